"""Board data: what the host needs to know to flash, deploy to and run a node on each board.

One JSON file per board in this folder (``esp32.json``, ...):

- ``chip``: the chip name as esptool reports it (``ESPLoader.CHIP_NAME``); flashing refuses a
  board whose chip differs;
- ``image_chip_id``: the chip id an ESP image for it carries (bytes 12-13 of the image
  header, esptool's ``IMAGE_CHIP_ID``); flashing refuses firmware built for another chip;
- ``firmware_offset``: where MicroPython's combined image (bootloader, partition table, app)
  is written: 0x1000 on the ESP32, 0x0 on the newer chips;
- ``flash_size``, ``baud`` (for writing), ``reset`` (esptool's ``--before``: default-reset for
  an RTS/DTR auto-reset circuit, usb-reset for native USB), ``led`` (pin and kind: a plain
  GPIO or a WS2812), ``micropython_board`` (the board name of MicroPython's downloads);
- ``heap_budget_bytes``: the MicroPython heap the firmware is designed to live in there
  (DESIGN.md: 100 KB), not a measurement;
- ``partitions``: the layout of MicroPython's stock firmware (``stock``: no ROMFS, so code goes
  to the filesystem as .mpy and loads into the heap) and of a build with a ``romfs``
  partition (MicroPython's partitions-4MiB-romfs.csv: data subtype 0x8f at 0x1E0000,
  128 KiB; code runs from flash in place). Offsets and sizes are hex strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_FOLDER = Path(__file__).resolve().parent


class BoardError(ValueError):
    """An unknown board, or a board file that is not well formed; one line for a user."""


@dataclass(frozen=True)
class Partition:
    name: str
    type: str
    subtype: str
    offset: int
    size: int


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    chip: str
    image_chip_id: int
    firmware_offset: int
    flash_size: str
    baud: int
    reset: str
    led: dict[str, Any]
    micropython_board: str
    heap_budget_bytes: int
    layouts: dict[str, tuple[Partition, ...]]

    def partition(self, name: str, layout: str = "romfs") -> Partition | None:
        """Partition ``name`` of ``layout``, or None when it has none."""
        return next((p for p in self.layouts.get(layout, ()) if p.name == name), None)


def _board(raw: dict[str, Any]) -> Board:
    layouts = {layout: tuple(Partition(p["name"], p["type"], p["subtype"], int(p["offset"], 16),
                                       int(p["size"], 16)) for p in parts)
               for layout, parts in raw["partitions"].items()}
    return Board(raw["name"], raw["description"], raw["chip"], int(raw["image_chip_id"]),
                 int(raw["firmware_offset"], 16),
                 raw["flash_size"], int(raw["baud"]), raw["reset"], dict(raw["led"]),
                 raw["micropython_board"], int(raw["heap_budget_bytes"]), layouts)


def boards() -> dict[str, Board]:
    """Every board in this folder, by name."""
    found = {}
    for path in sorted(_FOLDER.glob("*.json")):
        try:
            board = _board(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise BoardError(f"{path}: not a board file ({e})") from None
        found[board.name] = board
    return found


def board(name: str) -> Board:
    """The board called ``name``; BoardError naming the known ones otherwise."""
    known = boards()
    if name not in known:
        raise BoardError(f"unknown board {name!r}; known: {', '.join(known)}")
    return known[name]
