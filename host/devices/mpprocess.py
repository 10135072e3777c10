"""A MicroPython Unix-port process driven over a line protocol (stdout lines, stdin commands).

Conformance tests and benchmarks run small MicroPython scripts that print one status line per
event (``WORD field field ...``) and read commands from stdin; this is their host side.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import IO


class MicroPythonProcess:
    """``micropython -X heapsize=HEAP SCRIPT`` with ``lib`` on its import path."""

    def __init__(self, micropython: Path, lib: Path, script: Path, heap: str = "100k",
                 stderr: IO[str] | None = None) -> None:
        self.stderr = stderr
        self.proc = subprocess.Popen(
            [str(micropython), "-X", f"heapsize={heap}", str(script)],
            env={"MICROPYPATH": f"{lib}:.frozen"}, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1)
        self.lines: queue.Queue[list[str]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.split())

    def expect(self, word: str, timeout: float = 5.0) -> list[str]:
        """The next line whose first field is ``word``, split; other lines are skipped.

        Raises:
            AssertionError: none within ``timeout`` seconds (with the exit code and stderr).
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                parts = self.lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                err = ""
                if self.stderr is not None:
                    self.stderr.seek(0)
                    err = self.stderr.read()[-2000:]
                raise AssertionError(f"no {word!r} line within {timeout} s; "
                                     f"exit={self.proc.poll()} stderr={err}") from None
            if parts and parts[0] == word:
                return parts

    def send(self, command: str) -> None:
        """Write one command line to the script's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
