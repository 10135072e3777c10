"""Fixtures shared by the unit, conformance and cluster tests."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgebft.devices.micropython import find_micropython

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def micropython() -> Path:
    """The MicroPython Unix-port binary (tests need it: conformance runs on real MicroPython)."""
    return find_micropython()


@pytest.fixture(scope="session")
def mp_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like a device's /lib: edgebft/__init__.py, protocol/ and firmware/."""
    from edgebft.devices.image import build_lib

    lib = tmp_path_factory.mktemp("mp_lib")
    build_lib(lib)
    return lib


def run_mp(micropython: Path, lib: Path, code: str, timeout: float = 60,
           heap: str = "256k") -> subprocess.CompletedProcess[str]:
    """Run ``code`` on MicroPython with ``lib`` on its import path; return the finished process.
    The heap holds the modules (not mapped from ROMFS here) and, for replicas built without a
    flash, their MemFlash: conformance, not a node's budget (tools/bench_memory.py has that)."""
    return subprocess.run(
        [str(micropython), "-X", f"heapsize={heap}", "-c", code],
        env={"MICROPYPATH": f"{lib}:.frozen"},
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory):  # -> Iterator[edgebft.lab.broker.Broker]
    """One MQTT broker for the whole suite, stopped at the end.

    Kind from ``$EDGEBFT_TEST_BROKER``: auto (default: mosquitto if installed, else embedded),
    mosquitto, embedded or mqtt://HOST:PORT.
    """
    import os

    from edgebft.lab.broker import start_broker

    spec = os.environ.get("EDGEBFT_TEST_BROKER", "auto")
    with start_broker(spec, tmp_path_factory.mktemp("broker")) as running:
        yield running


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` every 20 ms until it holds or ``timeout_s`` passes; its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def new_ledger(genesis: dict[str, int] | None = None,
               stakes: tuple[int, ...] | list[int] = (1,)):  # -> edgebft.protocol.ledger.Ledger
    """A ledger on a fresh in-memory flash (what a new replica starts from)."""
    from edgebft.protocol.flash import MemFlash
    from edgebft.protocol.ledger import Ledger
    from edgebft.protocol.pagestore import PageStore
    return Ledger(PageStore(MemFlash(), "L", 64), genesis, stakes)


def ledger_state(ledger) -> tuple[object, ...]:  # ledger: edgebft.protocol.ledger.Ledger
    """Everything a checkpoint covers of a ledger: its small state and its store's digest
    (written first, as a checkpoint does: the digest counts the pages as written)."""
    ledger.store.flush()
    return (ledger.small_state(), ledger.store.total, ledger.store.count)
