"""Faults injected into an emulated cluster while a workload runs (Jepsen's nemesis).

A nemesis is stepped by the run loop with the elapsed time; it acts on the cluster when its
schedule says so, records every fault start and stop with host timestamps, and always heals
before the run ends (``heal()``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgebft.cluster import EmulatedCluster
from edgebft.observer import Observer

NEMESES = ("none", "crash-primary", "byzantine-primary")


class NemesisError(ValueError):
    """An unknown nemesis name; the message lists the known ones."""


@dataclass
class Fault:
    """One injected fault: ``start``/``end`` are host times (time.time()); ``end`` 0 if open."""

    kind: str
    node: int
    start: float
    view: int  # the cluster's view when the fault started
    end: float = 0.0


@dataclass
class PrimaryNemesis:
    """Strike the current primary at each of ``strike_at_s`` (seconds into the run) and heal
    it ``down_s`` later: ``strike(node)`` and ``cure(node)`` do the work."""

    kind: str
    observer: Observer
    strike: Callable[[int], None]
    cure: Callable[[int], None]
    strike_at_s: list[float]
    down_s: float
    faults: list[Fault] = field(default_factory=list)

    def step(self, elapsed_s: float) -> None:
        if self.faults and not self.faults[-1].end:
            if elapsed_s >= self.strike_at_s[len(self.faults) - 1] + self.down_s:
                self.heal()
        elif len(self.faults) < len(self.strike_at_s) and elapsed_s >= self.strike_at_s[
                len(self.faults)]:
            view, primary = current_primary(self.observer)
            self.strike(primary)
            self.faults.append(Fault(self.kind, primary, time.time(), view))

    def heal(self) -> None:
        for fault in self.faults:
            if not fault.end:
                self.cure(fault.node)
                fault.end = time.time()


def current_primary(observer: Observer) -> tuple[int, int]:
    """(view, primary) as most online nodes report it."""
    snapshot = observer.snapshot()
    votes = Counter((s.get("view", 0), s.get("primary", 0)) for n, s in snapshot.items()
                    if observer.online.get(n))
    if not votes:
        return 0, 0
    return votes.most_common(1)[0][0]


def make_nemesis(name: str, cluster: EmulatedCluster, observer: Observer, duration_s: float,
                 interval_s: float | None = None,
                 control: Callable[[int, str, list[Any]], None] | None = None
                 ) -> PrimaryNemesis | None:
    """The nemesis called ``name`` for a run of ``duration_s`` (None for "none").

    Without ``interval_s`` it strikes once, a third of the way in, and heals two thirds of
    the way in; with it, at every multiple of ``interval_s``, healing half an interval later.
    crash-primary kills the primary's process and restarts it from its flash;
    byzantine-primary makes the primary equivocate (``control`` sends the command) and heals
    it.
    """
    if name == "none":
        return None
    if name not in NEMESES:
        raise NemesisError(f"unknown nemesis {name!r}: expected one of {', '.join(NEMESES)}")
    if interval_s is None:
        times, down = [duration_s / 3], duration_s / 3
    else:
        times, t = [], interval_s
        while t + interval_s / 2 < duration_s:
            times.append(t)
            t += interval_s
        down = interval_s / 2
    if name == "crash-primary":
        return PrimaryNemesis(name, observer, cluster.kill, cluster.restart, times, down)
    assert control is not None
    send = control
    return PrimaryNemesis(name, observer, lambda node: send(node, "byzantine", ["equivocate"]),
                          lambda node: send(node, "heal", []), times, down)
