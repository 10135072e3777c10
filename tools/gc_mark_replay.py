"""How deep MicroPython's mark stack must be for a node's heap, replayed from one collection.

MicroPython marks the heap depth first with a stack of MICROPY_ALLOC_GC_STACK_SIZE block
numbers (64 by default, the Unix port's and ESP32's). A block whose children find the stack
full is marked but not traced; at the end of the mark phase the collector then traces every
marked block again (gc_deal_with_stack_overflow), until a pass overflows no more. So a heap
whose traversal overflows at all is marked about twice per collection.

This runs `edgebft bench` (64 closed-loop clients over 10,000 keys), attaches gdb to one
node's process once it has run WAIT_S seconds, and at the start of its next collection dumps
the heap and its allocation table, then records the blocks the collection marks from its
roots, in order (each call of gc_mark_subtree from gc_collect_root). It then replays the mark
phase offline (children pushed in word order, popped last first, the stack bounded) for
several stack sizes, and prints the overflow pushes, the tracing passes and the words scanned
against an unbounded stack. On the Unix port the replay with 64 entries gave the overflow
pushes a breakpoint in gc_mark_subtree counted in the same collection (168 and 168).

Needs gdb and the symbols of the MicroPython the package runs (the wheel has them), and the
right to ptrace the node (root, or kernel.yama.ptrace_scope=0).

Run: .venv/bin/python tools/gc_mark_replay.py [NODE] [WAIT_S]
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STACKS = (64, 96, 128, 160, 192, 256)
BYTES_PER_BLOCK = 32  # the Unix port's GC block (64-bit)
WORD = 8

GDB_SCRIPT = r'''
import gdb, json, os
out = os.environ["REPLAY_OUT"]
gdb.execute("set pagination off")
gdb.execute("handle all nostop noprint pass")
gdb.Breakpoint("gc_collect")
gdb.execute("continue")
area = "mp_state_ctx.mem.area"
start = int(gdb.parse_and_eval(area + ".gc_pool_start"))
end = int(gdb.parse_and_eval(area + ".gc_pool_end"))
atb = int(gdb.parse_and_eval(area + ".gc_alloc_table_start"))
atb_len = int(gdb.parse_and_eval(area + ".gc_alloc_table_byte_len"))
inferior = gdb.selected_inferior()
open(out + "/heap.bin", "wb").write(bytes(inferior.read_memory(start, end - start)))
open(out + "/atb.bin", "wb").write(bytes(inferior.read_memory(atb, atb_len)))
marker = gdb.Breakpoint("gc_mark_subtree")
done = gdb.Breakpoint("gc_collect_end")
roots = []
while True:
    gdb.execute("continue")
    frame = gdb.selected_frame()
    if frame.name() == "gc_collect_end":
        break
    if frame.older().name() == "gc_collect_root":
        roots.append(int(gdb.parse_and_eval("$rdi")))
json.dump({"start": start, "roots": roots}, open(out + "/roots.json", "w"))
gdb.execute("detach")
'''


class Heap:
    """A heap dump: its head blocks (block -> length in blocks) and, per head, the heads its
    words point at, in word order (block-aligned pointers into the pool, as VERIFY_PTR)."""

    def __init__(self, pool: bytes, atb: bytes, start: int) -> None:
        n = len(pool) // BYTES_PER_BLOCK
        kind = [(atb[b // 4] >> (2 * (b % 4))) & 3 for b in range(n)]  # 1 head, 2 tail, 3 mark
        self.heads: dict[int, int] = {}
        b = 0
        while b < n:
            if kind[b] in (1, 3):
                length = 1
                while b + length < n and kind[b + length] == 2:
                    length += 1
                self.heads[b] = length
                b += length
            else:
                b += 1
        self.children: dict[int, list[int]] = {}
        for head, length in self.heads.items():
            words = struct.unpack_from(f"<{length * BYTES_PER_BLOCK // WORD}Q", pool,
                                       head * BYTES_PER_BLOCK)
            self.children[head] = [
                (w - start) // BYTES_PER_BLOCK for w in words
                if start <= w < start + len(pool) and (w - start) % BYTES_PER_BLOCK == 0
                and (w - start) // BYTES_PER_BLOCK in self.heads]

    def mark(self, roots: list[int], stack_size: int | None) -> tuple[int, int, int]:
        """Replay a mark phase from ``roots`` with a stack of ``stack_size`` (None: unbounded).
        Returns (overflow pushes, tracing passes after the first, words scanned)."""
        marked: set[int] = set()
        overflows = 0
        overflowed = False
        words = 0

        def subtree(block: int) -> None:
            nonlocal overflows, overflowed, words
            stack: list[int] = []
            while True:
                words += self.heads[block] * BYTES_PER_BLOCK // WORD
                for child in self.children[block]:
                    if child not in marked:
                        marked.add(child)
                        if stack_size is None or len(stack) < stack_size:
                            stack.append(child)
                        else:
                            overflows += 1
                            overflowed = True
                if not stack:
                    return
                block = stack.pop()

        for root in roots:
            if root in self.heads and root not in marked:
                marked.add(root)
                subtree(root)
        passes = 0
        while overflowed:
            overflowed = False
            passes += 1
            for block in sorted(marked):
                subtree(block)
        return overflows, passes, words


def record(node: int, wait_s: float, out: Path) -> None:
    """Run a bench and record one collection of ``node`` into ``out``."""
    run = out / "run"
    bench = subprocess.Popen([sys.executable, "-m", "edgebft", "bench", "--clients", "64",
                              "--keys", "10000", "--duration", str(int(wait_s) + 15), "--out",
                              str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = run / "logs" / f"node{node}.log"
        deadline = time.monotonic() + 60
        while not (log.exists() and "up:" in log.read_text(errors="replace")):
            if time.monotonic() > deadline or bench.poll() is not None:
                raise SystemExit(f"node {node} did not come up (see {run})")
            time.sleep(0.2)
        time.sleep(wait_s)
        rom = run / "nodes" / f"node{node}" / "rom.img"
        pid = subprocess.run(["pgrep", "-f", f"romboot {rom}"], capture_output=True,
                             text=True).stdout.split()
        if not pid:
            raise SystemExit(f"no process for node {node}")
        script = out / "replay_gdb.py"
        script.write_text(GDB_SCRIPT)
        subprocess.run(["gdb", "-p", pid[0], "-batch", "-x", str(script)], check=True,
                       capture_output=True, timeout=120,
                       env={**os.environ, "REPLAY_OUT": str(out)})
    finally:
        bench.wait()


def main() -> int:
    node = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    wait_s = float(sys.argv[2]) if len(sys.argv) > 2 else 8.0
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        out = Path(tmp)
        record(node, wait_s, out)
        taken = json.loads((out / "roots.json").read_text())
        heap = Heap((out / "heap.bin").read_bytes(), (out / "atb.bin").read_bytes(),
                    taken["start"])
    roots = taken["roots"]
    _, _, unbounded = heap.mark(roots, None)
    print(f"node {node}: {len(heap.heads)} heads, {len(roots)} roots traced, "
          f"{unbounded} words to mark")
    print(f"{'stack':>6} {'overflow pushes':>16} {'extra passes':>13} {'words marked':>13}")
    for size in STACKS:
        overflows, passes, words = heap.mark(roots, size)
        print(f"{size:>6} {overflows:>16} {passes:>13} {words:>7} ({words / unbounded:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
