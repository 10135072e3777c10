"""The ``edgebft`` command line: a thin shell over the library (esptool's model).

Each command parses options, calls one library function and prints its result. User mistakes
and environment problems end in one line on stderr and exit code 2; a run whose checks fail
exits 1; success exits 0.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgebft import fault_kinds
from edgebft.board_commands import COMMANDS as BOARD_COMMANDS
from edgebft.check.verdict import NOT_LIVE, OK
from edgebft.devices.micropython import ENV_VAR, HEAP_DEFAULT, MicroPythonNotFound
from edgebft.lab.bench import CLIENTS_DEFAULT, BenchError, BenchOptions, run_bench
from edgebft.lab.broker import BrokerError
from edgebft.lab.cluster import ClusterError
from edgebft.lab.demo import DemoOptions
from edgebft.lab.nemesis import DELAY_JITTER_MS, DELAY_MS, OMISSION_PERMILLE, NemesisError
from edgebft.lab.report import ReportError, build_report
from edgebft.lab.session import ACTIONS, LabCluster, LabError, status_rows
from edgebft.lab.session import down as lab_down
from edgebft.lab.session import heal as lab_heal
from edgebft.lab.session import inject as lab_inject
from edgebft.lab.session import load as lab_load
from edgebft.lab.session import status as lab_status
from edgebft.lab.session import up as lab_up
from edgebft.lab.summary_table import summary_table
from edgebft.lab.workload import ACCOUNTS, FUNDED_ACCOUNTS, KEYS
from edgebft.ledger_commands import COMMANDS as LEDGER_COMMANDS
from edgebft.protocol.byzantine import BEHAVIOURS
from edgebft.protocol.cache import POLICIES
from edgebft.protocol.pagestore import CACHE_BYTES, CACHE_PAGES
from edgebft.protocol.replica import CHECKPOINT_INTERVAL
from edgebft.sim.simulator import (
    SIM_BEHAVIOURS,
    SimError,
    SimOptions,
    parse_behaviours,
    parse_faults,
    run_many,
)
from edgebft.sim.simulator import SimOptions as _SimDefaults
from edgebft.sim.summary_table import print_sim_summary

USER_ERRORS = (BenchError, BrokerError, ClusterError, MicroPythonNotFound, ReportError, LabError,
               SimError, NemesisError)
EXIT_CHECKS_FAILED = 1
EXIT_USER_ERROR = 2

console = Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgebft")
def cli() -> None:
    """EdgeBFT: PBFT with Proof-of-Stake on MicroPython nodes over MQTT, and a lab to break it."""


class Seconds(click.ParamType):
    """A duration: plain seconds (10, 2.5) or with a unit (10s, 500ms, 1.5m)."""

    name = "seconds"
    UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0))  # "ms" before "s" and "m"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        scale = 1.0
        for unit, factor in self.UNITS:
            if text.endswith(unit):
                text, scale = text[:-len(unit)], factor
                break
        try:
            return float(text) * scale
        except ValueError:
            self.fail(f"{value!r} is not a duration (e.g. 10, 10s, 500ms, 1m)", param, ctx)


ACL_HELP = ("MQTT identities and an ACL on the broker (edgebft.lab.broker_auth): anonymous "
            "connections refused, each node publishing only its own topics, client k only "
            "req/k, only the host ctl/+. Default: on with mosquitto, off with the embedded "
            "broker (amqtt enforces none) and an external one (its identities would have to be "
            "installed before the run).")
TLS_HELP = ("The broker speaks TLS only (edgebft.lab.broker_tls): a CA made for the cluster "
            "signs the broker's certificate, and the nodes, the host's tools and applications "
            "trust that CA alone (mosquitto only). Default: off.")


RUN_OPTIONS = [  # the options of edgebft demo and edgebft bench (edgebft.lab.bench.BenchOptions)
    click.option("--nodes", default=4, show_default=True, help="Replicas to run (4 to 32)."),
    click.option("--duration", "duration_s", default=10.0, show_default=True, type=Seconds(),
                 help="Client load for this long (seconds; or 10s, 500ms, 1m)."),
    click.option("--broker", default="auto", show_default=True,
                 metavar="URL|mosquitto|embedded",
                 help="mosquitto (started on a free loopback port), embedded (amqtt, started by "
                      "the host), mqtt://host:port (external), or auto: mosquitto if installed, "
                      "else embedded."),
    click.option("--acl/--no-acl", default=None, help=ACL_HELP),
    click.option("--tls/--no-tls", default=False, help=TLS_HELP),
    click.option("--micropython", default=None, metavar="PATH",
                 help=f"MicroPython Unix-port binary (default: ${ENV_VAR}, the venv's, PATH)."),
    click.option("--heap", default=HEAP_DEFAULT, show_default=True,
                 help="MicroPython heap per node (-X heapsize)."),
    click.option("--keys", default=KEYS, show_default=True, type=click.IntRange(min=1),
                 help="Keys the workload's puts and gets spread over (the ledger on flash gets "
                      "a page per 16 keys and accounts, at least 256 pages)."),
    click.option("--accounts", default=ACCOUNTS, show_default=True,
                 type=click.IntRange(1, FUNDED_ACCOUNTS),
                 help="Accounts the transfers go to, acct0 .. acct<N-1>: each client transfers "
                      f"from its own (genesis funds acct0 .. acct{FUNDED_ACCOUNTS - 1}, acct<c> "
                      "owned by client c)."),
    click.option("--mix", default="1:1:1", show_default=True, metavar="PUT:GET:TRANSFER",
                 help="Weights of the workload's operations, taken in turn."),
    click.option("--nemesis", default="none", show_default=True, metavar="KIND[,KIND...]",
                 help="Faults to inject on the primary, one kind per strike, in turn, each healed "
                      "before the next and all at the end: " + fault_kinds.describe("nemesis")
                      + f". Omission loses {OMISSION_PERMILLE / 10:g}% of its messages, delay "
                      f"holds them {DELAY_MS} ms + up to {DELAY_JITTER_MS} ms, byzantine sends "
                      "real and null pre-prepares to different replicas. Without "
                      "--nemesis-interval each kind strikes once, spread over the run (one "
                      "kind: a third of the way in, healed two thirds of the way in)."),
    click.option("--stake", default=None, metavar="W1,W2,...",
                 help="Stake per node (default: equal); every quorum is by stake."),
    click.option("--nemesis-interval", "nemesis_interval_s", type=Seconds(), default=None,
                 metavar="SECONDS",
                 help="Strike every SECONDS (healing half an interval later), taking the kinds "
                      "in turn, instead of once per kind."),
    click.option("--checkpoint-interval", default=CHECKPOINT_INTERVAL, show_default=True,
                 help="K: a checkpoint every K sequence numbers (window 2K)."),
    click.option("--cache-pages", default=CACHE_PAGES, show_default=True,
                 type=click.IntRange(min=1),
                 help="Pages each node's ledger and client table cache in RAM, in at most "
                      f"{CACHE_BYTES} bytes of heap each (summary.json's state.cache_hit_rate "
                      "gives the hit rate)."),
    click.option("--cache-policy", default="lru", show_default=True,
                 type=click.Choice(POLICIES),
                 help="The page cache's eviction policy: lru (least recently used), lfu "
                      "(least often used) or fifo (first in)."),
    click.option("--sensors", default=0, show_default=True, type=click.IntRange(min=0),
                 help="Sensor clients (firmware/sensor.py on the Unix port, 64 KB heap) that "
                      "write a reading every 0.5 s through the cluster beside the workload; "
                      "summary.json's 'sensors' gives their writes, latency and heap."),
]


def run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add RUN_OPTIONS to a click command; they reach it as keyword arguments."""
    for option in reversed(RUN_OPTIONS):
        command = option(command)
    return command


