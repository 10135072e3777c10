"""firmware/board.py on the Unix port, booted by the device's own main.py: the safe-mode escape
from a crash loop (counted only where EDGEBFT_SAFE_AFTER turns it on, as on a board), and the
file that keeps a board in safe mode. The LED states and the reset cause in a node's status:
hil_tests/test_lab.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from edgebft.devices.image import build_image
from edgebft.devices.micropython import find_micropython
from edgebft.devices.virtual_board import HEAP


@pytest.fixture
def crashing_board(tmp_path: Path) -> Path:
    """A board's flash whose node crashes at boot (a configuration without its fields)."""
    return build_image(tmp_path / "board", {"cluster": "greenhouse"})


def boot(folder: Path, safe_after: int | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBFT_")}
    if safe_after is not None:
        env["EDGEBFT_SAFE_AFTER"] = str(safe_after)
    # no ROMFS here: the modules' bytecode loads into the heap, as on stock firmware, whose
    # virtual board has this heap
    return subprocess.run([str(find_micropython()), "-X", f"heapsize={HEAP}", "main.py"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=60)


def crashed(done: subprocess.CompletedProcess[str]) -> bool:
    return done.returncode != 0 and "KeyError" in done.stdout + done.stderr


def test_a_crash_loop_ends_in_one_safe_boot_then_tries_again(crashing_board: Path) -> None:
    assert crashed(boot(crashing_board, 2))
    assert crashed(boot(crashing_board, 2))
    assert (crashing_board / "crashes").read_text() == "2"
    safe = boot(crashing_board, 2)
    assert safe.returncode == 0, safe.stdout + safe.stderr
    assert safe.stdout == ("edgebft: safe mode: 2 boots in a row crashed (the next reset tries "
                           "again); the node does not start, the REPL is free\n")
    assert (crashing_board / "crashes").read_text() == "0"
    assert crashed(boot(crashing_board, 2)), "the boot after the safe one starts the node"


def test_the_safe_file_keeps_a_board_in_safe_mode_until_removed(crashing_board: Path) -> None:
    (crashing_board / "safe").write_text("")
    for _ in range(2):
        done = boot(crashing_board, 2)
        assert done.returncode == 0
        assert "safe mode: the file 'safe' exists (remove it to start the node)" in done.stdout
    (crashing_board / "safe").unlink()
    assert crashed(boot(crashing_board, 2))


def test_the_unix_port_counts_no_crashes_unless_asked(crashing_board: Path) -> None:
    for _ in range(4):
        assert crashed(boot(crashing_board, None))
    assert not (crashing_board / "crashes").exists()
