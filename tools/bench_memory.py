"""Heap a replica takes on the MicroPython Unix port, by checkpoint interval K.

For each K: the bytes one Replica allocates when built (its preallocated log, oplog and
tables), and the most its live state (log, checkpoints, bodies, reply cache) grows above that
while four replicas in one MicroPython process commit requests (measured after a collection
every 8 requests; per replica). Run: .venv/bin/python tools/bench_memory.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from edgebft.image import build_lib
from edgebft.micropython import find_micropython

SCRIPT = r'''
import gc, hashlib, sys
from edgebft.protocol import replica as rp
from edgebft.protocol.client import ClientCore
from edgebft.protocol.stake import Stake
K = int(sys.argv[1]); REQUESTS = int(sys.argv[2]); N = 4; CLIENTS = 8
stake = Stake([1] * N)
keys = [[hashlib.sha256(bytes([min(i, j), max(i, j)])).digest() for j in range(N)]
        for i in range(N)]
secrets = [hashlib.sha256(bytes([i])).digest() for i in range(N)]
genesis = {"acct%d" % a: 1000000 for a in range(16)}
gc.collect(); base = gc.mem_alloc()
rs = [rp.Replica(i, stake, keys[i], secrets[i], genesis=genesis, checkpoint_interval=K)
      for i in range(N)]
gc.collect(); built = (gc.mem_alloc() - base) // N
clients = [ClientCore(c, stake, [rp.client_key(secrets[i], c) for i in range(N)])
           for c in range(CLIENTS)]
gc.collect(); start = gc.mem_alloc()
queue = []; peak = 0
for k in range(REQUESTS):
    c = clients[k % CLIENTS]
    wire = c.request(["transfer", "acct%d" % (k % 16), "acct%d" % ((k + 1) % 16), 1]
                     if k % 2 else ["put", "k%d" % (k % 32), k])
    for i in range(N):
        queue.append((i, wire))
    if k % CLIENTS == CLIENTS - 1:  # a burst of requests, then let the cluster run
        while queue:
            to, w = queue.pop(0)
            r = rs[to]
            r.receive(w, 0)
            for dest, out in r.out:
                if dest == rp.TO_ALL:
                    for j in range(N):
                        if j != to:
                            queue.append((j, out))
            del r.out[:]
            del r.events[:]
        gc.collect()
        peak = max(peak, (gc.mem_alloc() - start) // N)
print(K, built, peak, rs[0].last_exec, rs[0].h)
'''


def main() -> int:
    micropython = find_micropython()
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_lib(Path(tmp))
        script = Path(tmp) / "bench_memory_mp.py"
        script.write_text(SCRIPT)
        print(f"{'K':>4} {'built (B)':>10} {'live above (B)':>15} {'executed':>9} {'stable':>7}")
        for k in (8, 16, 32):
            done = subprocess.run([str(micropython), "-X", "heapsize=2m", str(script), str(k),
                                   "400"], env={"MICROPYPATH": f"{lib}:.frozen"},
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            k_, built, peak, executed, stable = done.stdout.split()
            print(f"{k_:>4} {built:>10} {peak:>15} {executed:>9} {stable:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
