"""``edgebft bench``: an emulated cluster on a real broker under client load, measured.

``edgebft demo`` is this run with the demo's defaults (``edgebft.lab.demo``). A run is a folder
(Maelstrom's model): ``config.json``, ``nodes/node<i>/`` (each node's image, its flash),
``logs/node<i>.log``, ``events.jsonl`` (every request with its intended send time, first send
and outcome; every fault with its start and end; every node event; host timestamps),
``summary.json`` (``summarize``) and the report (``report.html`` and its PNG plots,
edgebft.lab.report). The load is closed loop, or open loop at a fixed rate
(edgebft.lab.workload). The verdict on safety comes from the ledger digests the nodes report
(``edgebft.lab.observer``), not from the nodes' own claims.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgebft.check.verdict import Check, Verdict
from edgebft.devices.image import build_image
from edgebft.devices.keys import ClusterKeys, generate_keys
from edgebft.devices.micropython import HEAP_DEFAULT
from edgebft.lab.broker import Broker, parse_broker, start_broker
from edgebft.lab.broker_auth import HOST, BrokerAuth, node_identity
from edgebft.lab.broker_tls import BrokerTLS
from edgebft.lab.cluster import EmulatedCluster, node_argv
from edgebft.lab.control import fresh_nonce, send_command
from edgebft.lab.metrics import availability, latency_percentiles, percentile
from edgebft.lab.nemesis import Fault, NemesisError, PrimaryNemesis, make_nemesis, parse_nemesis
from edgebft.lab.observer import Observer
from edgebft.lab.processes import kill_process_group, spawn
from edgebft.lab.report import availability_windows, build_report
from edgebft.lab.workload import (
    ACCOUNTS,
    DEADLINE_S,
    FUNDED_ACCOUNTS,
    KEYS,
    Mix,
    Outcome,
    Workload,
    genesis,
)
from edgebft.protocol.log import REPLICAS_MAX
from edgebft.protocol.pagestore import CACHE_PAGES
from edgebft.protocol.replica import CHECKPOINT_INTERVAL
from edgebft.protocol.stake import Stake

NODES_MIN = 4  # n = 3f+1 with f >= 1
NODES_MAX = REPLICAS_MAX  # a slot's votes are bits of one word (protocol/log.py)
STARTUP_TIMEOUT_S = 20.0
CONVERGE_TIMEOUT_S = 5.0
CLIENTS_DEFAULT = 4
ACL_CLIENTS = 1024  # client ids 0..1023 get an MQTT identity on a broker with ACLs
ISSUED_CLIENTS_FIRST = 256  # edgebft client new issues ids from here; below: workloads, tools
KEYS_PER_PAGE = 16  # the ledger gets a page per this many keys (a power of two, at least 256)

Progress = Callable[[float, int, int, int], None]  # (elapsed_s, ok, failed, queued)
NodeEvent = tuple[float, int, list[Any]]  # (host time, node, event), as the observer has it


class BenchError(RuntimeError):
    """A run could not be set up or did not come up; the message says what to do."""


@dataclass
class BenchOptions:
    """What a run does. ``out=None`` makes a fresh folder under ./runs/<command>/. ``clients``
    is the number of client ids: closed-loop clients, or with a ``rate`` the open-loop pool."""

    nodes: int = 4
    duration_s: float = 10.0
    clients: int = CLIENTS_DEFAULT
    rate: float | None = None  # requests per second in total (open loop); None: closed loop
    keys: int = KEYS  # the puts and gets spread over this many keys
    accounts: int = ACCOUNTS  # the transfers spread over this many accounts
    mix: str = "1:1:1"  # PUT:GET:TRANSFER weights
    broker: str = "auto"
    out: Path | None = None
    micropython: str | None = None
    heap: str = HEAP_DEFAULT
    checkpoint_interval: int = CHECKPOINT_INTERVAL
    nemesis: str = "none"
    nemesis_interval_s: float | None = None
    stake: list[int] | None = None  # per node; None: equal
    acl: bool | None = None  # broker identities and ACL (broker_auth); None: on for mosquitto
    tls: bool = False  # the broker speaks TLS only, with the cluster's own CA (broker_tls)
    sensors: int = 0  # sensor clients (firmware/sensor.py) writing through the cluster
    cache_pages: int = CACHE_PAGES  # pages each store of a node caches
    cache_policy: str = "lru"  # their eviction policy (protocol/cache.py's POLICIES)
    extra: dict[str, Any] = field(default_factory=dict)
    command: str = "bench"  # names the run folder family: runs/<command>/

    def check(self) -> None:
        """Raise BenchError for options no run can satisfy."""
        if self.nodes < NODES_MIN:
            raise BenchError(f"--nodes {self.nodes}: PBFT needs at least {NODES_MIN} replicas "
                             "(n = 3f+1 with f >= 1); use --nodes 4 or more")
        if self.nodes > NODES_MAX:
            raise BenchError(f"--nodes {self.nodes}: a cluster has at most {NODES_MAX} replicas "
                             "(a slot's votes are bits of one 32-bit word)")
        if self.duration_s <= 0:
            raise BenchError("--duration must be positive")
        if self.clients < 1:
            raise BenchError("--clients must be at least 1")
        if self.keys < 1:
            raise BenchError("--keys must be at least 1")
        if not 1 <= self.accounts <= FUNDED_ACCOUNTS:
            raise BenchError(f"--accounts must be 1 to {FUNDED_ACCOUNTS} (the funded ones)")
        try:
            Mix.parse(self.mix)
        except ValueError as e:
            raise BenchError(str(e)) from None
        if self.rate is not None and self.rate <= 0:
            raise BenchError("--rate must be positive")
        if self.sensors < 0:
            raise BenchError("--sensors must not be negative")
        if self.clients + self.sensors > ACL_CLIENTS:
            raise BenchError(f"--clients and --sensors: {self.clients + self.sensors} client ids, "
                             f"the broker's identities go to {ACL_CLIENTS}")
        if self.nemesis_interval_s is not None and self.nemesis_interval_s <= 0:
            raise BenchError("--nemesis-interval must be positive")
        if self.stake is not None and (len(self.stake) != self.nodes or min(self.stake) < 0
                                       or sum(self.stake) <= 0):
            raise BenchError(f"--stake needs {self.nodes} non-negative values with a positive "
                             "sum")
        try:
            parse_nemesis(self.nemesis)
        except NemesisError as e:
            raise BenchError(str(e)) from None
        if self.out is not None and holds_run(Path(self.out)):
            raise BenchError(f"--out {self.out}: the folder holds a run; a cluster starts in a "
                             "fresh one (its nodes' flash would be another cluster's)")


def holds_run(folder: Path) -> bool:
    """Does ``folder`` hold a run whose nodes ran (their flash) or whose results were written?
    A run there again would restore that flash under fresh keys (it committed nothing) and
    overwrite those results. What a start that failed before its nodes ran left (their
    images, logs saying why) is no run: the same --out may be used again."""
    return ((folder / "summary.json").exists() or (folder / "events.jsonl").exists()
            or any((folder / "nodes").glob("*/state*")))


def new_run_dir(kind: str, base: Path = Path("runs")) -> Path:
    """A fresh ``base/kind/<timestamp>`` folder, with ``base/kind/latest`` pointing at it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = base / kind / stamp
    suffix = 1
    while run.exists():
        suffix += 1
        run = base / kind / f"{stamp}-{suffix}"
    run.mkdir(parents=True)
    latest = base / kind / "latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run.name)
    return run


