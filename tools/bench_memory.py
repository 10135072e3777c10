"""Heap a node's code and a replica take on the MicroPython Unix port.

First the node's code: the heap and the interned strings (qstrs) that importing the runtime
from a ROMFS image takes, as on a node. MicroPython's qstr pools double in size (the first
holds QSTR_FIRST_POOL_ENTRIES), and each entry takes ~11 bytes whether used or not: one qstr
past the pools' room allocates a pool twice the last (the sixth, 640 entries, was ~7 KB).
A running node interns QSTRS_AT_RUNTIME more than the import, so the import's room is the
pools' less those.

Then a ledger page of PAGE_ENTRIES entries (10,000 keys over 256 pages hold ~39 each): the
bytes allocated and the microseconds taken by a get that misses the page cache (reading the
page from flash and the offsets of its entries), a get that hits it, and a put that replaces
an entry then writes its page (splicing the entry into the page's bytes, hashing the page's
old and new bytes for the digest, writing the file), as a ledger put over 10,000 keys costs
(its page is evicted before the next touches it): the work of a request's ledger operations.

Then, for each checkpoint interval K: the bytes one Replica allocates when built (its
preallocated log, oplog and tables), and the most its live state (log, checkpoints, bodies,
reply cache) grows above that while four replicas in one MicroPython process commit requests
(measured after a collection every 8 requests; per replica), and the bytes they allocate per
request (collection off while the 8 run; per replica): what the garbage collector of a node
sweeps up, so its share of the node's CPU.

Run: .venv/bin/python tools/bench_memory.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from edgebft.devices.image import build_lib, build_rom
from edgebft.devices.micropython import find_micropython

QSTR_FIRST_POOL_ENTRIES = 20  # pools of 20, 40, 80, 160 ... entries (measured)
QSTR_ENTRY_BYTES = 11  # measured: the sixth pool, 640 entries, a 7,104-byte block
# Measured: with names added to the runtime, `edgebft demo --nemesis none` peaked at 82-83 KB
# per node with 617 qstrs at import and at 89-90 KB with 618 (five pools hold 620).
QSTRS_AT_RUNTIME = 3


def qstr_room(pools: int) -> int:
    """The qstrs ``pools`` pools hold."""
    return QSTR_FIRST_POOL_ENTRIES * (2 ** pools - 1)

PAGE_ENTRIES = 40
PAGE_SCRIPT = r'''
import gc, sys, time
from edgebft.firmware.store import Flash
from edgebft.protocol.pagestore import PageStore
store = PageStore(Flash("page-flash"), "L", 1)
n = int(sys.argv[1])
for i in range(n):
    store.put("key%d" % (i * 256 + 7), [i, "v%d" % i])
store.flush()
key = "key%d" % (n // 2 * 256 + 7)
def miss():
    store.cache.clear()
    store.get(key)
def put():
    store.put(key, [n, "v"])
    store.flush()
def cost(f):
    gc.collect(); gc.disable(); before = gc.mem_alloc(); f()
    allocated = gc.mem_alloc() - before; gc.enable(); gc.collect()
    t = time.ticks_us()
    for _ in range(200):
        f()
    return allocated, time.ticks_diff(time.ticks_us(), t) // 200
print(len(store.flash.read(store.file_at(0))), *cost(miss), *cost(lambda: store.get(key)),
      *cost(put))
'''

IMPORT_SCRIPT = r'''
import gc, micropython, os, sys, uctypes, vfs
address, size = os.getenv("EDGEBFT_ROM").split(":")
vfs.mount(vfs.VfsRom(uctypes.bytearray_at(int(address), int(size))), "/rom")
sys.path.insert(0, "/rom/lib")
gc.collect(); before = gc.mem_alloc()
from edgebft.firmware import runtime
gc.collect(); print("heap", gc.mem_alloc() - before)
micropython.qstr_info()
'''

SCRIPT = r'''
import gc, hashlib, sys
from edgebft.firmware.store import Flash
from edgebft.protocol import replica as rp
from edgebft.protocol.client import ClientCore
from edgebft.protocol.stake import Stake
K = int(sys.argv[1]); REQUESTS = int(sys.argv[2]); N = 4; CLIENTS = 8
stake = Stake([1] * N)
keys = [[hashlib.sha256(bytes([min(i, j), max(i, j)])).digest() for j in range(N)]
        for i in range(N)]
secrets = [hashlib.sha256(bytes([i])).digest() for i in range(N)]
genesis = {"acct*": [CLIENTS, 1000000]}  # acct<c> owned by client c
gc.collect(); base = gc.mem_alloc()
rs = [rp.Replica(i, stake, keys[i], secrets[i], genesis=genesis, checkpoint_interval=K,
                 flash=Flash("flash-%d-%d" % (K, i))) for i in range(N)]
gc.collect(); built = (gc.mem_alloc() - base) // N
clients = [ClientCore(c, stake, [rp.client_key(secrets[i], c) for i in range(N)])
           for c in range(CLIENTS)]
gc.collect(); start = gc.mem_alloc()
queue = []; peak = 0; allocated = 0
for k in range(REQUESTS):
    c = clients[k % CLIENTS]
    wire = c.request(["transfer", "acct%d" % (k % CLIENTS), "acct%d" % ((k + 1) % CLIENTS), 1]
                     if k % 2 else ["put", "k%d" % (k % 32), k])
    for i in range(N):
        queue.append((i, wire))
    if k % CLIENTS == CLIENTS - 1:  # a burst of requests, then let the cluster run
        gc.disable(); before = gc.mem_alloc()
        while queue:
            to, w = queue.pop(0)
            r = rs[to]
            r.receive(w, 0)
            rp.route(r.out, lambda out: queue.extend([(j, out) for j in range(N) if j != to]),
                     lambda j, out: None, lambda c, out: None)
            del r.events[:]
        allocated += gc.mem_alloc() - before; gc.enable()
        gc.collect()
        peak = max(peak, (gc.mem_alloc() - start) // N)
print(K, built, peak, allocated // (N * REQUESTS), rs[0].last_exec, rs[0].h)
'''


def import_cost(lib: Path, tmp: Path) -> tuple[int, int, int]:
    """(heap bytes, qstrs, qstr pools) after importing the runtime from a ROMFS image of
    ``lib``, as edgebft.devices.romboot runs a node."""
    rom = tmp / "rom.img"
    rom.write_bytes(build_rom(lib))
    script = tmp / "import_cost.py"
    script.write_text(IMPORT_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "edgebft.devices.romboot", str(rom), "-X",
                           "heapsize=1m", str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp, check=True)
    heap = int(re.search(r"heap (\d+)", done.stdout).group(1))
    pools = re.search(r"n_pool=(\d+), n_qstr=(\d+)", done.stdout)
    return heap, int(pools.group(2)), int(pools.group(1))


def main() -> int:
    micropython = find_micropython()
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_lib(Path(tmp) / "lib")
        heap, qstrs, pools = import_cost(lib, Path(tmp))
        room = qstr_room(pools) - QSTRS_AT_RUNTIME - qstrs
        next_pool = QSTR_FIRST_POOL_ENTRIES * 2 ** pools
        print(f"importing the runtime: {heap} B of heap, {qstrs} qstrs in {pools} pools "
              f"(they hold {qstr_room(pools)}; a running node interns {QSTRS_AT_RUNTIME} more: "
              f"room for {room} before pool {pools + 1}, {next_pool} entries, "
              f"~{next_pool * QSTR_ENTRY_BYTES // 1024} KB)")
        page_script = Path(tmp) / "bench_page_mp.py"
        page_script.write_text(PAGE_SCRIPT)
        done = subprocess.run([str(micropython), "-X", "heapsize=160k", str(page_script),
                               str(PAGE_ENTRIES)], env={"MICROPYPATH": f"{lib}:.frozen"},
                              capture_output=True, text=True, timeout=120, cwd=tmp, check=True)
        size, miss_b, miss_us, hit_b, hit_us, put_b, put_us = done.stdout.split()
        print(f"a page of {PAGE_ENTRIES} entries, {size} B: a get that misses the cache "
              f"allocates {miss_b} B in {miss_us} us, one that hits {hit_b} B in {hit_us} us; "
              f"a put that replaces an entry and writes its page {put_b} B in {put_us} us")
        script = Path(tmp) / "bench_memory_mp.py"
        script.write_text(SCRIPT)
        print(f"{'K':>4} {'built (B)':>10} {'live above (B)':>15} {'allocated (B/req)':>18} "
              f"{'executed':>9} {'stable':>7}")
        for k in (8, 16, 32):
            done = subprocess.run([str(micropython), "-X", "heapsize=4m", str(script), str(k),
                                   "400"], env={"MICROPYPATH": f"{lib}:.frozen"},
                                  capture_output=True, text=True, timeout=300, cwd=tmp)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            k_, built, peak, allocated, executed, stable = done.stdout.split()
            print(f"{k_:>4} {built:>10} {peak:>15} {allocated:>18} {executed:>9} {stable:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
