"""A long-lived emulated cluster driven from separate shells: ``edgebft cluster up``,
``cluster status``, ``inject``, ``heal``, ``cluster down``.

The cluster's state lives in its run folder (default ``runs/cluster/latest``):
``cluster.json`` (cluster id, broker, node pids and image folders, the last control nonce) and
``keys.json`` (all key material, mode 0600: the host acts as every client and holds every
node's control key). Nodes and broker run in their own process groups, detached from the
command that started them.

Faults (edgebft.fault_kinds, the kinds ``inject`` applies) reach nodes two ways: by signals to
the node's process group (crash, pause; and the actions resume and restart), and as
authenticated CONTROL messages on ``ebft/<c>/ctl/<i>`` (omission, delay, partition, skew,
byzantine, reboot, heal; firmware/faults.py). A rebooted emulated node exits and the lab boots
it again from its image, as a board's reset would. ``heal`` undoes both kinds.

With ``metrics_port``, ``up`` also starts a detached Prometheus exporter
(``edgebft.lab.prometheus``), recorded in ``cluster.json`` and stopped by ``down``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebft import fault_kinds
from edgebft.devices.keys import ClusterKeys, load_keys, save_keys
from edgebft.devices.micropython import HEAP_DEFAULT
from edgebft.lab.bench import (
    ACL_CLIENTS,
    ISSUED_CLIENTS_FIRST,
    STARTUP_TIMEOUT_S,
    BenchOptions,
    launch,
    new_run_dir,
)
from edgebft.lab.broker import Broker, BrokerError, Login
from edgebft.lab.broker_auth import HOST, BrokerAuth
from edgebft.lab.broker_tls import BrokerTLS
from edgebft.lab.cluster import node_argv
from edgebft.lab.control import fresh_nonce, partition_reach, send_command
from edgebft.lab.observer import Observer
from edgebft.lab.processes import alive, signal_group, spawn, wait_exit
from edgebft.lab.workload import KEYS, Workload
from edgebft.protocol.byzantine import BEHAVIOURS
from edgebft.protocol.stake import Stake

ACTIONS = ("resume", "restart")  # what inject does besides faults: signals, no fault kind
STATE_FILE = "cluster.json"
KEYS_FILE = "keys.json"
STATUS_WAIT_S = 1.5
REBOOT_WAIT_S = 5.0  # from the reboot command to the node's process exiting
EXPORTER_WAIT_S = 10.0  # from spawning the exporter to its port answering
LOOPBACK = "127.0.0.1"


class LabError(RuntimeError):
    """A lab command cannot run (no cluster, bad node, bad fault); one line says why."""


@dataclass
class LabCluster:
    """What ``cluster.json`` records of a running cluster."""

    path: Path
    state: dict[str, Any]
    _keys: ClusterKeys | None = field(default=None, repr=False, compare=False)

    @property
    def nodes(self) -> int:
        return len(self.state["nodes"])

    def save(self) -> None:
        (self.path / STATE_FILE).write_text(json.dumps(self.state, indent=1) + "\n")

    def keys(self) -> ClusterKeys:
        """The cluster's keys (keys.json, read once: they never change)."""
        if self._keys is None:
            self._keys = load_keys(self.path / KEYS_FILE)
        return self._keys

    def broker_auth(self) -> BrokerAuth | None:
        """The identities and ACL the cluster's broker enforces; None without ACLs."""
        if not self.state.get("acl"):
            return None
        return BrokerAuth(self.state["cluster"], self.keys(), ACL_CLIENTS)

    def broker_tls(self) -> BrokerTLS | None:
        """The CA and certificate of the cluster's broker; None when it speaks plain TCP."""
        return BrokerTLS(Path(self.state["tls"])) if self.state.get("tls") else None

    def login(self, identity: str = HOST) -> Login:
        """How ``identity`` logs in to the cluster's broker (credentials with ACLs, TLS)."""
        return Login.of(identity, self.broker_auth(), self.broker_tls())

    def issue_client(self) -> int:
        """A client id never issued before in this cluster (from ISSUED_CLIENTS_FIRST on),
        recorded in cluster.json; LabError once the broker's identities run out."""
        issued = self.state.get("clients_issued", ISSUED_CLIENTS_FIRST)
        if self.state.get("acl") and issued >= ACL_CLIENTS:
            raise LabError(f"all {ACL_CLIENTS - ISSUED_CLIENTS_FIRST} client identities of "
                           "the broker are issued")
        self.state["clients_issued"] = issued + 1
        self.save()
        return issued

    def workload(self, clients: int, **options: Any) -> Workload:
        """A workload of ``clients`` client ids against this cluster (Workload's options),
        logged in as the host; not started."""
        b = self.state["broker"]
        return Workload(b["host"], b["port"], self.state["cluster"], Stake(self.state["stake"]),
                        self.keys(), clients, login=self.login(), **options)

    def node(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.nodes:
            raise LabError(f"no node {i}: the cluster has nodes 0..{self.nodes - 1}")
        return self.state["nodes"][i]


def default_dir() -> Path:
    return Path("runs") / "cluster" / "latest"


def load(path: Path | None) -> LabCluster:
    """The cluster recorded in ``path`` (default runs/cluster/latest)."""
    path = path or default_dir()
    if not (path / STATE_FILE).is_file():
        raise LabError(f"no cluster in {path}: start one with 'edgebft cluster up'")
    return LabCluster(path.resolve(), json.loads((path / STATE_FILE).read_text()))


def up(nodes: int = 4, broker: str = "auto", out: Path | None = None,
       stake: list[int] | None = None, heap: str = HEAP_DEFAULT,
       micropython: str | None = None, metrics_port: int | None = None,
       keys: int = KEYS, acl: bool | None = None, tls: bool = False) -> LabCluster:
    """Start a broker and ``nodes`` emulated nodes that outlive this process, and with
    ``metrics_port`` a Prometheus exporter on 127.0.0.1:``metrics_port``. ``keys``: the
    ledger's size to plan its pages for (edgebft.lab.bench.ledger_pages). ``acl``: MQTT
    identities and an ACL on the broker (BenchOptions.acl); ``tls``: the broker speaks TLS
    only (BenchOptions.tls)."""
    options = BenchOptions(command="lab", nodes=nodes, broker=broker, heap=heap,
                           micropython=micropython, keys=keys, acl=acl, tls=tls, out=out)
    options.check()
    weights = stake or [1] * nodes
    if len(weights) != nodes:
        raise LabError(f"--stake lists {len(weights)} values for {nodes} nodes")
    if metrics_port is not None:
        _check_port_free(metrics_port)
    run = Path(out) if out else new_run_dir("cluster")
    run.mkdir(parents=True, exist_ok=True)
    run = run.resolve()  # nodes run in their image folders: relative paths would not hold
    with contextlib.ExitStack() as stack:
        started = launch(stack, run, options, Stake(weights))
        keys, b, cluster = started.keys, started.broker, started.cluster
        save_keys(keys, run / KEYS_FILE)
        pids = cluster.detach()  # from here on, leaving the stack stops neither
        broker_pid = b.pid
        b.detach()
    lab = LabCluster(run, {
        "cluster": started.cluster_id, "stake": weights,
        "broker": {"kind": b.kind, "host": b.host, "port": b.port, "pid": broker_pid,
                   "describe": b.describe(), "argv": b.argv},
        "nodes": [{"pid": pid, "image": str(image), "paused": False}
                  for pid, image in zip(pids, started.images, strict=True)],
        "heap": heap, "micropython": str(cluster.micropython), "rom": cluster.rom,
        "nonce": 0, "acl": b.auth is not None,
        "tls": None if b.tls is None else str(b.tls.folder)})
    lab.save()
    latest = run.parent / "latest"
    if run.parent.name == "cluster" and not latest.exists():
        latest.symlink_to(run.name)
    if metrics_port is not None:
        try:
            _start_exporter(lab, metrics_port)
        except LabError:
            down(lab)
            raise
    return lab


def down(lab: LabCluster) -> None:
    """Stop every node, the broker and the exporter the cluster started (SIGKILL to each
    group): those its state file names now (an inject or heal from another process restarts
    nodes and records their new pids there, not in ``lab``)."""
    if (lab.path / STATE_FILE).is_file():
        lab.state = load(lab.path).state
    for node in lab.state["nodes"]:
        signal_group(node["pid"], signal.SIGCONT)
        signal_group(node["pid"], signal.SIGKILL)
    for part in ("broker", "exporter"):
        pid = (lab.state.get(part) or {}).get("pid")
        if pid:
            signal_group(pid, signal.SIGKILL)
    lab.state["down"] = True
    lab.save()


def _check_port_free(port: int) -> None:
    if not 0 < port < 65536:
        raise LabError(f"--metrics-port {port}: expected a TCP port, 1..65535")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the exporter binds
        try:
            probe.bind((LOOPBACK, port))
        except OSError as e:
            raise LabError(f"--metrics-port {port}: cannot listen on {LOOPBACK}:{port} "
                           f"({e.strerror})") from None


def _start_exporter(lab: LabCluster, port: int) -> None:
    """Start ``edgebft.lab.prometheus`` detached, record it, and wait until its port answers."""
    argv = [sys.executable, "-m", "edgebft.lab.prometheus", "--dir", str(lab.path),
            "--port", str(port)]
    proc = spawn(argv, lab.path / "logs" / "exporter.log", tracked=False)
    lab.state["exporter"] = {"pid": proc.pid, "port": port,
                             "url": f"http://{LOOPBACK}:{port}/metrics"}
    lab.save()
    end = time.monotonic() + EXPORTER_WAIT_S
    while time.monotonic() < end and proc.poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.1)
    raise LabError(f"the metrics exporter did not start on port {port}; see "
                   f"{lab.path / 'logs' / 'exporter.log'}")