def node_config(i: int, cluster: str, stake: Stake, broker: Broker,
                key_row: dict[str, object], options: BenchOptions) -> dict[str, Any]:
    """The edgebft.json of node ``i`` (with its MQTT identity on a broker with ACLs)."""
    login = broker.login(node_identity(i))
    return {
        "node": i, "cluster": cluster, "stake": stake.weights,
        "broker": login.device_entry(broker.host, broker.port),
        "genesis": genesis(), "checkpoint_interval": options.checkpoint_interval,
        "store": {"ledger_pages": ledger_pages(options.keys + options.accounts),
                  "cache_pages": options.cache_pages, "policy": options.cache_policy},
        "wifi": None, **key_row, **options.extra,
    }


def ledger_pages(keys: int) -> int:
    """Ledger pages for a workload over ``keys`` keys: about KEYS_PER_PAGE keys a page, so a
    cached page stays small (State's default, 256, up to 4,096 keys)."""
    pages = 256
    while pages * KEYS_PER_PAGE < keys:
        pages *= 2
    return pages


@dataclass
class Launch:
    """A cluster launch() started: its id and keys, the broker, the nodes' image folders, the
    nodes and an observer of their statuses."""

    cluster_id: str
    keys: ClusterKeys
    broker: Broker
    images: list[Path]
    cluster: EmulatedCluster
    observer: Observer


