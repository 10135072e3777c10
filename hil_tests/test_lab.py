"""The fault lab against an emulated cluster: `edgebft cluster up/status/down`, `inject`,
`heal`, the authenticated control channel (forged and replayed commands do nothing) and the
Prometheus exporter of `cluster up --metrics-port`. Each fault kind's effect: test_faults.py."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from edgebft.lab import session as lab
from edgebft.lab.broker import find_mosquitto, free_port
from edgebft.protocol import auth
from edgebft.protocol import messages as m

EDGEBFT = [sys.executable, "-m", "edgebft"]


def cli(*args: str) -> str:
    done = subprocess.run([*EDGEBFT, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.LabCluster]:
    run = tmp_path_factory.mktemp("lab") / "run"
    cli("cluster", "up", "--out", str(run), "--metrics-port", str(free_port()))
    yield lab.load(run)
    cli("cluster", "down", "--dir", str(run))
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout
    assert left.strip() == "", "cluster down left processes behind"


def load(cluster: lab.LabCluster, seconds: float) -> int:
    work = cluster.workload(clients=2)
    work.start()
    time.sleep(seconds)
    work.drain(3.0)
    work.close()
    return sum(1 for o in work.outcomes if o.outcome == "ok")


def wait_for(predicate, timeout_s: float = 10.0) -> dict[int, dict]:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while True:
        snap = lab.status(cluster_ref[0], wait_s=0.5)
        if predicate(snap) or time.monotonic() > end:
            return snap
        time.sleep(0.2)


cluster_ref: list[lab.LabCluster] = []


def test_status_shows_every_node(cluster: lab.LabCluster) -> None:
    out = cli("cluster", "status", "--dir", str(cluster.path))
    assert "primary" in out
    assert out.count("backup") == 3
    assert "entries" in out, "the ledger's size on flash is a column"
    snap = lab.status(cluster)
    assert all(snap[n]["online"] for n in range(4))
    # The board layer (firmware/board.py) as the Unix port runs it: the LED is a state.
    assert [snap[n]["led"] for n in range(4)] == [
        "primary" if snap[n]["primary"] == n else "backup" for n in range(4)]
    assert {snap[n]["reset_cause"] for n in range(4)} == {"power-on"}


def test_status_watch_redraws_until_interrupted(cluster: lab.LabCluster) -> None:
    watch = subprocess.Popen([*EDGEBFT, "cluster", "status", "--watch", "300ms", "--dir",
                              str(cluster.path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(4.0)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    assert "Traceback" not in err
    stamps = {line for line in out.splitlines() if f"cluster {cluster.state['cluster']}" in line}
    assert len(stamps) >= 2, "the table was drawn again with a later time"


NODE_GAUGES = ("edgebft_online", "edgebft_view", "edgebft_seq", "edgebft_last_executed",
               "edgebft_stable_checkpoint", "edgebft_heap_used_bytes", "edgebft_heap_free_bytes",
               "edgebft_heap_peak_bytes", "edgebft_gc_threshold_bytes", "edgebft_rx_messages",
               "edgebft_tx_messages", "edgebft_executed_requests", "edgebft_boots",
               "edgebft_transfer_bytes", "edgebft_message_errors", "edgebft_stalls",
               "edgebft_suspicions", "edgebft_status_rejected",
               "edgebft_state_entries", "edgebft_state_clients", "edgebft_cache_hits",
               "edgebft_cache_misses", "edgebft_flash_writes", "edgebft_flash_bytes_written")


def test_metrics_endpoint_serves_every_nodes_gauges(cluster: lab.LabCluster) -> None:
    load(cluster, 1.0)
    url = cluster.state["exporter"]["url"]
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    nodes = {str(n) for n in range(cluster.nodes)}
    value = {}
    for name in NODE_GAUGES:
        assert families[name].type == "gauge", name
        value[name] = {s.labels["node"]: s.value for s in families[name].samples}
        assert set(value[name]) == nodes, name
    for n in nodes:
        assert value["edgebft_online"][n] == 1
        assert value["edgebft_view"][n] >= 0
        assert 0 <= value["edgebft_stable_checkpoint"][n] <= value["edgebft_last_executed"][n]
        assert value["edgebft_last_executed"][n] > 0, "the load executed"
        assert value["edgebft_executed_requests"][n] > 0
        heap = value["edgebft_heap_used_bytes"][n] + value["edgebft_heap_free_bytes"][n]
        assert 0 < value["edgebft_heap_used_bytes"][n] <= value["edgebft_heap_peak_bytes"][n]
        assert heap <= 160 * 1024, "within the -X heapsize=160k heap"
        assert 4096 <= value["edgebft_gc_threshold_bytes"][n] < heap
        assert value["edgebft_rx_messages"][n] > 0 and value["edgebft_tx_messages"][n] > 0
        assert value["edgebft_boots"][n] >= 1
        assert value["edgebft_state_entries"][n] >= 16, "the genesis accounts at least"
        assert value["edgebft_state_clients"][n] >= 1, "the load's client"
        assert value["edgebft_flash_bytes_written"][n] > 0 and value["edgebft_flash_writes"][n] > 0
        assert value["edgebft_cache_hits"][n] + value["edgebft_cache_misses"][n] > 0
    assert families["edgebft_drops"].type == "gauge"
    suspicion = {(s.labels["node"], s.labels["peer"]): s.value
                 for s in families["edgebft_phi"].samples}
    assert set(suspicion) == {(n, j) for n in nodes for j in nodes if j != n}
    assert all(v >= 0 for v in suspicion.values())


def test_omission_isolates_a_node_and_heal_lets_it_catch_up(cluster: lab.LabCluster) -> None:
    cluster_ref[:] = [cluster]
    cli("inject", "omission", "3", "--p", "1.0", "--dir", str(cluster.path))
    snap = wait_for(lambda s: s[3].get("faults", {}).get("drop_permille") == 1000)
    assert snap[3]["faults"]["drop_permille"] == 1000
    assert snap[3]["led"] == "fault"
    assert load(cluster, 2.0) > 0, "three nodes still commit"
    snap = lab.status(cluster)
    assert snap[3]["last_exec"] < snap[0]["last_exec"]
    assert snap[3]["fault_dropped"] > 0
    isolated_at = snap[3]["last_exec"]
    cli("heal", "--dir", str(cluster.path))
    assert load(cluster, 1.0) > 0
    snap = wait_for(lambda s: s[3]["last_exec"] >= s[0]["last_exec"] - 8)
    assert snap[3]["faults"]["drop_permille"] == 0
    assert snap[3]["led"] == "backup"
    assert snap[3]["last_exec"] > isolated_at, "the healed node executes again"
    assert snap[3]["last_exec"] >= snap[0]["last_exec"] - 8, "within a checkpoint of the rest"


def test_forged_and_replayed_control_commands_only_count(cluster: lab.LabCluster) -> None:
    cluster_ref[:] = [cluster]
    before = lab.status(cluster)[1]["ctl_rejected"]
    b = cluster.state["broker"]
    # One who may publish on ctl/1 (the broker's host identity) without the control key: the
    # node's own check is what stops it.
    client = cluster.login().client()
    client.connect(b["host"], b["port"])
    client.loop_start()
    topic = f"ebft/{cluster.state['cluster']}/ctl/1"
    forged_body = m.body(m.CONTROL, m.HOST, 2**62, "omission", [1000, None])
    forged = forged_body + auth.Mac(b"not the key" * 3).tag(forged_body)
    client.publish(topic, forged, qos=1).wait_for_publish(5)
    # A genuine command, then the same bytes again (a replay).
    nonce = time.time_ns() // 1000
    body = m.body(m.CONTROL, m.HOST, nonce, "delay", [0, 0])
    genuine = body + auth.Mac(cluster.keys().control[1]).tag(body)
    client.publish(topic, genuine, qos=1).wait_for_publish(5)
    client.publish(topic, genuine, qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()
    snap = wait_for(lambda s: s[1]["ctl_rejected"] >= before + 2)
    assert snap[1]["ctl_rejected"] == before + 2
    assert snap[1]["faults"]["drop_permille"] == 0, "the forged omission did nothing"
    cluster.state["nonce"] = nonce  # keep the lab's nonces above the one used here
    cluster.save()


def test_a_node_is_not_sent_its_own_broadcasts(cluster: lab.LabCluster) -> None:
    """MQTT 3.1.1 has no "no local": subscribed to from/+, a node was sent each of its own
    broadcasts back, read them and dropped them. It subscribes to its peers' topics only, so
    300 publishes on node 0's broadcast topic reach the other three, not node 0."""
    cluster_ref[:] = [cluster]
    before = lab.status(cluster)
    b = cluster.state["broker"]
    client = cluster.login().client()
    client.connect(b["host"], b["port"])
    client.loop_start()
    for _ in range(300):
        client.publish(f"ebft/{cluster.state['cluster']}/from/0", b"not a message",
                       qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()
    snap = wait_for(lambda s: s[1]["mqtt_rx"] >= before[1]["mqtt_rx"] + 300)
    grew = {n: snap[n]["mqtt_rx"] - before[n]["mqtt_rx"] for n in (0, 1)}
    assert grew[1] >= 300, grew
    assert grew[1] - grew[0] >= 280, f"node 0 was sent its own topic's messages: {grew}"


def test_kill_shows_offline_and_heal_restarts_from_flash(cluster: lab.LabCluster) -> None:
    cluster_ref[:] = [cluster]
    cli("inject", "crash", "2", "--dir", str(cluster.path))
    snap = wait_for(lambda s: not s[2]["online"])
    assert not snap[2]["online"], "the Last Will marked it offline"
    boots = snap[2].get("boots")
    out = cli("heal", "--dir", str(cluster.path))
    assert "restarted nodes [2]" in out
    # heal said so only once node 2 reported in from its new boot: its status is retained
    snap = lab.status(cluster)
    assert snap[2]["online"] and snap[2]["boots"] != boots
    assert load(cluster, 1.0) > 0


def test_bad_input_is_one_line(cluster: lab.LabCluster) -> None:
    done = subprocess.run([*EDGEBFT, "inject", "omission", "9", "--dir", str(cluster.path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "edgebft: error: no node 9: the cluster has nodes 0..3"]
    done = subprocess.run([*EDGEBFT, "cluster", "status", "--dir", "/nonexistent"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "no cluster in /nonexistent" in done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*EDGEBFT, "cluster", "up", "--metrics-port", str(port), "--out",
                               str(cluster.path.parent / "never")], capture_output=True,
                              text=True)
    assert done.returncode == 2
    assert done.stderr.startswith(f"edgebft: error: --metrics-port {port}: cannot listen")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (cluster.path.parent / "never" / "nodes").exists(), "nothing was started"
    done = subprocess.run([*EDGEBFT, "cluster", "up", "--out", str(cluster.path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"edgebft: error: --out {cluster.path}: the folder holds a run; a cluster starts in a "
        "fresh one (its nodes' flash would be another cluster's)"]
    gone = cluster.path.parent / "gone"  # a cluster whose broker no longer runs
    gone.mkdir()
    state = {**cluster.state, "broker": {**cluster.state["broker"], "port": 9}}
    (gone / lab.STATE_FILE).write_text(json.dumps(state))
    shutil.copy(cluster.path / lab.KEYS_FILE, gone / lab.KEYS_FILE)
    for args in (["cluster", "status"], ["inject", "delay", "1"]):
        done = subprocess.run([*EDGEBFT, *args, "--dir", str(gone)], capture_output=True,
                              text=True)
        assert done.returncode == 2, args
        [line] = done.stderr.strip().splitlines()
        assert line.startswith("edgebft: error: cannot reach the cluster's broker at "), line


def test_a_cluster_in_the_default_folder_boots_a_killed_node_again(tmp_path) -> None:
    """`cluster up` with no --out runs in ./runs/cluster/<time>, a relative folder: a node
    killed and healed must boot again from its image (it runs inside that folder)."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*EDGEBFT, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)

    up = run("cluster", "up")
    assert up.returncode == 0, up.stderr
    try:
        assert run("inject", "kill", "3").returncode == 0
        assert run("heal").returncode == 0
        cluster = lab.load(tmp_path / "runs" / "cluster" / "latest")
        deadline = time.monotonic() + 30
        while lab.status(cluster, wait_s=0.3).get(3, {}).get("boots") != 2:
            assert time.monotonic() < deadline, "node 3 did not boot again"
    finally:
        run("cluster", "down")


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_a_broker_restart_mid_run_loses_neither_nodes_nor_clients(tmp_path) -> None:
    """`inject broker-restart` stops the broker under load for 2 s and starts it again on the
    same port: the nodes reconnect and resubscribe, and so does the workload's client (it
    subscribes on every connection), so requests commit again, and no node restarted."""
    cluster = lab.up(broker="mosquitto", out=tmp_path / "run")
    boots = {n: s["boots"] for n, s in lab.status(cluster).items()}
    work = cluster.workload(clients=4)
    try:
        work.start()

        def committed() -> int:
            return sum(1 for o in list(work.outcomes) if o.outcome == "ok")
        assert wait_until(lambda: committed() >= 20, 20)
        pid = cluster.state["broker"]["pid"]
        out = cli("inject", "broker-restart", "--ms", "2000", "--dir", str(cluster.path))
        assert "started again on port" in out
        cluster = lab.load(cluster.path)
        assert cluster.state["broker"]["pid"] != pid
        before = committed()
        assert wait_until(lambda: committed() >= before + 20, 10), "no commit after the restart"
        assert {n: s["boots"] for n, s in lab.status(cluster).items()} == boots
    finally:
        work.stop_issuing()
        work.close()
        lab.down(cluster)
