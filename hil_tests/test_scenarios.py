"""The hardware-in-the-loop scenarios, one suite for every target (hil_targets.py: ``--target
emulated`` by default, ``virtual`` for virtual boards deployed by ``edgebft deploy``, ``boards
--cluster cluster.toml`` for real ones).

Each scenario runs under a client's steady load and asserts safety (no two nodes ever report
different ledger digests for one sequence number), liveness (the cluster commits again after
the fault is healed, the struck node catches up), availability (the share of requests
answered while the fault lasted: above a floor that says the cluster served, or 0 where it
must not) and, where a node goes down, that the others detect it; it records what it measured
in the run folder (``scenarios/<name>.json``). Every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hil_targets import HilCluster

from edgebft.client import ClientError
from edgebft.lab.control import partition_reach
from edgebft.lab.observer import Observer

WAIT_S = 30.0
PROGRESS = 10  # sequence numbers executed to show a cluster goes on


class Load:
    """One client putting a counter, one request at a time, from a thread; ``outcomes`` holds
    (time issued, ok) per request."""

    def __init__(self, cluster: HilCluster, client_id: int) -> None:
        self.client = cluster.client(client_id, timeout_s=2.0)
        self.outcomes: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            issued = time.time()
            try:
                self.client.put("hil", i)
                ok = True
            except ClientError:
                ok = False
            self.outcomes.append((issued, ok))
            i += 1

    def availability(self, start: float, end: float) -> float | None:
        """The share of the requests issued in [start, end) that were answered."""
        window = [ok for t, ok in self.outcomes if start <= t < end]
        return sum(window) / len(window) if window else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()


@pytest.fixture
def run(hil_cluster: HilCluster) -> Iterator[tuple[HilCluster, Observer, Load]]:
    observer = hil_cluster.observer()
    load = Load(hil_cluster, 100)
    try:
        wait(observer, "every node online", lambda s: len(s) == hil_cluster.nodes and all(
            observer.online.get(n) for n in s))
        yield hil_cluster, observer, load
    finally:
        load.close()
        hil_cluster.heal()
        observer.close()


def wait(observer: Observer, what: str, predicate: Callable[[dict[int, dict[str, Any]]], bool],
         timeout_s: float = WAIT_S) -> dict[int, dict[str, Any]]:
    end = time.monotonic() + timeout_s
    while True:
        snap = observer.snapshot()
        if predicate(snap):
            return snap
        if time.monotonic() > end:
            brief = {n: (observer.online.get(n), s.get("view"), s.get("last_exec"))
                     for n, s in snap.items()}
            pytest.fail(f"no {what} within {timeout_s:.0f} s; (online, view, last_exec): {brief}")
        time.sleep(0.1)


def executed(snap: dict[int, dict[str, Any]], n: int) -> int:
    return int(snap.get(n, {}).get("last_exec", -1))


def head(snap: dict[int, dict[str, Any]], nodes: list[int]) -> int:
    return max(executed(snap, n) for n in nodes)


def primary(snap: dict[int, dict[str, Any]]) -> int:
    return Counter(s["primary"] for s in snap.values()).most_common(1)[0][0]


def backup(snap: dict[int, dict[str, Any]]) -> int:
    return max(n for n in snap if n != primary(snap))


def goes_on(observer: Observer, nodes: list[int], what: str) -> dict[int, dict[str, Any]]:
    """Wait until ``nodes`` have all executed PROGRESS past their head now."""
    mark = head(observer.snapshot(), nodes) + PROGRESS
    return wait(observer, what, lambda s: min(executed(s, n) for n in nodes) >= mark)


def caught_up(observer: Observer, node: int, others: list[int]) -> float:
    """Wait until ``node`` executed past the others' head now; the seconds it took."""
    start = time.monotonic()
    mark = head(observer.snapshot(), others)
    wait(observer, f"node {node} caught up past {mark}",
         lambda s: observer.online.get(node, False) and executed(s, node) > mark)
    return time.monotonic() - start


def detected(observer: Observer, node: int, since: float) -> float | None:
    """Seconds from ``since`` to the first suspicion of ``node`` a peer published."""
    times = [t for t, j, event in list(observer.events) if t >= since and j != node
             and isinstance(event, list) and event[:2] == ["suspect", node]]
    return min(times) - since if times else None


def safe(observer: Observer) -> None:
    """No two nodes reported different digests for one sequence number, and some sequence
    was reported by two (waited for: statuses come every 0.5 s)."""
    wait(observer, "a sequence number reported by two nodes",
         lambda s: observer.sequences_compared() > 0)
    check = observer.safety_check()
    assert check.valid is True, check.reason


