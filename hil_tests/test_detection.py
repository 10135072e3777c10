"""The failure detector on emulated nodes (real MicroPython, a real broker): a killed node is
suspected by every live node (its Last Will), a paused one too (phi alone: a SIGSTOPped node
keeps its connection, so no Last Will) and trusted again once resumed, a clock skew (the
node's time jumping back and forth) is no failure, and a suspected primary drives the view
change even when the request timer could not (view_timeout_ms 60 s).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cbor2
import paho.mqtt.client as paho
import pytest

from conftest import wait_until
from edgebft.devices.image import build_image
from edgebft.devices.keys import ClusterKeys, generate_keys
from edgebft.lab.bench import node_config
from edgebft.lab.broker import start_broker
from edgebft.lab.cluster import EmulatedCluster
from edgebft.lab.control import fresh_nonce, send_command
from edgebft.lab.demo import DemoOptions
from edgebft.lab.observer import Observer
from edgebft.lab.workload import Workload
from edgebft.protocol import replica as rp
from edgebft.protocol.detector import phi_e4
from edgebft.protocol.node import STATUS_INTERVAL_MS, Node
from edgebft.protocol.stake import Stake

NODES = 4
DETECTOR = {"threshold": 800, "window": 16, "min_std_ms": 100, "pause_ms": 0}
VIEW_TIMEOUT_MS = 60_000  # so that only the detector can change the view within a test


def suspicion_bound_s() -> float:
    """When a node whose heartbeats stop is suspected at the latest, with regular heartbeats:
    the interval plus pause plus y(threshold) standard deviations (at least min_std_ms)."""
    y = next(y for y in range(4097) if phi_e4(y) >= DETECTOR["threshold"] * 100) / 256
    return (STATUS_INTERVAL_MS + DETECTOR["pause_ms"] + y * DETECTOR["min_std_ms"]) / 1000


# A loaded CI host delays heartbeats, widening their deviation: wait well past the bound.
DEADLINE_S = 3 * suspicion_bound_s() + 2.0


@dataclass
class Cluster:
    nodes: EmulatedCluster
    observer: Observer
    host: str
    port: int
    name: str
    stake: Stake
    keys: ClusterKeys

    def events(self, kind: str, about: int, since: float) -> dict[int, list[Any]]:
        """The first ``kind`` event naming node ``about`` after ``since``, per reporting node."""
        first: dict[int, list[Any]] = {}
        for at, node, event in list(self.observer.events):
            if at >= since and event[:2] == [kind, about]:
                first.setdefault(node, event)
        return first

    def primary(self) -> int:
        """The primary in the newest status of a running node."""
        snap = self.observer.snapshot()
        return next(snap[i]["primary"] for i in sorted(snap) if self.nodes.alive(i))

    def control(self, node: int, command: str, args: list[Any]) -> None:
        send_command(self.host, self.port, self.name, node, self.keys.control[node],
                     fresh_nonce(0), command, args)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    run = tmp_path_factory.mktemp("detection")
    options = DemoOptions(nodes=NODES, extra={"view_timeout_ms": VIEW_TIMEOUT_MS,
                                              "status_interval_ms": STATUS_INTERVAL_MS,
                                              "detector": DETECTOR})
    name = "det" + os.urandom(3).hex()
    stake = Stake([1] * NODES)
    keys = generate_keys(NODES)
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(
            start_broker(os.environ.get("EDGEBFT_TEST_BROKER", "auto"), run / "broker"))
        images = [build_image(run / "nodes" / f"node{i}",
                              node_config(i, name, stake, broker, keys.row(i), options))
                  for i in range(NODES)]
        observer = Observer(broker.host, broker.port, name, NODES, keys)
        stack.callback(observer.close)
        nodes = stack.enter_context(EmulatedCluster(images, run / "logs"))
        assert observer.wait_all_online(30.0), f"nodes did not come up; see {run / 'logs'}"
        # Every node has heard every peer's heartbeats for a while (phi is 0 until then).
        assert wait_until(lambda: all(len(s.get("phi", [])) == NODES and s["uptime_ms"] > 3000
                                    for s in observer.snapshot().values()), 30.0)
        yield Cluster(nodes, observer, broker.host, broker.port, name, stake, keys)
        for i in range(NODES):
            log = (run / "logs" / f"node{i}.log").read_text()
            assert "MemoryError" not in log and "Traceback" not in log, log


def test_no_publish_on_the_cluster_topics_stops_a_node(cluster: Cluster) -> None:
    """Anyone on a site's broker can publish anything: topics that name no replica of the
    cluster (out of range, not a number), and garbage, truncated CBOR and empty payloads on
    every topic a node reads. Every node drops them and stays up (no restart, no Traceback:
    the fixture checks the logs), and the cluster goes on committing."""
    rng = random.Random(7)
    boots = {i: s["boots"] for i, s in cluster.observer.snapshot().items()}
    ids = ["99", str(NODES), "zz", "-1", " 1", "1 ", "0x1", "", "1/2", "١"]
    topics = ([f"from/{j}" for j in ids] + [f"status/{j}" for j in ids]
              + [f"to/{i}/from/{j}" for i in range(NODES) for j in ids[:4]]
              + ["req/1", "req/zz", "req/", "from/1", "to/0/from/2"])
    valid = cbor2.dumps([1, 2, 1, 0, 5, b"\x00" * 32, [b"x" * 40]])
    payloads = [b"", b"\xff", rng.randbytes(40), rng.randbytes(700), valid[:-7],
                cbor2.dumps([[[[[[[[[[[[1]]]]]]]]]]]]), cbor2.dumps(2**64 + 1), valid]
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.connect(cluster.host, cluster.port)
    client.loop_start()
    try:
        for topic in topics:
            for payload in payloads:
                client.publish(f"ebft/{cluster.name}/{topic}", payload, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()
    sent = time.time()
    work = Workload(cluster.host, cluster.port, cluster.name, cluster.stake, cluster.keys,
                    clients=2)
    work.start()
    try:
        assert wait_until(lambda: sum(o.outcome == "ok" and o.end > sent
                                      for o in work.outcomes) >= 20, 20.0)
    finally:
        work.close()
    snapshot = cluster.observer.snapshot()
    assert all(cluster.nodes.alive(i) for i in range(NODES))
    assert {i: s["boots"] for i, s in snapshot.items()} == boots
    assert all(s["uptime_ms"] > 3000 for s in snapshot.values())
    assert all(s["drops"].get("bad topic", 0) >= 2 * len(payloads) for s in snapshot.values()), \
        "every node counted the topics that name no replica"


def test_forged_and_replayed_statuses_change_no_suspicion(cluster: Cluster) -> None:
    """A status topic is anyone's to publish on: a plain "offline", a Will under another
    node's keys, and node 3's own statuses and Will of an earlier boot, replayed (recorded
    from the broker and re-published, retained as the broker keeps them). No node suspects
    node 3 for it; each one counts what it refused."""
    victim = 3
    topic = f"ebft/{cluster.name}/status/{victim}"
    recorded: list[bytes] = []
    listener = paho.Client(paho.CallbackAPIVersion.VERSION2)
    listener.on_message = lambda c, u, msg: recorded.append(msg.payload)
    listener.connect(cluster.host, cluster.port)
    listener.subscribe(topic)
    listener.loop_start()
    assert wait_until(lambda: len(recorded) >= 3, 10.0)
    listener.loop_stop()
    listener.disconnect()
    before = {i: s["status_rejected"] for i, s in cluster.observer.snapshot().items()}
    since = time.time()
    stranger = Node(rp.Replica(victim, cluster.stake, [b"k" * 32] * NODES, b"s" * 32),
                    STATUS_INTERVAL_MS)
    boot = cluster.observer.snapshot()[victim]["boots"]
    forged = [b"offline", stranger.will_wire(boot, 99), stranger.status_wire(boot, 99, 1, {})]
    attacker = paho.Client(paho.CallbackAPIVersion.VERSION2)
    attacker.connect(cluster.host, cluster.port)
    attacker.loop_start()
    try:
        for _ in range(5):
            for payload in forged + recorded:
                attacker.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
            time.sleep(0.3)
    finally:
        attacker.loop_stop()
        attacker.disconnect()
    time.sleep(1.5)
    assert cluster.events("suspect", victim, since) == {}, "no forgery or replay suspected it"
    after = cluster.observer.snapshot()
    for i in range(NODES):
        if i != victim:
            assert after[i]["status_rejected"] >= before[i] + 5 * len(forged), (i, after[i])
    assert cluster.observer.online[victim], "the host's observer refused them too"


def test_a_killed_node_is_suspected_by_every_live_node(cluster: Cluster) -> None:
    victim = (cluster.primary() + 2) % NODES
    live = [i for i in range(NODES) if i != victim]
    since = time.time()
    cluster.nodes.kill(victim)
    assert wait_until(lambda: sorted(cluster.events("suspect", victim, since)) == live,
                    DEADLINE_S), cluster.events("suspect", victim, since)
    cluster.nodes.restart(victim)
    assert wait_until(lambda: sorted(cluster.events("trust", victim, since)) == live, 20.0)


def test_a_paused_node_is_suspected_by_phi_and_trusted_when_resumed(cluster: Cluster) -> None:
    victim = (cluster.primary() + 3) % NODES
    live = [i for i in range(NODES) if i != victim]
    since = time.time()
    cluster.nodes.pause(victim)
    try:
        assert wait_until(lambda: sorted(cluster.events("suspect", victim, since)) == live,
                        DEADLINE_S), cluster.events("suspect", victim, since)
        for event in cluster.events("suspect", victim, since).values():
            assert event[2] >= DETECTOR["threshold"]  # phi crossed: no Last Will came
        # The live nodes' status maps carry the paused node's phi (times 100).
        assert wait_until(lambda: all(s["phi"][victim] >= DETECTOR["threshold"]
                                    for n, s in cluster.observer.snapshot().items()
                                    if n != victim), 5.0)
    finally:
        resumed = time.time()
        cluster.nodes.resume(victim)
    assert wait_until(lambda: sorted(cluster.events("trust", victim, resumed)) == live, 10.0)


def test_a_clock_skew_is_not_a_failure(cluster: Cluster) -> None:
    node = (cluster.primary() + 1) % NODES
    since = time.time()
    cluster.control(node, "skew", [-5000])  # the clock jumps back 5 s, then forward 5 s
    assert wait_until(lambda: cluster.observer.snapshot()[node]["faults"]["skew_ms"] == -5000,
                    5.0)
    time.sleep(1.0)
    cluster.control(node, "heal", [])
    assert wait_until(lambda: cluster.observer.snapshot()[node]["faults"]["skew_ms"] == 0, 5.0)
    time.sleep(DEADLINE_S)
    assert [e for at, n, e in list(cluster.observer.events)
            if n == node and e[0] == "suspect" and at > since] == []


def test_a_suspected_primary_drives_the_view_change(cluster: Cluster) -> None:
    primary = cluster.primary()
    view = cluster.observer.snapshot()[primary]["view"]
    work = Workload(cluster.host, cluster.port, cluster.name, cluster.stake, cluster.keys,
                    clients=2)
    work.start()
    try:
        assert wait_until(lambda: any(o.outcome == "ok" for o in work.outcomes), 10.0)
        killed = time.time()
        cluster.nodes.kill(primary)
        # Well inside view_timeout_ms: the request timer cannot have changed the view.
        assert wait_until(lambda: any(o.outcome == "ok" and o.view > view and o.end > killed
                                    for o in work.outcomes), 20.0)
        suspicions = cluster.events("suspect", primary, killed)
        assert sorted(suspicions) == [i for i in range(NODES) if i != primary]
    finally:
        work.close()

