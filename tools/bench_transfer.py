"""State transfer of a large ledger, measured on an emulated cluster.

Node 3 is killed; closed-loop clients on the other three write KEYS distinct keys (values of
~40 bytes); node 3 restarts from its flash, which holds the genesis state, and catches up by
state transfer. Printed: the time from its restart to executing past the sequence number the
others had reached, the bytes it fetched, the state's bytes on flash, and the flash bytes the
others wrote per committed request. Then node 3 is down again while KEYS / 20 keys are
rewritten: the second transfer fetches only the pages that changed.

Run: .venv/bin/python tools/bench_transfer.py [KEYS] [CLIENTS]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgebft.lab import session as lab
from edgebft.lab.broker import find_mosquitto

NODE = 3
POLL_S = 0.1
CATCH_UP_TIMEOUT_S = 120.0
STALL_S = 30.0


def fill(cluster: lab.LabCluster, keys: int, clients: int, rewrite: bool) -> int:
    """Put ``keys`` distinct keys (with other values when ``rewrite``, spread over the key
    space of a first fill of 20 times as many); the number of requests committed."""

    def op(c: int, i: int) -> list[Any]:
        n = (i * clients + c) % keys * (20 if rewrite else 1)
        return ["put", f"key{n:06d}", ("w" if rewrite else "v") * 40]

    work = cluster.workload(clients, ops=op)
    work.start()
    try:
        done, last, moved = 0, 0, time.monotonic()
        while done < keys:
            time.sleep(POLL_S)
            done = sum(1 for o in work.outcomes if o.outcome == "ok")
            print(f"\r  {done}/{keys} puts committed", end="", flush=True)
            if done > last:
                last, moved = done, time.monotonic()
            elif time.monotonic() - moved > STALL_S:
                raise SystemExit(f"\nno put committed for {STALL_S:.0f} s: see {cluster.path}")
        work.stop_issuing()
        work.drain(3.0)
    finally:
        work.close()
    print()
    return sum(1 for o in work.outcomes if o.outcome == "ok")


def catch_up(cluster: lab.LabCluster) -> tuple[float, int]:
    """Restart NODE; (seconds until it executed past the others' head, bytes it fetched)."""
    snap = lab.status(cluster, wait_s=0.5)
    head = max(s.get("last_exec", 0) for n, s in snap.items() if n != NODE)
    start = time.monotonic()
    print("  " + lab.heal(cluster))
    while time.monotonic() - start < CATCH_UP_TIMEOUT_S:
        s = lab.status(cluster, wait_s=POLL_S).get(NODE, {})
        if s.get("online") and s.get("last_exec", 0) >= head and s.get("boots", 0) >= 2:
            return time.monotonic() - start, int(s.get("transfer_bytes", 0))
    raise SystemExit(f"node {NODE} did not catch up within {CATCH_UP_TIMEOUT_S:.0f} s")


def state_bytes(cluster: lab.LabCluster, node: int) -> int:
    folder = Path(cluster.state["nodes"][node]["image"]) / "state"
    return sum(p.stat().st_size for p in folder.iterdir() if p.name[:3] in ("L.p", "C.p"))


def main() -> int:
    keys = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    with tempfile.TemporaryDirectory() as tmp:
        cluster = lab.up(broker="mosquitto" if find_mosquitto() else "auto",
                         out=Path(tmp) / "run", keys=keys)
        try:
            for rewrite in (False, True):
                print(lab.inject(cluster, "crash", NODE))
                before = lab.status(cluster, wait_s=0.5)[0].get("store", {}).get("bytes", 0)
                puts = keys // 20 if rewrite else keys
                committed = fill(cluster, puts, clients, rewrite)
                after = lab.status(cluster, wait_s=0.5)[0].get("store", {}).get("bytes", 0)
                seconds, fetched = catch_up(cluster)
                size = state_bytes(cluster, 0)
                written = after - before
                print(f"{'rewrite' if rewrite else 'fill'}: {puts} puts, state {size} B on "
                      f"flash; node {NODE} caught up in {seconds:.2f} s, fetched {fetched} B "
                      f"({fetched / size:.2f} of the state); node 0 wrote "
                      f"{written / max(committed, 1):.0f} B of flash per committed request")
        finally:
            lab.down(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
