"""TLS between a cluster and its broker: the cluster's own certificate authority, the broker's
certificate, and how every party checks it (issue 12).

The ACL (broker_auth.py) decides who may say what; TLS keeps the network between the boards and
the broker from reading or rewriting what they say (WiFi is a shared medium). Each cluster gets
its own CA, made at ``cluster up`` (or by a bench run) with the ``cryptography`` library: an
ECDSA P-256 key and a self-signed CA certificate, and a broker certificate it signs for the
addresses the broker answers on (subjectAltName: 127.0.0.1, ::1 and localhost in the lab). The
CA's private key signs once and is then thrown away: nothing else can ever be signed by it.

Files in the broker's folder: ``ca.crt`` (PEM: host programs, mosquitto), ``ca.der`` (DER: a
node's image, what MicroPython's ``ssl`` loads), ``server.crt`` and ``server.key`` (mode 0600,
the broker's). Everybody verifies the broker's certificate against the CA and its name; the
broker does not ask for client certificates (clients prove who they are with the ACL's
passwords, now sent inside the TLS session).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_PEM = "ca.crt"
CA_DER = "ca.der"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
NAMES = ("127.0.0.1", "::1", "localhost")  # what the lab's broker answers on
VALID_DAYS = 3650


@dataclass(frozen=True)
class BrokerTLS:
    """The TLS material of one cluster's broker, in ``folder``."""

    folder: Path

    @cached_property
    def ca_der(self) -> bytes:
        """The CA certificate, DER: what nodes (MicroPython's ``ssl``) and host programs
        trust; read once."""
        return (self.folder / CA_DER).read_bytes()

    def mosquitto_lines(self) -> list[str]:
        """The mosquitto.conf lines that make the listener before them speak TLS only."""
        return [f"cafile {self.folder / CA_PEM}", f"certfile {self.folder / SERVER_CERT}",
                f"keyfile {self.folder / SERVER_KEY}", "tls_version tlsv1.2"]

    @classmethod
    def create(cls, folder: Path, cluster: str, names: tuple[str, ...] = NAMES) -> BrokerTLS:
        """Make a CA for ``cluster`` and a broker certificate for ``names`` in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS))
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgebft {cluster} CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(valid[0]).not_valid_after(valid[1])
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                           False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        server = (x509.CertificateBuilder()
                  .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                  .issuer_name(ca_name).public_key(key.public_key())
                  .serial_number(x509.random_serial_number())
                  .not_valid_before(valid[0]).not_valid_after(valid[1])
                  .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]),
                                 critical=False)
                  .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                 critical=True)
                  .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID
                                                        .SERVER_AUTH]), critical=False)
                  .sign(ca_key, hashes.SHA256()))
        (folder / CA_PEM).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        (folder / CA_DER).write_bytes(ca.public_bytes(serialization.Encoding.DER))
        (folder / SERVER_CERT).write_bytes(server.public_bytes(serialization.Encoding.PEM))
        key_path = folder / SERVER_KEY
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        return cls(folder)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def client_context(ca_der: bytes) -> ssl.SSLContext:
    """An SSLContext that trusts only the CA certificate ``ca_der`` and checks the broker's
    name against its certificate (TLS 1.2 or later)."""
    context = ssl.create_default_context(cadata=ca_der)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
