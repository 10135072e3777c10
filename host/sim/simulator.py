"""Deterministic simulation of a whole cluster from one seed (DESIGN.md section 6, layer 3).

FoundationDB and TigerBeetle style: the replicas of ``edgebft.protocol`` run in one process on a
simulated network and clock. Everything random (keys, latencies, losses, the fault schedule,
client think times) comes from one ``random.Random(seed)``, and every input reaches a replica
through an event queue ordered by (simulated ms, insertion number), so a seed replays exactly.

Rules:
- Faults are benign here (crash, reboot, pause, partition, omission, delay: fault_kinds.py
  names them for every tool, and the simulator applies them here): every replica is
  correct, so any disagreement between replicas is a protocol bug. The bound is in stake: the
  replicas down (crashed, rebooting or paused), those a partition cuts off (its smaller side,
  by stake) and the Byzantine ones together hold less than 1/3 of the stake, of the genesis set
  when the schedule is drawn and of the set in force when a fault starts (with churn: a fault
  that would break it then is skipped). ``beyond_bound`` drops the bound on purpose: then the
  checkers must find the run unsafe or not live, or it is ok; it never forks silently.
- Each replica runs inside a protocol/node.py Node, as on a board: the simulator feeds it
  messages, a tick every TICK_MS, its peers' heartbeats every STATUS_INTERVAL_MS (cut by
  partitions and losses like any message) and the broker's Last Will ("offline") when a peer
  crashes, so the seeds cover the node's suspicion and stall gates. A paused replica (a
  SIGSTOP) handles nothing and sends nothing until it resumes; what reached it meanwhile is
  read then, after the tick that finds the stall.
- Everything heals at ``fault_ms``; from then the run goes on until every request is accepted
  or ``liveness_ms`` more have passed.
- Verdicts come from checkers over the run's history (Jepsen's model), never from what the
  replicas claim about themselves: safety (executed and stable digests agree per sequence
  number), client safety (one accepted result per request), liveness (all accepted in time)
  and convergence (once all are accepted, every correct replica executes the last of them
  within SETTLE_MS with no new load, or else once one more request is accepted: one left
  behind, alone in a view change say, is a replica the cluster can no longer count on. The
  probe request is there because PBFT promises progress to requests, not catch-up at rest:
  when the only votes that could carry a lagging replica died with a restarted one, it is
  the next request, and the view change it may need, that carries it).
- Byzantine replicas (``byzantine``) run a behaviour of edgebft.protocol.byzantine, or are
  twins (Bano et al., "Twins", OPODIS 2021): two instances of one replica with the same id and
  keys, each behaving correctly on its own. While faults last, a seeded sequence of twin phases
  splits the correct replicas between the twins (each twin talks to its side only; in a "cut"
  phase the correct replicas of the two sides cannot talk either, Twins' partitions); clients
  reach both. At the heal point the second twins go silent and everyone talks to the first.
  Byzantine replicas' events are not history: the checkers judge the correct replicas only.
- A replica exception (an assert is our own invariant) ends the seed with verdict ``error``
  (unless the history up to it is already unsafe: ``unsafe`` outranks ``error``).

The contract this module drives: protocol/node.py's inputs (message, heartbeat, offline,
tick), the replica's ``out`` and ``events`` lists (drained and cleared after every input), and
``durable()`` / ``Replica.restore(...)`` for a restart.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edgebft import fault_kinds
from edgebft.check.verdict import OK, Check, Verdict
from edgebft.devices.keys import ClusterKeys, generate_keys
from edgebft.lab.workload import genesis, operation
from edgebft.protocol import replica as rp
from edgebft.protocol.byzantine import BEHAVIOURS, misbehave
from edgebft.protocol.client import ClientCore
from edgebft.protocol.node import STATUS_INTERVAL_MS, TICK_MS, Node
from edgebft.protocol.stake import Stake

FAULT_KINDS = fault_kinds.names("sim")
_DOWN_KINDS = ("crash", "reboot", "pause")  # faults that take a replica out while they last
TWINS = "twins"
SIM_BEHAVIOURS = BEHAVIOURS + (TWINS,)  # what a Byzantine replica may do in the simulator

LATENCY_MS = (1, 20)             # one MQTT hop on WiFi is ~10 ms (DESIGN.md section 8)
FAULT_GAP_MS = (100, 1_000)      # between the starts of two faults
FAULT_LENGTH_MS = (200, 2_500)   # crash, partition, loss and delay windows
REBOOT_DOWN_MS = (0, 200)        # a power cycle: down briefly, then restore from flash
CUT_OPERATIONS_MAX = 12          # a crash undoes up to this many of the last flash operations
SETTLE_MS = 5_000                # convergence: after the last acceptance, with no load
DEFAULT_NODES = 4
DEFAULT_REQUESTS = 30
DEFAULT_CLIENTS = 4
DEFAULT_LOSS_MAX = 0.3
DEFAULT_DELAY_MS_MAX = 500
DEFAULT_FAULT_MS = 5_000
DEFAULT_LIVENESS_MS = 30_000
DEFAULT_CHECKPOINT_INTERVAL = 4  # small, so runs of ~30 requests cross checkpoints and GC
DEFAULT_VIEW_TIMEOUT_MS = 1_000  # the replica's default (DESIGN.md section 8: view change < 1 s)


class SimError(ValueError):
    """Bad simulation options (a user mistake: the CLI prints it on one line, exit 2)."""


@dataclass(frozen=True)
class SimOptions:
    """What one seed simulates; ``check()`` validates it.

    ``plant_divergence`` = (replica, seq) makes that replica's ledger execute a different op at
    sequence ``seq``: a planted bug that the safety checker must report (tests and demos only).
    """

    nodes: int = DEFAULT_NODES
    requests: int = DEFAULT_REQUESTS
    clients: int = DEFAULT_CLIENTS
    faults: tuple[str, ...] = FAULT_KINDS
    loss_max: float = DEFAULT_LOSS_MAX
    delay_ms_max: int = DEFAULT_DELAY_MS_MAX
    fault_ms: int = DEFAULT_FAULT_MS
    liveness_ms: int = DEFAULT_LIVENESS_MS
    checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL
    view_timeout_ms: int = DEFAULT_VIEW_TIMEOUT_MS
    plant_divergence: tuple[int, int] | None = None
    stake: tuple[int, ...] | None = None      # per replica; None: equal
    byzantine: tuple[int, ...] = ()           # replica ids that misbehave
    behaviour: str = "silent"                 # SIM_BEHAVIOURS
    churn: bool = False                       # every other request bonds or unbonds stake
    state_keys: int = 0                       # extra genesis accounts: a large state to move
    beyond_bound: bool = False                # faults may take 1/3 of stake or more
    overlap_restarts: bool = False            # down faults need not wait for recovering ones

    def weights(self) -> list[int]:
        return list(self.stake) if self.stake is not None else [1] * self.nodes

    def byzantine_share(self) -> tuple[int, int]:
        """(Byzantine stake, total stake)."""
        w = self.weights()
        return sum(w[i] for i in self.byzantine), sum(w)

    def check(self) -> None:
        """Raise SimError naming the first bad option."""
        if self.nodes < 4 or self.nodes > 32:
            raise SimError(f"--nodes must be 4..32 (n = 3f+1 needs f >= 1), got {self.nodes}")
        if self.requests < 1:
            raise SimError(f"--requests must be at least 1, got {self.requests}")
        if self.clients < 1:
            raise SimError(f"--clients must be at least 1, got {self.clients}")
        for k in self.faults:  # the names parse_faults() gives (no aliases)
            if k not in FAULT_KINDS:
                raise SimError(f"unknown fault {k!r}: expected one of {', '.join(FAULT_KINDS)} "
                               "or none")
        if not 0.0 <= self.loss_max < 1.0:
            raise SimError(f"--loss must be in [0, 1), got {self.loss_max}")
        if self.delay_ms_max < 0 or self.fault_ms < 0 or self.liveness_ms < 0:
            raise SimError("--delay-ms, --fault-ms and --liveness-ms must be >= 0")
        if self.checkpoint_interval < 1:
            raise SimError("--checkpoint-interval must be at least 1")
        if self.state_keys < 0:
            raise SimError(f"--state-keys must be >= 0, got {self.state_keys}")
        if self.view_timeout_ms < 1:
            raise SimError("--view-timeout-ms must be at least 1")
        if self.stake is not None and (len(self.stake) != self.nodes or min(self.stake) < 0
                                       or sum(self.stake) <= 0):
            raise SimError(f"--stake needs {self.nodes} non-negative values with a positive "
                           f"sum, got {','.join(map(str, self.stake))}")
        if any(not 0 <= i < self.nodes for i in self.byzantine):
            raise SimError(f"--byzantine ids must be in 0..{self.nodes - 1}")
        if self.behaviour not in SIM_BEHAVIOURS:
            raise SimError(f"unknown behaviour {self.behaviour!r}: choose from "
                           f"{','.join(SIM_BEHAVIOURS)}")
        if self.plant_divergence is not None:
            replica, seq = self.plant_divergence
            if not 0 <= replica < self.nodes or seq < 1:
                raise SimError(f"--plant-divergence wants REPLICA:SEQ with REPLICA < "
                               f"{self.nodes} and SEQ >= 1, got {replica}:{seq}")

    def replay_command(self, seed: int) -> str:
        """The exact command line that replays ``seed`` with these options."""
        faults = ",".join(self.faults) or "none"
        cmd = (f"edgebft sim --seed {seed} --nodes {self.nodes} --faults {faults} "
               f"--requests {self.requests}")
        extra = [("--clients", self.clients, DEFAULT_CLIENTS),
                 ("--loss", self.loss_max, DEFAULT_LOSS_MAX),
                 ("--delay-ms", self.delay_ms_max, DEFAULT_DELAY_MS_MAX),
                 ("--fault-ms", self.fault_ms, DEFAULT_FAULT_MS),
                 ("--liveness-ms", self.liveness_ms, DEFAULT_LIVENESS_MS),
                 ("--checkpoint-interval", self.checkpoint_interval,
                  DEFAULT_CHECKPOINT_INTERVAL),
                 ("--view-timeout-ms", self.view_timeout_ms, DEFAULT_VIEW_TIMEOUT_MS)]
        for flag, value, default in extra:
            if value != default:
                cmd += f" {flag} {value}"
        if self.plant_divergence is not None:
            cmd += " --plant-divergence {}:{}".format(*self.plant_divergence)
        if self.stake is not None:
            cmd += " --stake " + ",".join(map(str, self.stake))
        if self.byzantine:
            cmd += " --byzantine " + ",".join(map(str, self.byzantine))
            cmd += f" --behaviour {self.behaviour}"
        if self.churn:
            cmd += " --churn"
        if self.beyond_bound:
            cmd += " --beyond-bound"
        if self.overlap_restarts:
            cmd += " --overlap-restarts"
        if self.state_keys:
            cmd += f" --state-keys {self.state_keys}"
        return cmd


@dataclass
class SeedResult:
    """The outcome of one seed; ``history_digest`` fingerprints the whole run (replays match)."""

    seed: int
    verdict: str  # edgebft.check.verdict's name of the run: ok, unsafe, error, not-live
    reasons: list[str]
    checks: list[Check]  # safety, client-safety, liveness
    sim_ms: int
    delivered: int
    dropped: int
    view_changes: int
    accepted: int
    requests: int
    faults: int
    history_digest: str
    replay: str
    fault_kinds: tuple[str, ...] = ()  # the faults that started, by kind (one entry each)
    transfers: int = 0  # state transfers the correct replicas completed
    stalls: int = 0      # ticks of correct replicas' nodes that found a stall (since restart)
    suspicions: int = 0  # view changes their failure detectors started (since restart)

    @property
    def ok(self) -> bool:
        return self.verdict == OK


@dataclass
class SimSummary:
    """The results of many seeds, with the wall time they took."""

    options: SimOptions
    results: list[SeedResult]
    elapsed_s: float

    @property
    def failures(self) -> list[SeedResult]:
        return [r for r in self.results if not r.ok]

    @property
    def seeds_per_s(self) -> float:
        return len(self.results) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def count(self, verdict: str) -> int:
        return sum(1 for r in self.results if r.verdict == verdict)


@dataclass(frozen=True)
class Fault:
    """One scheduled fault, active on [start_ms, end_ms)."""

    kind: str                         # FAULT_KINDS or TWINS (a twin phase)
    start_ms: int
    end_ms: int
    replica: int = -1                 # crash, reboot, pause, delay
    side: frozenset[int] = frozenset()  # partition: one group; twins: the second twins' side
    loss_p: float = 0.0               # omission: the share lost; duplicate: sent twice
    delay_ms: int = 0
    cut: bool = False                 # twins: the correct replicas of the two sides are cut

    def describe(self) -> str:
        if self.kind == "partition":
            return f"partition {sorted(self.side)}"
        if self.kind == TWINS:
            return f"twins {sorted(self.side)}{' cut' if self.cut else ''}"
        if self.kind in ("omission", "duplicate"):
            return f"{self.kind} p={self.loss_p:.2f}"
        if self.kind == "delay":
            return f"delay replica {self.replica} +{self.delay_ms} ms"
        return f"{self.kind} replica {self.replica}"


def seeded_keys(n: int, rng: random.Random) -> ClusterKeys:
    """Cluster keys shaped like ``edgebft.devices.keys.generate_keys(n)``, drawn from ``rng``."""
    return generate_keys(n, rng.randbytes)


def fault_schedule(options: SimOptions, rng: random.Random) -> list[Fault]:
    """Draw the faults of one run: at most one of each window kind at a time, at most f down.

    Every fault ends by ``options.fault_ms`` (the heal point).
    """
    kinds = list(options.faults)
    if not kinds or options.fault_ms <= 0:
        return []
    faults: list[Fault] = []
    t = 0
    while True:
        t += rng.randint(*FAULT_GAP_MS)
        if t >= options.fault_ms:
            break
        kind = rng.choice(kinds)
        length = rng.randint(*(REBOOT_DOWN_MS if kind == "reboot" else FAULT_LENGTH_MS))
        end = min(t + length, options.fault_ms)
        active = [x for x in faults if x.start_ms < end and t < x.end_ms]
        fault = _draw_fault(kind, t, end, active, options, rng)
        if fault is not None:
            faults.append(fault)
    for fault in faults:
        assert fault.start_ms <= fault.end_ms <= options.fault_ms
    return faults


def twin_phases(options: SimOptions, rng: random.Random) -> list[Fault]:
    """Draw the twin phases of a twins run: back to back from 0 to ``options.fault_ms``, each
    putting every correct replica on the first or the second twins' side (``side``: the
    second's) and cutting the two sides apart or not. Empty unless twins and fault_ms > 0."""
    if options.behaviour != TWINS or not options.byzantine or options.fault_ms <= 0:
        return []
    correct = [i for i in range(options.nodes) if i not in options.byzantine]
    phases = []
    t = 0
    while t < options.fault_ms:
        end = min(t + rng.randint(*FAULT_LENGTH_MS), options.fault_ms)
        side = frozenset(i for i in correct if rng.random() < 0.5)
        phases.append(Fault(TWINS, t, end, side=side, cut=rng.random() < 0.5))
        t = end
    return phases


