"""``edgebft demo``: ``edgebft bench`` with the demo's defaults (edgebft.lab.bench).

A closed-loop run (no ``rate``) in a fresh folder under ``runs/demo/``.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgebft.lab.bench import BenchOptions


@dataclass
class DemoOptions(BenchOptions):
    """BenchOptions whose run folders go under ``runs/demo/``."""

    command: str = "demo"
