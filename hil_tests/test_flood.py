"""A hostile client floods every topic of a running cluster while clients use it (issue 12).

Without ACLs the flood reaches the nodes (any client on the broker may publish anywhere): they
must stay up and safe. With ACLs (edgebft.lab.broker_auth) the flooder, even one holding a
client's identity, gets only its own request topic: the broker refuses the rest, and the
cluster serves its clients as if nothing happened (availability at least 0.99).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from conftest import wait_until
from edgebft.lab import session as lab
from edgebft.lab.broker import Login, find_mosquitto

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")

FLOOD_S = 8.0
FLOOD_RATE = 2000  # messages per second, spread over every topic shape
INSIDER = "200"    # a client identity the flooder holds when the broker has ACLs


def flood(cluster: lab.LabCluster, login: Login, stop: threading.Event,
          sent: list[int]) -> None:
    """Publish random bytes on every topic a node reads or writes, FLOOD_RATE a second."""
    rng = random.Random(12)
    p = f"ebft/{cluster.state['cluster']}/"
    n = cluster.nodes
    topics = ([f"{p}from/{j}" for j in range(n)] + [f"{p}status/{j}" for j in range(n)]
              + [f"{p}to/{i}/from/{j}" for i in range(n) for j in range(n) if i != j]
              + [f"{p}ctl/{i}" for i in range(n)] + [f"{p}req/{k}" for k in (0, 1, 200)]
              + [f"{p}rep/{k}" for k in (0, 1)])
    b = cluster.state["broker"]
    client = login.client()
    client.connect(b["host"], b["port"])
    client.loop_start()
    try:
        start = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - start) * FLOOD_RATE)
            while sent[0] < due:
                client.publish(rng.choice(topics), rng.randbytes(rng.randint(0, 700)))
                sent[0] += 1
            time.sleep(0.005)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture(params=[False, True], ids=["no-acl", "acl"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[lab.LabCluster]:
    up = lab.up(broker="mosquitto", out=tmp_path / "run", acl=request.param)
    try:
        yield up
    finally:
        lab.down(up)
        for i in range(up.nodes):
            log = (up.path / "logs" / f"node{i}.log").read_text()
            assert "Traceback" not in log and "MemoryError" not in log, log
            # e.g. "Comparison between bytes and str": topics are bytes throughout
            assert "Warning" not in log, log


def test_a_flood_on_every_topic_under_load(cluster: lab.LabCluster) -> None:
    acl = cluster.state["acl"]
    boots = {n: s["boots"] for n, s in lab.status(cluster).items()}
    work = cluster.workload(clients=4)
    work.start()
    stop, sent = threading.Event(), [0]
    login = cluster.login(INSIDER)
    flooder = threading.Thread(target=flood, args=(cluster, login, stop, sent), daemon=True)
    try:
        time.sleep(1.0)
        flooder.start()
        time.sleep(FLOOD_S)
    finally:
        stop.set()
        flooder.join(10)
        work.stop_issuing()
        work.drain(5.0)
        work.close()
    outcomes = list(work.outcomes)
    ok = sum(1 for o in outcomes if o.outcome == "ok")
    availability = ok / len(outcomes)
    print(f"\nflood {'with' if acl else 'without'} ACL: {sent[0]} messages in {FLOOD_S:g} s; "
          f"{ok}/{len(outcomes)} requests committed, availability {availability:.4f}")
    assert sent[0] >= FLOOD_RATE * FLOOD_S * 0.8, "the flood ran"
    # Every node alive (same boot), and all of them on one history once the load stops.
    assert wait_until(lambda: len({(s.get("last_exec"), s.get("digest"))
                                   for s in lab.status(cluster).values()}) == 1, 20.0)
    snap = lab.status(cluster)
    assert all(s["online"] for s in snap.values())
    assert {n: s["boots"] for n, s in snap.items()} == boots, "no node restarted"
    if acl:
        assert availability >= 0.99
        assert sum(s["status_rejected"] for s in snap.values()) == 0, "no forged status got in"
        anonymous = paho.Client(paho.CallbackAPIVersion.VERSION2)
        refused: list[bool] = []
        anonymous.on_connect = lambda c, u, f, reason, p: refused.append(reason.is_failure)
        b = cluster.state["broker"]
        anonymous.connect(b["host"], b["port"])
        anonymous.loop_start()
        assert wait_until(lambda: refused, 5.0)
        anonymous.disconnect()
        anonymous.loop_stop()
        assert refused == [True], "anonymous connections are refused"
    else:
        assert sum(s["status_rejected"] for s in snap.values()) > 0, "the flood reached them"