def launch(stack: contextlib.ExitStack, run: Path, options: BenchOptions,
           stake: Stake) -> Launch:
    """Bring a cluster up in ``run``: fresh keys, a broker (options.broker), one image per
    node, the nodes, and an observer; return once every node reported online. This is the
    one bring-up: bench, demo and ``cluster up`` (edgebft.lab.session) all start here.

    Everything started is registered on ``stack``, so leaving it stops it all (on failure
    too); ``cluster up`` detaches the nodes and the broker before it leaves.

    Raises:
        BenchError: the nodes did not come up within STARTUP_TIMEOUT_S (the message names
        them and the log folder); BrokerError, ClusterError, MicroPythonNotFound.
    """
    cluster_id = options.command + os.urandom(3).hex()
    keys = generate_keys(options.nodes)
    spec = parse_broker(options.broker)
    acl = options.acl if options.acl is not None else spec.kind == "mosquitto"
    if acl and spec.kind != "mosquitto":
        raise BenchError(f"--acl: the {spec.kind} broker cannot take this run's identities "
                         "(only the mosquitto the host starts does); use --broker mosquitto "
                         "or --no-acl")
    auth = BrokerAuth(cluster_id, keys, ACL_CLIENTS) if acl else None
    tls = BrokerTLS.create(run / "broker" / "tls", cluster_id) if options.tls else None
    broker = stack.enter_context(start_broker(spec, run / "broker", auth, tls))
    images = [build_image(run / "nodes" / f"node{i}",
                          node_config(i, cluster_id, stake, broker, keys.row(i), options))
              for i in range(options.nodes)]
    observer = Observer(broker.host, broker.port, cluster_id, options.nodes, keys,
                        broker.login(HOST))
    stack.callback(observer.close)
    cluster = stack.enter_context(EmulatedCluster(
        images, run / "logs", options.heap, micropython=options.micropython))
    started = time.time()
    if not observer.wait_all_online(STARTUP_TIMEOUT_S, since=started):
        missing = sorted(set(range(options.nodes)) - set(observer.snapshot()))
        raise BenchError(f"nodes {missing} did not come up within "
                         f"{STARTUP_TIMEOUT_S:.0f} s; see {run / 'logs'}")
    return Launch(cluster_id, keys, broker, images, cluster, observer)


SENSOR_PERIOD_MS = 500
SENSOR_HEAP = "64k"
_SENSOR_LINE = re.compile(r"sensor \S+ #\d+ (?:ok in (\d+) ms, heap (\d+)|late)")


def start_sensors(stack: contextlib.ExitStack, run: Path, options: BenchOptions, up: Launch,
                  stake: Stake) -> list[Path]:
    """Start ``options.sensors`` sensor clients (firmware/sensor.py on the Unix port with a
    SENSOR_HEAP heap, a write every SENSOR_PERIOD_MS under sensor/<s>), with the client ids
    after the workload's; leaving ``stack`` stops them. Returns their logs."""
    from edgebft.client import Identity  # edgebft.client imports this module

    logs = []
    for s in range(options.sensors):
        identity = Identity.make(up.cluster_id, options.clients + s, up.broker.host,
                                 up.broker.port, up.broker.auth, stake.weights, up.keys,
                                 up.broker.tls)
        image = build_image(run / "sensors" / f"sensor{s}", {**identity.to_json(), "sensor": {
            "key": f"sensor/{s}", "period_ms": SENSOR_PERIOD_MS}}, "sensor.json")
        log = run / "logs" / f"sensor{s}.log"
        proc = spawn(node_argv(image, up.cluster.micropython, SENSOR_HEAP, up.cluster.rom), log,
                     cwd=image)
        stack.callback(kill_process_group, proc, 0)
        logs.append(log)
    return logs


