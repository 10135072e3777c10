"""A virtual board: MicroPython's Unix port behind a serial-like pseudo-terminal, with a
folder standing in for its flash (../shared/HARDWARE.md, "A virtual board").

    edgebft virtual-board FLASH [--port-file F] [--link PATH] [--heap 320k] [--romfs]
    python -m edgebft.devices.virtual_board ...     (the same)

It prints (and writes to F, and links PATH to) the path of its port, e.g. /dev/pts/7, which
mpremote, pyserial and ``edgebft deploy`` open as they would /dev/ttyUSB0. Like a board running
stock firmware it boots ``main.py`` from its flash when there is one; main.py interrupted
(Ctrl-C from the port) or crashed leaves it at the REPL; a reset from main.py
(``machine.soft_reset``: the Unix port has no ``machine.reset``) or a soft reset at the REPL
(Ctrl-D) boots it again in the same flash, after "MPY: soft reboot". Both ends of its pseudo-
terminals are raw (no CR/LF translation), or the raw REPL's framing breaks. Like a board, it
never waits for its console to be read: output the port does not take waits in a bounded
backlog (CONSOLE_BACKLOG_BYTES, the newest kept) and the rest is lost. With ``--romfs`` it
is a board whose firmware was built with ROMFS: a 128 KiB ``romfs`` partition (``romfs.img`` in
the flash folder, mapped writable by edgebft.devices.romboot), ``vfs.rom_ioctl`` over it and
/rom mounted at boot (edgebft.devices.virtual_boot), so ``edgebft deploy`` and mpremote's
``romfs`` commands work on it as on such a board.

The relay between the port and the interpreter owns the terminal: a raw terminal generates no
SIGINT, so the first Ctrl-C while main.py runs is delivered as SIGINT (at the REPL, Ctrl-C is
a byte like any other). Confined: its flash folder is the root of its filesystem
(edgebft.devices.virtual_boot), so a tool or a program on it reaches nothing outside. (Test
and demo equipment all the same: MicroPython's Unix port is no security boundary.)
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tty
from pathlib import Path

from edgebft.devices.micropython import find_micropython

# Stock firmware loads our modules' bytecode into the heap (no ROMFS): measured, a node deployed
# this way holds ~164 KB live on the 64-bit Unix port (~100 KB from ROMFS), so the virtual
# board gets twice that.
HEAP = "320k"
REBOOT_BANNER = b"MPY: soft reboot\r\n"
ROMFS_IMAGE = "romfs.img"  # the ROMFS partition, in the flash folder (--romfs)
ROMFS_BYTES = 0x20000      # as the boards' romfs partition (boards/*.json)
# Console output the port has not taken yet, kept at most this much (the newest). A board's
# UART sends whether anyone listens or not, and its USB console drops what no host reads: a
# board never waits for a reader. The relay wrote to the port blocking, so with nothing
# reading it the pseudo-terminal filled, the relay stopped, and so did the interpreter at
# its next print: a node that logged much with no monitor attached stood still.
CONSOLE_BACKLOG_BYTES = 64 * 1024
BOOT = str(Path(__file__).with_name("virtual_boot.py"))

# Set by SIGTERM or SIGINT: the relay stops the interpreter at its next turn (within one
# select timeout) and serve() returns. The handler raises nothing: an exception raised from
# it could land inside Popen.poll() between taking its wait lock and the try that releases
# it, and the Popen.wait() after it never returned (a board that ignored SIGTERM, seen once
# in CI).
_stopping: list[bool] = []


def _stop(signum: int, frame: object) -> None:
    _stopping.append(True)


def _boot(micropython: str, flash: Path, heap: str, slave: int, script: bool,
          romfs: bool) -> subprocess.Popen[bytes]:
    """Start the interpreter on ``slave`` in the board's flash folder, booted by
    virtual_boot (confined to the folder): main.py (``script``) or the REPL; with ``romfs``,
    through romboot with the folder's romfs.img as the ROMFS partition (the firmware of a
    board built with ROMFS)."""
    interpreter = [micropython]
    if romfs:
        interpreter = [sys.executable, "-m", "edgebft.devices.romboot", "--partition",
                       str(flash / ROMFS_IMAGE)]
    argv = [*interpreter, "-X", f"heapsize={heap}", *([] if script else ["-i"]), BOOT]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBFT_")}
    env["EDGEBFT_BOOT"] = "main" if script else "repl"
    return subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=flash,
                            start_new_session=True, env=env)


def serve(flash: Path, port_file: Path | None, heap: str, romfs: bool = False,
          link: Path | None = None) -> None:
    """Run the board until SIGTERM or SIGINT (see the module docstring), then return, its
    interpreter stopped. Raises MicroPythonNotFound."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    micropython = str(find_micropython())
    if romfs and not (flash / ROMFS_IMAGE).exists():
        (flash / ROMFS_IMAGE).write_bytes(b"\xff" * ROMFS_BYTES)  # erased flash
    port_master, port_slave = os.openpty()
    tty.setraw(port_slave)
    os.set_blocking(port_master, False)  # output nobody reads is dropped, never waited on
    port = os.ttyname(port_slave)
    if link is not None:
        if link.is_symlink():
            link.unlink()
        link.symlink_to(port)
    if port_file is not None:
        port_file.write_text(port)
    print(port, flush=True)
    script = True  # what a boot runs: main.py when the flash has one, else the REPL
    typed = b""    # what the port sent from Ctrl-C on, while main.py was ending: the REPL's
    console = Console(port_master)
    while not _stopping:
        script, typed = _run_once(micropython, flash, heap, romfs, console, script, typed)


