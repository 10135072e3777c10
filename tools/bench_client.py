"""Latency of the application client (edgebft.client) on an emulated cluster: ordered puts and
ordered gets, one client, one request at a time, against an idle 4-node cluster on mosquitto.

Run: .venv/bin/python tools/bench_client.py [REQUESTS per kind, 300]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from edgebft import Client
from edgebft.lab import session as lab
from edgebft.lab.metrics import percentile


def main() -> int:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    with tempfile.TemporaryDirectory() as tmp:
        cluster = lab.up(broker="mosquitto", out=Path(tmp) / "run")
        try:
            with Client.connect(cluster.path, client_id=100) as ledger:
                for name, call in (("put", lambda i: ledger.put(f"k{i % 50}", i)),
                                   ("get", lambda i: ledger.get(f"k{i % 50}"))):
                    ms = []
                    for i in range(requests):
                        t = time.perf_counter()
                        call(i)
                        ms.append((time.perf_counter() - t) * 1000)
                    ms.sort()
                    print(f"ordered {name}: {requests} requests, p50 "
                          f"{percentile(ms, 0.5):.2f} ms, p99 {percentile(ms, 0.99):.2f} ms")
        finally:
            lab.down(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
