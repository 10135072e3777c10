"""A cluster of real boards, as its owner describes it in ``cluster.toml``.

    [cluster]
    name = "greenhouse"          # topics ebft/<name>/...; letters, digits, - and _
    stake = [1, 1, 1, 1]         # optional: equal stakes
    checkpoint_interval = 8      # optional
    watchdog_s = 30              # optional: each board's watchdog (default 0: off)

    [broker]                     # the site's MQTT broker, as the boards reach it
    host = "192.168.1.10"
    port = 1883                  # optional
    acl = false                  # optional: the broker enforces edgebft's identities and ACL
    ca = "broker-ca.crt"         # optional: TLS, trusting this CA (PEM), relative to this file

    [wifi]                       # optional (absent: the board is already on the network)
    ssid = "greenhouse"
    password = "..."

    [[node]]                     # one per board, ids 0 .. n-1
    id = 0
    board = "esp32"              # edgebft boards
    port = "/dev/ttyUSB0"        # or socket://HOST:PORT, rfc2217://HOST:PORT

The cluster's secrets live beside it in ``<stem>.keys.json`` (mode 0600; ``edgebft keys new``),
never in cluster.toml, which can be shared. A node's configuration (its edgebft.json) holds
only its own row of keys and, on a broker with ACLs, its own password.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from edgebft.boards import BoardError, board
from edgebft.devices.keys import ClusterKeys, load_keys
from edgebft.lab.bench import ACL_CLIENTS
from edgebft.lab.broker import Login
from edgebft.lab.broker_auth import BrokerAuth, node_identity
from edgebft.lab.workload import genesis
from edgebft.protocol.replica import CHECKPOINT_INTERVAL

_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


class SiteError(ValueError):
    """cluster.toml or its keys are missing or wrong; the message is one line for a user."""


@dataclass(frozen=True)
class SiteNode:
    id: int
    board: str
    port: str


@dataclass(frozen=True)
class Site:
    """A parsed cluster.toml (``path``)."""

    path: Path
    name: str
    stake: list[int]
    checkpoint_interval: int
    broker: dict[str, Any]
    wifi: dict[str, str] | None
    nodes: list[SiteNode]
    watchdog_s: float = 0.0

    @property
    def keys_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".keys.json")

    def keys(self) -> ClusterKeys:
        """The cluster's keys; SiteError (naming ``edgebft keys new``) when there are none."""
        try:
            keys = load_keys(self.keys_path)
        except FileNotFoundError:
            raise SiteError(f"no keys for {self.path}: make them with 'edgebft keys new "
                            f"--cluster {self.path}'") from None
        except (OSError, ValueError, KeyError) as e:
            raise SiteError(f"{self.keys_path}: not a keys file ({e})") from None
        if keys.n != len(self.nodes):
            raise SiteError(f"{self.keys_path} holds keys for {keys.n} nodes, {self.path} "
                            f"lists {len(self.nodes)}")
        return keys

    def node(self, i: int) -> SiteNode:
        if not 0 <= i < len(self.nodes):
            raise SiteError(f"no node {i} in {self.path}: its nodes are 0..{len(self.nodes) - 1}")
        return self.nodes[i]

    def login(self, identity: str, keys: ClusterKeys) -> Login:
        """How ``identity`` logs in to the site's broker (credentials with ACLs, TLS)."""
        auth = BrokerAuth(self.name, keys, ACL_CLIENTS) if self.broker["acl"] else None
        ca = self.broker.get("ca")
        return Login(None if auth is None else auth.credentials(identity),
                     None if ca is None else _ca_der(self.path.parent / ca))

    def node_config(self, i: int, keys: ClusterKeys) -> dict[str, Any]:
        """Node ``i``'s edgebft.json: its id, the cluster, its row of keys, the broker entry
        with its own login, the WiFi, the genesis the lab uses, its board's LED and the
        watchdog (firmware/board.py)."""
        node = self.node(i)
        login = self.login(node_identity(i), keys)
        return {"node": i, "cluster": self.name, "stake": self.stake,
                "broker": login.device_entry(self.broker["host"], self.broker["port"]),
                "genesis": genesis(), "checkpoint_interval": self.checkpoint_interval,
                "wifi": self.wifi, "led": board(node.board).led,
                "watchdog_ms": round(self.watchdog_s * 1000), **keys.row(i)}


def _ca_der(path: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)
    except (OSError, ValueError) as e:
        raise SiteError(f"{path}: not a PEM certificate ({e})") from None


def load_site(path: Path) -> Site:
    """Parse ``path``; SiteError with one line saying what is wrong."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise SiteError(f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SiteError(f"{path}: not TOML ({e})") from None
    try:
        cluster, broker = raw["cluster"], raw["broker"]
        name = str(cluster["name"])
        nodes = [SiteNode(int(n["id"]), str(n["board"]), str(n["port"]))
                 for n in raw.get("node", [])]
        stake = [int(w) for w in cluster.get("stake", [1] * len(nodes))]
        entry = {"host": str(broker["host"]), "port": int(broker.get("port", 1883)),
                 "acl": bool(broker.get("acl", False))}
        if "ca" in broker:
            entry["ca"] = str(broker["ca"])
        wifi = raw.get("wifi")
        if wifi is not None:
            wifi = {"ssid": str(wifi["ssid"]), "password": str(wifi.get("password", ""))}
        interval = int(cluster.get("checkpoint_interval", CHECKPOINT_INTERVAL))
        watchdog_s = float(cluster.get("watchdog_s", 0))
    except KeyError as e:
        raise SiteError(f"{path}: missing {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise SiteError(f"{path}: {e}") from None
    if not _NAME.fullmatch(name):
        raise SiteError(f"{path}: cluster name {name!r}: 1-32 letters, digits, - or _")
    if len(nodes) < 4:
        raise SiteError(f"{path}: {len(nodes)} [[node]] entries; a cluster needs at least 4")
    if sorted(n.id for n in nodes) != list(range(len(nodes))):
        raise SiteError(f"{path}: node ids must be 0..{len(nodes) - 1}, each once")
    if len(stake) != len(nodes) or min(stake) < 0 or sum(stake) <= 0:
        raise SiteError(f"{path}: stake needs {len(nodes)} non-negative values, not all 0")
    for n in nodes:
        try:
            board(n.board)
        except BoardError as e:
            raise SiteError(f"{path}: node {n.id}: {e}") from None
    if not (watchdog_s == 0 or 1 <= watchdog_s <= 3600):
        raise SiteError(f"{path}: watchdog_s {watchdog_s:g}: 0 (off) or 1 to 3600 seconds")
    return Site(path, name, stake, interval, entry, wifi, sorted(nodes, key=lambda n: n.id),
                watchdog_s)