@contextmanager
def _broker(lab: LabCluster) -> Iterator[dict[str, Any]]:
    """The cluster's broker record; a connection refused or lost inside becomes a LabError."""
    b = lab.state["broker"]
    try:
        yield b
    except OSError as e:
        raise LabError(f"cannot reach the cluster's broker at {b['host']}:{b['port']} "
                       f"({e.strerror or e}); is the cluster in {lab.path} up?") from None


def status(lab: LabCluster, wait_s: float = STATUS_WAIT_S) -> dict[int, dict[str, Any]]:
    """The newest status of each node (retained on the broker), waited for ``wait_s``."""
    with _broker(lab) as b:
        observer = Observer(b["host"], b["port"], lab.state["cluster"], lab.nodes,
                            lab.keys(), lab.login())
    try:
        observer.wait_all_online(wait_s)
        snap = observer.snapshot()
        for n in range(lab.nodes):
            snap.setdefault(n, {})["online"] = observer.online.get(n, False)
        return snap
    finally:
        observer.close()


def send_control(lab: LabCluster, node: int, command: str, args: list[Any]) -> None:
    """Publish one authenticated CONTROL command to ``node`` (QoS 1), with a fresh nonce."""
    lab.node(node)
    lab.state["nonce"] = nonce = fresh_nonce(lab.state["nonce"])
    lab.save()
    with _broker(lab) as b:
        send_command(b["host"], b["port"], lab.state["cluster"], node,
                     lab.keys().control[node], nonce, command, args, lab.login())


