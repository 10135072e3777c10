"""A long-lived emulated cluster driven from separate shells: ``edgebft cluster up``,
``cluster status``, ``inject``, ``heal``, ``cluster down``.

The cluster's state lives in its run folder (default ``runs/cluster/latest``):
``cluster.json`` (cluster id, broker, node pids and image folders, the last control nonce) and
``keys.json`` (all key material, mode 0600: the host acts as every client and holds every
node's control key). Nodes and broker run in their own process groups, detached from the
command that started them.

Faults reach nodes two ways: process faults (kill, pause, resume, restart) by signals to the
node's process group, and network faults (omission, delay, partition, skew, heal) as
authenticated CONTROL messages on ``ebft/<c>/ctl/<i>`` (firmware/faults.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebft.broker import start_broker
from edgebft.cluster import EmulatedCluster, node_argv
from edgebft.control import fresh_nonce, send_command
from edgebft.demo import DemoOptions, new_run_dir, node_config
from edgebft.image import build_image
from edgebft.keys import ClusterKeys, generate_keys
from edgebft.micropython import HEAP_DEFAULT
from edgebft.observer import Observer
from edgebft.protocol.stake import Stake

NETWORK_FAULTS = ("omission", "delay", "partition", "skew")
PROCESS_FAULTS = ("kill", "pause", "resume", "restart")
STATE_FILE = "cluster.json"
KEYS_FILE = "keys.json"
STATUS_WAIT_S = 1.5


class LabError(RuntimeError):
    """A lab command cannot run (no cluster, bad node, bad fault); one line says why."""


@dataclass
class LabCluster:
    """What ``cluster.json`` records of a running cluster."""

    path: Path
    state: dict[str, Any]

    @property
    def nodes(self) -> int:
        return len(self.state["nodes"])

    def save(self) -> None:
        (self.path / STATE_FILE).write_text(json.dumps(self.state, indent=1) + "\n")

    def keys(self) -> ClusterKeys:
        raw = json.loads((self.path / KEYS_FILE).read_text())
        return ClusterKeys(pairwise=[[bytes.fromhex(k) for k in row] for row in raw["pairwise"]],
                           client_secrets=[bytes.fromhex(k) for k in raw["client_secrets"]],
                           control=[bytes.fromhex(k) for k in raw["control"]])

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


def _alive(pid: int) -> bool:
    """True while process ``pid`` runs: not gone and not a zombie waiting to be reaped."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # our child: reap it if it exited
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def up(nodes: int = 4, broker: str = "auto", out: Path | None = None,
       stake: list[int] | None = None, heap: str = HEAP_DEFAULT,
       micropython: str | None = None) -> LabCluster:
    """Start a broker and ``nodes`` emulated nodes that outlive this process."""
    options = DemoOptions(nodes=nodes, broker=broker, heap=heap, micropython=micropython)
    options.check()
    weights = stake or [1] * nodes
    if len(weights) != nodes:
        raise LabError(f"--stake lists {len(weights)} values for {nodes} nodes")
    run = Path(out) if out else new_run_dir("cluster")
    run.mkdir(parents=True, exist_ok=True)
    cluster_id = "lab" + os.urandom(3).hex()
    keys = generate_keys(nodes)
    keys_path = run / KEYS_FILE
    keys_path.write_text(json.dumps({
        "pairwise": [[k.hex() for k in row] for row in keys.pairwise],
        "client_secrets": [k.hex() for k in keys.client_secrets],
        "control": [k.hex() for k in keys.control]}))
    keys_path.chmod(0o600)
    the_stake = Stake(weights)
    b = start_broker(broker, run / "broker")
    try:
        images = [build_image(run / "nodes" / f"node{i}",
                              node_config(i, cluster_id, the_stake, b.host, b.port,
                                          keys.row(i), options))
                  for i in range(nodes)]
        cluster = EmulatedCluster(images, run / "logs", heap, micropython=micropython)
        cluster.start()
        observer = Observer(b.host, b.port, cluster_id, nodes)
        try:
            if not observer.wait_all_online(20.0):
                cluster.stop()
                raise LabError(f"nodes did not come up within 20 s; see {run / 'logs'}")
        finally:
            observer.close()
        pids = cluster.detach()
    except BaseException:
        b.stop()
        raise
    broker_pid = b.pid
    b.detach()
    lab = LabCluster(run.resolve(), {
        "cluster": cluster_id, "stake": weights,
        "broker": {"kind": b.kind, "host": b.host, "port": b.port, "pid": broker_pid,
                   "describe": b.describe()},
        "nodes": [{"pid": pid, "image": str(image), "paused": False}
                  for pid, image in zip(pids, images, strict=True)],
        "heap": heap, "micropython": str(cluster.micropython), "rom": cluster.rom,
        "nonce": 0})
    lab.save()
    latest = run.parent / "latest"
    if run.parent.name == "cluster" and not latest.exists():
        latest.symlink_to(run.name)
    return lab


