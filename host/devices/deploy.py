"""Put a node on a board over its REPL (mpremote's serial transport): our code, the node's
configuration, then a reset that boots it.

Our modules go where the firmware can run them from: into the board's ``romfs`` partition
as one ROMFS image (the image emulation boots from) when the firmware was built with ROMFS
(``vfs.rom_ioctl`` answers and the partition holds the image), else to its filesystem as
``lib/*.mpy`` (stock firmware); then ``main.py`` and the node's ``edgebft.json``. What already
matches is skipped, so a second deploy of the same code writes only what changed: a file
whose SHA-256 on the board is the same, a partition whose first bytes hash to the image's.
Each file is written to ``<name>.new`` and renamed over the old one (atomic on LittleFS and on
the Unix port), so a deploy cut off halfway leaves every file either old or new, never
truncated; the ROMFS image is written with its first block (its header) last, so a partition
cut off halfway holds no image the firmware would mount. The configuration holds the node's
keys and password: they are never printed, only file names are.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mpremote.transport import TransportError
from mpremote.transport_serial import SerialTransport

from edgebft.devices.image import build_lib, build_rom, main_source

CONFIG_NAME = "edgebft.json"
BAUD = 115200
# The built-in modules the node imports (firmware/, protocol/): a board whose firmware lacks
# one is refused before anything is written. Those a configuration asks for of a chip come on
# top (chip_modules; firmware/board.py does without them on the Unix port).
REQUIRED_MODULES = ("array", "asyncio", "binascii", "builtins", "cryptolib", "errno", "gc",
                    "hashlib", "json", "machine", "micropython", "os", "random", "select",
                    "socket", "ssl", "struct", "sys", "time")
ROMFS_CHUNK = 2048        # bytes of image per exec (base64 on the wire; heap on the board)
ROMFS_ERASE_MAX = 32768   # bytes erased per call (each call blocks the board's REPL)


class DeployError(RuntimeError):
    """The board could not be reached or written; one line for a user."""


@dataclass(frozen=True)
class Deployed:
    port: str
    written: tuple[str, ...]
    skipped: tuple[str, ...]
    reset: bool
    romfs: int | None = None  # image bytes written to the romfs partition (0: it matched);
    #                           None: the firmware has none, and lib/ was used


@dataclass(frozen=True)
class NodeFiles:
    """What a node's board holds: ``files`` (main.py, lib/edgebft/** compiled as for
    emulation, edgebft.json; paths relative to the board's root) and ``rom``, the ROMFS image
    of the same lib/ for a firmware with a romfs partition."""

    files: dict[str, bytes]
    rom: bytes


def node_files(config: dict[str, Any]) -> NodeFiles:
    """The files and ROMFS image of a node whose edgebft.json is ``config``."""
    files = {"main.py": main_source()}
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_lib(Path(tmp) / "lib")
        for path in sorted(lib.rglob("*")):
            if path.is_file():
                files["lib/" + path.relative_to(lib).as_posix()] = path.read_bytes()
        rom = build_rom(lib)
    files[CONFIG_NAME] = (json.dumps(config, sort_keys=True) + "\n").encode()
    return NodeFiles(files, rom)


def chip_modules(config: dict[str, Any]) -> tuple[str, ...]:
    """The built-in modules a node with ``config`` needs on a chip besides REQUIRED_MODULES:
    network to join a WiFi, neopixel for a WS2812 LED (firmware/wifi.py, board.py)."""
    extra = ("network",) if config.get("wifi") else ()
    if (config.get("led") or {}).get("kind") == "ws2812":
        extra += ("neopixel",)
    return extra


def deploy(port: str, node: NodeFiles, reset: bool = True,
           progress: Callable[[str, bool], None] | None = None) -> Deployed:
    """Put ``node`` on the board on ``port`` (see the module docstring), then, with ``reset``,
    soft-reset it so it boots main.py. ``progress(path, written)`` is called per file (and
    once for the ROMFS image, as "romfs", when there is a partition).

    Raises:
        DeployError: the port cannot be opened, no REPL answers, the board's firmware lacks
        a module the node needs (nothing written then), or a write failed.
    """
    chip_only = chip_modules(json.loads(node.files.get(CONFIG_NAME, b"{}")))
    try:
        transport = SerialTransport(port, baudrate=BAUD)
    except TransportError as e:
        raise DeployError(f"{port}: {' '.join(str(e).split())}") from None
    written, skipped = [], []
    try:
        _no_delay(transport)
        transport.enter_raw_repl(soft_reset=False)
        transport.exec("def _has(name):\n try:\n  __import__(name)\n  return True\n"
                       " except ImportError:\n  return False")
        on_chip = "__import__('sys').platform not in ('linux', 'darwin', 'win32')"  # ON_BOARD
        needed = f"{list(REQUIRED_MODULES)!r} + ({list(chip_only)!r} if {on_chip} else [])"
        missing = transport.eval(f"[m for m in {needed} if not _has(m)]")
        if missing:
            transport.exit_raw_repl()
            if reset:
                transport.serial.write(b"\x04")  # what ran before boots again
            raise DeployError(f"{port}: the board's firmware lacks {', '.join(missing)}, which "
                              "the node needs: flash a MicroPython build that has "
                              f"{'it' if len(missing) == 1 else 'them'}; nothing written")
        romfs = _write_romfs(transport, node.rom)
        files = node.files
        if romfs is not None:
            files = {path: data for path, data in files.items() if not path.startswith("lib/")}
            if progress is not None:
                progress("romfs", romfs > 0)
        made: set[str] = set()
        for path, data in files.items():
            _make_dirs(transport, PurePosixPath(path).parent, made)
            if transport.fs_exists(path) and \
                    transport.fs_hashfile(path, "sha256") == hashlib.sha256(data).digest():
                skipped.append(path)
            else:
                transport.fs_writefile(path + ".new", data)
                transport.exec(f"import os\nos.rename({path + '.new'!r}, {path!r})")
                written.append(path)
            if progress is not None:
                progress(path, written[-1:] == [path])
        transport.exit_raw_repl()
        if reset:
            transport.serial.write(b"\x04")  # soft reset at the REPL: the board boots main.py
    except (TransportError, OSError) as e:
        raise DeployError(f"{port}: {' '.join(str(e).split()) or type(e).__name__}") from None
    finally:
        transport.close()
    return Deployed(port, tuple(written), tuple(skipped), reset, romfs)


def _no_delay(transport: SerialTransport) -> None:
    """A socket:// port (a board on a lab host) sends each write at once: the raw REPL's
    exchanges are small writes that wait for an answer, which Nagle's algorithm would hold
    back for the peer's delayed acknowledgement (a deploy of unchanged files: 8 s, not 1.5)."""
    sock = getattr(transport.serial, "_socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _write_romfs(transport: SerialTransport, image: bytes) -> int | None:
    """Write ``image`` to the board's ROMFS partition 0 over ``vfs.rom_ioctl`` (the protocol
    of mpremote's ``romfs deploy``: erase, write, complete); the bytes written, 0 when the
    partition already starts with it, None when the firmware has no partition (a memory-mapped
    one, as on an ESP32) big enough."""
    transport.exec("import vfs\ntry:\n d = vfs.rom_ioctl(2, 0) if vfs.rom_ioctl(1) > 0 else None\n"
                   "except AttributeError:\n d = None\n"
                   "if not isinstance(d, memoryview):\n d = None")
    size = transport.eval("0 if d is None else len(d)")
    if size < len(image):
        return None
    if transport.eval(f"__import__('hashlib').sha256(d[:{len(image)}]).digest()") == \
            hashlib.sha256(image).digest():
        return 0
    transport.exec("try:\n vfs.umount('/rom')\nexcept OSError:\n pass")
    block = transport.eval("vfs.rom_ioctl(6, 0)")
    if block <= 0 or block >= size:
        transport.eval(f"vfs.rom_ioctl(3, 0, {len(image)})")
    else:
        for offset in range(0, len(image), ROMFS_ERASE_MAX):
            length = min(ROMFS_ERASE_MAX, len(image) - offset)
            length = (length + block - 1) // block * block  # whole blocks
            transport.eval(f"vfs.rom_ioctl(3, 0, {offset}, {length})")
    offsets = list(range(0, len(image), ROMFS_CHUNK))
    for offset in offsets[1:] + offsets[:1]:  # the header last: torn, it is no image
        chunk = base64.b64encode(image[offset:offset + ROMFS_CHUNK]).decode()
        transport.exec(f"vfs.rom_ioctl(4, 0, {offset}, __import__('binascii')"
                       f".a2b_base64({chunk!r}))")
    transport.eval("vfs.rom_ioctl(5, 0)")
    return len(image)


def _make_dirs(transport: SerialTransport, folder: PurePosixPath, made: set[str]) -> None:
    for part in reversed([folder, *folder.parents]):
        name = str(part)
        if name in (".", "") or name in made:
            continue
        if not transport.fs_exists(name):
            transport.fs_mkdir(name)
        made.add(name)
