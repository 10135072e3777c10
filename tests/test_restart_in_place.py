"""firmware/runtime.py's restart in place, on MicroPython: a node that runs out of heap is
dropped whole before the next one is built, and running out of heap while building one is a
restart too, not the end of the process."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path
from typing import Any

from conftest import run_mp
from edgebft.devices.image import build_image
from edgebft.devices.keys import generate_keys
from edgebft.lab.bench import BenchOptions, node_config
from edgebft.protocol.stake import Stake

_LIVES = """
import asyncio, gc
from edgebft.firmware import runtime

free = []  # the heap free when each node is built, after a collection


class Done(Exception):
    pass


class Node:
    gc_threshold = 0

    def __init__(self, restarts):
        gc.collect()
        free.append(gc.mem_free())
        if restarts == 1:
            raise MemoryError  # building this one ran out of heap
        self.tables = bytearray(48 * 1024)  # what a node under load holds

    async def run(self):
        async def link():  # the link task runs out of heap, as it did in the field
            await asyncio.sleep_ms(1)
            raise MemoryError
        await asyncio.create_task(link())


def build(restarts):
    if restarts == 4:
        raise Done
    return Node(restarts)


try:
    runtime.run_lives(build)
except Done:
    print(free)
"""


def test_a_node_out_of_heap_is_gone_before_the_next_is_built(micropython: Path,
                                                             mp_lib: Path) -> None:
    """Four lives: the second runs out of heap while being built, the others in their link
    task. The process goes on after the failed build (when main() built the node outside
    its handler, that MemoryError ended the process: a node gone for good, seen under 256
    clients), and each node is built in the heap the first found: none holds the 48 KB of
    the one before (a stale slot of the frame that ran the old node can keep it alive)."""
    proc = run_mp(micropython, mp_lib, _LIVES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("restarting from flash") == 4
    free = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert len(free) == 4, free
    assert all(abs(f - free[0]) < 2048 for f in free), free


_TIMERS_OUT_OF_HEAP = """
import gc
from edgebft.firmware import board, runtime

free = []


class Done(Exception):
    pass


def build(restarts):
    gc.collect()
    free.append(gc.mem_free())
    if restarts == 2:
        raise Done
    node = runtime.Runtime(runtime.load_config(), board.Led(None), board.Watchdog(0))
    ticks = [0]
    tick = node.node.tick

    def tick_until_out_of_heap(now_ms, connected):
        ticks[0] += 1
        if ticks[0] == 25:  # half a second in, connected and subscribed
            raise MemoryError
        tick(now_ms, connected)

    node.node.tick = tick_until_out_of_heap
    return node


try:
    runtime.run_lives(build)
except Done:
    print(free)
"""


def test_a_node_whose_timers_run_out_of_heap_restarts_with_its_heap_whole(
        micropython: Path, broker: Any, tmp_path: Path) -> None:
    """A real node (its image, the suite's broker) whose timers task runs out of heap, twice:
    each time the node restarts, and the next is built in the heap the one before was, but
    for what the first life loaded on first use (asyncio's modules, ~4 KB). Before, that
    task died alone ("Task exception wasn't retrieved"): the node ran on with no ticks, and
    asyncio's context for the message kept the dead task, so the whole node, past its
    restart."""
    keys = generate_keys(4)
    config = node_config(0, "restart-test", Stake([1] * 4), broker, keys.row(0),
                         BenchOptions())
    image = build_image(tmp_path / "node0", config)
    proc = subprocess.run([str(micropython), "-X", "heapsize=256k", "-c", _TIMERS_OUT_OF_HEAP],
                          cwd=image, env={"MICROPYPATH": "lib:.frozen"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("restarting from flash") == 2
    assert "wasn't retrieved" not in proc.stdout
    free = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert len(free) == 3 and abs(free[2] - free[1]) < 1024 and free[0] - free[1] < 8192, free