def cut_off(fault: Fault, weights: Sequence[int]) -> frozenset[int]:
    """The replicas ``fault`` takes out while it lasts: the one it takes down, or the smaller
    side of a partition by stake (either side when they are equal: the one named)."""
    if fault.kind in _DOWN_KINDS:
        return frozenset((fault.replica,))
    if fault.kind != "partition":
        return frozenset()
    side = fault.side
    inside = sum(weights[i] for i in side)
    if 2 * inside <= sum(weights):
        return side
    return frozenset(i for i in range(len(weights)) if i not in side)


def within_bound(out: Iterable[int], weights: Sequence[int]) -> bool:
    """Do the replicas ``out`` hold less than 1/3 of the stake?"""
    return 3 * sum(weights[i] for i in set(out)) < sum(weights)


def _draw_fault(kind: str, start: int, end: int, active: list[Fault],
                options: SimOptions, rng: random.Random) -> Fault | None:
    """One fault of ``kind`` that fits beside the overlapping ``active`` ones, or None: one
    down fault per replica at a time, one window of each other kind, and (unless
    ``options.beyond_bound``) the bound in stake of the genesis set."""
    n = options.nodes
    weights = options.weights()
    out = set(options.byzantine).union(*(cut_off(x, weights) for x in active))

    def fits(more: Iterable[int]) -> bool:
        return options.beyond_bound or within_bound(out.union(more), weights)

    if kind in _DOWN_KINDS:
        down = {x.replica for x in active if x.kind in _DOWN_KINDS}
        choices = [i for i in range(n) if i not in down and fits((i,))]
        if not choices:
            return None
        return Fault(kind, start, end, replica=rng.choice(choices))
    if any(x.kind == kind for x in active):
        return None
    if kind == "partition":
        size = rng.randint(1, n // 2)
        fault = Fault(kind, start, end, side=frozenset(rng.sample(range(n), size)))
        return fault if fits(cut_off(fault, weights)) else None
    if kind == "duplicate":
        return Fault(kind, start, end, loss_p=rng.uniform(0.0, 0.5))
    if kind == "omission":
        return Fault(kind, start, end, loss_p=rng.uniform(0.0, options.loss_max))
    assert kind == "delay"
    return Fault(kind, start, end, replica=rng.randrange(n),
                 delay_ms=rng.randint(0, options.delay_ms_max))


# Event queue kinds: (time_ms, order, kind, a, b). A replica there is an instance (below).
_DELIVER = 0       # a: replica, b: (incarnation, wire, sender id or None for a client)
_REPLY = 1         # a: client, b: wire
_TICK = 2          # a: replica, b: incarnation
_RETRANSMIT = 3    # a: client, b: timestamp
_ISSUE = 4         # a: client, b: None
_FAULT_START = 5   # a: fault index
_FAULT_END = 6     # a: fault index
_BEAT = 7          # a: replica, b: incarnation (it sends its heartbeats)
_HEARD = 8         # a: replica, b: (incarnation, sender id, status or Will wire) (one arrives)
_EVENT_NAMES = {_DELIVER: "delivery", _REPLY: "reply", _TICK: "tick", _RETRANSMIT: "retransmit",
                _ISSUE: "issue", _FAULT_START: "fault start", _FAULT_END: "heal",
                _BEAT: "heartbeat", _HEARD: "heartbeat"}


class _Client:
    """One closed-loop client: a ClientCore (its retransmission timer too) and its outstanding
    op."""

    __slots__ = ("core", "op", "issued", "think_ms")

    def __init__(self, core: ClientCore, think_ms: int) -> None:
        self.core = core
        self.op: list[Any] | None = None
        self.issued = 0
        self.think_ms = think_ms


def churn_operation(client: int, i: int, nodes: int) -> list[Any]:
    """The i-th operation of ``client`` under stake churn: every other one bonds one token to a
    validator or unbonds one from another (in turn), so the validator set changes at nearly
    every checkpoint (a new epoch) while each stake stays within a few tokens of its start."""
    if i % 2:
        return operation(client, i // 2)
    k = i // 2
    validator = (client + k // 2) % nodes  # it unbonds what it bonded the turn before
    account = f"acct{client}"
    if k % 2 == 0:
        return ["stake", account, validator, 1]
    return ["unstake", validator, account, 1]


class Simulation:
    """One seed: replicas, clients, network and faults. ``run()`` returns its SeedResult.

    Replica instances: 0..n-1 are the replicas (the first twin of a twinned one), then one
    second twin per twinned replica; ``node[k]`` is instance k's replica id. Per-replica
    network state (delays, partitions) is indexed by id; liveness state (up, incarnation,
    timer) by instance. Faults that name a replica act on its instance of that index.
    """

    def __init__(self, seed: int, options: SimOptions, faults: list[Fault] | None = None) -> None:
        """``faults`` replaces the schedule drawn from the seed (targeted scenarios); twin
        phases are drawn all the same."""
        options.check()
        self.seed = seed
        self.options = options
        self.rng = random.Random(seed)
        n = options.nodes
        self.stake = Stake(options.weights())
        self.byzantine = set(options.byzantine)
        self.sent: dict[int, list[bytes]] = {i: [] for i in self.byzantine}  # for "replay"
        self.keys = seeded_keys(n, self.rng)
        self.genesis = genesis()
        self.genesis.update({f"fill{k}": [1, 0] for k in range(options.state_keys)})
        self.nodes = [self._node(self._new_replica(i)) for i in range(n)]
        drawn = fault_schedule(options, self.rng)
        phases = twin_phases(options, self.rng)
        self.faults = (drawn if faults is None else list(faults)) + phases
        self.twinned = sorted(self.byzantine) if phases else []
        self.nodes += [self._node(self._new_replica(i)) for i in self.twinned]
        self.node = list(range(n)) + self.twinned
        self.instances = [[k for k, i in enumerate(self.node) if i == j] for j in range(n)]
        # The twin side of every instance (0: the first twins' side) while a phase lasts.
        self.twin_side: list[int] | None = None
        self.twin_cut = False
        count = len(self.nodes)
        self.incarnation = [0] * count
        self.beats = [0] * count  # statuses instance i sent in its incarnation
        self.up = [True] * count
        self.paused = [False] * count
        self.backlog: list[list[tuple[int, Any]]] = [[] for _ in range(count)]  # while paused
        self.skipped: set[int] = set()  # down faults not started: one was recovering
        self.side: frozenset[int] | None = None  # active partition
        self.loss_p = 0.0
        self.dup_p = 0.0  # duplicate: the chance a message is delivered twice
        self.delay_ms = [0] * n
        # Closed-loop clients whose think times spread the requests over the fault period.
        think_ms = 2 * options.fault_ms * options.clients // options.requests
        self.clients = [_Client(ClientCore(c, self.stake, self.keys.client_keys(c)), think_ms)
                        for c in range(options.clients)]
        self.queue: list[tuple[int, int, int, Any, Any]] = []
        self.order = 0
        self.now = 0
        self.current: tuple[int, Any] = (-1, None)  # the event being handled (error reports)
        self.history: list[tuple[Any, ...]] = []
        self.delivered = 0
        self.dropped = 0
        self.accepted = 0
        self.scheduled = 0  # requests issued or waiting out a think time

    # ------------------------------------------------------------------ replicas

    @property
    def replicas(self) -> list[rp.Replica]:
        """The replica of every instance, in instance order."""
        return [node.replica for node in self.nodes]

    def _replica_kwargs(self) -> dict[str, Any]:
        return {"genesis": self.genesis,
                "checkpoint_interval": self.options.checkpoint_interval,
                "view_timeout_ms": self.options.view_timeout_ms}

    @staticmethod
    def _node(replica: rp.Replica, clock: int = 0) -> Node:
        """The node a replica runs in; an exception it raises ends the seed (an error)."""
        return Node(replica, STATUS_INTERVAL_MS, clock=clock, contain=False)

    def _new_replica(self, i: int) -> rp.Replica:
        r = rp.Replica(i, self.stake, self.keys.pairwise[i], self.keys.client_secrets[i],
                       **self._replica_kwargs())
        self._plant(r)
        return r

    def _restarted_replica(self, i: int) -> rp.Replica:
        """Replica i rebuilt from what it persisted (crash-recovery, DESIGN.md section 3): its
        flash (a MemFlash, which the crash may have cut in the middle of a write) and its
        durable record.

        Its old object has received nothing since the crash, so its ``durable()`` now is what
        a runtime saving after every call would have on flash at the crash.
        """
        old = self.nodes[i].replica
        r = rp.Replica.restore(old.durable(), i, self.stake, self.keys.pairwise[i],
                               self.keys.client_secrets[i], flash=old.state.flash,
                               **self._replica_kwargs())
        self._plant(r)
        return r

    def _plant(self, r: rp.Replica) -> None:
        """Apply ``plant_divergence`` to ``r`` if it names it: a deliberately wrong ledger."""
        plant = self.options.plant_divergence
        if plant is None or plant[0] != r.me:
            return
        seq = plant[1]
        execute = r.ledger.execute

        def divergent(op: Any, *args: Any) -> Any:
            if r.last_exec + 1 == seq:  # _execute bumps last_exec after the batch
                # Always fails (no such account), so its result differs from any workload op.
                return execute(["transfer", "planted-src", "planted-dst", 1], *args)
            return execute(op, *args)

        r.ledger.execute = divergent  # type: ignore[method-assign]

    def _drain(self, k: int) -> None:
        """Route instance k's outbox and record its events, then clear both lists. A Byzantine
        replica's outbox is rewritten first (twins need no rewriting), and its events are not
        history: the checkers judge the correct replicas only."""
        node = self.nodes[k]
        r = node.replica
        i = self.node[k]
        if i in self.byzantine:
            if self.options.behaviour != TWINS:
                misbehave(r, self.options.behaviour, self.rng.getrandbits,
                          colluders=self.byzantine - {i}, sent=self.sent[i])
            del r.events[:]

        def to_all(wire: bytes) -> None:
            for c in range(len(self.nodes)):
                if self.node[c] != i:
                    self._send_to_replica(k, c, wire)

        def to_replica(j: int, wire: bytes) -> None:
            for c in self.instances[j]:
                self._send_to_replica(k, c, wire)

        if r.out:
            r.state.flash.sent()  # what it wrote before these left survives a power cut
        rp.route(r.out, to_all, to_replica, lambda c, wire: self._send_to_client(i, c, wire))
        for event in r.events:
            self.history.append((event[0], self.now, i) + tuple(event[1:]))
        del r.events[:]
        del node.detector.events[:]

    # ------------------------------------------------------------------ network

    def _push(self, at_ms: int, kind: int, a: Any, b: Any) -> None:
        self.order += 1
        heapq.heappush(self.queue, (at_ms, self.order, kind, a, b))

    def _latency(self, replica: int) -> int | None:
        """Latency of one message on a link of ``replica``, or None when the message is lost."""
        if self.loss_p and self.rng.random() < self.loss_p:
            return None
        return self.rng.randint(*LATENCY_MS) + self.delay_ms[replica]

    def _linked(self, src: int, dst: int) -> bool:
        """May instance src reach instance dst in the current partition and twin phase?"""
        a, b = self.node[src], self.node[dst]
        side = self.side
        if side is not None and (a in side) != (b in side):
            return False
        twin_side = self.twin_side
        if twin_side is None or twin_side[src] == twin_side[dst]:
            return True
        # Across twin sides only correct replicas talk, and only when the phase does not cut.
        return not self.twin_cut and a not in self.twinned and b not in self.twinned

    def _transmit(self, src: int, dst: int, kind: int, payload: Any) -> None:
        """Instance src's message (queue event ``kind`` with ``payload``) reaches instance
        dst after a drawn latency, unless the partition, a twin phase or a loss cuts it."""
        if not self._linked(src, dst):
            self.dropped += 1
            return
        latency = self._latency(self.node[src])
        if latency is None:
            self.dropped += 1
            return
        self._push(self.now + latency + self.delay_ms[self.node[dst]], kind, dst, payload)
        if self.dup_p and self.rng.random() < self.dup_p:  # a second copy, its own latency
            self._push(self.now + self.rng.randint(*LATENCY_MS) + self.delay_ms[self.node[dst]],
                       kind, dst, payload)

    def _send_to_replica(self, src: int, dst: int, wire: bytes) -> None:
        """Instance src sends ``wire`` to instance dst."""
        self._transmit(src, dst, _DELIVER, (self.incarnation[dst], wire, self.node[src]))

    def _send_to_client(self, src: int, client: int, wire: bytes) -> None:
        latency = self._latency(src)
        if latency is None or client >= len(self.clients):
            self.dropped += 1
            return
        self._push(self.now + latency, _REPLY, client, wire)

    def _client_broadcast(self, wire: bytes) -> None:
        """A request goes to every replica (on MQTT each subscribes the request topic)."""
        for k in range(len(self.nodes)):
            latency = self._latency(self.node[k])
            if latency is None:
                self.dropped += 1
            else:
                self._push(self.now + latency, _DELIVER, k, (self.incarnation[k], wire, None))

    def _send_heartbeat(self, src: int, offline: bool = False) -> None:
        """Instance src's status (or its Last Will, which the broker publishes for it) reaches
        the others like any message of it: partitions and losses cut it. Both are the wires a
        board sends (Node.status_wire, Node.will_wire), stamped with the incarnation as the
        boot count and one connection per incarnation; the status map is left empty."""
        node, boot = self.nodes[src], self.incarnation[src]
        if offline:
            wire = node.will_wire(boot, 1)
        else:
            self.beats[src] += 1
            wire = node.status_wire(boot, 1, self.beats[src], {})
        for dst in range(len(self.nodes)):
            if self.node[dst] != self.node[src]:
                self._transmit(src, dst, _HEARD, (self.incarnation[dst], self.node[src], wire))

    # ------------------------------------------------------------------ handlers

    def _on_deliver(self, i: int, incarnation: int, wire: bytes, sender: int | None) -> None:
        if not self.up[i] or incarnation != self.incarnation[i]:
            self.dropped += 1  # sent to a crashed replica, or to its previous life
            return
        if self.paused[i]:
            self.backlog[i].append((_DELIVER, (incarnation, wire, sender)))
            return
        self.delivered += 1
        self.nodes[i].message(wire, sender, self.now)
        self._drain(i)

    def _on_heard(self, i: int, incarnation: int, sender: int, wire: bytes) -> None:
        if not self.up[i] or incarnation != self.incarnation[i]:
            return
        if self.paused[i]:
            self.backlog[i].append((_HEARD, (incarnation, sender, wire)))
            return
        self.nodes[i].peer_status(wire, sender, self.now)
        self._drain(i)

    def _on_tick(self, i: int, incarnation: int) -> None:
        if not self.up[i] or incarnation != self.incarnation[i] or self.paused[i]:
            return  # a paused replica's next tick comes when it resumes
        self.nodes[i].tick(self.now)
        self._drain(i)
        self._push(self.now + TICK_MS, _TICK, i, incarnation)

    def _on_beat(self, i: int, incarnation: int) -> None:
        if not self.up[i] or incarnation != self.incarnation[i]:
            return
        if not self.paused[i]:
            self._send_heartbeat(i)
        self._push(self.now + STATUS_INTERVAL_MS, _BEAT, i, incarnation)

    def _start(self, i: int) -> None:
        """Instance i (just created or restarted) starts ticking and sending heartbeats."""
        incarnation = self.incarnation[i]
        self.beats[i] = 0
        self._push(self.now + self.rng.randint(1, TICK_MS), _TICK, i, incarnation)
        self._push(self.now + self.rng.randint(1, STATUS_INTERVAL_MS), _BEAT, i, incarnation)

    def _resume(self, i: int) -> None:
        """Paused instance i runs again: its first tick finds the stall, then it reads what
        reached it meanwhile, in order."""
        self.paused[i] = False
        if not self.up[i]:
            return
        backlog, self.backlog[i] = self.backlog[i], []
        self._on_tick(i, self.incarnation[i])
        for kind, b in backlog:
            if kind == _DELIVER:
                self._on_deliver(i, *b)
            else:
                self._on_heard(i, *b)

    def _on_issue(self, c: int) -> None:
        client = self.clients[c]
        assert client.op is None
        assert self.scheduled <= self.options.requests
        if self.options.churn:
            client.op = churn_operation(c, client.issued, self.options.nodes)
        else:
            client.op = operation(c, client.issued)
        client.issued += 1
        wire = client.core.request(client.op)
        self.history.append(("invoke", self.now, c, client.core.timestamp, client.op))
        self._client_send(c, wire)

    def _on_retransmit(self, c: int, timestamp: int) -> None:
        client = self.clients[c]
        if client.op is None or client.core.timestamp != timestamp:
            return
        self._client_send(c, client.core.request_wire(client.op))

    def _client_send(self, c: int, wire: bytes) -> None:
        """Client c's outstanding request to every replica, and its retransmission timer."""
        core = self.clients[c].core
        self._client_broadcast(wire)
        core.sent(self.now)
        self._push(core.next_send_ms, _RETRANSMIT, c, core.timestamp)

    def _on_reply(self, c: int, wire: bytes) -> None:
        client = self.clients[c]
        self.delivered += 1
        accepted, result = client.core.on_reply(wire, self.now)
        if not accepted:
            return
        assert client.op is not None
        self.history.append(("ok", self.now, c, client.core.timestamp, result))
        self.accepted += 1
        client.op = None
        self._schedule_issue(c)

    def _schedule_issue(self, c: int) -> None:
        """Client c's next request after a think time, while requests remain to issue."""
        if self.scheduled >= self.options.requests:
            return
        self.scheduled += 1
        self._push(self.now + self.rng.randint(0, self.clients[c].think_ms), _ISSUE, c, None)

    def _on_fault(self, index: int, start: bool) -> None:
        fault = self.faults[index]
        kind = fault.kind
        if index in self.skipped or start and not self._may_start(fault):
            self.skipped.add(index)
            return
        self.history.append(("fault" if start else "heal", self.now, fault.describe()))
        if kind == TWINS:
            self._twin_phase(fault, start)
        elif kind == "partition":
            self.side = fault.side if start else None
        elif kind == "duplicate":
            self.dup_p = fault.loss_p if start else 0.0
        elif kind == "omission":
            self.loss_p = fault.loss_p if start else 0.0
        elif kind == "delay":
            self.delay_ms[fault.replica] = fault.delay_ms if start else 0
        elif kind == "pause":
            for k in self.instances[fault.replica]:
                if start:
                    self.paused[k] = True
                else:
                    self._resume(k)
        elif start:
            self.up[fault.replica] = False
            self.backlog[fault.replica] = []
            # The power goes in the middle of whatever the replica was writing: its last few
            # flash operations never happened (drawn apart from self.rng, so that the rest of
            # a seed's schedule is the same with and without torn writes).
            cut = random.Random(f"{self.seed}/cut/{index}").randint(0, CUT_OPERATIONS_MAX)
            self.nodes[fault.replica].replica.state.flash.cut(cut)
            self._send_heartbeat(fault.replica, offline=True)  # the broker's Last Will
        else:
            self._restart(fault.replica)

    def _may_start(self, fault: Fault) -> bool:
        """May ``fault`` start now? A down fault waits for no replica still recovering from a
        restart, unless ``overlap_restarts``: one votes on nothing up to h + window in its old
        view, so it counts toward the bound for liveness (its P entries, written ahead, keep
        it from counting for safety: with overlapping restarts seeds must stay safe, and need
        not be live). And unless the options go beyond the bound, the replicas out with it
        hold less than 1/3 of the stake in force (the newest validator set a correct replica
        knows: churn moves stake)."""
        if fault.kind in _DOWN_KINDS and not self.options.overlap_restarts and any(
                r.recovering() for j, r in enumerate(self.replicas) if j != fault.replica):
            return False
        if self.options.beyond_bound or fault.kind not in _DOWN_KINDS + ("partition",):
            return True
        newest = max((self.nodes[i].replica for i in range(self.options.nodes)
                      if i not in self.byzantine), key=lambda r: r.sets[-1][0])
        weights = newest.sets[-1][1].weights
        active = [x for k, x in enumerate(self.faults) if x is not fault and k not in self.skipped
                  and x.start_ms <= self.now < x.end_ms]
        out = set(self.byzantine).union(*(cut_off(x, weights) for x in active),
                                        cut_off(fault, weights))
        return within_bound(out, weights)

    def _twin_phase(self, phase: Fault, start: bool) -> None:
        """Start or end a twin phase; the end of the last (at the heal point) silences the
        second twins for good."""
        n = self.options.nodes
        if start:
            self.twin_side = [int(k >= n or self.node[k] in phase.side)
                              for k in range(len(self.replicas))]
            self.twin_cut = phase.cut
            return
        self.twin_side = None
        self.twin_cut = False
        if phase.end_ms >= self.options.fault_ms:
            for k in range(n, len(self.replicas)):
                self.up[k] = False

    def _restart(self, i: int) -> None:
        assert not self.up[i]
        self.incarnation[i] += 1
        self.nodes[i] = self._node(self._restarted_replica(i), self.now)
        self.up[i] = True
        self.paused[i] = False
        self._drain(i)
        self._start(i)

    # ------------------------------------------------------------------ run

    def run(self) -> SeedResult:
        """Simulate until all requests are accepted or the liveness bound passes; check."""
        options = self.options
        for index, fault in enumerate(self.faults):
            self._push(fault.start_ms, _FAULT_START, index, None)
            self._push(fault.end_ms, _FAULT_END, index, None)
        for c in range(len(self.clients)):
            self._schedule_issue(c)
        for i in range(len(self.nodes)):
            self._drain(i)
            self._start(i)
        deadline_ms = options.fault_ms + options.liveness_ms
        error = None
        try:
            self._loop(deadline_ms)
            if self.accepted >= options.requests:
                self.settle(SETTLE_MS)
                if check_convergence(self.history, self._correct_up()).valid is False:
                    self._probe()
        except Exception as e:  # a replica's invariant or our own: report, do not crash
            error = self._describe_error(e)
            self.history.append(("error", self.now, error))
        self.options = options  # as given: settling and the probe changed the request count
        return self._result(error)

    def _describe_error(self, e: Exception) -> str:
        """One line: what was being handled, the exception and where it was raised."""
        kind, target = self.current
        what = _EVENT_NAMES.get(kind, "event")
        who = "client" if kind in (_REPLY, _RETRANSMIT, _ISSUE) else "replica"
        if kind in (_FAULT_START, _FAULT_END):
            who, target = "fault", self.faults[target].describe()
        where = traceback.extract_tb(e.__traceback__)[-1]
        text = "".join(traceback.format_exception_only(type(e), e)).strip()
        return (f"{text} at {where.filename.rsplit('/', 1)[-1]}:{where.lineno} "
                f"in {where.name}, {what} for {who} {target} at {self.now} ms")

    def settle(self, extra_ms: int) -> None:
        """Go on for ``extra_ms`` after run(), without new requests, so replicas catch up."""
        self.options = replace(self.options, requests=self.accepted)
        end = self.now + extra_ms
        self._loop(end, stop_when_accepted=False)

    def _probe(self) -> None:
        """One more request (client 0's), then SETTLE_MS more with no load."""
        self.options = replace(self.options, requests=self.accepted + 1)
        self._schedule_issue(0)
        self._loop(self.now + self.options.liveness_ms)
        self.settle(SETTLE_MS)

    def _loop(self, deadline_ms: int, stop_when_accepted: bool = True) -> None:
        queue = self.queue
        requests = self.options.requests
        while queue and (self.accepted < requests or not stop_when_accepted):
            if queue[0][0] > deadline_ms:
                self.now = deadline_ms  # the event stays queued: settle() may go on from here
                return
            at_ms, _, kind, a, b = heapq.heappop(queue)
            assert at_ms >= self.now
            self.now = at_ms
            self.current = (kind, a)
            if kind == _DELIVER:
                self._on_deliver(a, *b)
            elif kind == _REPLY:
                self._on_reply(a, b)
            elif kind == _TICK:
                self._on_tick(a, b)
            elif kind == _HEARD:
                self._on_heard(a, *b)
            elif kind == _BEAT:
                self._on_beat(a, b)
            elif kind == _RETRANSMIT:
                self._on_retransmit(a, b)
            elif kind == _ISSUE:
                self._on_issue(a)
            elif kind == _FAULT_START:
                self._on_fault(a, True)
            else:
                self._on_fault(a, False)

    def _result(self, error: str | None) -> SeedResult:
        options = self.options
        checks = [check_safety(self.history), check_client_safety(self.history),
                  check_liveness(self.history, options.requests,
                                 options.fault_ms + options.liveness_ms),
                  check_convergence(self.history, self._correct_up())]
        verdict = Verdict(tuple(checks), error)  # an error: liveness says nothing
        views = {e[3] for e in self.history if e[0] == "view"}
        return SeedResult(
            seed=self.seed, verdict=verdict.name, reasons=verdict.reasons, checks=checks,
            sim_ms=self.now, delivered=self.delivered, dropped=self.dropped,
            view_changes=len(views),
            accepted=min(self.accepted, options.requests),  # the probe is not the run's
            requests=options.requests, faults=len(self.faults),
            history_digest=history_digest(self.history),
            replay=options.replay_command(self.seed),
            fault_kinds=tuple(e[2].split()[0] for e in self.history if e[0] == "fault"),
            transfers=sum(1 for e in self.history if e[0] == "transferred"),
            stalls=sum(self._correct_counts("stalls")),
            suspicions=sum(self._correct_counts("suspicions")))

    def _correct_up(self) -> list[int]:
        """The correct replicas running at the end of the run."""
        return [i for i in range(self.options.nodes) if i not in self.byzantine and self.up[i]]

    def _correct_counts(self, name: str) -> list[int]:
        """A Node count of each correct replica's current instance (since its last restart)."""
        return [self.nodes[i].counts[name] for i in range(self.options.nodes)
                if i not in self.byzantine]


# ---------------------------------------------------------------------- checkers
# Each takes the history (tuples whose first two fields are kind and simulated ms) and returns a
# Check. Replica events are (kind, ms, replica, *event fields); client ones (kind, ms, client,
# timestamp, op or result).


def history_digest(history: list[tuple[Any, ...]]) -> str:
    """SHA-256 over the whole history, hex: equal digests mean identical runs."""
    h = hashlib.sha256()
    for entry in history:
        h.update(repr(entry).encode())
        h.update(b"\n")
    return h.hexdigest()


_CHECKPOINT_EVENTS = ("checkpoint", "stable", "transferred")


def check_safety(history: list[tuple[Any, ...]]) -> Check:
    """No two replicas executed different ledger digests at one sequence number (the digest is
    a hash chain: equal means the same history), and every checkpoint digest of a sequence
    number (taken, stable or transferred: a snapshot's hash) is the same everywhere.
    """
    executed: dict[int, tuple[int, bytes]] = {}     # seq -> (first replica, ledger digest)
    checkpoints: dict[int, tuple[int, bytes]] = {}  # seq -> (first replica, snapshot digest)
    for entry in history:
        kind = entry[0]
        if kind == "executed":
            seen = executed
        elif kind in _CHECKPOINT_EVENTS:
            seen = checkpoints
        else:
            continue
        _, at_ms, replica, seq, digest = entry
        first = seen.get(seq)
        if first is None:
            seen[seq] = (replica, digest)
        elif first[1] != digest:
            what = "executed" if kind == "executed" else "checkpoint"
            return Check("safety", False,
                         f"seq {seq}: {what} digests differ: replica {first[0]} has "
                         f"{first[1].hex()[:12]}, replica {replica} {kind} "
                         f"{digest.hex()[:12]} (at {at_ms} ms)")
    return Check("safety", True)


def check_client_safety(history: list[tuple[Any, ...]]) -> Check:
    """Every accepted result of one (client, timestamp) is the same."""
    results: dict[tuple[int, int], Any] = {}
    for entry in history:
        if entry[0] != "ok":
            continue
        _, at_ms, client, timestamp, result = entry
        key = (client, timestamp)
        if key in results and results[key] != result:
            return Check("client-safety", False,
                         f"client {client} request {timestamp}: accepted {results[key]!r} "
                         f"and {result!r} (at {at_ms} ms)")
        results[key] = result
    return Check("client-safety", True)


def check_liveness(history: list[tuple[Any, ...]], requests: int, bound_ms: int) -> Check:
    """All ``requests`` requests were accepted by ``bound_ms`` (healing + the liveness bound)."""
    invoked = {(e[2], e[3]): e[1] for e in history if e[0] == "invoke"}
    done = {(e[2], e[3]) for e in history if e[0] == "ok" and e[1] <= bound_ms}
    if len(done) >= requests:
        return Check("liveness", True)
    waiting = sorted(set(invoked) - done, key=lambda k: invoked[k])
    detail = ""
    if waiting:
        c, ts = waiting[0]
        detail = f"; oldest: client {c} request {ts} invoked at {invoked[(c, ts)]} ms"
    return Check("liveness", False, f"{len(done)}/{requests} requests accepted by "
                                    f"{bound_ms} ms{detail}")


def check_convergence(history: list[tuple[Any, ...]], replicas: Sequence[int]) -> Check:
    """Every replica of ``replicas`` executed the highest sequence number any replica executed
    (the run settled with no new load first). Unknown when nothing executed."""
    last: dict[int, int] = {i: 0 for i in replicas}
    for e in history:
        if e[0] in ("executed", "transferred") and e[2] in last:
            last[e[2]] = max(last[e[2]], e[3])
    top = max([e[3] for e in history if e[0] == "executed"], default=0)
    if not top:
        return Check("convergence", None, "nothing executed")
    behind = sorted(i for i in last if last[i] < top)
    if not behind:
        return Check("convergence", True)
    return Check("convergence", False, ", ".join(f"replica {i} at {last[i]}" for i in behind)
                 + f" of {top} once settled")


# ---------------------------------------------------------------------- entry points


def run_seed(seed: int, options: SimOptions) -> SeedResult:
    """Simulate one seed and check its history.

    Raises:
        SimError: the options are invalid.
    """
    return Simulation(seed, options).run()


def run_many(options: SimOptions, seeds: Iterable[int],
             progress: Callable[[SeedResult], None] | None = None,
             behaviours: Sequence[str] = ()) -> SimSummary:
    """Run every seed in ``seeds`` (in order); call ``progress`` after each. With
    ``behaviours``, the k-th seed's Byzantine replicas do ``behaviours[k % len]`` (each
    seed's replay command names its own).

    Raises:
        SimError: the options are invalid (checked before the first seed).
    """
    runs = [replace(options, behaviour=b) for b in behaviours] or [options]
    for run in runs:
        run.check()
    results: list[SeedResult] = []
    start = time.perf_counter()
    for k, seed in enumerate(seeds):
        result = run_seed(seed, runs[k % len(runs)])
        results.append(result)
        if progress is not None:
            progress(result)
    return SimSummary(options=options, results=results,
                      elapsed_s=time.perf_counter() - start)


def parse_behaviours(text: str) -> tuple[str, ...]:
    """``"equivocate,twins"`` -> ("equivocate", "twins"): what Byzantine replicas do, in turn
    per seed.

    Raises:
        SimError: an unknown behaviour (the message lists the known ones).
    """
    behaviours = tuple(b.strip() for b in text.split(","))
    for b in behaviours:
        if b not in SIM_BEHAVIOURS:
            raise SimError(f"unknown behaviour {b!r}; choose from {','.join(SIM_BEHAVIOURS)}")
    return behaviours


def parse_faults(text: str) -> tuple[str, ...]:
    """``"crash,omission"`` -> ("crash", "omission"); ``"none"`` or ``""`` -> (); "all" ->
    every kind the simulator draws. Older names (fault_kinds aliases: ``loss``) are accepted.

    Raises:
        SimError: an unknown kind.
    """
    text = text.strip().lower()
    if text in ("", "none"):
        return ()
    if text == "all":
        return FAULT_KINDS
    try:
        return tuple(fault_kinds.kind(k, "sim").name for k in text.split(",") if k.strip())
    except fault_kinds.FaultKindError as e:
        raise SimError(f"{e} or none") from None


__all__ = ["FAULT_KINDS", "Check", "Fault", "SeedResult", "SimError", "SimOptions",
           "SimSummary", "Simulation", "check_client_safety", "check_liveness", "check_safety",
           "fault_schedule", "history_digest", "parse_faults", "run_many", "run_seed",
           "seeded_keys"]
