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
    """Kill the current primary's process at ``kill_at_s``, restart it at ``restart_at_s``.

    The restarted node boots from its image folder, whose files persisted (its flash).
    """

    cluster: EmulatedCluster
    observer: Observer
    kill_at_s: float
    restart_at_s: float
    faults: list[Fault] = field(default_factory=list)

    def step(self, elapsed_s: float) -> None:
        if not self.faults and elapsed_s >= self.kill_at_s:
            view, primary = current_primary(self.observer)
            self.cluster.kill(primary)
            self.faults.append(Fault("crash-primary", primary, time.time(), view))
        elif self.faults and not self.faults[-1].end and elapsed_s >= self.restart_at_s:
            self.heal()

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
                 duration_s: float) -> CrashPrimary | None:
    """The nemesis called ``name`` for a run of ``duration_s`` (None for "none")."""
    if name == "none":
        return None
    if name == "crash-primary":
        return CrashPrimary(cluster, observer, kill_at_s=duration_s / 3,
                            restart_at_s=2 * duration_s / 3)
    raise NemesisError(f"unknown nemesis {name!r}: expected one of {', '.join(NEMESES)}")