def sensors_summary(logs: list[Path]) -> dict[str, Any]:
    """What the sensors' logs say: writes accepted and late, their latency, the live heap
    peak of the busiest one."""
    ms, heaps, late = [], [], 0
    for log in logs:
        for m in _SENSOR_LINE.finditer(log.read_text()):
            if m.group(1) is None:
                late += 1
            else:
                ms.append(float(m.group(1)))
                heaps.append(int(m.group(2)))
    return {"count": len(logs), "writes": len(ms), "late": late,
            "latency_ms": latency_percentiles(ms) if ms else None,
            "heap_peak_bytes": max(heaps, default=None), "heap": SENSOR_HEAP}


class TxMeter:
    """Messages the replicas sent, from the ``tx`` counter in each node's status map.

    ``update(statuses)`` adds each node's growth since the previous update; a node whose
    boot count changed restarted, and its new count is added whole. The first update of a
    node is its baseline. Messages a node sent after its last status before a crash are
    missed (statuses come every 0.5 s).
    """

    def __init__(self) -> None:
        self.sent = 0
        self._last: dict[int, tuple[int, int]] = {}  # node -> (tx, boots)

    def update(self, statuses: Mapping[int, Mapping[str, Any]]) -> None:
        for node, status in statuses.items():
            tx, boots = int(status.get("tx", 0)), int(status.get("boots", 0))
            last = self._last.get(node)
            if last is not None:
                self.sent += tx if boots != last[1] else tx - last[0]
            self._last[node] = (tx, boots)


