"""``edgebft demo``: an emulated cluster on a real broker, a client workload, a summary.

A run is a folder (Maelstrom's model): ``config.json``, ``nodes/node<i>/`` (each node's image,
its flash), ``logs/node<i>.log``, ``events.jsonl`` (every request's outcome and every fault,
with host timestamps), ``summary.json`` and the report (``report.html`` and its PNG plots,
edgebft.report). The verdict on safety comes from the ledger digests the nodes
report (``edgebft.observer``), not from the nodes' own claims.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgebft.broker import start_broker
from edgebft.cluster import EmulatedCluster
from edgebft.control import fresh_nonce, send_command
from edgebft.image import build_image
from edgebft.keys import generate_keys
from edgebft.metrics import availability, latency_summary, percentile
from edgebft.micropython import HEAP_DEFAULT, find_micropython
from edgebft.nemesis import Fault, PrimaryNemesis, make_nemesis, parse_nemesis
from edgebft.observer import Observer
from edgebft.protocol.replica import CHECKPOINT_INTERVAL
from edgebft.protocol.stake import Stake
from edgebft.report import build_report
from edgebft.workload import DEADLINE_S, Outcome, Workload, genesis

NODES_MIN = 4  # n = 3f+1 with f >= 1
STARTUP_TIMEOUT_S = 20.0
CONVERGE_TIMEOUT_S = 5.0


class DemoError(RuntimeError):
    """A run could not be set up or did not come up; the message says what to do."""


@dataclass
class DemoOptions:
    """What ``edgebft demo`` runs. ``out=None`` makes a fresh folder under ./runs/demo/."""

    nodes: int = 4
    duration_s: float = 10.0
    clients: int = 4
    broker: str = "auto"
    out: Path | None = None
    micropython: str | None = None
    heap: str = HEAP_DEFAULT
    checkpoint_interval: int = CHECKPOINT_INTERVAL
    nemesis: str = "none"
    nemesis_interval_s: float | None = None
    stake: list[int] | None = None  # per node; None: equal
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise DemoError for options no run can satisfy."""
        if self.nodes < NODES_MIN:
            raise DemoError(f"--nodes {self.nodes}: PBFT needs at least {NODES_MIN} replicas "
                            "(n = 3f+1 with f >= 1); use --nodes 4 or more")
        if self.duration_s <= 0:
            raise DemoError("--duration must be positive")
        if self.clients < 1:
            raise DemoError("--clients must be at least 1")
        if self.nemesis_interval_s is not None and self.nemesis_interval_s <= 0:
            raise DemoError("--nemesis-interval must be positive")
        if self.stake is not None and (len(self.stake) != self.nodes or min(self.stake) < 0
                                       or sum(self.stake) <= 0):
            raise DemoError(f"--stake needs {self.nodes} non-negative values with a positive sum")
        parse_nemesis(self.nemesis)  # raises NemesisError, a user error


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


def node_config(i: int, cluster: str, stake: Stake, broker_host: str, broker_port: int,
                key_row: dict[str, object], options: DemoOptions) -> dict[str, Any]:
    """The edgebft.json of node ``i``."""
    return {
        "node": i, "cluster": cluster, "stake": stake.weights,
        "broker": {"host": broker_host, "port": broker_port},
        "genesis": genesis(), "checkpoint_interval": options.checkpoint_interval,
        "wifi": None, **key_row, **options.extra,
    }


