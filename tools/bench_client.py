"""Latency of the application client (edgebft.client) on an emulated cluster: ordered puts,
ordered gets and read-only gets (one round trip; the ratio to ordered gets is printed), one
client, one request at a time, against an idle 4-node cluster on mosquitto.

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
                p50 = {}
                for name, call in (
                        ("ordered put", lambda i: ledger.put(f"k{i % 50}", i)),
                        ("ordered get", lambda i: ledger.get(f"k{i % 50}", ordered=True)),
                        ("read-only get", lambda i: ledger.get(f"k{i % 50}"))):
                    ms = []
                    for i in range(requests):
                        t = time.perf_counter()
                        call(i)
                        ms.append((time.perf_counter() - t) * 1000)
                    ms.sort()
                    p50[name] = percentile(ms, 0.5)
                    print(f"{name}: {requests} requests, p50 {p50[name]:.2f} ms, p99 "
                          f"{percentile(ms, 0.99):.2f} ms")
                print(f"read-only / ordered get, p50: "
                      f"{p50['read-only get'] / p50['ordered get']:.2f}; reads {ledger.reads}")
        finally:
            lab.down(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
