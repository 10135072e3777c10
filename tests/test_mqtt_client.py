"""firmware/mqtt.py against a real mosquitto, with the client running on real MicroPython.

Each test starts a MicroPython node (``-X heapsize=100k``) running HARNESS, a small script that
drives ``MQTTClient`` and reports on stdout (``READY``, ``RX ...``, ``UP``/``DOWN``, ``SEQ ...``,
``STATS ...``) and takes commands on stdin (``pub``, ``stats``). The test observes and drives it
with paho-mqtt.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from edgebft.devices.mpprocess import MicroPythonProcess

MOSQUITTO = "/usr/sbin/mosquitto"
HEAP = "100k"

# ---- module-local fixture `restartable_broker`: a mosquitto this module may stop, start again
# ---- on the same port, and freeze (SIGSTOP). The shared session `broker` fixture of
# ---- tests/conftest.py serves the tests that only need a broker running.


class _Broker:
    host = "127.0.0.1"

    def __init__(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        )
        self.log = folder / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def restartable_broker(tmp_path: Path) -> Iterator[_Broker]:
    if not os.path.exists(MOSQUITTO):
        pytest.skip(f"{MOSQUITTO} not installed")
    b = _Broker(tmp_path)
    b.start()
    yield b
    b.stop()


# ---- end of the module-local broker fixture


HARNESS = r"""
import asyncio, sys
from time import ticks_ms, ticks_diff
from edgebft.firmware.mqtt import MQTTClient
CFG = %(cfg)r
P = CFG["prefix"]
seq = [0, 0, 0, True]  # count, next expected, first ticks, in order

def on_message(topic, payload, retain):
    topic = str(topic, "utf-8")  # the client hands topics on as bytes
    if topic.startswith(P + "/echo"):
        c.publish(P + "/back" + topic[-1], payload, False, int(topic[-1]))
    elif topic == P + "/seq":
        n = int(str(payload, "utf-8"))
        if seq[0] == 0:
            seq[2] = ticks_ms()
        if n != seq[1]:
            seq[3] = False
        seq[1] = n + 1
        seq[0] += 1
        if seq[0] == CFG.get("seq", 0):
            print("SEQ", seq[0], int(seq[3]), ticks_diff(ticks_ms(), seq[2]))
    else:
        print("RX", topic, len(payload), sum(payload), int(retain))

c = MQTTClient(CFG["id"], CFG["host"], CFG["port"], keepalive=CFG.get("ka", 30),
               will=CFG.get("will"), on_message=on_message, **CFG.get("kw", {}))

def stats():
    print("STATS", int(c.connected), c.rx_msgs, c.tx_msgs, c.reconnects, c.rx_dropped,
          c.tx_dropped)

async def monitor():
    up = c.connected
    while True:
        await asyncio.sleep_ms(20)
        if c.connected != up:
            up = c.connected
            print("UP" if up else "DOWN", c.reconnects)

async def commands():
    r = asyncio.StreamReader(sys.stdin)
    while True:
        w = (await r.readline()).split()
        if not w:
            return
        if w[0] == b"pub":
            n = int(w[4])
            data = bytes(i %% 251 for i in range(n))
            ok = c.publish(str(w[1], "utf-8"), data, w[3] == b"1", int(w[2]))
            print("PUB", int(ok))
        elif w[0] == b"burst":  # N publishes of SIZE bytes within one loop turn
            data = bytes(int(w[2]))
            ok = 0
            for i in range(int(w[1])):
                ok += c.publish(P + "/burst", data)
            print("BURST", ok)
        elif w[0] == b"stats":
            stats()

async def main():
    await c.connect()
    for t, q in CFG.get("subs", ()):
        await c.subscribe(P + t, q)
    print("READY")
    asyncio.create_task(monitor())
    asyncio.create_task(commands())
    await c.run()