def run_bench(options: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run the cluster under load and return its summary (also ``<out>/summary.json``).

    ``progress(elapsed_s, ok, failed, queued)`` is called about every 0.1 s while the workload
    runs.

    Raises:
        BenchError, BrokerError, MicroPythonNotFound, ClusterError: setup failed (one line).
    """
    options.check()
    run = Path(options.out) if options.out else new_run_dir(options.command)
    run.mkdir(parents=True, exist_ok=True)
    stake = Stake(options.stake or [1] * options.nodes)
    with contextlib.ExitStack() as stack:
        up = launch(stack, run, options, stake)
        broker, cluster, observer, keys, cluster_id = (up.broker, up.cluster, up.observer,
                                                       up.keys, up.cluster_id)
        config = {**asdict(options), "out": str(run), "cluster": cluster_id,
                  "broker": broker.describe(), "micropython": str(cluster.micropython)}
        (run / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
        sensors = stack.enter_context(contextlib.ExitStack())
        sensor_logs = start_sensors(sensors, run, options, up, stake)
        workload = Workload(broker.host, broker.port, cluster_id, stake, keys,
                            options.clients, rate=options.rate, keyspace=options.keys,
                            accounts=options.accounts, mix=Mix.parse(options.mix),
                            login=broker.login(HOST))
        stack.callback(workload.close)
        nonces = [0]

        def control(node: int, command: str, args: list[Any]) -> None:
            nonces[0] = fresh_nonce(nonces[0])
            send_command(broker.host, broker.port, cluster_id, node, keys.control[node],
                         nonces[0], command, args, broker.login(HOST))

        try:
            nemesis = make_nemesis(options.nemesis, cluster, observer, options.duration_s,
                                   options.nemesis_interval_s, control, broker)
        except NemesisError as e:
            raise BenchError(str(e)) from None
        tx = TxMeter()
        tx.update(observer.snapshot())
        pids = [cluster.pid(i) for i in range(options.nodes)]
        cpu_before = [cluster.cpu_s(i) for i in range(options.nodes)]
        t0 = time.time()
        workload.start()
        _drive(options.duration_s, workload, tx, observer, progress, nemesis)
        issuing_s = time.time() - t0
        if nemesis is not None:
            nemesis.heal()  # always healed before the end (Jepsen)
        workload.drain(DEADLINE_S + 1.0)
        # All load stops before convergence is judged: a sensor's next write would move some
        # nodes' last executed sequence past the others' last status.
        sensors.close()
        faults = nemesis.faults if nemesis is not None else []
        byzantine = sorted({f.node for f in faults if f.kind == "byzantine"})
        converged = observer.wait_converged(CONVERGE_TIMEOUT_S + (5.0 if nemesis else 0.0),
                                            exclude=byzantine)
        tx.update(observer.snapshot())
        summary = summarize(options, broker.describe(), workload.outcomes, observer,
                            issuing_s, converged, faults, tx.sent)
        summary["nodes_alive_at_end"] = [cluster.alive(i) for i in range(options.nodes)]
        cpu_after = [cluster.cpu_s(i) if cluster.pid(i) == pids[i] else None
                     for i in range(options.nodes)]
        summary["cpu_ms_per_commit"] = cpu_ms_per_commit(
            cpu_before, cpu_after, summary["committed"], lambda t: t[0] + t[1])
        summary["cpu_sys_ms_per_commit"] = cpu_ms_per_commit(
            cpu_before, cpu_after, summary["committed"], lambda t: t[1])
        summary["byzantine_nodes"] = byzantine
    if sensor_logs:
        summary["sensors"] = sensors_summary(sensor_logs)
    write_events(run / "events.jsonl", workload.outcomes, faults, observer.events)
    (run / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["out"] = str(run)
    if summary["requests"]:
        summary["report"] = str(build_report(run))
    return summary


def _drive(duration_s: float, workload: Workload, tx: TxMeter, observer: Observer,
           progress: Progress | None, nemesis: PrimaryNemesis | None) -> None:
    """Step the nemesis, the message meter and the progress until ``duration_s`` has passed."""
    start = time.monotonic()
    seen = ok = 0
    while (elapsed := time.monotonic() - start) < duration_s:
        time.sleep(min(0.1, duration_s - elapsed))
        if nemesis is not None:
            nemesis.step(time.monotonic() - start)
        tx.update(observer.snapshot())
        if progress:
            outcomes = workload.outcomes[seen:]
            seen += len(outcomes)
            ok += sum(1 for o in outcomes if o.outcome == "ok")
            progress(min(time.monotonic() - start, duration_s), ok, seen - ok,
                     workload.queued())


def recovery_ms(fault: Fault, outcomes: list[Outcome],
                before: float = float("inf")) -> float | None:
    """Fault start to the first request accepted from a view after the fault's view, if one
    was accepted before ``before`` (the next fault's start): a fault that changed no view (a
    delay the cluster rode out) has none, rather than the next fault's. A broker restart
    takes the cluster's link, not a replica: its recovery runs from the broker's return to
    the first request accepted after it, in any view."""
    if fault.kind == "broker-restart":
        if not fault.end:
            return None
        ends = [o.end for o in outcomes if o.outcome == "ok" and fault.end < o.end < before]
        return round((min(ends) - fault.end) * 1000.0, 1) if ends else None
    ends = [o.end for o in outcomes
            if o.outcome == "ok" and o.view > fault.view and fault.start < o.end < before]
    return round((min(ends) - fault.start) * 1000.0, 1) if ends else None


def detection_ms(fault: Fault, node_events: list[NodeEvent]) -> float | None:
    """Fault start to the first event another node published after it naming the faulted
    node: ``["suspect", node, ...]`` (its failure detector) or ``["equivocation", node, ...]``
    (caught sending conflicting messages); None when none did."""
    times = [at for at, node, event in node_events
             if len(event) >= 2 and event[0] in ("suspect", "equivocation")
             and event[1] == fault.node and node != fault.node and at >= fault.start]
    return round((min(times) - fault.start) * 1000.0, 1) if times else None


def request_event(outcome: Outcome) -> dict[str, Any]:
    """The events.jsonl line of a request: the Outcome's fields, ``type`` and ``latency_ms``."""
    return {"type": "request", **asdict(outcome), "latency_ms": round(outcome.latency_ms, 3)}


def summarize(options: BenchOptions, broker: str, outcomes: list[Outcome], observer: Observer,
              issuing_s: float, converged: bool, faults: list[Fault],
              messages_sent: int) -> dict[str, Any]:
    """The summary.json contract of ``edgebft bench`` and ``edgebft demo`` (see README)."""
    genesis_stake = options.stake or [1] * options.nodes
    ok = [o for o in outcomes if o.outcome == "ok"]
    starts = sorted(f.start for f in faults)
    recoveries = [recovery_ms(f, outcomes, min((t for t in starts if t > f.start),
                                                default=float("inf"))) for f in faults]
    detections = [detection_ms(f, observer.events) for f in faults]
    violations = observer.violations()
    statuses = observer.snapshot()
    verdict = Verdict((observer.safety_check(),
                       Check("convergence", True) if converged else
                       Check("convergence", False, "the nodes did not reach one last executed "
                                                   "sequence number and digest in time")))
    return {
        "command": options.command,
        "nodes": options.nodes,
        "f": (options.nodes - 1) // 3,
        "broker": broker,
        "duration_s": options.duration_s,
        "mode": "closed" if options.rate is None else "open",
        "rate_rps": options.rate,
        "clients": options.clients,
        "requests": len(outcomes),
        "committed": len(ok),
        "refused": dict(sorted(Counter(o.refused for o in ok if o.refused).items())),
        "timed_out": len(outcomes) - len(ok),
        "never_sent": sum(1 for o in outcomes if o.sent is None),
        "offered_rps": round(len(outcomes) / issuing_s, 1) if issuing_s > 0 else 0.0,
        "throughput_rps": round(len(ok) / issuing_s, 1) if issuing_s > 0 else 0.0,
        "latency_ms": latency_percentiles([o.latency_ms for o in ok]),
        "availability": availability(len(ok), len(outcomes)),
        "availability_per_s": availability_windows([request_event(o) for o in outcomes]),
        "verdict": verdict.to_json(),
        "safety_ok": verdict.check("safety").valid is True,
        "safety": {"violations": violations, "converged": converged,
                   "sequences_compared": observer.sequences_compared()},
        "last_executed": {str(n): s.get("last_exec") for n, s in sorted(statuses.items())},
        "heap_peak_bytes": {str(n): v for n, v in sorted(observer.heap_peak.items())},
        "keys": options.keys,
        "state": {str(n): state_summary(s) for n, s in sorted(statuses.items())},
        "state_transfer_ms": transfer_ms(observer.events),
        "drops": {str(n): dict(sorted((s.get("drops") or {}).items()))
                  for n, s in sorted(statuses.items())},
        "heap_restarts": {str(n): s.get("restarts") for n, s in sorted(statuses.items())},
        "messages_sent": messages_sent,
        "msgs_per_commit": round(messages_sent / len(ok), 2) if ok else None,
        "view_changes": max((s.get("view", 0) for s in statuses.values()), default=0),
        "nemesis": options.nemesis,
        "faults": [{**asdict(f), "detection_ms": d, "recovery_ms": r}
                   for f, d, r in zip(faults, detections, recoveries, strict=True)],
        "detection_ms": detections,
        "detection": times_summary(detections, "undetected"),
        "recovery_ms": recoveries,
        "recovery": times_summary(recoveries, "unrecovered"),
        "stake": stake_table(genesis_stake),
        "stake_epochs": stake_epochs(genesis_stake, observer.events),
        "equivocations_detected": equivocations(observer.events),
    }


def cpu_ms_per_commit(before: list[tuple[float, float] | None],
                      after: list[tuple[float, float] | None], committed: int,
                      part: Callable[[tuple[float, float]], float]) -> dict[str, float | None]:
    """Per node: the CPU its process used over the load, ``part`` of its (user, system)
    seconds, in ms per committed request; None for a node that restarted or ran no /proc."""
    return {str(i): round((part(a) - part(b)) * 1000 / committed, 3)
            if a is not None and b is not None and committed else None
            for i, (b, a) in enumerate(zip(before, after, strict=True))}


def state_summary(status: Mapping[str, Any]) -> dict[str, Any]:
    """A node's store from its newest status: entries, flash written since it booted, the
    page caches' hit rate, bytes it fetched by state transfer, and its verification error."""
    store = status.get("store") or {}
    hits, misses = store.get("hits", 0), store.get("misses", 0)
    return {"state_keys": store.get("keys"), "clients": store.get("clients"),
            "flash_bytes_written": store.get("bytes"), "flash_writes": store.get("writes"),
            "cache_hit_rate": round(hits / (hits + misses), 3) if hits + misses else None,
            "state_transfer_bytes": status.get("transfer_bytes"),
            "store_error": store.get("error")}


def stake_table(weights: list[int]) -> dict[str, int]:
    """A validator set as {node id: stake}."""
    return {str(i): w for i, w in enumerate(weights)}


def stake_epochs(genesis: list[int], node_events: list[NodeEvent]) -> list[dict[str, Any]]:
    """The validator set of every epoch the nodes reported (``["epoch", epoch, first
    checkpoint, validators]`` events; all correct nodes report the same ones), from the
    genesis set (epoch 0): [{epoch, since, validators: {node id: stake}}] by epoch."""
    epochs = {0: {"epoch": 0, "since": 0, "validators": stake_table(genesis)}}
    for _, _, event in node_events:
        if len(event) == 4 and event[0] == "epoch" and event[1] not in epochs:
            epochs[event[1]] = {"epoch": event[1], "since": event[2],
                                "validators": stake_table(list(event[3]))}
    return [epochs[e] for e in sorted(epochs)]


def transfer_ms(node_events: list[NodeEvent]) -> dict[str, list[float]]:
    """Per node, how long each state transfer took: from the first "fetch" event after its
    previous transfer (or boot) to its "transferred" event, host time, in ms."""
    started: dict[int, float] = {}
    took: dict[str, list[float]] = {}
    for t, node, event in node_events:
        if event and event[0] == "fetch":
            started.setdefault(node, t)
        elif event and event[0] in ("transferred", "restored"):
            if event[0] == "transferred" and node in started:
                took.setdefault(str(node), []).append(round((t - started[node]) * 1000, 1))
            started.pop(node, None)
    return took


def equivocations(node_events: list[NodeEvent]) -> list[dict[str, Any]]:
    """Who caught whom equivocating in which view: one entry per (node, offender, view) with
    the first sequence number and how many slots it saw."""
    found: dict[tuple[int, int, int], dict[str, Any]] = {}
    for _, node, event in node_events:
        if len(event) == 4 and event[0] == "equivocation":
            key = (node, event[1], event[2])
            if key in found:
                found[key]["slots"] += 1
            else:
                found[key] = {"node": node, "offender": event[1], "view": event[2],
                              "seq": event[3], "slots": 1}
    return list(found.values())


def times_summary(values: list[float | None], missing: str) -> dict[str, float | int | None]:
    """p50 (nearest rank) and max of per-fault times in ms, and under ``missing`` how many
    faults have none."""
    done = sorted(v for v in values if v is not None)
    return {"p50": percentile(done, 0.5) if done else None, "max": done[-1] if done else None,
            missing: len(values) - len(done)}


def write_events(path: Path, outcomes: list[Outcome], faults: list[Fault],
                 node_events: list[NodeEvent]) -> None:
    """events.jsonl: the faults, then the node events, then the requests in completion order;
    one JSON object a line, bytes in node events as hex."""
    with path.open("w") as f:
        for fault in faults:
            f.write(json.dumps({"type": "fault", **asdict(fault)}) + "\n")
        for at, node, event in node_events:
            f.write(json.dumps({"type": "node", "time": at, "node": node,
                                "event": [x.hex() if isinstance(x, bytes) else x
                                          for x in event]}) + "\n")
        for o in outcomes:
            f.write(json.dumps(request_event(o)) + "\n")
