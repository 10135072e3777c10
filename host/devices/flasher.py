"""Write MicroPython, and a ROMFS image of our code, to a board through esptool's library API.

``flash(port, plan)`` connects to the ROM bootloader on ``port`` (a serial path, or esptool's
``socket://`` and ``rfc2217://`` URLs), refuses a chip other than the board's, runs the stub,
erases the whole flash when asked, writes the firmware at the board's offset and the ROMFS
image at its ``romfs`` partition, verifies both against their digests, and hard-resets the
chip. Nothing is written before the chip is identified, and every check of sizes and offsets
happens in ``plan()``, before a port is opened. esptool's log goes to a logger of ours: its
progress bars feed the flashing thread's callback (boards flash in parallel threads), and
nothing is printed; a failure is esptool's FatalError, whose message we pass on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esptool.cmds import (
    attach_flash,
    detect_chip,
    erase_flash,
    reset_chip,
    run_stub,
    verify_flash,
    write_flash,
)
from esptool.logger import TemplateLogger, log
from esptool.util import FatalError

from edgebft.boards import Board

Progress = Callable[[str, int, int], None]  # (what, done, total)
IMAGE_MAGIC = 0xE9        # the first byte of an ESP image (esptool's ESPLoader.ESP_IMAGE_MAGIC)
IMAGE_HEADER_BYTES = 24   # the image header with its extended part (the chip id at 12-13)
ROMFS_MAGIC = b"\xd2\xcd\x31"  # a ROMFS image starts with it (MicroPython's vfs_rom)


class FlashError(RuntimeError):
    """Flashing cannot or did not succeed; the message is one line for a user."""


@dataclass(frozen=True)
class FlashPlan:
    """What to write where on ``board``: checked against its layout by plan()."""

    board: Board
    writes: tuple[tuple[str, int, bytes], ...]  # (what, offset, data), in offset order
    erase: bool


def plan(board: Board, firmware: Path, romfs: Path | None = None,
         erase: bool = False) -> FlashPlan:
    """The writes for ``firmware`` (MicroPython's combined .bin for this board) and, if
    given, ``romfs`` (an image of edgebft.devices.image.build_rom) on ``board``.

    Raises:
        FlashError: a file that cannot be read, a firmware that is no ESP image (its header's
        magic byte) or one for another chip (its header's chip id), a firmware that would
        run into the partition after its app, a ROMFS image that is none (its magic) or is
        larger than the board's romfs partition (or a board without one).
    """
    layout = "romfs" if romfs is not None else "stock"
    app = board.partition("factory", layout)
    assert app is not None, f"board {board.name}: no factory partition in {layout}"
    data = _read(firmware, "firmware")
    if len(data) < IMAGE_HEADER_BYTES or data[0] != IMAGE_MAGIC:
        raise FlashError(f"{firmware}: not an ESP image (no 0x{IMAGE_MAGIC:X} magic byte at "
                         "its start): give MicroPython's firmware.bin for the board")
    chip_id = int.from_bytes(data[12:14], "little")
    if chip_id != board.image_chip_id:
        raise FlashError(f"{firmware}: an image for chip id {chip_id}, not for "
                         f"{board.name}'s {board.chip} (chip id {board.image_chip_id})")
    end = board.firmware_offset + len(data)
    if end > app.offset + app.size:
        raise FlashError(f"{firmware}: {len(data):,} bytes at 0x{board.firmware_offset:X} end at "
                         f"0x{end:X}, past the app partition (0x{app.offset:X} + "
                         f"0x{app.size:X}) of {board.name}'s {layout} layout")
    writes = [("firmware", board.firmware_offset, data)]
    if romfs is not None:
        part = board.partition("romfs")
        if part is None:
            raise FlashError(f"board {board.name} has no romfs partition")
        image = _read(romfs, "ROMFS image")
        if not image.startswith(ROMFS_MAGIC):
            raise FlashError(f"{romfs}: not a ROMFS image (make one with 'edgebft romfs')")
        if len(image) > part.size:
            raise FlashError(f"{romfs}: {len(image):,} bytes, more than the romfs partition's "
                             f"{part.size:,}")
        writes.append(("romfs", part.offset, image))
    return FlashPlan(board, tuple(writes), erase)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise FlashError(f"{path}: cannot read the {what}: {e.strerror or e}") from None


class _Logger(TemplateLogger):
    """esptool's output, nothing printed: its progress bars go to the ``progress`` of the
    thread that is flashing. esptool has one logger for the process, and provision flashes
    boards in parallel threads: one instance, installed for good, with a callback per thread."""

    def __init__(self) -> None:
        self.local = threading.local()

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def warning(self, message: str) -> None:
        pass

    def error(self, message: str) -> None:
        pass

    def stage(self, finish: bool = False) -> None:
        pass

    def progress_bar(self, cur_iter: int, total_iters: int, prefix: str = "", suffix: str = "",
                     bar_length: int = 30) -> None:
        progress = getattr(self.local, "progress", None)
        if progress is not None:
            progress(prefix.strip() or "working", cur_iter, total_iters)

    def set_verbosity(self, verbosity: str) -> None:
        pass


_LOGGER = _Logger()


@dataclass(frozen=True)
class Flashed:
    """What flash() did: the chip it found and the writes it verified."""

    port: str
    chip: str
    mac: str
    writes: tuple[tuple[str, int, int], ...]  # (what, offset, bytes)


def flash(port: str, job: FlashPlan, baud: int | None = None,
          progress: Progress | None = None) -> Flashed:
    """Carry out ``job`` on the board at ``port`` (see the module docstring).

    Raises:
        FlashError: the port cannot be opened, no bootloader answers, the chip is not the
        board's (nothing written), or a write or its verification failed.
    """
    log.set_logger(_LOGGER)
    _LOGGER.local.progress = progress
    try:
        with detect_chip(port, baud or job.board.baud, connect_mode=job.board.reset) as esp:
            if esp.CHIP_NAME != job.board.chip:
                raise FlashError(f"the chip on {port} is an {esp.CHIP_NAME}, not the "
                                 f"{job.board.chip} of board {job.board.name}: nothing written")
            chip = esp.get_chip_description()
            mac = ":".join(f"{b:02x}" for b in esp.read_mac())
            esp = run_stub(esp)
            attach_flash(esp)
            if job.erase:
                erase_flash(esp)
            addr_data: list[tuple[int, str | bytes | Any]] = [
                (offset, data) for _, offset, data in job.writes]
            write_flash(esp, addr_data)
            verify_flash(esp, addr_data)
            reset_chip(esp, "hard-reset")
    except FatalError as e:
        detail = " ".join(str(e).split())
        raise FlashError(f"{port}: {detail}") from None
    except OSError as e:
        raise FlashError(f"{port}: {e.strerror or e}") from None
    finally:
        _LOGGER.local.progress = None
    return Flashed(port, chip, mac, tuple((w, o, len(d)) for w, o, d in job.writes))