asyncio.run(main())
"""


class Node(MicroPythonProcess):
    """A MicroPython process running HARNESS: stdout lines are queued, stdin takes commands."""

    def __init__(self, micropython: Path, lib: Path, folder: Path, cfg: dict) -> None:
        script = folder / f"node_{cfg['id']}.py"
        script.write_text(HARNESS % {"cfg": cfg})
        super().__init__(micropython, lib, script, HEAP,
                         stderr=open(folder / f"node_{cfg['id']}.err", "w+"))

    def stats(self) -> dict[str, int]:
        self.send("stats")
        v = [int(x) for x in self.expect("STATS")[1:]]
        names = ("connected", "rx_msgs", "tx_msgs", "reconnects", "rx_dropped", "tx_dropped")
        return dict(zip(names, v, strict=True))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        assert self.stderr is not None
        self.stderr.close()


class Observer:
    """A paho-mqtt client that records every message it receives."""

    def __init__(self, broker, *topics: tuple[str, int]) -> None:
        self.msgs: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.acks: queue.Queue[int] = queue.Queue()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"obs{id(self)}")
        self.c.on_message = lambda c, u, m: self.msgs.put(m)
        self.c.on_connect = lambda c, u, f, rc, p: self.acks.put(-1)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.acks.put(mid)
        self.c.connect(broker.host, broker.port, keepalive=30)
        self.c.loop_start()
        assert self.acks.get(timeout=5) == -1
        for topic, qos in topics:
            _, mid = self.c.subscribe(topic, qos)
            assert self.acks.get(timeout=5) == mid

    def get(self, timeout: float = 5.0) -> paho.MQTTMessage:
        return self.msgs.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.c.publish(topic, payload, qos).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


@pytest.fixture
def node_factory(micropython: Path, mp_lib: Path) -> Iterator:
    nodes: list[Node] = []
    folder = Path(tempfile.mkdtemp(prefix="mqtt_nodes_"))

    def make(broker, cfg: dict, ready: bool = True) -> Node:
        n = Node(micropython, mp_lib, folder, {"host": broker.host, "port": broker.port, **cfg})
        nodes.append(n)
        if ready:
            n.expect("READY")
        return n

    yield make
    for n in nodes:
        n.kill()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("qos", [0, 1])
def test_round_trip_both_directions(broker, node_factory, qos: int) -> None:
    p = f"rt{qos}"
    node = node_factory(broker, {"id": f"mp-rt{qos}", "prefix": p,
                         "subs": [("/in", qos)]})
    obs = Observer(broker, (f"{p}/out", qos))
    try:
        for size in (0, 100, 10 * 1024):
            obs.publish(f"{p}/in", pattern(size), qos)  # paho -> MicroPython
            rx = node.expect("RX")
            assert rx[1:] == [f"{p}/in", str(size), str(sum(pattern(size))), "0"]
            node.send(f"pub {p}/out {qos} 0 {size}")  # MicroPython -> paho
            assert node.expect("PUB") == ["PUB", "1"]
            m = obs.get()
            assert (m.topic, m.qos, m.payload) == (f"{p}/out", qos, pattern(size))
        st = node.stats()
        assert st["rx_msgs"] == 3
        assert st["tx_msgs"] == 3
        assert st["tx_dropped"] == 0
    finally:
        obs.close()


def test_5000_messages_in_order(broker, node_factory) -> None:
    count = 5000
    node = node_factory(broker, {"id": "mp-seq", "prefix": "sq", "seq": count,
                         "subs": [("/seq", 0)]})
    obs = Observer(broker)
    try:
        t0 = time.monotonic()
        for i in range(count):
            obs.c.publish("sq/seq", str(i).encode(), 0)
            if i % 500 == 499:  # a sane rate: about 50k msg/s at most, in bursts of 500
                time.sleep(0.01)
        seq = node.expect("SEQ", timeout=20)
        elapsed = time.monotonic() - t0
        assert seq[1:3] == [str(count), "1"], seq  # all of them, in order
        print(f"\n5000 QoS0 msgs: {seq[1]} received in order, {elapsed:.3f} s from the first "
              f"publish ({count / elapsed:.0f} msg/s); {seq[3]} ms on MicroPython")
        assert node.stats()["rx_dropped"] == 0
    finally:
        obs.close()


def test_last_will_on_sigkill(broker, node_factory) -> None:
    obs = Observer(broker, ("lw/will", 1))
    node = node_factory(broker, {"id": "mp-lw", "prefix": "lw",
                         "will": ("lw/will", b"offline", False, 1)})
    try:
        with pytest.raises(queue.Empty):
            obs.get(timeout=0.2)
        node.proc.send_signal(signal.SIGKILL)
        m = obs.get(timeout=5)
        assert (m.topic, m.payload) == ("lw/will", b"offline")
    finally:
        obs.close()


def test_keepalive_keeps_idle_client_connected(broker, node_factory) -> None:
    # The broker drops a client after 1.5 x keepalive = 3 s without a packet from it.
    obs = Observer(broker, ("ka/will", 0), ("ka/back0", 0))
    node = node_factory(broker, {"id": "mp-ka", "prefix": "ka", "ka": 2,
                         "will": ("ka/will", b"offline", False, 0), "subs": [("/echo0", 0)]})
    try:
        time.sleep(6)
        assert obs.msgs.empty()  # no will
        obs.publish("ka/echo0", b"still there?")
        m = obs.get()
        assert (m.topic, m.payload) == ("ka/back0", b"still there?")
        st = node.stats()
        assert st["connected"] == 1
        assert st["reconnects"] == 0
    finally:
        obs.close()


def test_dead_broker_detected_by_ping(restartable_broker: _Broker, node_factory) -> None:
    broker = restartable_broker
    # A frozen broker keeps the TCP connection open: only the unanswered PINGREQ tells.
    node = node_factory(broker, {"id": "mp-dead", "prefix": "db", "ka": 2,
                         "subs": [("/echo0", 0)]})
    broker.pause()
    try:
        t0 = time.monotonic()
        node.expect("DOWN", timeout=6)
        print(f"\nfrozen broker detected after {time.monotonic() - t0:.2f} s (keepalive 2 s)")
    finally:
        broker.resume()
    node.expect("UP", timeout=10)
    obs = Observer(broker, ("db/back0", 0))
    try:
        obs.publish("db/echo0", b"ping")
        assert obs.get().payload == b"ping"
    finally:
        obs.close()


def test_reconnect_resubscribes(restartable_broker: _Broker, node_factory) -> None:
    broker = restartable_broker
    node = node_factory(broker, {"id": "mp-rc", "prefix": "rc",
                         "subs": [("/in", 1), ("/echo0", 0)]})
    broker.stop()
    node.expect("DOWN")
    time.sleep(0.3)  # a few refused attempts
    broker.start()
    assert node.expect("UP", timeout=10) == ["UP", "1"]
    obs = Observer(broker, ("rc/back0", 0))
    try:
        obs.publish("rc/in", b"again", 1)
        assert node.expect("RX")[1:3] == ["rc/in", "5"]
        obs.publish("rc/echo0", b"echo")
        assert obs.get().payload == b"echo"
    finally:
        obs.close()


def test_qos1_queued_while_disconnected_is_delivered(restartable_broker: _Broker,
                                                     node_factory) -> None:
    broker = restartable_broker
    node = node_factory(broker, {"id": "mp-q1", "prefix": "q1"})
    broker.stop()
    node.expect("DOWN")
    node.send("pub q1/late 1 1 50")  # QoS1, retained: it survives until someone subscribes
    assert node.expect("PUB") == ["PUB", "1"]
    node.send("pub q1/lost 0 0 50")  # QoS0 while disconnected: dropped and counted
    assert node.expect("PUB") == ["PUB", "0"]
    broker.start()
    node.expect("UP", timeout=10)
    obs = Observer(broker, ("q1/#", 1))
    try:
        m = obs.get()
        assert (m.topic, m.payload, m.retain) == ("q1/late", pattern(50), True)
        st = node.stats()
        assert st["tx_dropped"] == 1
        assert st["tx_msgs"] == 1
    finally:
        obs.close()


def test_oversized_packet_is_skipped(broker, node_factory) -> None:
    node = node_factory(broker, {"id": "mp-big", "prefix": "ov",
                         "kw": {"max_packet": 1024, "rx_chunk": 512},
                         "subs": [("/in", 0)]})
    obs = Observer(broker)
    try:
        for size in (3000, 800, 10, 5000, 20):  # > max_packet, > rx_chunk, small, ...
            obs.c.publish("ov/in", pattern(size), 0)
        for size in (800, 10, 20):
            assert node.expect("RX")[1:4] == ["ov/in", str(size), str(sum(pattern(size)))]
        st = node.stats()
        assert st["rx_dropped"] == 2
        assert st["rx_msgs"] == 3
        assert st["connected"] == 1
    finally:
        obs.close()


def test_outgoing_queue_is_bounded(restartable_broker: _Broker, node_factory) -> None:
    broker = restartable_broker
    # With the broker frozen the socket backs up; publishes beyond the byte bound are dropped
    # and counted, not buffered without end (a MemoryError on a 100 KB heap otherwise).
    node = node_factory(broker, {"id": "mp-burst", "prefix": "bu",
                         "subs": [("/echo0", 0)]})
    broker.pause()
    try:
        node.send("burst 20000 1000")  # 20 MB: more than the kernel buffers hold
        queued = int(node.expect("BURST", timeout=20)[1])
        st = node.stats()
    finally:
        broker.resume()
    print(f"\nburst into a frozen broker: {queued} of 20000 x 1000 B queued, the rest dropped")
    assert 0 < queued < 20000
    assert st["tx_dropped"] == 20000 - queued
    assert st["connected"] == 1
    obs = Observer(broker, ("bu/back0", 0))
    try:
        obs.publish("bu/echo0", b"after")
        deadline = time.monotonic() + 10
        while obs.get(timeout=10).payload != b"after":
            assert time.monotonic() < deadline
    finally:
        obs.close()
