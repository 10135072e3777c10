"""Key material for a cluster (DESIGN.md section 2, authentication).

A cluster's keys: one pairwise key K_ij = K_ji per pair of replicas, and per replica i a client
secret S_i from which the key that client c shares with replica i is derived
(``edgebft.protocol.replica.client_key(S_i, c)``). Each device receives only its own row: the
keys K_i* and S_i, never another replica's secrets. The host keeps the whole set, so it can act
as any client.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

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
