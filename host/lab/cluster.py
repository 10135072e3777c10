"""The emulated cluster: one MicroPython Unix-port process per node, each in its image folder.

Node ``i`` runs ``micropython -X heapsize=<heap> main.py`` with its image folder (built by
``edgebft.devices.image.build_image``) as working directory, so the folder's files are the
node's flash and survive ``kill``/``restart``. Its stdout and stderr go to
``<log_dir>/node<i>.log``, appended across restarts; the host adds one ``# edgebft: ...``
line at each start and stop.

Every node runs in its own session and process group, and every signal goes to the group, so
nothing a node starts survives it. (``.venv/bin/micropython`` is a CPython console script that
runs MicroPython in-process; killing the group kills both.) Nodes are stopped by ``stop()``, by
leaving the ``with`` block, at interpreter exit, and on SIGTERM/SIGHUP of the host (see
``edgebft.lab.broker``); only a SIGKILL of the host can leave nodes behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from edgebft.devices import romboot
from edgebft.devices.micropython import HEAP_DEFAULT, find_micropython
from edgebft.lab.processes import (
    STOP_GRACE_S,
    kill_process_group,
    signal_group,
    spawn,
    untrack_process,
)

__all__ = ["ClusterError", "EmulatedCluster"]


class ClusterError(RuntimeError):
    """The cluster was misused or misconfigured; the message says how."""


KILL_WAIT_S = 5.0  # SIGKILL is not ignorable; this only bounds a wait that never takes long
_HEAP_RE = re.compile(r"[1-9][0-9]*[kKmM]?")


def node_argv(image: Path, micropython: Path | str, heap: str, rom: bool) -> list[str]:
    """The command that boots the node in ``image`` (run with the image as its cwd): through
    edgebft.devices.romboot when ``rom`` and the image has a rom.img, else the binary itself."""
    argv = ["-X", f"heapsize={heap}", "main.py"]
    if rom and (image / "rom.img").is_file():
        return [sys.executable, "-m", "edgebft.devices.romboot", str(image / "rom.img"), *argv]
    return [str(micropython), *argv]


class EmulatedCluster:
    """Start, stop, crash, restart, pause and resume emulated nodes.

    Nodes are numbered by their position in ``images``. Methods taking ``i`` raise
    ``IndexError`` for a bad index. Use as a context manager (``start()`` on entry, ``stop()``
    on exit) or call ``start()``/``stop()`` yourself.
    """

    def __init__(self, images: Sequence[Path], log_dir: Path, heap: str = HEAP_DEFAULT, *,
                 micropython: str | os.PathLike[str] | None = None,
                 stop_grace_s: float = STOP_GRACE_S,
                 env: dict[str, str] | None = None) -> None:
        """Check the images and find MicroPython; start nothing yet.

        Args:
            images: one image folder per node, each holding ``main.py``.
            log_dir: where ``node<i>.log`` files go (created if missing).
            heap: MicroPython heap size, e.g. ``"100k"`` (an ESP32's free heap).
            micropython: explicit binary; else ``find_micropython``'s defaults.
            stop_grace_s: how long ``stop()`` waits after SIGTERM before SIGKILL.
            env: extra environment variables for the nodes.

        Raises:
            ClusterError: no images, an image without ``main.py``, or a malformed heap size.
            edgebft.devices.micropython.MicroPythonNotFound: no MicroPython binary.
        """
        if not images:
            raise ClusterError("an emulated cluster needs at least one image folder")
        for image in images:
            if not (Path(image) / "main.py").is_file():
                raise ClusterError(f"image folder {str(image)!r} has no main.py; build it with "
                                   "edgebft.devices.image.build_image")
        if not _HEAP_RE.fullmatch(heap):
            raise ClusterError(f"bad heap size {heap!r}: expected e.g. 100k, 2m or 65536")
        self.images = [Path(image).resolve() for image in images]
        self.log_dir = Path(log_dir)
        self.heap = heap
        self.micropython = find_micropython(micropython)
        # Code runs in place from each image's rom.img when MicroPython is the venv's in-process
        # wheel (edgebft.devices.romboot maps it outside the heap, as a board maps flash).
        self.rom = (romboot.available()
                    and self.micropython == Path(sys.executable).parent / "micropython")
        self.stop_grace_s = stop_grace_s
        self._env = {**os.environ, **(env or {})}
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def log_path(self, i: int) -> Path:
        """The file node ``i``'s stdout and stderr are appended to."""
        self._check_index(i)
        return self.log_dir / f"node{i}.log"

    def pid(self, i: int) -> int | None:
        """Node ``i``'s current (or last) process id, or None if never started."""
        proc = self._procs[self._check_index(i)]
        return proc.pid if proc is not None else None

    def cpu_s(self, i: int) -> tuple[float, float] | None:
        """CPU seconds node ``i``'s current process has used, (user, system), from
        /proc/<pid>/stat; None when it is not running or the system has no /proc."""
        pid = self.pid(i)
        if pid is None or not self.alive(i):
            return None
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def start(self) -> None:
        """Start every node that is not running."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(len(self)):
            if not self.alive(i):
                self._spawn(i)

    def stop(self) -> None:
        """Stop every node: SIGTERM (and SIGCONT) to each group, SIGKILL after the grace period.

        All nodes get the signal together, so the wait is one grace period, not one per node.
        Idempotent; never raises for nodes already gone.
        """
        running = [(i, p) for i, p in enumerate(self._procs) if p is not None and p.poll() is None]
        for _i, proc in running:
            signal_group(proc.pid, signal.SIGTERM)
            signal_group(proc.pid, signal.SIGCONT)  # a paused node must see the SIGTERM
        deadline = time.monotonic() + self.stop_grace_s
        for _i, proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for i, proc in running:
            if proc.poll() is None:
                kill_process_group(proc, grace_s=0)
            else:  # the leader is gone; sweep anything it left in its group
                signal_group(proc.pid, signal.SIGKILL)
                untrack_process(proc)
            self._note(i, f"stopped, exit code {proc.returncode}")

    def detach(self) -> list[int]:
        """Leave every running node running after this process exits; return their pids
        (each is its process group's id: ``os.killpg`` stops one later)."""
        pids = []
        for proc in self._procs:
            if proc is not None and proc.poll() is None:
                untrack_process(proc)
                pids.append(proc.pid)
        self._procs = [None] * len(self.images)
        return pids

    def kill(self, i: int) -> None:
        """Crash node ``i``: SIGKILL its process group and reap it. No-op if it is not running."""
        proc = self._procs[self._check_index(i)]
        if proc is None or proc.poll() is not None:
            return
        signal_group(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:  # cannot happen short of a hung kernel
            raise ClusterError(f"node {i} (pid {proc.pid}) survived SIGKILL") from None
        untrack_process(proc)
        self._note(i, f"killed, exit code {proc.returncode}")

    def restart(self, i: int) -> None:
        """Start node ``i`` again from its image folder (its flash); crash it first if running."""
        self.kill(i)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._spawn(i)

    def pause(self, i: int) -> None:
        """Freeze node ``i`` (SIGSTOP to its group); its sockets stay open, it just stops."""
        proc = self._require_running(i, "pause")
        signal_group(proc.pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        """Unfreeze node ``i`` (SIGCONT to its group)."""
        proc = self._require_running(i, "resume")
        signal_group(proc.pid, signal.SIGCONT)

    def alive(self, i: int) -> bool:
        """True while node ``i``'s process exists (paused counts as alive)."""
        proc = self._procs[self._check_index(i)]
        return proc is not None and proc.poll() is None

    def returncode(self, i: int) -> int | None:
        """Node ``i``'s exit status (negative: killed by that signal); None if running or never
        started."""
        proc = self._procs[self._check_index(i)]
        return proc.poll() if proc is not None else None

    def __enter__(self) -> EmulatedCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _check_index(self, i: int) -> int:
        if not 0 <= i < len(self.images):
            raise IndexError(f"node {i} out of range: the cluster has nodes 0..{len(self) - 1}")
        return i

    def _require_running(self, i: int, verb: str) -> subprocess.Popen[bytes]:
        proc = self._procs[self._check_index(i)]
        if proc is None or proc.poll() is not None:
            raise ClusterError(f"cannot {verb} node {i}: it is not running")
        return proc

    def _note(self, i: int, what: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with open(self.log_path(i), "a") as log:
            log.write(f"# edgebft: {stamp} node{i} {what}\n")

    def _spawn(self, i: int) -> None:
        assert self._procs[i] is None or self._procs[i].poll() is not None
        argv = node_argv(self.images[i], self.micropython, self.heap, self.rom)
        self._note(i, f"start: {' '.join(argv)} in {self.images[i]}")
        self._procs[i] = spawn(argv, self.log_path(i), cwd=self.images[i], env=self._env)