def inject(lab: LabCluster, kind: str, node: int | None, p: float = 1.0, ms: int = 0,
           jitter_ms: int = 0, group: list[int] | None = None,
           peers: list[int] | None = None, mode: str = "equivocate",
           colluders: list[int] | None = None) -> str:
    """Inject fault ``kind`` (a kind fault_kinds lets inject apply, or an alias of one) on
    ``node`` (None for a kind that strikes the broker), or do one of ACTIONS to it; return a
    one-line description. Raises LabError for a bad kind, node or argument."""
    if kind not in ACTIONS:
        try:
            found = fault_kinds.kind(kind, "inject")
        except fault_kinds.FaultKindError as e:
            raise LabError(f"{e}, or {', '.join(ACTIONS)}") from None
        kind = found.name
        if found.inject == "broker":
            return _restart_broker(lab, ms)
    if node is None:
        raise LabError(f"{kind} needs a NODE")
    info = lab.node(node)
    for j in (group or []) + (peers or []) + (colluders or []):
        lab.node(j)
    if kind in ACTIONS or found.inject == "signal":
        return _process_fault(lab, kind, node, info)
    if kind == "omission":
        if not 0 <= p <= 1:
            raise LabError("--p must be between 0 and 1")
        send_control(lab, node, "omission", [round(p * 1000), peers])
        return f"node {node} drops {p:.0%} of its messages" + (f" with {peers}" if peers else "")
    if kind == "duplicate":
        if not 0 <= p <= 1:
            raise LabError("--p must be between 0 and 1")
        send_control(lab, node, "duplicate", [round(p * 1000)])
        return f"node {node} sends {p:.0%} of its messages twice"
    if kind == "delay":
        if ms < 0 or jitter_ms < 0:
            raise LabError("--ms and --jitter must not be negative")
        send_control(lab, node, "delay", [ms, jitter_ms])
        return f"node {node} delays its messages {ms} ms (+0..{jitter_ms} ms)"
    if kind == "partition":
        members = sorted(set(group or []) | {node})
        for j, reach in partition_reach(lab.nodes, members).items():
            send_control(lab, j, "partition", [reach])
        return f"partitioned {members} from the rest"
    if kind == "skew":
        send_control(lab, node, "skew", [ms])
        return f"node {node} clock skewed by {ms} ms"
    if kind == "byzantine":
        if mode not in BEHAVIOURS:
            raise LabError(f"--mode {mode}: expected one of {', '.join(BEHAVIOURS)}")
        send_control(lab, node, "byzantine", [mode, colluders or []])
        return f"node {node} is Byzantine: {mode}" + (
            f" with colluders {colluders}" if colluders else "")
    if kind == "oom":
        with _supervising(lab, [node]):
            send_control(lab, node, "oom", [])  # the node restarts by itself: no respawn
        return f"node {node} ran out of heap and restarted in place from its flash"
    if kind == "reboot":
        with _supervising(lab, [node]) as respawn:
            send_control(lab, node, "reboot", [])
            if not wait_exit(info["pid"], REBOOT_WAIT_S):
                raise LabError(f"node {node} did not reboot within {REBOOT_WAIT_S:.0f} s "
                               "(paused? 'edgebft heal' restarts it)")
            respawn()
        return f"node {node} rebooted on command and booted again from its flash"
    raise AssertionError(f"fault {kind!r} is injectable but has no control command here")


