"""The protocol runs unchanged and identically on MicroPython and CPython (DESIGN.md 6.2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("portable_cluster.py")


def _run(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")


@pytest.mark.parametrize("requests,seed", [(60, 1), (45, 7)])
def test_cluster_scenario_is_identical_on_micropython_and_cpython(
        micropython: Path, mp_lib: Path, requests: int, seed: int) -> None:
    on_cpython = _run([sys.executable, str(SCRIPT), str(requests), str(seed)])
    # Four replicas in one process: four heaps of a node's worth, and their flash too (each a
    # MemFlash in RAM, with its last 64 operations kept to undo; the P entries replicas write
    # ahead added a file and its versions, and 400k ran out now and then).
    on_mp = _run([str(micropython), "-X", "heapsize=480k", str(SCRIPT), str(requests),
                  str(seed)], env={"MICROPYPATH": f"{mp_lib}:.frozen"})
    assert on_mp == on_cpython
    rows = [line.split() for line in on_cpython if line and not line.startswith("accepted")]
    assert len(rows) == 4
    assert {row[1] for row in rows} == {str(requests)}, "every request executed everywhere"
    assert len({row[3] for row in rows}) == 1, "one ledger digest"
    assert int(rows[0][2]) == requests - requests % 4, "checkpoints at K=4 became stable"


def test_protocol_and_firmware_compile_on_micropython(micropython: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    sources = sorted((root / "protocol").glob("*.py")) + sorted((root / "firmware").glob("*.py"))
    assert len(sources) >= 8
    for src in sources:
        done = subprocess.run([str(micropython), "-X", "compile-only", str(src)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{src.name}: {done.stderr}"