def down(lab: LabCluster) -> None:
    """Stop every node and the broker the cluster started (SIGKILL to each group)."""
    for node in lab.state["nodes"]:
        _killpg(node["pid"], signal.SIGCONT)
        _killpg(node["pid"], signal.SIGKILL)
    pid = lab.state["broker"].get("pid")
    if pid:
        _killpg(pid, signal.SIGKILL)
    lab.state["down"] = True
    lab.save()


def _killpg(pid: int, signum: int) -> bool:
    try:
        os.killpg(pid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def status(lab: LabCluster, wait_s: float = STATUS_WAIT_S) -> dict[int, dict[str, Any]]:
    """The newest status of each node (retained on the broker), waited for ``wait_s``."""
    b = lab.state["broker"]
    observer = Observer(b["host"], b["port"], lab.state["cluster"], lab.nodes)
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
    b = lab.state["broker"]
    send_command(b["host"], b["port"], lab.state["cluster"], node, lab.keys().control[node],
                 nonce, command, args)


def inject(lab: LabCluster, kind: str, node: int, p: float = 0.0, ms: int = 0,
           jitter_ms: int = 0, group: list[int] | None = None,
           peers: list[int] | None = None) -> str:
    """Inject fault ``kind`` on ``node``; return a one-line description."""
    info = lab.node(node)
    if kind == "kill":
        _killpg(info["pid"], signal.SIGKILL)
        return f"killed node {node}"
    if kind == "pause":
        _killpg(info["pid"], signal.SIGSTOP)
        info["paused"] = True
        lab.save()
        return f"paused node {node}"
    if kind == "resume":
        _killpg(info["pid"], signal.SIGCONT)
        info["paused"] = False
        lab.save()
        return f"resumed node {node}"
    if kind == "restart":
        _killpg(info["pid"], signal.SIGKILL)
        info["pid"] = _spawn(lab, node)
        lab.save()
        return f"restarted node {node} from its flash"
    if kind == "omission":
        if not 0 <= p <= 1:
            raise LabError("--p must be between 0 and 1")
        send_control(lab, node, "omission", [round(p * 1000), peers])
        return f"node {node} drops {p:.0%} of its messages" + (f" with {peers}" if peers else "")
    if kind == "delay":
        if ms < 0 or jitter_ms < 0:
            raise LabError("--ms and --jitter must not be negative")
        send_control(lab, node, "delay", [ms, jitter_ms])
        return f"node {node} delays its messages {ms} ms (+0..{jitter_ms} ms)"
    if kind == "partition":
        members = sorted(set(group or []) | {node})
        for j in range(lab.nodes):
            reachable = members if j in members else [x for x in range(lab.nodes)
                                                      if x not in members]
            send_control(lab, j, "partition", [reachable])
        return f"partitioned {members} from the rest"
    if kind == "skew":
        send_control(lab, node, "skew", [ms])
        return f"node {node} clock skewed by {ms} ms"
    raise LabError(f"unknown fault {kind!r}: expected one of "
                   f"{', '.join(PROCESS_FAULTS + NETWORK_FAULTS)}")


def heal(lab: LabCluster) -> str:
    """Undo every fault: resume paused nodes, restart dead ones, heal the network faults."""
    restarted = []
    for i, info in enumerate(lab.state["nodes"]):
        _killpg(info["pid"], signal.SIGCONT)
        info["paused"] = False
        if not _alive(info["pid"]):
            info["pid"] = _spawn(lab, i)
            restarted.append(i)
    lab.save()
    for i in range(lab.nodes):
        send_control(lab, i, "heal", [])
    return "healed" + (f"; restarted nodes {restarted}" if restarted else "")


def _spawn(lab: LabCluster, i: int) -> int:
    """Start node i again from its image folder, detached; return its pid."""
    image = Path(lab.node(i)["image"])
    argv = node_argv(image, lab.state["micropython"], lab.state["heap"], lab.state["rom"])
    with open(lab.path / "logs" / f"node{i}.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=image, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def status_rows(snap: dict[int, dict[str, Any]]) -> list[list[str]]:
    """Rows for the status table: node, role, view, sequence, checkpoint, heap, faults."""
    rows = []
    for n in sorted(snap):
        s = snap[n]
        if not s.get("online"):
            rows.append([str(n), "offline", "-", "-", "-", "-", "-"])
            continue
        role = "primary" if s.get("primary") == n else "backup"
        if s.get("limbo"):
            role += " (view change)"
        faults = s.get("faults") or {}
        active = [k for k, v in faults.items() if v not in (0, None)]
        rows.append([str(n), role, str(s.get("view")), str(s.get("last_exec")),
                     str(s.get("stable")), f"{s.get('heap_used', 0) // 1024} KB",
                     ",".join(active) or "-"])
    return rows
