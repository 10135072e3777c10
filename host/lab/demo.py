"""``edgebft demo``: ``edgebft bench`` with the demo's defaults (edgebft.lab.bench).

A closed-loop run (no ``rate``) in a fresh folder under ``runs/demo/``. ``DemoOptions`` is
also how edgebft.lab.session describes the nodes it builds (``node_config``, ``new_run_dir``).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgebft.lab.bench import BenchOptions, new_run_dir, node_config

__all__ = ["DemoOptions", "new_run_dir", "node_config"]


@dataclass
class DemoOptions(BenchOptions):
    """BenchOptions whose run folders go under ``runs/demo/``."""

    command: str = "demo"
