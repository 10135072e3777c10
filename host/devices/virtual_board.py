"""A virtual board: MicroPython's Unix port behind a serial-like pseudo-terminal, with a
folder standing in for its flash (../shared/HARDWARE.md, "A virtual board").

    python -m edgebft.devices.virtual_board FLASH [--port-file F] [--heap 320k] [--romfs]

It prints (and writes to F) the path of its port, e.g. /dev/pts/7, which mpremote, pyserial
and ``edgebft deploy`` open as they would /dev/ttyUSB0. Like a board running stock firmware it
boots ``main.py`` from its flash when there is one; main.py interrupted (Ctrl-C from the port)
or crashed leaves it at the REPL; a reset from main.py (``machine.soft_reset``: the Unix port
has no ``machine.reset``) or a soft reset at the REPL (Ctrl-D) boots it again in the same
flash, after "MPY: soft reboot". Both ends of its pseudo-terminals are raw (no CR/LF
translation), or the raw REPL's framing breaks. With ``--romfs`` it is a board whose firmware
was built with ROMFS: a 128 KiB ``romfs`` partition (``romfs.img`` in the flash folder, mapped
writable by edgebft.devices.romboot), ``vfs.rom_ioctl`` over it and /rom mounted at boot
(edgebft.devices.virtual_boot), so ``edgebft deploy`` and mpremote's ``romfs`` commands work
on it as on such a board.

The relay between the port and the interpreter owns the terminal: a raw terminal generates no
SIGINT, so the first Ctrl-C while main.py runs is delivered as SIGINT (at the REPL, Ctrl-C is
a byte like any other). Not confined: the Unix port's ``/`` is the host's, so only tools that
write relative paths (as deploy does) belong on it; it is test and demo equipment, not a
sandbox.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import tty
from pathlib import Path

from edgebft.devices.micropython import MicroPythonNotFound, find_micropython

# Stock firmware loads our modules' bytecode into the heap (no ROMFS): measured, a node deployed
# this way holds ~164 KB live on the 64-bit Unix port (~100 KB from ROMFS), so the virtual
# board gets twice that.
HEAP = "320k"
REBOOT_BANNER = b"MPY: soft reboot\r\n"
ROMFS_IMAGE = "romfs.img"  # the ROMFS partition, in the flash folder (--romfs)
ROMFS_BYTES = 0x20000      # as the boards' romfs partition (boards/*.json)
BOOT = str(Path(__file__).with_name("virtual_boot.py"))


def _boot(micropython: str, flash: Path, heap: str, slave: int, script: bool,
          romfs: bool) -> subprocess.Popen[bytes]:
    """Start the interpreter on ``slave``: main.py (``script``) or the REPL; with ``romfs``,
    through romboot with the flash's romfs.img as the ROMFS partition and virtual_boot's
    vfs.rom_ioctl (the firmware of a board built with ROMFS)."""
    heap_arg = ["-X", f"heapsize={heap}"]
    env = None
    if romfs:
        argv = [sys.executable, "-m", "edgebft.devices.romboot", "--partition",
                str(flash / ROMFS_IMAGE), *heap_arg, *([] if script else ["-i"]), BOOT]
        env = {**os.environ, "EDGEBFT_BOOT": "main" if script else "repl"}
    else:
        argv = [micropython, *heap_arg] + (["main.py"] if script else [])
    return subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=flash,
                            start_new_session=True, env=env)


def serve(flash: Path, port_file: Path | None, heap: str, romfs: bool = False) -> None:
    """Run the board until killed (see the module docstring)."""
    micropython = str(find_micropython())
    if romfs and not (flash / ROMFS_IMAGE).exists():
        (flash / ROMFS_IMAGE).write_bytes(b"\xff" * ROMFS_BYTES)  # erased flash
    port_master, port_slave = os.openpty()
    tty.setraw(port_slave)
    port = os.ttyname(port_slave)
    if port_file is not None:
        port_file.write_text(port)
    print(port, flush=True)
    script = True  # what a boot runs: main.py when the flash has one, else the REPL
    typed = b""    # what the port sent from Ctrl-C on, while main.py was ending: the REPL's
    while True:
        board_master, board_slave = os.openpty()
        tty.setraw(board_slave)
        running_main = script and (flash / "main.py").exists()
        proc = _boot(micropython, flash, heap, board_slave, running_main, romfs)
        os.close(board_slave)
        if not running_main and typed:
            os.write(board_master, typed)
        typed = b""
        interrupted = False
        while proc.poll() is None:
            ready, _, _ = select.select([port_master, board_master], [], [], 0.05)
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
                    os.write(port_master, os.read(board_master, 4096))
                except OSError:  # the interpreter is gone
                    break
        code = proc.wait()
        os.close(board_master)
        # main.py reset the board (machine.soft_reset: exit 0), or the REPL was soft-reset
        # (Ctrl-D): boot again. main.py interrupted or crashed: the REPL, as on a board.
        script = not running_main or (code == 0 and not interrupted)
        if script:
            os.write(port_master, REBOOT_BANNER)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgebft.devices.virtual_board",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("flash", type=Path, help="the folder that is the board's flash")
    parser.add_argument("--port-file", type=Path, help="write the port's path here too")
    parser.add_argument("--heap", default=HEAP, help=f"MicroPython heap (default {HEAP})")
    parser.add_argument("--romfs", action="store_true",
                        help="firmware built with ROMFS: a 128 KiB romfs partition (romfs.img "
                             "in the flash folder), mounted at /rom when it holds an image; "
                             "deploy writes our code there")
    args = parser.parse_args(argv)
    if not args.flash.is_dir():
        parser.error(f"{args.flash}: no such folder")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.flash.resolve(), args.port_file, args.heap, args.romfs)
    except MicroPythonNotFound as e:
        parser.exit(2, f"edgebft: error: {e}\n")


if __name__ == "__main__":
    main()
