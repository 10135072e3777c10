"""Every board of a site at once: flash MicroPython (when given a firmware) and deploy its node,
one thread per board. One board failing does not stop the others; each ends with a Result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgebft.boards import board
from edgebft.devices import deploy, flasher
from edgebft.devices.site import Site

BOOT_WAIT_S = 15.0  # after flashing: how long the REPL may take to answer


@dataclass
class Result:
    """How one board went: ``error`` is None when it is provisioned."""

    node: int
    board: str
    port: str
    flashed: str = "-"    # the chip, when flashed
    written: int = 0
    unchanged: int = 0
    error: str | None = None
    romfs: int | None = None  # bytes written to its romfs partition (None: lib/ was used)


# (node, what it is doing now: "flashing", "deploying", "done" or "failed", and how far: done
# of total, esptool's blocks while flashing, files while deploying)
Report = Callable[[int, str, int, int], None]


def provision(site: Site, firmware: Path | None = None, romfs: Path | None = None,
              report: Report | None = None) -> list[Result]:
    """Provision every node of ``site`` in parallel; the results in node order."""
    keys = site.keys()
    results = [Result(n.id, n.board, n.port) for n in site.nodes]

    def one(result: Result) -> None:
        def say(what: str, done: int = 0, total: int = 1) -> None:
            if report is not None:
                report(result.node, what, done, total)

        try:
            if firmware is not None:
                say("flashing")
                job = flasher.plan(board(result.board), firmware, romfs)
                result.flashed = flasher.flash(
                    result.port, job, progress=lambda what, i, n: say("flashing", i, n)).chip
            node = deploy.node_files(site.node_config(result.node, keys))
            files = [0, len(node.files)]  # deployed, of

            def deployed(path: str, wrote: bool) -> None:
                if path == "romfs":  # the image stands for lib/
                    files[1] = 1 + sum(not p.startswith("lib/") for p in node.files)
                files[0] += 1
                say("deploying", *files)

            say("deploying", *files)
            done = _deploy_when_up(result.port, node, BOOT_WAIT_S if firmware else 0.0,
                                   deployed)
            result.written, result.unchanged = len(done.written), len(done.skipped)
            result.romfs = done.romfs
            say("done", 1, 1)
        except (flasher.FlashError, deploy.DeployError) as e:
            result.error = str(e)
            say("failed")

    threads = [threading.Thread(target=one, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _deploy_when_up(port: str, node: deploy.NodeFiles, wait_s: float,
                    progress: Callable[[str, bool], None]) -> deploy.Deployed:
    """deploy(), retried for ``wait_s`` while the board boots (just flashed)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return deploy.deploy(port, node, progress=progress)
        except deploy.DeployError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)
