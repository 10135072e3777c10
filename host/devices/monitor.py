"""Serial logs of one or many boards, as lines stamped with the host's clock and prefixed by
node: ``15:04:05.123 node2 | edgebft node 2 up: 4 replicas, ...``.

One reader thread per port (pyserial, so serial paths, ``socket://`` and ``rfc2217://``
alike); lines from all of them go out through one callback under one lock, each whole, in the
order the host read them. A port that cannot be opened, or that goes away, is reported as a
line of its own and the others go on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import serial

BAUD = 115200
_READ_TIMEOUT_S = 0.2


def stamp(at: float) -> str:
    """``HH:MM:SS.mmm`` of host time ``at`` (local time)."""
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"


def monitor(ports: dict[str, str], emit: Callable[[str], None], stop: threading.Event,
            baud: int = BAUD) -> None:
    """Read every port of ``ports`` (name -> port) until ``stop`` is set, passing each line
    to ``emit`` as ``<stamp> <name> | <line>``; returns once every reader has ended."""
    lock = threading.Lock()

    def out(name: str, text: str) -> None:
        with lock:
            emit(f"{stamp(time.time())} {name} | {text}")

    def read(name: str, port: str) -> None:
        try:
            link = serial.serial_for_url(port, baudrate=baud, timeout=_READ_TIMEOUT_S)
        except (serial.SerialException, OSError) as e:
            out(name, f"[cannot open {port}: {e}]")
            return
        partial = b""
        try:
            while not stop.is_set():
                partial += link.read(4096)
                *lines, partial = partial.split(b"\n")
                for line in lines:
                    out(name, line.rstrip(b"\r").decode("utf-8", "replace"))
        except (serial.SerialException, OSError) as e:
            out(name, f"[{port} went away: {e}]")
        finally:
            link.close()

    readers = [threading.Thread(target=read, args=item, daemon=True) for item in ports.items()]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
