"""The lab's processes: brokers, nodes and exporters, each the leader of its own process group.

Every process the lab starts goes through spawn(): its own session (so a signal to its group
reaches whatever it started, and a Ctrl-C in the terminal does not), stdin closed, stdout and
stderr appended to a log. A tracked process's group is killed when the interpreter exits
(normally, or on SIGTERM/SIGHUP), so a failed run leaves nothing behind; ``cluster up`` untracks
what it leaves running, and later commands reach it by pid (signal_group, alive, wait_exit).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
import time
import types
from pathlib import Path

STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL after this long

_tracked: dict[int, subprocess.Popen[bytes]] = {}
_tracked_lock = threading.Lock()
_handlers_installed = False


def kill_process_group(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL it after ``grace_s``, reap ``proc``.

    ``proc`` must have been started with ``start_new_session=True`` (its pid is its group id).
    Idempotent; never raises for a process or group that is already gone. A process already
    reaped (by ``poll()``) is not signalled again, as its pid may have been reused.
    """
    if proc.returncode is not None:
        untrack_process(proc)
        return
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        signal_group(proc.pid, signum)
        if signum == signal.SIGTERM:
            signal_group(proc.pid, signal.SIGCONT)  # a paused group handles SIGTERM too
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is reaped; kill anything it left in the group without waiting for it.
        signal_group(proc.pid, signal.SIGKILL)
        break
    untrack_process(proc)


def signal_group(pid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pid`` (a process spawn() started, or a node of a
    detached cluster); return False if the group is gone."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        return False  # the whole group is gone
    except PermissionError:
        return False  # pid reused by someone else's group: nothing of ours is left in it
    return True


def track_process(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc``'s process group at interpreter exit unless untracked before."""
    _install_exit_handlers()
    with _tracked_lock:
        _tracked[proc.pid] = proc


def untrack_process(proc: subprocess.Popen[bytes]) -> None:
    """Forget ``proc`` (it has been stopped)."""
    with _tracked_lock:
        _tracked.pop(proc.pid, None)


def _kill_all_tracked() -> None:
    with _tracked_lock:
        procs = list(_tracked.values())
    for proc in procs:  # SIGKILL at once: at exit nobody waits for a graceful stop
        if proc.poll() is None:  # an exited, reaped leader's pid may belong to someone else now
            signal_group(proc.pid, signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        untrack_process(proc)


def _exit_on_signal(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _install_exit_handlers() -> None:
    """Register the atexit hook; map SIGTERM/SIGHUP to SystemExit where nobody else handles them.

    Signal handlers can only be set from the main thread; from other threads only atexit
    applies.
    """
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_kill_all_tracked)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, _exit_on_signal)


def spawn(argv: list[str], log: Path, cwd: Path | None = None,
          env: dict[str, str] | None = None, tracked: bool = True) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of a new session and process group, its output appended
    to ``log``; with ``tracked``, its group dies with this interpreter (track_process)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    if tracked:
        track_process(proc)
    return proc


def alive(pid: int) -> bool:
    """True while process ``pid`` runs: not gone and not a zombie waiting to be reaped."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # our child: reap it if it exited
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait until process ``pid`` is gone; False if it still runs after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True