def run_demo(options: DemoOptions,
             progress: Callable[[float, int, int], None] | None = None) -> dict[str, Any]:
    """Run the demo and return its summary (also written to ``<out>/summary.json``).

    ``progress(elapsed_s, ok, failed)`` is called about every 0.2 s while the workload runs.

    Raises:
        DemoError, BrokerError, MicroPythonNotFound, ClusterError: setup failed (one line).
    """
    options.check()
    micropython = find_micropython(options.micropython)
    run = Path(options.out) if options.out else new_run_dir("demo")
    run.mkdir(parents=True, exist_ok=True)
    cluster_id = "demo" + os.urandom(3).hex()
    stake = Stake(options.stake or [1] * options.nodes)
    keys = generate_keys(options.nodes)
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(start_broker(options.broker, run / "broker"))
        images = [build_image(run / "nodes" / f"node{i}",
                              node_config(i, cluster_id, stake, broker.host, broker.port,
                                          keys.row(i), options))
                  for i in range(options.nodes)]
        config = {**asdict(options), "out": str(run), "cluster": cluster_id,
                  "broker": broker.describe(), "micropython": str(micropython)}
        (run / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
        observer = Observer(broker.host, broker.port, cluster_id, options.nodes)
        stack.callback(observer.close)
        cluster = stack.enter_context(EmulatedCluster(
            images, run / "logs", options.heap, micropython=micropython))
        started = time.time()
        if not observer.wait_all_online(STARTUP_TIMEOUT_S, since=started):
            missing = sorted(set(range(options.nodes)) - set(observer.snapshot()))
            raise DemoError(f"nodes {missing} did not come up within {STARTUP_TIMEOUT_S:.0f} s; "
                            f"see {run / 'logs'}")
        workload = Workload(broker.host, broker.port, cluster_id, stake, keys, options.clients)
        stack.callback(workload.close)
        nonces = [0]

        def control(node: int, command: str, args: list[Any]) -> None:
            nonces[0] = fresh_nonce(nonces[0])
            send_command(broker.host, broker.port, cluster_id, node, keys.control[node],
                         nonces[0], command, args)

        nemesis = make_nemesis(options.nemesis, cluster, observer, options.duration_s,
                               options.nemesis_interval_s, control)
        t0 = time.time()
        workload.start()
        _wait(options.duration_s, workload, progress, nemesis)
        issuing_s = time.time() - t0
        if nemesis is not None:
            nemesis.heal()  # always healed before the end (Jepsen)
        workload.drain(DEADLINE_S + 1.0)
        byzantine = sorted({f.node for f in (nemesis.faults if nemesis else [])
                            if f.kind == "byzantine-primary"})
        converged = observer.wait_converged(CONVERGE_TIMEOUT_S + (5.0 if nemesis else 0.0),
                                            exclude=byzantine)
        alive = [cluster.alive(i) for i in range(options.nodes)]
        faults = nemesis.faults if nemesis is not None else []
        summary = summarize(options, broker.describe(), workload.outcomes, observer,
                            issuing_s, converged, faults)
        summary["nodes_alive_at_end"] = alive
        summary["byzantine_nodes"] = byzantine
    _write_events(run / "events.jsonl", workload.outcomes, faults, observer.events)
    (run / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["out"] = str(run)
    if summary["requests"]:
        summary["report"] = str(build_report(run))
    return summary


def _wait(duration_s: float, workload: Workload,
          progress: Callable[[float, int, int], None] | None,
          nemesis: PrimaryNemesis | None) -> None:
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < duration_s:
        time.sleep(min(0.1, duration_s - elapsed))
        if nemesis is not None:
            nemesis.step(time.monotonic() - start)
        if progress:
            outcomes = list(workload.outcomes)
            ok = sum(1 for o in outcomes if o.outcome == "ok")
            progress(min(elapsed + 0.2, duration_s), ok, len(outcomes) - ok)


def recovery_ms(fault: Fault, outcomes: list[Outcome]) -> float | None:
    """Fault start to the first request accepted from a view after the fault's view."""
    ends = [o.end for o in outcomes
            if o.outcome == "ok" and o.view > fault.view and o.end > fault.start]
    return round((min(ends) - fault.start) * 1000.0, 1) if ends else None


def summarize(options: DemoOptions, broker: str, outcomes: list[Outcome], observer: Observer,
              issuing_s: float, converged: bool, faults: list[Fault]) -> dict[str, Any]:
    """The summary.json contract of ``edgebft demo`` (see README)."""
    ok = [o for o in outcomes if o.outcome == "ok"]
    recoveries = [recovery_ms(f, outcomes) for f in faults]
    violations = observer.violations()
    statuses = observer.snapshot()
    return {
        "nodes": options.nodes,
        "f": (options.nodes - 1) // 3,
        "broker": broker,
        "duration_s": options.duration_s,
        "clients": options.clients,
        "requests": len(outcomes),
        "committed": len(ok),
        "timed_out": len(outcomes) - len(ok),
        "throughput_rps": round(len(ok) / issuing_s, 1) if issuing_s > 0 else 0.0,
        "latency_ms": latency_summary([o.latency_ms for o in ok]),
        "availability": availability(len(ok), len(outcomes)),
        "safety_ok": not violations and observer.sequences_compared() > 0,
        "safety": {"violations": violations, "converged": converged,
                   "sequences_compared": observer.sequences_compared()},
        "last_executed": {str(n): s.get("last_exec") for n, s in sorted(statuses.items())},
        "heap_peak_bytes": {str(n): v for n, v in sorted(observer.heap_peak.items())},
        "view_changes": max((s.get("view", 0) for s in statuses.values()), default=0),
        "nemesis": options.nemesis,
        "faults": [{"kind": f.kind, "node": f.node, "start": f.start, "end": f.end,
                    "view": f.view, "recovery_ms": r} for f, r in zip(faults, recoveries,
                                                                     strict=True)],
        "recovery_ms": recoveries,
        "recovery": recovery_summary(recoveries),
        "stake": stake_table(options),
        "equivocations_detected": [
            {"node": node, "offender": event[1], "view": event[2], "seq": event[3]}
            for _, node, event in observer.events if event and event[0] == "equivocation"],
    }


def stake_table(options: DemoOptions) -> dict[str, int]:
    """The validator set's stake per node (one epoch: stake changes are future work)."""
    weights = options.stake or [1] * options.nodes
    return {str(i): w for i, w in enumerate(weights)}


def recovery_summary(values: list[float | None]) -> dict[str, float | int | None]:
    """p50 and max of the recovery times, and how many faults never saw a new view commit."""
    done = sorted(v for v in values if v is not None)
    return {"p50": percentile(done, 0.5) if done else None, "max": done[-1] if done else None,
            "unrecovered": len(values) - len(done)}


def _write_events(path: Path, outcomes: list[Outcome], faults: list[Fault],
                  node_events: list[tuple[float, int, list[Any]]]) -> None:
    with path.open("w") as f:
        for fault in faults:
            f.write(json.dumps({"type": "fault", **asdict(fault)}) + "\n")
        for at, node, event in node_events:
            f.write(json.dumps({"type": "node", "time": at, "node": node,
                                "event": [x.hex() if isinstance(x, bytes) else x
                                          for x in event]}) + "\n")
        for o in outcomes:
            f.write(json.dumps({"type": "request", **asdict(o),
                                "latency_ms": round(o.latency_ms, 3)}) + "\n")
