"""edgebft.lab.broker_auth on a real mosquitto: who may connect, publish and read what.

Each check publishes through the broker and looks at what a host subscriber receives: a
publish the ACL refuses is dropped by mosquitto without an error to the publisher (MQTT 3.1.1
has no way to say so), so only the subscriber can tell.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgebft.devices.keys import generate_keys
from edgebft.lab.broker import Broker, find_mosquitto, start_broker
from edgebft.lab.broker_auth import HOST, BrokerAuth, mosquitto_hash, node_identity

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")

CLUSTER = "acl1"
P = f"ebft/{CLUSTER}/"
AUTH = BrokerAuth(CLUSTER, generate_keys(4), clients=8)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with start_broker("mosquitto", tmp_path_factory.mktemp("acl"), AUTH) as b:
        yield b


def connect(broker: Broker, login: tuple[str, str] | None,
            subscribe: str | None = None) -> tuple[mqtt.Client, queue.Queue, int]:
    """A client logged in as ``login``; (client, its received (topic, payload), CONNACK code)."""
    got: queue.Queue = queue.Queue()
    acked: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    if login is not None:
        client.username_pw_set(*login)
    client.on_connect = lambda c, u, f, reason, p: acked.put(reason.value)
    client.on_message = lambda c, u, msg: got.put((msg.topic, msg.payload))
    client.on_subscribe = lambda *a: acked.put("subscribed")
    client.connect(broker.host, broker.port)
    client.loop_start()
    code = acked.get(timeout=5)
    if code == 0 and subscribe is not None:
        client.subscribe(subscribe, qos=1)
        assert acked.get(timeout=5) == "subscribed"
    return client, got, code


def close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def delivered(broker: Broker, login: tuple[str, str], topic: str) -> bool:
    """Does a publish on ``topic`` by ``login`` reach the host's subscriber to everything?"""
    watcher, got, _ = connect(broker, AUTH.credentials(HOST), P + "#")
    publisher, _, code = connect(broker, login)
    assert code == 0
    try:
        publisher.publish(topic, b"x", qos=1).wait_for_publish(5)
        publisher.publish(P + "marker", b"end", qos=1)  # refused too: only a timeout ends it
        try:
            while True:
                t, _ = got.get(timeout=1.0)
                if t == topic:
                    return True
        except queue.Empty:
            return False
    finally:
        close(publisher)
        close(watcher)


def test_anonymous_and_wrong_passwords_are_refused(broker: Broker) -> None:
    for login in (None, ("host", "guess"), (node_identity(0), AUTH.password(node_identity(1))),
                  ("mallory", "x")):
        client, _, code = connect(broker, login)
        close(client)
        assert code != 0, login


@pytest.mark.parametrize(("who", "topic", "allowed"), [
    (node_identity(0), "from/0", True),
    (node_identity(0), "to/2/from/0", True),
    (node_identity(0), "status/0", True),
    (node_identity(0), "rep/5", True),
    (node_identity(0), "from/1", False),       # posing as another node
    (node_identity(0), "to/2/from/1", False),
    (node_identity(0), "status/1", False),     # a forged heartbeat or Will never gets out
    (node_identity(0), "ctl/1", False),
    (node_identity(0), "req/5", False),
    ("5", "req/5", True),
    ("5", "req/6", False),                     # another client's requests
    ("5", "from/0", False),
    ("5", "rep/6", False),
    ("5", "ctl/0", False),
    (HOST, "ctl/0", True),
    (HOST, "req/6", True),                     # the workload speaks for many client ids
])
def test_each_identity_publishes_only_its_topics(broker: Broker, who: str, topic: str,
                                                 allowed: bool) -> None:
    assert delivered(broker, AUTH.credentials(who), P + topic) is allowed


def test_a_client_reads_only_its_own_replies(broker: Broker) -> None:
    mine, got_mine, _ = connect(broker, AUTH.credentials("5"), P + "rep/5")
    other, got_other, _ = connect(broker, AUTH.credentials("6"), P + "rep/+")
    node, _, _ = connect(broker, AUTH.credentials(node_identity(2)))
    try:
        node.publish(P + "rep/5", b"reply", qos=1).wait_for_publish(5)
        assert got_mine.get(timeout=5) == (P + "rep/5", b"reply")
        with pytest.raises(queue.Empty):
            got_other.get(timeout=1.0)
    finally:
        for c in (mine, other, node):
            close(c)


def test_identities_and_files() -> None:
    assert AUTH.identities()[:5] == [HOST, "node0", "node1", "node2", "node3"]
    assert len(AUTH.identities()) == 1 + 4 + 8
    with pytest.raises(ValueError):
        AUTH.password("8")  # beyond the client ids the broker knows
    with pytest.raises(ValueError):
        AUTH.password("node4")
    assert len({AUTH.password(who) for who in AUTH.identities()}) == len(AUTH.identities())
    lines = AUTH.password_file().splitlines()
    assert [line.split(":")[0] for line in lines] == AUTH.identities()
    assert all(line.split(":", 1)[1].startswith("$7$101$") for line in lines)
    # salted: the same password hashes differently each time (mosquitto checks it either way,
    # as every login above shows)
    assert mosquitto_hash("secret") != mosquitto_hash("secret")


def test_files_are_private(tmp_path: Path) -> None:
    for path in AUTH.write(tmp_path):
        assert path.stat().st_mode & 0o777 == 0o600
