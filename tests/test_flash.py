"""Flashing a board (issue 14): `edgebft flash` through esptool's library API against a ROM
bootloader on a pty (esp32-mock-bootloader: a 4 MB in-memory flash that real esptool reads
back byte for byte; ../shared/HARDWARE.md), and `edgebft boards`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from esptool.cmds import attach_flash, detect_chip, read_flash, run_stub
from esptool.targets import CHIP_DEFS

from edgebft.boards import BoardError, board, boards
from edgebft.devices import flasher
from edgebft.devices.image import build_lib, build_rom

MOCK = Path(sys.executable).parent / "esp32-mock-bootloader"
EDGEBFT = [sys.executable, "-m", "edgebft"]

pytestmark = pytest.mark.skipif(not MOCK.exists() and shutil.which("esp32-mock-bootloader")
                                is None, reason="esp32-mock-bootloader not installed")


def mock_board(tmp_path: Path, chip: str) -> Iterator[str]:
    port_file = tmp_path / f"port-{chip}"
    proc = subprocess.Popen([str(MOCK), "run", "--pty", "--chip", chip, "--port-file",
                             str(port_file), "--timeout", "120"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.monotonic() < deadline, "the mock bootloader did not start"
            time.sleep(0.05)
        yield port_file.read_text().strip()
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def esp32(tmp_path: Path) -> Iterator[str]:
    yield from mock_board(tmp_path, "esp32")


@pytest.fixture
def esp32c3(tmp_path: Path) -> Iterator[str]:
    yield from mock_board(tmp_path, "esp32c3")


def esp_image(chip_id: int, size: int) -> bytes:
    """Bytes shaped like an ESP image for ``chip_id`` (its header's magic and chip id), the
    rest random: what flash checks of a firmware file, not a program."""
    header = bytes([0xE9, 3, 2, 0x20]) + bytes(8) + chip_id.to_bytes(2, "little")
    return header + os.urandom(size - len(header))


def read_back(port: str, offset: int, size: int) -> bytes:
    with detect_chip(port, 115200) as esp:
        esp = run_stub(esp)
        attach_flash(esp)
        return bytes(read_flash(esp, offset, size))


def test_boards_describe_the_four_chips() -> None:
    known = boards()
    assert {b.chip for b in known.values()} == {"ESP32", "ESP32-S3", "ESP32-C3", "ESP32-C6"}
    assert board("esp32").firmware_offset == 0x1000
    assert all(b.firmware_offset == 0 for n, b in known.items() if n != "esp32")
    for b in known.values():
        for layout in b.layouts.values():
            ends = [(p.offset, p.offset + p.size) for p in layout]
            assert all(a[1] <= b_[0] for a, b_ in zip(ends, ends[1:], strict=False)), b.name
        romfs = b.partition("romfs")
        assert romfs is not None and (romfs.offset, romfs.size) == (0x1E0000, 0x20000)
    for b in known.values():  # the chip id an image for it carries, as esptool knows it
        assert CHIP_DEFS[b.name].IMAGE_CHIP_ID == b.image_chip_id
        assert CHIP_DEFS[b.name].CHIP_NAME == b.chip
    with pytest.raises(BoardError, match="unknown board 'esp99'; known: esp32"):
        board("esp99")
    done = subprocess.run([*EDGEBFT, "boards", "--json"], capture_output=True, text=True)
    assert done.returncode == 0
    assert json.loads(done.stdout)["esp32c6"]["chip"] == "ESP32-C6"


def test_flash_writes_the_firmware_and_our_romfs_and_reads_back_identical(
        esp32: str, tmp_path: Path) -> None:
    firmware = tmp_path / "micropython.bin"
    firmware.write_bytes(esp_image(0, 300_000))
    rom = tmp_path / "rom.img"
    made = subprocess.run([*EDGEBFT, "romfs", str(rom)], capture_output=True, text=True,
                          timeout=60)
    assert made.stdout == f"{rom}: ROMFS image, {rom.stat().st_size:,} B\n", made.stderr
    assert rom.read_bytes() == build_rom(build_lib(tmp_path / "lib")), "the image deploy writes"
    done = subprocess.run([*EDGEBFT, "flash", "--port", esp32, "--board", "esp32", "--firmware",
                           str(firmware), "--romfs", str(rom), "--erase"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"flashed esp32 on {esp32}: ESP32-")
    assert "firmware 300,000 B at 0x1000" in done.stdout and "at 0x1E0000" in done.stdout
    assert read_back(esp32, 0x1000, 300_000) == firmware.read_bytes()
    flashed = read_back(esp32, 0x1E0000, rom.stat().st_size)
    assert flashed == rom.read_bytes()
    # Flash, then boot: the partition's bytes, mapped as a board maps its ROMFS partition
    # (romboot), mount at /rom and our modules import from them, in place.
    board = tmp_path / "board"
    board.mkdir()
    (board / "romfs.img").write_bytes(flashed)
    (board / "probe.py").write_text(
        "import os, sys, uctypes, vfs\n"
        "address, size = os.getenv('EDGEBFT_ROM').split(':')\n"
        "vfs.mount(vfs.VfsRom(uctypes.bytearray_at(int(address), int(size))), '/rom')\n"
        "sys.path.insert(0, '/rom/lib')\n"
        "from edgebft.firmware import runtime\n"
        "print(runtime.__file__)\n")
    done = subprocess.run([sys.executable, "-m", "edgebft.devices.romboot", "romfs.img",
                           "-X", "heapsize=160k", "probe.py"], cwd=board, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "/rom/lib/edgebft/firmware/runtime.mpy\n"


def test_a_chip_that_is_not_the_boards_is_refused_and_nothing_is_written(
        esp32c3: str, tmp_path: Path) -> None:
    firmware = tmp_path / "micropython.bin"
    firmware.write_bytes(esp_image(0, 4096))
    done = subprocess.run([*EDGEBFT, "flash", "--port", esp32c3, "--board", "esp32",
                           "--firmware", str(firmware)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"edgebft: the chip on {esp32c3} is an ESP32-C3, not the ESP32 of board esp32: "
        "nothing written")
    assert read_back(esp32c3, 0x1000, 4096) != firmware.read_bytes()


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(esp_image(5, 0x1E0000 + 1))  # at 0x0 (C3), past its app at 0x10000 + 0x1D0000
    rom = tmp_path / "rom.img"
    rom.write_bytes(b"\xd2\xcd\x31" + b"\0" * 0x20000)
    small = tmp_path / "small.bin"
    small.write_bytes(esp_image(0, 1024))
    text = tmp_path / "notes.txt"
    text.write_text("not firmware\n" * 10)
    cases = {
        ("--board", "esp99", "--firmware", str(small)): "unknown board 'esp99'",
        ("--board", "esp32", "--firmware", str(tmp_path / "none.bin")): "cannot read",
        ("--board", "esp32c3", "--firmware", str(big), "--romfs", str(rom)):
            "past the app partition",
        ("--board", "esp32", "--firmware", str(small), "--romfs", str(rom)):
            "more than the romfs partition's 131,072",
        ("--board", "esp32", "--firmware", str(text)): "not an ESP image",
        ("--board", "esp32s3", "--firmware", str(small)):
            "an image for chip id 0, not for esp32s3's ESP32-S3 (chip id 9)",
        ("--board", "esp32", "--firmware", str(small), "--romfs", str(text)):
            "not a ROMFS image (make one with 'edgebft romfs')",
    }
    for args, message in cases.items():
        done = subprocess.run([*EDGEBFT, "flash", "--port", "/dev/null", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, lines)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(flasher.FlashError, match="not an ESP image"):
        flasher.plan(board("esp32"), empty)


def test_a_port_that_does_not_exist_is_one_line_and_exit_1(tmp_path: Path) -> None:
    firmware = tmp_path / "micropython.bin"
    firmware.write_bytes(esp_image(0, 1024))
    done = subprocess.run([*EDGEBFT, "flash", "--port", str(tmp_path / "ttyNONE"), "--board",
                           "esp32", "--firmware", str(firmware)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Could not open" in lines[0] and "Traceback" not in done.stderr
