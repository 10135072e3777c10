"""``edgebft boards`` and ``edgebft flash``: the boards the host knows, and writing MicroPython
and our code to one (edgebft.boards, edgebft.devices.flasher).

Exit status: 0 done, 1 the board or the port failed (one line on stderr, nothing written when
the chip is not the board's), 2 a usage error (an unknown board, a file that cannot be read or
does not fit).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgebft.boards import BoardError, board, boards
from edgebft.devices import flasher

EXIT_DEVICE = 1
EXIT_USAGE = 2

console = Console()


@click.command("boards")
@click.option("--json", "as_json", is_flag=True, help="Print every board's data as JSON.")
def list_boards(as_json: bool) -> None:
    """List the boards the host can flash and deploy to: chip (as esptool names it), flash
    size, where MicroPython's image goes, the romfs partition, LED, reset method, heap
    budget, and MicroPython's download for it (--json: everything, partitions included)."""
    known = boards()
    if as_json:
        click.echo(json.dumps({name: asdict(b) for name, b in known.items()}, indent=1))
        return
    table = Table(title="boards (edgebft/boards/*.json)", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("board", "chip", "flash", "image", "romfs", "LED", "reset"):
        table.add_column(column, no_wrap=True)
    for b in known.values():
        romfs = b.partition("romfs")
        led = str(b.led["pin"]) + ("" if b.led["kind"] == "gpio" else f" {b.led['kind']}")
        table.add_row(b.name, b.chip, b.flash_size, f"0x{b.firmware_offset:X}",
                      "-" if romfs is None else f"0x{romfs.offset:X} {romfs.size // 1024}K",
                      led, b.reset.removesuffix("-reset"))
    console.print(table)
    for b in known.values():
        console.print(f"{b.name}: {b.description}; heap budget {b.heap_budget_bytes // 1000} "
                      f"KB; MicroPython download {b.micropython_board}", highlight=False)


@click.command("flash")
@click.option("--port", required=True,
              help="The board's serial port (/dev/ttyUSB0, COM3), or socket://HOST:PORT or "
                   "rfc2217://HOST:PORT for a board on a lab host.")
@click.option("--board", "board_name", required=True, help="The board (edgebft boards).")
@click.option("--firmware", required=True, type=click.Path(path_type=Path),
              help="MicroPython's combined image for the board (FILE.bin).")
@click.option("--romfs", type=click.Path(path_type=Path), default=None,
              help="A ROMFS image of the node's code, written to the board's romfs partition "
                   "(firmware built with MICROPY_VFS_ROM and that partition table).")
@click.option("--erase", is_flag=True, help="Erase the whole flash first (the filesystem too).")
@click.option("--baud", type=click.IntRange(min=9600), default=None,
              help="Baud rate for writing (default: the board's).")
def flash(port: str, board_name: str, firmware: Path, romfs: Path | None, erase: bool,
          baud: int | None) -> None:
    """Write MicroPython (and a ROMFS image) to a board through esptool: identify the chip
    and refuse one that is not the board's, erase when asked, write at the board's offsets,
    verify every byte against its digest, then hard-reset it."""
    try:
        job = flasher.plan(board(board_name), firmware, romfs, erase)
    except (BoardError, flasher.FlashError) as e:
        click.echo(f"edgebft: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            stage = what.split(" at ")[0].split(" from ")[0]  # "Writing at 0x..." -> "Writing"
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            done = flasher.flash(port, job, baud, progress)
        except flasher.FlashError as e:
            bar.stop()
            click.echo(f"edgebft: {e}", err=True)
            sys.exit(EXIT_DEVICE)
    writes = ", ".join(f"{what} {size:,} B at 0x{offset:X}" for what, offset, size in done.writes)
    click.echo(f"flashed {job.board.name} on {port}: {done.chip}, MAC {done.mac}; "
               f"{'erased, ' if erase else ''}{writes}; verified; reset")


COMMANDS = (list_boards, flash)
