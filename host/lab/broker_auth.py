"""Who may say what on a cluster's broker: MQTT identities, their passwords, and the ACL.

Every byte from the broker is hostile input, and the nodes check every message they read; the
broker's own access control is the outer wall: it refuses connections without credentials,
and lets each identity publish only its own topics, so a sensor or a laptop on the site's
broker can no longer write into the cluster's traffic at all (issue 12).

Identities of cluster ``c`` (topics under ``ebft/c/``, protocol/SPEC.md):

- ``node<i>``: publishes ``from/i``, ``to/+/from/i``, ``status/i``, ``event/i`` and ``rep/+``;
  reads ``from/+`` (it subscribes to each peer's ``from/j``), ``to/i/from/+``, ``req/+``,
  ``status/+`` and ``ctl/i``;
- ``host``: the lab's own tools (control commands, the observer, the workload, which speaks
  for many client ids on one connection): reads and writes every topic of the cluster;
- ``<k>`` (a client id, decimal): publishes ``req/k`` and reads ``rep/k`` only (mosquitto's
  ``%u`` patterns).

Passwords are derived from the cluster's keys (HMAC-SHA256 of a label), so nothing new has to
be stored: a node's from its control key, a client's from the key it shares with replica 0,
the host's from node 0's control key. Anonymous connections are refused. The password file
holds PBKDF2-SHA512 hashes in mosquitto's own format (``$7$``, as ``mosquitto_passwd`` writes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from edgebft.devices.keys import ClusterKeys

HOST = "host"
PASSWORD_FILE = "passwords"
ACL_FILE = "acl"
_PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for $7$
_SALT_BYTES = 12


def node_identity(i: int) -> str:
    return f"node{i}"


def _derive(key: bytes, label: str) -> str:
    return hmac.new(key, label.encode(), hashlib.sha256).hexdigest()[:32]


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """``password`` hashed as mosquitto 2 stores it: ``$7$iterations$salt$hash`` (base64)."""
    salt = os.urandom(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    return (f"$7${_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


@dataclass(frozen=True)
class BrokerAuth:
    """The identities of cluster ``cluster`` (keys ``keys``) and ``clients`` client ids
    (0 .. clients - 1) on its broker."""

    cluster: str
    keys: ClusterKeys
    clients: int

    def password(self, identity: str) -> str:
        """The password of ``identity`` (node<i>, host, or a client id); ValueError if the
        cluster has no such identity."""
        if identity == HOST:
            return _derive(self.keys.control[0], "mqtt password: host")
        if identity.startswith("node") and identity[4:].isdigit():
            i = int(identity[4:])
            if i < self.keys.n:
                return _derive(self.keys.control[i], "mqtt password: node")
        elif identity.isdigit() and int(identity) < self.clients:
            return _derive(self.keys.client_keys(int(identity))[0], "mqtt password: client")
        raise ValueError(f"no MQTT identity {identity!r} in cluster {self.cluster}")

    def credentials(self, identity: str) -> tuple[str, str]:
        """(username, password) of ``identity``."""
        return identity, self.password(identity)

    def identities(self) -> list[str]:
        return ([HOST] + [node_identity(i) for i in range(self.keys.n)]
                + [str(k) for k in range(self.clients)])

    def password_file(self) -> str:
        """mosquitto's password_file: one ``user:hash`` line per identity."""
        return "".join(f"{who}:{mosquitto_hash(self.password(who))}\n"
                       for who in self.identities())

    def acl_file(self) -> str:
        """mosquitto's acl_file: what each identity may read and write (the module's list)."""
        p = f"ebft/{self.cluster}/"
        lines = [f"user {HOST}", f"topic readwrite {p}#", ""]
        for i in range(self.keys.n):
            lines += [f"user {node_identity(i)}"]
            lines += [f"topic write {p}{t}" for t in (f"from/{i}", f"to/+/from/{i}",
                                                        f"status/{i}", f"event/{i}", "rep/+")]
            lines += [f"topic read {p}{t}" for t in ("from/+", f"to/{i}/from/+", "req/+",
                                                       "status/+", f"ctl/{i}")]
            lines.append("")
        # Clients: %u is the username, a client id; for a node's or the host's username the
        # topic names no client, and replicas drop what it carries unread.
        lines += [f"pattern write {p}req/%u", f"pattern read {p}rep/%u", ""]
        return "\n".join(lines)

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write the password and ACL files into ``folder`` (mode 0600); return their paths."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = (folder / PASSWORD_FILE, folder / ACL_FILE)
        for path, text in zip(paths, (self.password_file(), self.acl_file()), strict=True):
            path.write_text(text)
            path.chmod(0o600)
        return paths