def _restart_broker(lab: LabCluster, down_ms: int) -> str:
    """broker-restart: SIGKILL the cluster's broker, wait ``down_ms``, start it again on the
    same port with the same configuration, detached like the rest of the cluster."""
    record = lab.state["broker"]
    if not record.get("argv"):
        raise LabError("broker-restart: the cluster's broker is not one 'cluster up' started")
    if down_ms < 0:
        raise LabError("--ms must not be negative")
    signal_group(record["pid"], signal.SIGKILL)
    wait_exit(record["pid"], REBOOT_WAIT_S)
    time.sleep(down_ms / 1000)
    broker = Broker(record["kind"], record["host"], record["port"], argv=record["argv"],
                    output=lab.path / "broker" / "restarts.out", tls=lab.broker_tls())
    try:
        broker.start_again()
    except BrokerError as e:
        raise LabError(str(e)) from None
    record["pid"] = broker.pid
    broker.detach()
    lab.save()
    return (f"broker stopped for {down_ms} ms and started again on port {record['port']} "
            "(nodes and clients reconnect within a second)")


def _process_fault(lab: LabCluster, kind: str, node: int, info: dict[str, Any]) -> str:
    """crash, pause, resume or restart ``node`` by signals to its process group."""
    if kind == "crash":
        signal_group(info["pid"], signal.SIGKILL)
        return f"killed node {node}"
    if kind == "restart":
        with _supervising(lab, [node]) as respawn:
            signal_group(info["pid"], signal.SIGKILL)
            wait_exit(info["pid"], REBOOT_WAIT_S)
            respawn()
        message = f"restarted node {node} from its flash"
    else:
        pause = kind == "pause"
        signal_group(info["pid"], signal.SIGSTOP if pause else signal.SIGCONT)
        message = f"{'paused' if pause else 'resumed'} node {node}"
    info["paused"] = kind == "pause"
    lab.save()
    return message


