"""Faults injected into an emulated cluster while a workload runs (Jepsen's nemesis).

A nemesis is stepped by the run loop with the elapsed time; it acts on the cluster when its
schedule says so, records every fault start and stop with host timestamps, and always heals
before the run ends (``heal()``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from edgebft.cluster import EmulatedCluster
from edgebft.observer import Observer

NEMESES = ("none", "crash-primary")


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
class CrashPrimary:
    """Kill the current primary's process at each of ``kill_at_s`` (seconds into the run) and
    restart it ``down_s`` later. The restarted node boots from its image folder, whose files
    persisted (its flash).
    """

    cluster: EmulatedCluster
    observer: Observer
    kill_at_s: list[float]
    down_s: float
    faults: list[Fault] = field(default_factory=list)

    def step(self, elapsed_s: float) -> None:
        if self.faults and not self.faults[-1].end:
            if elapsed_s >= self.kill_at_s[len(self.faults) - 1] + self.down_s:
                self.heal()
        elif len(self.faults) < len(self.kill_at_s) and elapsed_s >= self.kill_at_s[
                len(self.faults)]:
            view, primary = current_primary(self.observer)
            self.cluster.kill(primary)
            self.faults.append(Fault("crash-primary", primary, time.time(), view))

    def heal(self) -> None:
        for fault in self.faults:
            if not fault.end:
                self.cluster.restart(fault.node)
                fault.end = time.time()


def current_primary(observer: Observer) -> tuple[int, int]:
    """(view, primary) as most online nodes report it."""
    snapshot = observer.snapshot()
    votes = Counter((s.get("view", 0), s.get("primary", 0)) for n, s in snapshot.items()
                    if observer.online.get(n))
    if not votes:
        return 0, 0
    return votes.most_common(1)[0][0]


def make_nemesis(name: str, cluster: EmulatedCluster, observer: Observer,
                 duration_s: float, interval_s: float | None = None) -> CrashPrimary | None:
    """The nemesis called ``name`` for a run of ``duration_s`` (None for "none").

    Without ``interval_s`` it strikes once, a third of the way in, and heals two thirds of
    the way in; with it, at every multiple of ``interval_s``, healing half an interval later.
    """
    if name == "none":
        return None
    if name == "crash-primary":
        if interval_s is None:
            return CrashPrimary(cluster, observer, [duration_s / 3], duration_s / 3)
        kills = []
        t = interval_s
        while t + interval_s / 2 < duration_s:
            kills.append(t)
            t += interval_s
        return CrashPrimary(cluster, observer, kills, interval_s / 2)
    raise NemesisError(f"unknown nemesis {name!r}: expected one of {', '.join(NEMESES)}")
