"""Each fault kind of the lab on a live emulated cluster: its effect, and that heal undoes it.

One cluster (real MicroPython nodes, a real broker) serves every test of the module, under a
steady client load; each test strikes one node, waits for the effect, heals, and waits for
the node to execute past the point the others had reached when it was healed (it caught up).
Omission, and kill healed by a restart, are in test_lab.py (through the CLI). The first test,
before the shared cluster starts, runs the demo's nemesis through a list of kinds. No timing
assertions: every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgebft.lab import session as lab
from edgebft.lab.broker import find_mosquitto
from edgebft.lab.workload import Outcome, Workload

Snapshot = dict[int, dict]
WAIT_S = 30.0
PROGRESS = 10  # sequence numbers the others must execute to show they go on


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.LabCluster]:
    run: Path = tmp_path_factory.mktemp("faults") / "run"
    the_lab = lab.up(broker="mosquitto" if find_mosquitto() else "auto", out=run)
    try:
        yield the_lab
    finally:
        lab.down(the_lab)


@pytest.fixture(scope="module")
def load(cluster: lab.LabCluster) -> Iterator[Workload]:
    """Two closed-loop clients, issuing for the whole module."""
    work = cluster.workload(clients=2)
    work.start()
    try:
        yield work
    finally:
        work.drain(3.0)
        work.close()


def wait_for(cluster: lab.LabCluster, what: str, predicate: Callable[[Snapshot], bool],
             timeout_s: float = WAIT_S) -> Snapshot:
    """The first status snapshot that satisfies ``predicate``; fail after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while True:
        snap = lab.status(cluster, wait_s=0.3)
        if predicate(snap):
            return snap
        if time.monotonic() > end:
            brief = {n: (s.get("online"), s.get("view"), s.get("status"), s.get("last_exec"),
                         s.get("boots")) for n, s in snap.items()}
            pytest.fail(f"no {what} within {timeout_s:.0f} s; "
                        f"(online, view, status, last_exec, boots): {brief}")
        time.sleep(0.2)


def executed(snap: Snapshot, n: int) -> int:
    return snap[n].get("last_exec", -1) if snap[n].get("online") else -1


def head(snap: Snapshot, nodes: list[int]) -> int:
    """The highest sequence any of ``nodes`` executed."""
    return max(executed(snap, n) for n in nodes)


def primary(snap: Snapshot) -> int:
    return Counter(s["primary"] for s in snap.values() if s.get("online")).most_common(1)[0][0]


def others(cluster: lab.LabCluster, node: int) -> list[int]:
    return [j for j in range(cluster.nodes) if j != node]


def a_backup(cluster: lab.LabCluster) -> tuple[int, Snapshot]:
    """A backup of a healthy cluster (every node online), and the snapshot that shows it."""
    snap = wait_for(cluster, "healthy cluster", lambda s: all(x.get("online") for x in
                                                                s.values()))
    return max(others(cluster, primary(snap))), snap


def others_go_on(cluster: lab.LabCluster, node: int, since: Snapshot) -> Snapshot:
    rest = others(cluster, node)
    mark = head(since, rest) + PROGRESS
    return wait_for(cluster, f"progress of {rest} without node {node}",
                    lambda s: min(executed(s, j) for j in rest) >= mark)


def heal_and_catch_up(cluster: lab.LabCluster, node: int) -> Snapshot:
    """Heal everything, then wait until ``node`` is clear of faults and executed past the
    others' head at the time of healing."""
    mark = head(lab.status(cluster, wait_s=0.3), others(cluster, node))
    lab.heal(cluster)
    return wait_for(cluster, f"node {node} healed and caught up past {mark}",
                    lambda s: executed(s, node) > mark and not any(
                        v for v in s[node].get("faults", {}).values()))