class Console:
    """The board's side of its port: output goes out as fast as the port takes it, and what
    it has not taken waits here, the newest CONSOLE_BACKLOG_BYTES of it (the rest is lost, as
    a UART's output with nobody listening). ``fd`` is the port's master end, non-blocking."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.backlog = b""

    def put(self, data: bytes) -> None:
        """Send ``data`` after the backlog, keeping what the port does not take."""
        self.backlog = (self.backlog + data)[-CONSOLE_BACKLOG_BYTES:]
        self.flush()

    def flush(self) -> None:
        """Send what the port takes of the backlog now."""
        try:
            while self.backlog:
                self.backlog = self.backlog[os.write(self.fd, self.backlog):]
        except BlockingIOError:
            pass  # the port is full: the rest waits (select() tells when it has room)


def _run_once(micropython: str, flash: Path, heap: str, romfs: bool, console: Console,
              script: bool, typed: bytes) -> tuple[bool, bytes]:
    """One boot, relayed between the port and the interpreter until it ends; what the next
    boot runs (``script``) and the bytes it inherits (``typed``). The board stopped (SIGTERM,
    SIGINT) stops the interpreter too: it runs in a session of its own."""
    board_master, board_slave = os.openpty()
    tty.setraw(board_slave)
    running_main = script and (flash / "main.py").exists()
    proc = _boot(micropython, flash, heap, board_slave, running_main, romfs)
    os.close(board_slave)
    if not running_main and typed:
        os.write(board_master, typed)
    typed = b""
    interrupted = False
    try:
        port_master = console.fd
        while proc.poll() is None and not _stopping:
            waiting = [port_master] if console.backlog else []
            ready, writable, _ = select.select([port_master, board_master], waiting, [], 0.05)
            if writable:
                console.flush()
            if port_master in ready:
                data = os.read(port_master, 4096)
                if running_main and not interrupted and b"\x03" in data:
                    os.kill(proc.pid, signal.SIGINT)  # raw terminals send no SIGINT
                    interrupted = True
                if interrupted:
                    typed += data  # main.py reads no input: the REPL after it will
                else:
                    os.write(board_master, data)
            if board_master in ready:
                try:
                    console.put(os.read(board_master, 4096))
                except OSError:  # the interpreter is gone
                    break
    except BaseException:
        _kill(proc)
        raise
    if _stopping:
        _kill(proc)
    code = proc.wait()
    os.close(board_master)
    # main.py reset the board (machine.soft_reset: exit 0), or the REPL was soft-reset
    # (Ctrl-D): boot again. main.py interrupted, crashed or ended (virtual_boot's
    # MAIN_ENDED): the REPL, as on a board.
    script = not running_main or (code == 0 and not interrupted)
    if script:
        console.put(REBOOT_BANNER)
    return script, typed


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the interpreter and its session (romboot's child), and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # gone already
        pass
    proc.wait()


if __name__ == "__main__":
    from edgebft.board_commands import virtual_board

    virtual_board()
