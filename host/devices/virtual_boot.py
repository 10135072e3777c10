"""The boot of a virtual board (edgebft.devices.virtual_board). Runs on MicroPython's Unix port,
never on CPython.

- Confinement: the board's flash folder (the working directory it starts in) becomes the
  root of its filesystem (a VfsPosix of it mounted at /, in place of the host's root), so
  nothing on the board, nor anything a tool sends it, reads or writes outside it.
- ROMFS, when ``$EDGEBFT_ROMFS_PARTITION`` names the partition (address:size) that
  ``romboot --partition`` mapped from the folder's ``romfs.img``: an ESP32 built with
  MICROPY_VFS_ROM gives ``vfs.rom_ioctl`` over its ``romfs`` flash partition, mounts it at /rom
  when it holds a ROMFS image, and puts /rom and /rom/lib at the front of ``sys.path``; the
  Unix port has none of it, so this boot gives the same: ``vfs`` becomes this module's proxy
  of the built-in one (an entry in sys.modules), with ``rom_ioctl``:

  - ``rom_ioctl(1)``: 1 partition; ``rom_ioctl(2, 0)``: its memory (a memoryview), else
    -ENODEV;
  - ``rom_ioctl(3, 0, length)`` or ``(3, 0, offset, length)``: erase (0xFF) whole blocks of
    BLOCK_BYTES from ``offset``; returns the smallest write (4 bytes);
  - ``rom_ioctl(4, 0, offset, data)``: write ``data`` at ``offset``; ``rom_ioctl(5, 0)``: done;
  - ``rom_ioctl(6, 0)``: the block size.

Then, with ``$EDGEBFT_BOOT`` set to ``main``, it runs main.py, as a board boots, and exits with
MAIN_ENDED if main.py returns (the relay then boots the REPL, where a board would sit);
otherwise the REPL follows (``micropython -i``).
"""

import os
import sys

import uctypes
import vfs as _vfs

MAIN_ENDED = 3  # exit status when main.py returned: not 0, which the relay takes for a reset
BLOCK_BYTES = 4096
_ERASED = b"\xff" * BLOCK_BYTES
_MIN_WRITE = 4
_ENODEV = 19

_root = os.getcwd()
_vfs.umount("/")
_vfs.mount(_vfs.VfsPosix(_root), "/")
sys.path[0] = ""  # the Unix port put this script's folder there; a board has the cwd

_mapped = os.getenv("EDGEBFT_ROMFS_PARTITION")
_partition = None
if _mapped:
    _address, _size = _mapped.split(":")
    _partition = uctypes.bytearray_at(int(_address), int(_size))


def rom_ioctl(op, *args):
    if op == 1:
        return 1
    if args and args[0] != 0:
        return -_ENODEV
    if op == 2:
        return memoryview(_partition)
    if op == 3:
        offset, length = (0, args[1]) if len(args) == 2 else (args[1], args[2])
        block = offset - offset % BLOCK_BYTES
        while block < min(offset + length, len(_partition)):
            _partition[block:block + BLOCK_BYTES] = _ERASED
            block += BLOCK_BYTES
        return _MIN_WRITE
    if op == 4:
        offset, data = args[1], args[2]
        _partition[offset:offset + len(data)] = data
        return 0
    if op == 5:
        return 0
    if op == 6:
        return BLOCK_BYTES
    return -22  # EINVAL


class _Vfs:
    """The built-in vfs with rom_ioctl."""

    def __getattr__(self, name):
        return getattr(_vfs, name)


if _partition is not None:
    _proxy = _Vfs()
    _proxy.rom_ioctl = rom_ioctl
    sys.modules["vfs"] = _proxy
    try:
        _vfs.mount(_vfs.VfsRom(memoryview(_partition)), "/rom")
        sys.path[1:1] = ["/rom", "/rom/lib"]
    except OSError:
        pass  # an erased partition, or no ROMFS image in it: nothing to mount, as on a board

if os.getenv("EDGEBFT_BOOT") == "main":
    import main  # noqa: F401  (runs the board's main.py; machine.soft_reset exits with 0)
    # main.py ended (a node in safe mode, a script that is done): a board then sits at its
    # REPL, so the relay boots the REPL next, where an exit with 0 would boot main.py again
    sys.exit(MAIN_ENDED)