def test_demo_nemesis_takes_the_kinds_in_turn_and_heals_them(tmp_path: Path) -> None:
    # Omission first, not last: the primary losing half its messages can starve one backup
    # into a view change no one joins, and such a replica stays above the others' view (kept
    # current by state transfer at each checkpoint) until they change view too; a later
    # strike on the primary brings them up to it, the end of the run would not (a known
    # liveness gap, not what this test is about).
    kinds = ["omission", "partition", "delay", "pause"]
    out = tmp_path / "demo"
    # The default heap (160k): four faults in 14 s (a view change and a catch-up every 3 s)
    # take a node's transient peak past 120 KB on the 64-bit Unix port now and then: at 128k
    # 1 run in 3 lost a node in a state transfer's check (MemoryError) once the node core,
    # outbox and input guards added ~2 KB to the import. This test is about the schedule; the
    # heap is tools/bench_memory.py's and the bench's (heap_peak_bytes).
    done = subprocess.run([sys.executable, "-m", "edgebft", "demo", "--duration", "14",
                           "--nemesis", ",".join(kinds), "--nemesis-interval", "3",
                           "--broker", "mosquitto" if find_mosquitto() else "auto",
                           "--out", str(out)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["safety_ok"] and summary["safety"]["converged"]
    assert all(summary["nodes_alive_at_end"])
    faults = summary["faults"]
    assert [f["kind"] for f in faults] == kinds, "one kind per interval, in turn"
    assert all(f["end"] > f["start"] for f in faults), "each healed"
    assert all(faults[i + 1]["start"] >= faults[i]["end"] for i in range(len(faults) - 1))


def test_partition_stops_a_node_until_healed(cluster: lab.LabCluster, load: Workload) -> None:
    node, _ = a_backup(cluster)
    print(lab.inject(cluster, "partition", node))
    rest = others(cluster, node)
    cut = wait_for(cluster, "partition in force on every node",
                   lambda s: s[node].get("faults", {}).get("reachable") == [node]
                   and all(s[j].get("faults", {}).get("reachable") == rest for j in rest))
    stalled = others_go_on(cluster, node, cut)
    later = others_go_on(cluster, node, stalled)
    assert executed(later, node) == executed(stalled, node), "the cut-off node executes nothing"
    assert executed(later, node) < min(executed(later, j) for j in rest)
    assert later[node]["fault_dropped"] > 0
    heal_and_catch_up(cluster, node)
    # each node reports the heal in its next status (every 0.5 s): the struck one's may come
    # first
    wait_for(cluster, "the partition healed on every node",
             lambda s: all(s[j].get("faults", {}).get("reachable") is None
                           for j in range(cluster.nodes)))


def test_delay_on_the_primary_raises_latency(cluster: lab.LabCluster, load: Workload) -> None:
    _, snap = a_backup(cluster)
    node, view = primary(snap), snap[primary(snap)]["view"]
    delay_ms = 200
    lab.inject(cluster, "delay", node, ms=delay_ms, jitter_ms=0)
    wait_for(cluster, "delay in force",
             lambda s: s[node].get("faults", {}).get("delay_ms") == delay_ms)
    since = time.time()

    def delayed(outcomes: list[Outcome]) -> list[Outcome]:
        return [o for o in outcomes if o.outcome == "ok" and o.start > since and o.view == view]

    wait_for(cluster, "requests committed under the delay",
             lambda s: len(delayed(list(load.outcomes))) >= 5 or s[node].get("view") != view)
    slow = delayed(list(load.outcomes))
    assert slow, "the delayed primary was replaced before committing anything"
    # Causal, not a timing bound: nothing commits before the backups get the pre-prepare.
    assert min(o.latency_ms for o in slow) >= delay_ms
    heal_and_catch_up(cluster, node)
    healed_at = time.time()
    wait_for(cluster, "a request faster than the delay after healing",
             lambda s: any(o.outcome == "ok" and o.start > healed_at and o.latency_ms < delay_ms
                           for o in list(load.outcomes)))


def test_pause_freezes_a_node_and_resume_lets_it_catch_up(cluster: lab.LabCluster,
                                                          load: Workload) -> None:
    node, _ = a_backup(cluster)
    lab.inject(cluster, "pause", node)
    frozen = [-1]

    def still(s: Snapshot) -> bool:  # two reads in a row with the same uptime: no more status
        seen, frozen[0] = frozen[0], s[node].get("uptime_ms", -2)
        return seen == frozen[0]

    stopped = wait_for(cluster, "the paused node's status to stop", still)
    later = others_go_on(cluster, node, stopped)
    assert later[node].get("uptime_ms") == stopped[node]["uptime_ms"], "its status stopped"
    assert executed(later, node) == executed(stopped, node)
    mark = head(later, others(cluster, node))
    lab.inject(cluster, "resume", node)
    wait_for(cluster, "the resumed node to catch up",
             lambda s: s[node].get("uptime_ms", 0) > stopped[node]["uptime_ms"]
             and executed(s, node) > mark)
    heal_and_catch_up(cluster, node)


def test_restart_boots_from_flash(cluster: lab.LabCluster, load: Workload) -> None:
    node, before = a_backup(cluster)
    pid = cluster.state["nodes"][node]["pid"]
    lab.inject(cluster, "restart", node)
    cluster = lab.load(cluster.path)
    assert cluster.state["nodes"][node]["pid"] != pid
    booted = wait_for(cluster, "the restarted node back online",
                      lambda s: s[node].get("online")
                      and s[node]["boots"] == before[node]["boots"] + 1)
    assert executed(booted, node) >= executed(before, node), "restored from its flash"
    heal_and_catch_up(cluster, node)


def test_sigkill_under_load_leaves_a_store_that_verifies(cluster: lab.LabCluster,
                                                         load: Workload) -> None:
    """SIGKILL a loaded node at arbitrary instants (now and then in the middle of a batch's
    page writes, a checkpoint record or a fold): every restart reopens its stable checkpoint,
    checks every page against it and reports no store error, and the node catches up."""
    node, before = a_backup(cluster)
    boots = before[node]["boots"]
    pause = random.Random(node)
    for _ in range(4):
        time.sleep(pause.uniform(0.05, 0.5))
        lab.inject(cluster, "restart", node)
        cluster = lab.load(cluster.path)
        boots += 1
        booted = wait_for(cluster, "the killed node back online",
                          lambda s, boots=boots: s[node].get("online")
                          and s[node]["boots"] == boots)
        assert booted[node]["store"]["error"] is None
        assert booted[node]["stable"] <= booted[node]["last_exec"]
    heal_and_catch_up(cluster, node)


def test_reboot_command_resets_the_node(cluster: lab.LabCluster, load: Workload) -> None:
    node, before = a_backup(cluster)
    print(lab.inject(cluster, "reboot", node))
    cluster = lab.load(cluster.path)
    booted = wait_for(cluster, "the rebooted node back online",
                      lambda s: s[node].get("online")
                      and s[node]["boots"] == before[node]["boots"] + 1)
    assert executed(booted, node) >= executed(before, node), "restored from its flash"
    heal_and_catch_up(cluster, node)


def test_oom_restarts_the_node_in_place_from_its_flash(cluster: lab.LabCluster,
                                                       load: Workload) -> None:
    """A node whose heap runs out (a MemoryError anywhere) drops its link, restarts in the
    same process from its flash as a new boot, and catches up."""
    node, before = a_backup(cluster)
    pid = cluster.state["nodes"][node]["pid"]
    print(lab.inject(cluster, "oom", node))
    cluster = lab.load(cluster.path)
    assert cluster.state["nodes"][node]["pid"] == pid, "the same process"
    booted = wait_for(cluster, "the node back online after running out of heap",
                      lambda s: s[node].get("online")
                      and s[node]["boots"] == before[node]["boots"] + 1)
    assert booted[node]["restarts"] == before[node].get("restarts", 0) + 1
    # built in a heap nearly as whole as at boot: a restart here cost 4-5 KB of threshold,
    # far from the ~37 KB of a node held through its restart
    assert booted[node]["gc_threshold"] >= before[node]["gc_threshold"] - 8192, \
        (before[node]["gc_threshold"], booted[node]["gc_threshold"])
    assert booted[node]["store"]["error"] is None
    assert executed(booted, node) >= executed(before, node), "restored from its flash"
    heal_and_catch_up(cluster, node)


def test_skew_shows_in_status_and_heal_resets_it(cluster: lab.LabCluster,
                                                 load: Workload) -> None:
    node, _ = a_backup(cluster)
    lab.inject(cluster, "skew", node, ms=-5000)
    skewed = wait_for(cluster, "skew in force",
                      lambda s: s[node].get("faults", {}).get("skew_ms") == -5000)
    others_go_on(cluster, node, skewed)
    healed = heal_and_catch_up(cluster, node)
    assert healed[node]["faults"]["skew_ms"] == 0


def test_duplicate_on_the_primary_sends_twice_and_changes_nothing(cluster: lab.LabCluster,
                                                                  load: Workload) -> None:
    """Every message of the primary published twice: its MQTT traffic doubles against what
    its replica sends, the others drop the copies, and the cluster goes on in its view."""
    snap = wait_for(cluster, "healthy cluster", lambda s: all(x.get("online") for x in
                                                                s.values()))
    node = primary(snap)
    print(lab.inject(cluster, "duplicate", node, p=1.0))
    start = wait_for(cluster, "duplicate in force",
                     lambda s: s[node].get("faults", {}).get("dup_permille") == 1000)
    later = others_go_on(cluster, node, others_go_on(cluster, node, start))
    sent = later[node]["tx"] - start[node]["tx"]
    published = later[node]["mqtt_tx"] - start[node]["mqtt_tx"]
    assert sent > 0 and published >= 1.8 * sent, (sent, published)
    assert primary(later) == node, "copies are no reason to change the view"
    healed = heal_and_catch_up(cluster, node)
    assert healed[node]["faults"]["dup_permille"] == 0


def test_byzantine_primary_is_replaced_until_healed(cluster: lab.LabCluster,
                                                    load: Workload) -> None:
    # Silent: whatever the primary's id, its backups time out on it. (An equivocating primary
    # stalls a view only when the replicas it sends the real batch to fall short of a quorum:
    # with 4 equal replicas, when its id is even; test_demo.py shows that case.)
    _, snap = a_backup(cluster)
    node = primary(snap)
    view = snap[node]["view"]
    print(lab.inject(cluster, "byzantine", node, mode="silent"))
    wait_for(cluster, "the silent mode in force",
             lambda s: s[node].get("faults", {}).get("byzantine") == "silent")
    rest = others(cluster, node)
    replaced = wait_for(cluster, "a view change away from the silent primary",
                        lambda s: all(s[j].get("view", 0) > view for j in rest))
    others_go_on(cluster, node, replaced)
    healed = heal_and_catch_up(cluster, node)
    assert healed[node]["faults"]["byzantine"] is None
