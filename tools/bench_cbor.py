"""Time encode/decode of a typical message: our codec vs cbor2 on CPython, ours on MicroPython.

Usage: .venv/bin/python tools/bench_cbor.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cbor2

from edgebft.devices.image import build_lib
from edgebft.devices.micropython import HEAP_DEFAULT, find_micropython
from edgebft.protocol import cbor

# A pre-prepare: version, type, view, sequence, client, digest, batch of three requests.
MESSAGE = [1, 3, 2, 7, 1234, os.urandom(32), [os.urandom(50)] * 3]

_MP_CODE = """
import time
from edgebft.protocol import cbor
msg = [1, 3, 2, 7, 1234, bytes(32), [bytes(50)] * 3]
data = cbor.encode(msg)
def rate(fn, arg, seconds):
    n = 0
    t0 = time.ticks_ms()
    while time.ticks_diff(time.ticks_ms(), t0) < seconds * 1000:
        for _ in range(100):
            fn(arg)
        n += 100
    return n * 1000 / time.ticks_diff(time.ticks_ms(), t0)
print(rate(cbor.encode, msg, {seconds}), rate(cbor.decode, data, {seconds}))
"""


def rate(fn: Callable[[object], object], arg: object, seconds: float) -> float:
    """Calls of ``fn(arg)`` per second, measured for about ``seconds``."""
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(1000):
            fn(arg)
        n += 1000
    return n / (time.perf_counter() - t0)


def micropython_rates(seconds: float) -> tuple[float, float]:
    """(encode/s, decode/s) of our codec on the MicroPython Unix port at the device heap size."""
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_lib(Path(tmp))
        proc = subprocess.run(
            [str(find_micropython()), "-X", f"heapsize={HEAP_DEFAULT}", "-c",
             _MP_CODE.format(seconds=seconds)],
            env={"MICROPYPATH": f"{lib}:.frozen"}, capture_output=True, text=True, check=True,
        )
    enc, dec = proc.stdout.split()
    return float(enc), float(dec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args(argv)
    data = cbor.encode(MESSAGE)
    assert data == cbor2.dumps(MESSAGE, canonical=True)
    assert cbor.decode(data) == cbor2.loads(data) == MESSAGE
    print(f"message: {len(data)} bytes")
    ours_enc = rate(cbor.encode, MESSAGE, args.seconds)
    ref_enc = rate(lambda m: cbor2.dumps(m, canonical=True), MESSAGE, args.seconds)
    ours_dec = rate(cbor.decode, data, args.seconds)
    ref_dec = rate(cbor2.loads, data, args.seconds)
    print(f"{'':24}{'ours ops/s':>12}{'cbor2 ops/s':>13}{'ours/cbor2':>12}")
    print(f"{'CPython encode':24}{ours_enc:12,.0f}{ref_enc:13,.0f}{ours_enc / ref_enc:12.2f}")
    print(f"{'CPython decode':24}{ours_dec:12,.0f}{ref_dec:13,.0f}{ours_dec / ref_dec:12.2f}")
    mp_enc, mp_dec = micropython_rates(args.seconds)
    print(f"{'MicroPython encode':24}{mp_enc:12,.0f}")
    print(f"{'MicroPython decode':24}{mp_dec:12,.0f}")


if __name__ == "__main__":
    main()