def out_option(command: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return click.option("--out", type=click.Path(path_type=Path), default=None,
                        help=f"Run folder, not one that holds a run (default: a fresh "
                             f"folder under ./runs/{command}/).")


@cli.command()
@click.option("--clients", default=CLIENTS_DEFAULT, show_default=True,
              help="Closed-loop clients (any number: the replicas keep every client's last "
                   "reply on flash).")
@out_option("demo")
@run_options
def demo(clients: int, out: Path | None, **run: Any) -> None:
    """Run an emulated cluster under client load; print and save a summary.

    'edgebft bench' with closed-loop clients and runs/demo/. Writes config.json, summary.json,
    events.jsonl, per-node logs and report.html to the run folder. Exits 0 when the run was
    safe, every node converged on one ledger digest and (without a nemesis) every request
    committed; 1 otherwise.
    """
    summary = run_with_progress(DemoOptions(clients=clients, out=out, **_run_kwargs(run)))
    if not healthy(summary) or (run["nemesis"] == "none" and summary["availability"] != 1.0):
        sys.exit(EXIT_CHECKS_FAILED)


@cli.command()
@click.option("--clients", default=CLIENTS_DEFAULT, show_default=True,
              help="Client ids (any number): the closed-loop clients, or with --rate the "
                   "pool open-loop "
                   "requests are sent from (a request waits while every id has one "
                   "outstanding).")
@click.option("--rate", type=float, default=None, metavar="R",
              help="Open loop: R requests per second in total, intended on a fixed schedule "
                   "whatever the replies; latency runs from each request's intended send time. "
                   "Without it: closed loop.")
@out_option("bench")
@run_options
def bench(clients: int, rate: float | None, out: Path | None, **run: Any) -> None:
    """Benchmark an emulated cluster under closed- or open-loop load, with faults.

    Writes events.jsonl (every request with its intended send time, first send and outcome;
    every fault; every node event), summary.json (HDR-style latency percentiles, availability
    overall and per second, detection and recovery times, view changes, messages per commit,
    heap per node), report.html with PNG plots, config.json and per-node logs to the run
    folder; shows progress while it runs and a summary table at the end. Exits 0 when the run
    was safe and every node converged on one ledger digest, 1 otherwise (availability and
    latency are measured, not judged).
    """
    summary = run_with_progress(BenchOptions(clients=clients, rate=rate, out=out,
                                             **_run_kwargs(run)))
    if not healthy(summary):
        sys.exit(EXIT_CHECKS_FAILED)


def _run_kwargs(run: dict[str, Any]) -> dict[str, Any]:
    """RUN_OPTIONS' values as BenchOptions fields."""
    return {**run, "stake": _parse_stake(run["stake"])}


def healthy(summary: dict[str, Any]) -> bool:
    """The run's verdict is ok: safe, and every correct node converged on one ledger digest."""
    return bool(summary["verdict"]["verdict"] == OK)


def run_with_progress(options: BenchOptions) -> dict[str, Any]:
    """edgebft.lab.bench.run_bench with a progress bar; prints the summary table at the end."""
    options.check()
    load = (f"open loop {options.rate:g}/s" if options.rate is not None
            else f"{options.clients} closed-loop clients")
    with Progress(TextColumn(f"[bold]{options.command}[/bold] {load}"), BarColumn(),
                  TimeElapsedColumn(),
                  TextColumn("{task.fields[ok]} ok, {task.fields[failed]} failed, "
                             "{task.fields[queued]} queued, {task.fields[rps]:.0f} ok/s"),
                  console=console, transient=True) as bar:
        task = bar.add_task("load", total=options.duration_s, ok=0, failed=0, queued=0, rps=0.0)

        def progress(elapsed_s: float, ok: int, failed: int, queued: int) -> None:
            bar.update(task, completed=elapsed_s, ok=ok, failed=failed, queued=queued,
                       rps=ok / max(elapsed_s, 1e-3))

        summary = run_bench(options, progress)
    console.print(summary_table(summary))
    return summary


@cli.group()
def cluster() -> None:
    """A long-lived emulated cluster, driven from separate shells (state in its run folder)."""


DIR_OPTION = click.option("--dir", "run_dir", type=click.Path(path_type=Path), default=None,
                          help="The cluster's run folder (default: runs/cluster/latest).")


@cluster.command("up")
@click.option("--nodes", default=4, show_default=True, help="Replicas (4 to 32).")
@click.option("--stake", default=None, metavar="W1,W2,...",
              help="Stake per node (default: equal).")
@click.option("--broker", default="auto", show_default=True,
              metavar="URL|mosquitto|embedded|auto", help="As for demo.")
@click.option("--acl/--no-acl", default=None, help=ACL_HELP)
@click.option("--tls/--no-tls", default=False, help=TLS_HELP)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run folder (default: a fresh folder under runs/cluster/).")
@click.option("--micropython", default=None, metavar="PATH",
              help="MicroPython Unix-port binary.")
@click.option("--heap", default=HEAP_DEFAULT, show_default=True, help="Heap per node.")
@click.option("--keys", default=KEYS, show_default=True, type=click.IntRange(min=1),
              help="Keys the ledger is planned for (a page per 16 keys, at least 256 pages).")
@click.option("--metrics-port", type=int, default=None, metavar="PORT",
              help="Also serve live per-node metrics in the Prometheus text format at "
                   "http://127.0.0.1:PORT/metrics (a detached exporter, stopped by 'cluster "
                   "down').")
def cluster_up(nodes: int, stake: str | None, broker: str, acl: bool | None, tls: bool,
               out: Path | None, micropython: str | None, heap: str, keys: int,
               metrics_port: int | None) -> None:
    """Start a broker and NODES emulated nodes that keep running after this command."""
    weights = _parse_stake(stake)
    lab = lab_up(nodes, broker, out, weights, heap, micropython, metrics_port, keys, acl, tls)
    console.print(f"cluster {lab.state['cluster']} up: {lab.nodes} nodes, "
                  f"{lab.state['broker']['describe']}; state in {lab.path}", highlight=False)
    if metrics_port is not None:
        console.print(f"metrics: {lab.state['exporter']['url']}", highlight=False)


def _parse_ints(text: str | None, hint: str, example: str) -> list[int] | None:
    """``"30,25,25,20"`` -> [30, 25, 25, 20] (None stays None); a usage error naming ``hint``
    with ``example`` otherwise."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected {example}", param_hint=hint) from None


def _parse_stake(text: str | None) -> list[int] | None:
    return _parse_ints(text, "--stake", "integers like 30,25,25,20")


@cluster.command("status")
@DIR_OPTION
@click.option("--watch", "watch_s", type=Seconds(), default=None, metavar="SECONDS",
              help="Redraw the table every SECONDS (or 2s, 500ms) until Ctrl-C.")
def cluster_status(run_dir: Path | None, watch_s: float | None) -> None:
    """Show each node: role, view, last executed, stable checkpoint, ledger entries, heap,
    active faults, and its phi of each peer (failure detector)."""
    lab = lab_load(run_dir)
    if watch_s is None:
        console.print(_status_table(lab))
        return
    if watch_s <= 0:
        raise click.BadParameter("must be positive", param_hint="--watch")
    with contextlib.suppress(KeyboardInterrupt):
        if not console.is_terminal:  # a pipe or a file: one table after another
            while True:
                console.print(_status_table(lab))
                time.sleep(watch_s)
        with Live(_status_table(lab), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(watch_s)
                live.update(_status_table(lab), refresh=True)


def _status_table(lab: LabCluster) -> Table:
    table = Table(title=f"cluster {lab.state['cluster']} ({lab.path}) at "
                        f"{time.strftime('%H:%M:%S')}")
    for name in ("node", "role", "view", "exec", "stable", "entries", "heap", "faults", "phi"):
        # a narrow terminal (80 columns, a pipe) folds phi, never a role to "prima…"
        table.add_column(name, min_width=len("primary") if name == "role" else None)
    for row in status_rows(lab_status(lab)):
        table.add_row(*row)
    return table


@cluster.command("down")
@DIR_OPTION
def cluster_down(run_dir: Path | None) -> None:
    """Stop every node and the broker of the cluster."""
    lab = lab_load(run_dir)
    lab_down(lab)
    console.print(f"cluster {lab.state['cluster']} down")


@cli.command(help="Inject fault KIND on NODE (broker-restart: on the broker, no NODE), or act "
             "on it.\n\nFaults: "
             + fault_kinds.describe("inject") + ". Older names: "
             + ", ".join(f"{a} ({fault_kinds.kind(a, 'inject').name})"
                         for a in fault_kinds.aliases("inject"))
             + ".\n\nActions: resume (SIGCONT), restart (crash, then boot again from its "
             "flash).\n\nOptions by kind: " + fault_kinds.inject_options()
             + ". An emulated node that reboots exits and is booted again from its flash; "
             "one that runs out of heap (oom) restarts in place, in the same process.\n\n"
             "'edgebft heal' undoes them all.")
@click.argument("kind", metavar="KIND", type=click.Choice(
    fault_kinds.names("inject") + ACTIONS + fault_kinds.aliases("inject")))
@click.argument("node", type=int, required=False)
@click.option("--p", "p", type=float, default=1.0, show_default=True,
              help="omission: the fraction of messages dropped; duplicate: the fraction sent "
                   "twice.")
@click.option("--peers", default=None, metavar="J,K",
              help="omission: only messages to and from these replicas (default: all).")
@click.option("--ms", type=int, default=100, show_default=True,
              help="delay: fixed delay; skew: clock offset (negative: behind); "
                   "broker-restart: how long the broker stays down.")
@click.option("--jitter", "jitter_ms", type=int, default=0, show_default=True,
              help="delay: extra random delay up to this many ms.")
@click.option("--group", default=None, metavar="J,K",
              help="partition: the replicas on NODE's side (NODE is always in it); the "
                   "others form the other side.")
@click.option("--mode", default="equivocate", show_default=True, type=click.Choice(BEHAVIOURS),
              help="byzantine: what NODE does (protocol/byzantine.py).")
@click.option("--colluders", default=None, metavar="J,K",
              help="byzantine equivocate: the replicas colluding with NODE.")
@DIR_OPTION
def inject(kind: str, node: int | None, p: float, peers: str | None, ms: int, jitter_ms: int,
           group: str | None, mode: str, colluders: str | None, run_dir: Path | None) -> None:
    lab = lab_load(run_dir)
    console.print(lab_inject(lab, kind, node, p=p, ms=ms, jitter_ms=jitter_ms,
                             group=_parse_ids(group, "--group"),
                             peers=_parse_ids(peers, "--peers"), mode=mode,
                             colluders=_parse_ids(colluders, "--colluders")), highlight=False)


def _parse_ids(text: str | None, hint: str) -> list[int] | None:
    return _parse_ints(text, hint, "replica ids like 0,1")


@cli.command()
@DIR_OPTION
def heal(run_dir: Path | None) -> None:
    """Undo every fault: resume paused nodes, restart killed ones, heal control faults
    (omission, delay, partition, skew, byzantine) on every node."""
    console.print(lab_heal(lab_load(run_dir)))


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Rebuild RUN_DIR's report (report.html and PNG plots) from its events.jsonl and
    summary.json alone."""
    console.print(f"report: {build_report(run_dir)}")


SIM_SEEDS_DEFAULT = 100


@cli.command()
@click.option("--nodes", default=_SimDefaults.nodes, show_default=True,
              help="Replicas (n = 3f+1 survives f down).")
@click.option("--seeds", "seed_count", default=None, type=int,
              help=f"How many seeds to run: START, START+1, ... [default: {SIM_SEEDS_DEFAULT}]")
@click.option("--start", default=1, show_default=True, help="First seed of a --seeds run.")
@click.option("--seed", default=None, type=int,
              help="Run this one seed only (replays a failure exactly).")
@click.option("--faults", "faults_text", default="all", show_default=True, metavar="KINDS",
              help="Comma list of " + ",".join(fault_kinds.names("sim")) + "; or all, or "
                   "none.")
@click.option("--requests", default=_SimDefaults.requests, show_default=True,
              help="Client requests per seed (all must be accepted for liveness).")
@click.option("--clients", default=_SimDefaults.clients, show_default=True,
              help="Closed-loop clients per seed.")
@click.option("--loss", "loss_max", default=_SimDefaults.loss_max, show_default=True,
              type=float,
              help="Highest drop probability of a loss fault.")
@click.option("--delay-ms", "delay_ms_max", default=_SimDefaults.delay_ms_max,
              show_default=True,
              help="Highest extra latency of a delay fault (ms, on one replica's links).")
@click.option("--fault-ms", default=_SimDefaults.fault_ms, show_default=True,
              help="Simulated ms during which faults happen; everything heals at its end.")
@click.option("--liveness-ms", default=_SimDefaults.liveness_ms, show_default=True,
              help="Simulated ms after healing within which every request must be accepted.")
@click.option("--checkpoint-interval", default=_SimDefaults.checkpoint_interval,
              show_default=True,
              help="Replicas' checkpoint interval K (small: short runs cross checkpoints).")
@click.option("--view-timeout-ms", default=_SimDefaults.view_timeout_ms,
              show_default=True,
              help="Replicas' first view-change timeout (ms; it doubles per failed view).")
@click.option("--safety-only", is_flag=True,
              help="Report liveness failures but exit 0 when every seed is safe.")
@click.option("--plant-divergence", "plant", default=None, metavar="REPLICA:SEQ",
              help="Plant a bug: REPLICA executes a different op at SEQ (proves the checker).")
@click.option("--stake", default=None, metavar="W1,W2,...",
              help="Stake per replica (default: equal); quorums are by stake.")
@click.option("--byzantine", default=None, metavar="J,K",
              help="Replicas that misbehave (their own history is not checked).")
@click.option("--behaviour", "behaviour_text", default="silent", show_default=True,
              metavar="B[,B...]",
              help="What the Byzantine replicas do, one of " + ", ".join(SIM_BEHAVIOURS)
                   + " (protocol/byzantine.py): equivocate is a coordinated attack, view-skew "
                   "votes for past and future views, twins runs two correct instances with one "
                   "identity on parts of the network. A comma list takes them in turn, one per "
                   "seed.")
@click.option("--churn", is_flag=True,
              help="Every other request bonds or unbonds one token of stake, so the validator "
                   "set changes (a new epoch) at nearly every checkpoint; use stakes of 100 or "
                   "so (--stake 100,100,100,100) to keep each within a few tokens.")
@click.option("--state-keys", default=0, show_default=True, metavar="N",
              help="N more genesis accounts, so state transfers move a large state (only the "
                   "pages that differ).")
@click.option("--beyond-bound", is_flag=True,
              help="Let faults take 1/3 of the stake or more: by default the replicas down "
                   "(crash, reboot, pause), cut off by a partition (its smaller side by stake) "
                   "and Byzantine hold less than 1/3 of the stake in force. Beyond it a seed "
                   "may be unsafe or not live; the checkers must say so.")
@click.option("--overlap-restarts", is_flag=True,
              help="Let a crash, reboot or pause start while another replica is still "
                   "recovering from a restart (by default it waits: a recovering replica "
                   "votes on nothing in its old view, so it counts toward the bound). Seeds "
                   "must stay safe (replicas write their P entries ahead) and need not be "
                   "live: use with --safety-only.")
def sim(nodes: int, seed_count: int | None, start: int, seed: int | None, faults_text: str,
        requests: int, clients: int, loss_max: float, delay_ms_max: int, fault_ms: int,
        liveness_ms: int, checkpoint_interval: int, view_timeout_ms: int, safety_only: bool,
        plant: str | None, stake: str | None, byzantine: str | None, behaviour_text: str,
        churn: bool, state_keys: int, beyond_bound: bool, overlap_restarts: bool) -> None:
    """Deterministic simulation: whole clusters in-process on a simulated network and clock.

    Each seed draws keys, latencies, faults and client timing from random.Random(seed), runs
    the replicas of edgebft.protocol until every request is accepted or the liveness bound
    passes, and checks the history: safety (replicas agree on every executed and stable
    digest), client safety, liveness and convergence (every correct replica executes the
    last request, with no load, else once one more request comes). A failing seed prints
    the command that replays it.
    Byzantine replicas (--byzantine, --behaviour) are not judged; below 1/3 of stake they
    must break neither safety nor liveness. Exits 0 when every seed is ok, 1 on any
    violation, 2 on bad options.
    """
    if seed is not None and seed_count is not None:
        raise SimError("--seed runs one seed; do not combine it with --seeds")
    if seed_count is not None and seed_count < 1:
        raise SimError(f"--seeds must be at least 1, got {seed_count}")
    options = SimOptions(nodes=nodes, requests=requests, clients=clients,
                         faults=parse_faults(faults_text), loss_max=loss_max,
                         delay_ms_max=delay_ms_max, fault_ms=fault_ms, liveness_ms=liveness_ms,
                         checkpoint_interval=checkpoint_interval,
                         view_timeout_ms=view_timeout_ms, plant_divergence=_parse_plant(plant),
                         stake=tuple(_parse_stake(stake) or ()) or None,
                         byzantine=tuple(_parse_ids(byzantine, "--byzantine") or ()),
                         churn=churn, state_keys=state_keys, beyond_bound=beyond_bound,
                         overlap_restarts=overlap_restarts)
    try:
        behaviours = parse_behaviours(behaviour_text)
    except SimError as e:
        raise click.BadParameter(str(e), param_hint="--behaviour") from None
    options = replace(options, behaviour=behaviours[0])
    options.check()
    seeds = [seed] if seed is not None else list(
        range(start, start + (seed_count or SIM_SEEDS_DEFAULT)))
    with Progress(TextColumn("[bold]sim"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  TextColumn("{task.fields[bad]} failing"),
                  console=console, transient=True) as bar:
        task = bar.add_task("seeds", total=len(seeds), bad=0)
        failing = [0]

        def progress(result: Any) -> None:
            failing[0] += not result.ok
            bar.update(task, advance=1, bad=failing[0])

        summary = run_many(options, seeds, progress, behaviours)
    print_sim_summary(summary, console)
    violated = [r for r in summary.failures if not (safety_only and r.verdict == NOT_LIVE)]
    if violated:
        sys.exit(EXIT_CHECKS_FAILED)


def _parse_plant(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        replica, seq = text.split(":")
        return int(replica), int(seq)
    except ValueError:
        raise SimError(f"--plant-divergence wants REPLICA:SEQ, got {text!r}") from None


for _command in LEDGER_COMMANDS + BOARD_COMMANDS:  # put, get, ..., client; boards, flash
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="edgebft", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        console.print("aborted", style="red", highlight=False)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        print(f"edgebft: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
