"""Key material for a cluster (DESIGN.md section 2, authentication).

A cluster's keys: one pairwise key K_ij = K_ji per pair of replicas, and per replica i a client
secret S_i from which the key that client c shares with replica i is derived
(``edgebft.protocol.replica.client_key(S_i, c)``). Each device receives only its own row: the
keys K_i* and S_i, never another replica's secrets. The host keeps the whole set, so it can act
as any client.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgebft.protocol.replica import client_key

KEY_BYTES = 32


@dataclass(frozen=True)
class ClusterKeys:
    """All key material of one cluster of ``n`` replicas."""

    pairwise: list[list[bytes]]  # pairwise[i][j] == pairwise[j][i]
    client_secrets: list[bytes]  # client_secrets[i] belongs to replica i
    control: list[bytes]         # control[i]: the host's key for node i's control channel

    @property
    def n(self) -> int:
        return len(self.client_secrets)

    def row(self, i: int) -> dict[str, object]:
        """Replica i's share, as hex strings for its edgebft.json."""
        return {
            "keys": [k.hex() for k in self.pairwise[i]],
            "client_secret": self.client_secrets[i].hex(),
            "control_key": self.control[i].hex(),
        }

    def client_keys(self, client: int) -> list[bytes]:
        """The keys client ``client`` shares with each replica, in replica order."""
        return [client_key(secret, client) for secret in self.client_secrets]


def save_keys(keys: ClusterKeys, path: Path) -> None:
    """Write every key of the cluster to ``path`` as JSON (hex), created with mode 0600: it is
    the host's copy, from which each device gets its row and each client its keys."""
    text = json.dumps({"pairwise": [[k.hex() for k in row] for row in keys.pairwise],
                       "client_secrets": [k.hex() for k in keys.client_secrets],
                       "control": [k.hex() for k in keys.control]})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def load_keys(path: Path) -> ClusterKeys:
    """The keys save_keys() wrote to ``path`` (OSError, ValueError, KeyError when it cannot)."""
    raw = json.loads(Path(path).read_text())
    return ClusterKeys(pairwise=[[bytes.fromhex(k) for k in row] for row in raw["pairwise"]],
                       client_secrets=[bytes.fromhex(k) for k in raw["client_secrets"]],
                       control=[bytes.fromhex(k) for k in raw["control"]])


def generate_keys(n: int, randbytes: Callable[[int], bytes] = os.urandom) -> ClusterKeys:
    """Fresh keys for ``n`` replicas from ``randbytes`` (os.urandom; the simulator passes a
    seeded generator's so a seed replays)."""
    pairwise = [[b""] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            key = randbytes(KEY_BYTES)
            pairwise[i][j] = key
            pairwise[j][i] = key
    return ClusterKeys(pairwise=pairwise, client_secrets=[randbytes(KEY_BYTES) for _ in range(n)],
                       control=[randbytes(KEY_BYTES) for _ in range(n)])
