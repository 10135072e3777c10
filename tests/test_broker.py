"""edgebft.lab.broker: parsing --broker, starting and stopping mosquitto and amqtt, reaching
external ones.

The MQTT features EdgeBFT relies on (round trips at QoS 0 and 1, retained messages, the Last
Will on an abrupt disconnect) are checked against both brokers we start.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from conftest import wait_until
from edgebft.lab.broker import (
    SPEC_HELP,
    Broker,
    BrokerError,
    BrokerSpec,
    check_reachable,
    find_mosquitto,
    free_port,
    parse_broker,
    start_broker,
)

KINDS = [
    pytest.param("mosquitto", marks=pytest.mark.skipif(find_mosquitto() is None,
                                                       reason="mosquitto not installed")),
    "embedded",
]
WAIT_S = 5.0


def gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie waiting for an init that never reaps counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def port_free(port: int) -> bool:
    """True if a server could listen on ``port`` (as brokers do, with SO_REUSEADDR: the
    connections just closed linger in TIME_WAIT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Client:
    """A paho client that connects synchronously and queues what it receives."""

    def __init__(self, broker: Broker, client_id: str, will: tuple[str, bytes] | None = None):
        self.received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=mqtt.MQTTv311)
        self.paho.on_message = lambda _c, _u, msg: self.received.put(msg)
        if will:
            self.paho.will_set(will[0], will[1], qos=1)
        self.paho.connect(broker.host, broker.port, keepalive=30)
        self.paho.loop_start()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        result, mid = self.paho.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.2)  # SUBACK: paho has no wait_for_subscribe; this is ample on loopback

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.paho.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(WAIT_S)

    def next(self) -> mqtt.MQTTMessage:
        return self.received.get(timeout=WAIT_S)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture(params=KINDS)
def started(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    broker = start_broker(request.param, tmp_path)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_start_round_trip_stop(kind: str, tmp_path: Path) -> None:
    broker = start_broker(kind, tmp_path)
    assert broker.kind == kind
    assert broker.host == "127.0.0.1"
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert broker.describe().startswith(kind)
    assert broker.describe().endswith(f" on 127.0.0.1:{broker.port}")
    pid = broker.pid
    assert pid is not None and broker.running()
    sub, pub = Client(broker, "sub"), Client(broker, "pub")
    try:
        sub.subscribe("ebft/t/from/+")
        pub.publish("ebft/t/from/0", b"\x00hello", qos=0)
        pub.publish("ebft/t/from/1", b"qos1", qos=1)
        got = {(m.topic, m.payload) for m in (sub.next(), sub.next())}
        assert got == {("ebft/t/from/0", b"\x00hello"), ("ebft/t/from/1", b"qos1")}
    finally:
        sub.close()
        pub.close()
    broker.stop()
    broker.stop()  # idempotent
    assert not broker.running()
    assert wait_until(lambda: gone(pid))
    assert wait_until(lambda: port_free(broker.port))


def test_qos1_retained_and_will(started: Broker) -> None:
    """What EdgeBFT uses: ordered QoS 1 delivery, retained status, Last Will on a crash."""
    pub = Client(started, "pub")
    pub.publish("ebft/t/status/0", b"online", retain=True)
    sub = Client(started, "sub")
    try:
        sub.subscribe("ebft/t/status/+")
        retained = sub.next()
        assert (retained.topic, retained.payload, retained.retain) == \
            ("ebft/t/status/0", b"online", True)
        sub.subscribe("ebft/t/q")
        for n in range(200):
            pub.publish("ebft/t/q", str(n).encode(), qos=1)
        got = [sub.next() for _ in range(200)]
        assert [int(m.payload) for m in got] == list(range(200))
        assert {m.qos for m in got} == {1}
        # A client that dies without DISCONNECT: the broker must publish its will.
        crasher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import time, paho.mqtt.client as mqtt
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="node7")
            c.will_set("ebft/t/status/7", b"dead", qos=1)
            c.connect("{started.host}", {started.port}, keepalive=30)
            c.loop_start()
            time.sleep(0.5)
            print("connected", flush=True)
            time.sleep(60)
            """)], stdout=subprocess.PIPE, text=True)
        try:
            assert crasher.stdout is not None
            assert crasher.stdout.readline().strip() == "connected"
        finally:
            crasher.kill()
            crasher.wait()
        will = sub.next()
        assert (will.topic, will.payload) == ("ebft/t/status/7", b"dead")
    finally:
        sub.close()
        pub.close()


def test_external_reachable(started: Broker) -> None:
    external = start_broker(f"mqtt://127.0.0.1:{started.port}", started.log or Path("."))
    assert external.kind == "external"
    assert (external.host, external.port) == ("127.0.0.1", started.port)
    assert external.describe() == f"external on 127.0.0.1:{started.port}"
    external.stop()  # not ours: a no-op
    assert started.running()


def test_external_unreachable_is_one_line() -> None:
    port = free_port()
    with pytest.raises(BrokerError) as err:
        start_broker(f"mqtt://127.0.0.1:{port}", Path("."))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"cannot reach MQTT broker at mqtt://127.0.0.1:{port}: ")
    assert message.endswith("; start one or use --broker mosquitto|embedded")


def test_external_not_mqtt() -> None:
    """A listener that accepts TCP but never answers CONNECT is not a broker."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(BrokerError, match=r"no CONNACK within 0.5 s; start one"):
            check_reachable("127.0.0.1", port, timeout_s=0.5)


@pytest.mark.parametrize("spec", ["", "rabbitmq", "mqtt://", "mqtt://h:99999", "tcp://h:1883",
                                  "mqtt://h:port", "Mosquitto"])
def test_bad_spec(spec: str) -> None:
    with pytest.raises(BrokerError) as err:
        parse_broker(spec)
    assert str(err.value) == f"bad broker {spec!r}: expected {SPEC_HELP}"


def test_parse() -> None:
    assert parse_broker("embedded") == BrokerSpec("embedded")
    assert parse_broker("mqtt://example.org") == BrokerSpec("external", "example.org", 1883)
    assert parse_broker("mqtt://10.0.0.2:1884") == BrokerSpec("external", "10.0.0.2", 1884)
    assert parse_broker("mqtt://[::1]:1884") == BrokerSpec("external", "::1", 1884)
    auto = parse_broker("auto")
    assert auto.kind == ("mosquitto" if find_mosquitto() else "embedded")


EXIT_SCRIPT = """
import sys, time
from pathlib import Path
from edgebft.lab.broker import start_broker
broker = start_broker(sys.argv[1], Path(sys.argv[2]))
print(broker.pid, flush=True)
if sys.argv[3] == "raise":
    raise RuntimeError("caller bug")
if sys.argv[3] == "return":
    sys.exit(0)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["sigterm", "sigint", "raise", "return"])
@pytest.mark.parametrize("kind", KINDS)
def test_no_broker_outlives_host(kind: str, how: str, tmp_path: Path) -> None:
    host = subprocess.Popen([sys.executable, "-c", EXIT_SCRIPT, kind, str(tmp_path), how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        pid = int(host.stdout.readline())
        if how in ("sigterm", "sigint"):
            host.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        host.wait(timeout=15)
    finally:
        host.kill()
    assert wait_until(lambda: gone(pid)), f"broker {pid} survived its host ({how})"
