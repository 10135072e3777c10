"""Faults injected into an emulated cluster while a workload runs (Jepsen's nemesis).

A nemesis is stepped by the run loop with the elapsed time; it strikes the current primary
when its schedule says so, one fault kind per strike, taking the kinds of a comma list in
turn; it records every fault (kind, node, start, end, view) with host timestamps, cures each
fault before the next strike and always heals before the run ends (``heal()``).

Kinds (``KINDS``, the nemesis kinds of edgebft.fault_kinds): crash (SIGKILL, restarted from
its flash), pause (SIGSTOP, then SIGCONT), partition (the primary cut off from every other
replica), omission (the primary loses ``OMISSION_PERMILLE``/1000 of its messages), delay (its
messages held ``DELAY_MS`` plus up to ``DELAY_JITTER_MS``), duplicate (it sends a share of
its messages twice), byzantine (it equivocates) and oom (its heap fills up; it restarts in
place from its flash). The control kinds (all but crash, pause and broker-restart) are
authenticated control commands (firmware/faults.py), sent by the caller's ``control``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgebft import fault_kinds
from edgebft.lab.broker import Broker
from edgebft.lab.cluster import EmulatedCluster
from edgebft.lab.control import partition_reach
from edgebft.lab.observer import Observer

KINDS = fault_kinds.names("nemesis")
NEMESES = ("none", *KINDS)  # the single names; --nemesis also takes comma lists of KINDS
CONTROL_KINDS = tuple(k for k in KINDS if fault_kinds.kind(k, "nemesis").inject == "control")
DELAY_MS = 300
DELAY_JITTER_MS = 200
OMISSION_PERMILLE = 500
DUPLICATE_PERMILLE = 500

Control = Callable[[int, str, list[Any]], None]


class NemesisError(ValueError):
    """A bad --nemesis value; the one-line message lists the known kinds."""


def parse_nemesis(text: str) -> list[str]:
    """The fault kinds of a --nemesis value in turn order: [] for "none", else a comma list of
    ``KINDS`` or their older names (a kind may repeat). Raises NemesisError for anything
    else."""
    if text.strip() == "none":
        return []
    try:
        return [fault_kinds.kind(k, "nemesis").name for k in text.split(",")]
    except fault_kinds.FaultKindError as e:
        raise NemesisError(f"--nemesis {text}: {e} (or none)") from None


@dataclass
class Fault:
    """One injected fault: ``start``/``end`` are host times (time.time()); ``end`` 0 if open."""

    kind: str
    node: int
    start: float
    view: int  # the cluster's view when the fault started
    end: float = 0.0


@dataclass(frozen=True)
class Action:
    """How one fault kind strikes a node, and how it is cured."""

    strike: Callable[[int], None]
    cure: Callable[[int], None]


def actions(cluster: EmulatedCluster, control: Control | None,
            broker: Broker | None = None) -> dict[str, Action]:
    """Every kind's Action on ``cluster``; the control kinds only when ``control`` is given,
    broker-restart only with a ``broker`` this host started. A pause of a node that is not
    running (it crashed by itself) does nothing."""

    def if_running(signal: Callable[[int], None]) -> Callable[[int], None]:
        return lambda node: signal(node) if cluster.alive(node) else None

    table = {"crash": Action(cluster.kill, cluster.restart),
             "pause": Action(if_running(cluster.pause), if_running(cluster.resume))}
    if broker is not None:
        table["broker-restart"] = Action(lambda node: broker.stop(),
                                         lambda node: broker.start_again())
    if control is None:
        return table
    send = control
    nodes = len(cluster)

    def command(name: str, args: list[Any]) -> Callable[[int], None]:
        return lambda node: send(node, name, args)

    def partition(node: int) -> None:
        for j, reach in partition_reach(nodes, [node]).items():
            send(j, "partition", [reach])

    def heal_all(node: int) -> None:
        for j in range(nodes):
            send(j, "heal", [])

    heal = command("heal", [])
    return {**table,
            "partition": Action(partition, heal_all),
            "delay": Action(command("delay", [DELAY_MS, DELAY_JITTER_MS]), heal),
            "omission": Action(command("omission", [OMISSION_PERMILLE, None]), heal),
            "duplicate": Action(command("duplicate", [DUPLICATE_PERMILLE]), heal),
            "byzantine": Action(command("byzantine", ["equivocate"]), heal),
            "oom": Action(command("oom", []), heal)}


@dataclass
class PrimaryNemesis:
    """Strike the current primary at each of ``strike_at_s`` (seconds into the run) with the
    next of ``kinds`` (in turn) and cure it ``down_s`` later; ``actions`` does the work."""

    kinds: list[str]
    actions: dict[str, Action]
    observer: Observer
    strike_at_s: list[float]
    down_s: float
    faults: list[Fault] = field(default_factory=list)

    def step(self, elapsed_s: float) -> None:
        if self.faults and not self.faults[-1].end:
            if elapsed_s >= self.strike_at_s[len(self.faults) - 1] + self.down_s:
                self.heal()
        elif len(self.faults) < len(self.strike_at_s) and elapsed_s >= self.strike_at_s[
                len(self.faults)]:
            kind = self.kinds[len(self.faults) % len(self.kinds)]
            view, primary = current_primary(self.observer)
            fault = Fault(kind, primary, time.time(), view)  # start: before the first blow
            self.actions[kind].strike(primary)
            self.faults.append(fault)

    def heal(self) -> None:
        """Cure every open fault (idempotent)."""
        for fault in self.faults:
            if not fault.end:
                self.actions[fault.kind].cure(fault.node)
                fault.end = time.time()


def current_primary(observer: Observer) -> tuple[int, int]:
    """(view, primary) as most online nodes report it."""
    snapshot = observer.snapshot()
    votes = Counter((s.get("view", 0), s.get("primary", 0)) for n, s in snapshot.items()
                    if observer.online.get(n))
    if not votes:
        return 0, 0
    return votes.most_common(1)[0][0]


def schedule(duration_s: float, interval_s: float | None, strikes: int) -> tuple[list[float],
                                                                                 float]:
    """(strike times, time down) for a run of ``duration_s``.

    With ``interval_s``: a strike at every multiple of it that leaves half an interval before
    the end, each cured half an interval later. Without: ``strikes`` strikes (one per kind)
    in the odd slots of 2·strikes+1 equal slots, each cured a slot later (one kind: a third
    of the way in, cured two thirds of the way in).
    """
    if interval_s is None:
        slot = duration_s / (2 * strikes + 1)
        return [slot * (2 * i + 1) for i in range(strikes)], slot
    times, t = [], interval_s
    while t + interval_s / 2 < duration_s:
        times.append(t)
        t += interval_s
    return times, interval_s / 2


def make_nemesis(name: str, cluster: EmulatedCluster, observer: Observer, duration_s: float,
                 interval_s: float | None = None, control: Control | None = None,
                 broker: Broker | None = None) -> PrimaryNemesis | None:
    """The nemesis for the --nemesis value ``name`` (None for "none") over a run of
    ``duration_s``, on the schedule of ``schedule()``. ``control(node, command, args)`` sends
    an authenticated control command; kinds in CONTROL_KINDS need it. broker-restart needs
    the ``broker`` this host started.

    Raises NemesisError for an unknown kind, or a kind without what it needs.
    """
    kinds = parse_nemesis(name)
    if not kinds:
        return None
    if control is None and set(kinds) & set(CONTROL_KINDS):
        raise NemesisError(f"--nemesis {name}: {', '.join(CONTROL_KINDS)} need a control "
                           "channel")
    if "broker-restart" in kinds and (broker is None or broker.kind == "external"):
        raise NemesisError(f"--nemesis {name}: broker-restart needs a broker this host starts "
                           "(--broker mosquitto or embedded)")
    times, down = schedule(duration_s, interval_s, len(kinds))
    return PrimaryNemesis(kinds, actions(cluster, control, broker), observer, times, down)