def heal(lab: LabCluster) -> str:
    """Undo every fault: resume paused nodes, restart dead ones, heal the control faults."""
    for info in lab.state["nodes"]:
        signal_group(info["pid"], signal.SIGCONT)
        info["paused"] = False
    lab.save()
    restarted = [i for i, info in enumerate(lab.state["nodes"]) if not alive(info["pid"])]
    if restarted:
        with _supervising(lab, restarted) as respawn:
            respawn()
    for i in range(lab.nodes):
        send_control(lab, i, "heal", [])
    return "healed" + (f"; restarted nodes {restarted}" if restarted else "")


@contextmanager
def _supervising(lab: LabCluster, nodes: list[int]) -> Iterator[Callable[[], None]]:
    """Restart ``nodes`` and vouch for them: the block stops them (or finds them stopped)
    and calls the ``respawn`` it is given, which starts each again from its image folder (or
    makes them restart by themselves and does not call it); on leaving, each must report
    online with a new boot count within STARTUP_TIMEOUT_S, or LabError names those that did
    not and their logs. The one way this module restarts a node: "restarted" is said only of
    a node that is back."""
    with _broker(lab) as b:
        observer = Observer(b["host"], b["port"], lab.state["cluster"], lab.nodes,
                            lab.keys(), lab.login())
    try:
        _wait_retained(observer, nodes)
        boots = {i: observer.snapshot().get(i, {}).get("boots") for i in nodes}

        def respawn() -> None:
            for i in nodes:
                lab.state["nodes"][i]["pid"] = _spawn(lab, i)
            lab.save()

        yield respawn
        late = observer.wait_booted(boots, STARTUP_TIMEOUT_S)
    finally:
        observer.close()
    if late:
        logs = ", ".join(str(lab.path / "logs" / f"node{i}.log") for i in late)
        raise LabError(f"node(s) {late} restarted but did not report in within "
                       f"{STARTUP_TIMEOUT_S:.0f} s; see {logs}")


def _wait_retained(observer: Observer, nodes: list[int]) -> None:
    """Give the broker's retained statuses of ``nodes`` time to arrive (a node that never
    reported has none: then it is the wait's whole length, STATUS_WAIT_S)."""
    end = time.monotonic() + STATUS_WAIT_S
    while time.monotonic() < end and not set(nodes) <= set(observer.snapshot()):
        time.sleep(0.02)


def _spawn(lab: LabCluster, i: int) -> int:
    """Start node i again from its image folder, detached; return its pid."""
    image = Path(lab.node(i)["image"])
    argv = node_argv(image, lab.state["micropython"], lab.state["heap"], lab.state["rom"])
    return spawn(argv, lab.path / "logs" / f"node{i}.log", cwd=image, tracked=False).pid


def status_rows(snap: dict[int, dict[str, Any]]) -> list[list[str]]:
    """Rows for the status table: node, role, view, sequence, checkpoint, entries (keys and
    accounts in its ledger on flash), heap, faults, and phi: the node's failure-detector
    suspicion level of each peer ("peer:phi", phi to one decimal; nodes report it times
    100)."""
    rows = []
    for n in sorted(snap):
        s = snap[n]
        if not s.get("online"):
            rows.append([str(n), "offline", "-", "-", "-", "-", "-", "-", "-"])
            continue
        role = "primary" if s.get("primary") == n else "backup"
        if s.get("status") == "view change":
            role += " (view change)"
        if s.get("fetching") is not None:
            role += f" (fetching {s['fetching']})"
        faults = s.get("faults") or {}
        active = [k for k, v in faults.items() if v not in (0, None)]
        phi = " ".join(f"{j}:{v / 100:.1f}" for j, v in enumerate(s.get("phi") or []) if j != n)
        rows.append([str(n), role, str(s.get("view")), str(s.get("last_exec")),
                     str(s.get("stable")), str((s.get("store") or {}).get("keys", "-")),
                     f"{s.get('heap_used', 0) // 1024} KB",
                     ",".join(active) or "-", phi or "-"])
    return rows