def test_crash_and_recovery_from_flash(run: tuple[HilCluster, Observer, Load]) -> None:
    cluster, observer, load = run
    snap = observer.snapshot()
    node = backup(snap)
    others = [j for j in range(cluster.nodes) if j != node]
    start = time.time()
    cluster.reboot(node)
    late = observer.wait_booted({node: snap[node].get("boots")}, WAIT_S)
    assert not late, f"node {node} did not boot again from its flash"
    back = time.time()
    detection = detected(observer, node, start)
    assert detection is not None, "a peer suspected the node that went down"
    goes_on(observer, others, "progress of the others")
    catch_up = caught_up(observer, node, others)
    availability = load.availability(start, back)
    assert availability is not None and availability > 0.5, "three nodes of four served"
    safe(observer)
    cluster.record("crash_and_recovery_from_flash", {
        "node": node, "detection_s": detection, "down_s": back - start,
        "catch_up_s": catch_up, "availability": availability})


def test_minority_partition_stops_one_node_until_healed(
        run: tuple[HilCluster, Observer, Load]) -> None:
    cluster, observer, load = run
    node = backup(observer.snapshot())
    others = [j for j in range(cluster.nodes) if j != node]
    start = time.time()
    for j, reach in partition_reach(cluster.nodes, [node]).items():
        cluster.control(j, "partition", [reach])
    wait(observer, "the partition in force", lambda s: s[node].get("faults", {}).get(
        "reachable") == [node])
    cut_at = executed(observer.snapshot(), node)
    goes_on(observer, others, "progress of the majority")
    assert executed(observer.snapshot(), node) <= cut_at + 2 * 8, "the minority stood still"
    end = time.time()
    cluster.heal()
    catch_up = caught_up(observer, node, others)
    availability = load.availability(start, end)
    assert availability is not None and availability > 0.5
    safe(observer)
    cluster.record("minority_partition", {"node": node, "catch_up_s": catch_up,
                                          "availability": availability})


def test_majority_partition_commits_nothing_until_healed(
        run: tuple[HilCluster, Observer, Load]) -> None:
    """Two against two: neither side holds a quorum (over 2/3 of stake), so nothing commits;
    once healed, the cluster goes on."""
    cluster, observer, load = run
    half = list(range(cluster.nodes // 2))
    for j, reach in partition_reach(cluster.nodes, half).items():
        cluster.control(j, "partition", [reach])
    wait(observer, "the partition in force", lambda s: all(
        s[j].get("faults", {}).get("reachable") is not None for j in range(cluster.nodes)))
    time.sleep(1.0)  # what was under way when it struck settles
    start = time.time()
    stalled = observer.snapshot()
    time.sleep(3.0)
    end = time.time()
    now = observer.snapshot()
    assert all(executed(now, j) == executed(stalled, j) for j in range(cluster.nodes)), \
        "no side committed without a quorum"
    availability = load.availability(start, end)  # answered before the heal
    assert availability in (0.0, None)
    cluster.heal()
    goes_on(observer, list(range(cluster.nodes)), "progress after healing")
    safe(observer)
    cluster.record("majority_partition", {"stalled_s": end - start,
                                          "availability": availability})


def test_byzantine_primary_is_replaced(run: tuple[HilCluster, Observer, Load]) -> None:
    cluster, observer, load = run
    snap = observer.snapshot()
    node = primary(snap)
    view = snap[node]["view"]
    others = [j for j in range(cluster.nodes) if j != node]
    start = time.time()
    cluster.control(node, "byzantine", ["silent", []])
    replaced = wait(observer, "a view change away from the Byzantine primary",
                    lambda s: all(s[j].get("view", 0) > view for j in others))
    assert primary(replaced) != node
    goes_on(observer, others, "progress under the new primary")
    end = time.time()
    availability = load.availability(start, end)
    assert availability is not None and availability > 0
    safe(observer)
    cluster.heal()
    cluster.record("byzantine_primary", {"node": node, "replaced_s": end - start,
                                         "availability": availability})


def test_slow_node_does_not_slow_the_cluster(run: tuple[HilCluster, Observer, Load]) -> None:
    cluster, observer, load = run
    node = backup(observer.snapshot())
    others = [j for j in range(cluster.nodes) if j != node]
    start = time.time()
    cluster.control(node, "delay", [300, 200])
    goes_on(observer, others, "progress beside a slow node")
    end = time.time()
    availability = load.availability(start, end)
    assert availability is not None and availability > 0.9, "three fast nodes are a quorum"
    cluster.heal()
    caught_up(observer, node, others)
    safe(observer)
    cluster.record("slow_node", {"node": node, "availability": availability})


def test_broker_restart_is_ridden_out(run: tuple[HilCluster, Observer, Load]) -> None:
    cluster, observer, load = run
    if not cluster.broker_restartable:
        pytest.skip("the site's broker is not one this host started")
    before = head(observer.snapshot(), list(range(cluster.nodes)))
    start = time.time()
    cluster.restart_broker(2.0)
    wait(observer, "every node back online", lambda s: all(
        observer.online.get(n) and s[n]["received"] > start + 2.0 for n in s))
    goes_on(observer, list(range(cluster.nodes)), "progress after the broker came back")
    assert head(observer.snapshot(), list(range(cluster.nodes))) > before
    safe(observer)
    cluster.record("broker_restart", {"back_s": time.time() - start,
                                      "availability": load.availability(start, time.time())})
