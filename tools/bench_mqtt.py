"""Micro-benchmark of firmware/mqtt.py: a MicroPython node echoes, paho-mqtt measures.

    .venv/bin/python tools/bench_mqtt.py [--pings 2000] [--flood 20000] [--size 100]

A MicroPython Unix-port node (``-X heapsize=100k``) runs MQTTClient: it republishes every
payload from ``bench/ping`` to ``bench/pong``, counts ``bench/flood`` messages, and on command
publishes a burst to ``bench/down``. A paho client on the host measures

- round-trip latency: sequential pings (one in flight), p50/p90/p99/max;
- one-way throughput host -> node: a bare-socket publisher writes pre-encoded packets as fast
  as the broker takes them, the node times the run from the first to the last message;
- one-way throughput node -> host: the node publishes as fast as its buffer lets it, a
  bare-socket subscriber times the run from the first to the last message it receives.

All messages are QoS0 with ``--size`` byte payloads. mosquitto is started on a free loopback
port unless ``--port`` names a running broker.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho

from edgebft.devices.image import build_lib
from edgebft.devices.micropython import find_micropython
from edgebft.devices.mpprocess import MicroPythonProcess

MOSQUITTO = "/usr/sbin/mosquitto"

NODE = r"""
import asyncio, gc, sys
from time import ticks_ms, ticks_diff
from edgebft.firmware.mqtt import MQTTClient
N_FLOOD = %(flood)d
fl = [0, 0]
mark = [0, 0]

def on_message(topic, payload, retain):
    if topic == "bench/ping":
        c.publish("bench/pong", payload)
    else:
        if fl[0] == 0:
            fl[1] = ticks_ms()
        fl[0] += 1
        if fl[0] == N_FLOOD:
            print("FLOOD", fl[0], ticks_diff(ticks_ms(), fl[1]))

c = MQTTClient("bench-node", "127.0.0.1", %(port)d, on_message=on_message)

async def blast(n, size):
    data = bytes(size)
    t0 = ticks_ms()
    sent = 0
    while sent < n:
        if c.publish("bench/down", data):
            sent += 1
        else:
            await c.flush()  # the batch buffer is full: let the socket take it
    await c.flush()
    print("BLAST", sent, ticks_diff(ticks_ms(), t0), c.tx_dropped)

async def commands():
    r = asyncio.StreamReader(sys.stdin)
    while True:
        w = (await r.readline()).split()
        if not w:
            return
        if w[0] == b"blast":
            await blast(int(w[1]), int(w[2]))
        elif w[0] == b"mark":  # count the bytes allocated until "unmark", gc off
            gc.collect()
            gc.disable()
            mark[0], mark[1] = gc.mem_alloc(), c.rx_msgs
            print("MARKED")
        elif w[0] == b"unmark":
            a, n = gc.mem_alloc() - mark[0], c.rx_msgs - mark[1]
            gc.enable()
            gc.collect()
            print("ALLOC", a, n, gc.mem_alloc(), gc.mem_free())

async def main():
    await c.connect()
    await c.subscribe("bench/ping")
    await c.subscribe("bench/flood")
    print("READY")
    asyncio.create_task(commands())
    await c.run()

asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mosquitto(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


class _Node(MicroPythonProcess):
    def __init__(self, micropython: Path, folder: Path, port: int, flood: int) -> None:
        lib = build_lib(folder / "lib")
        script = folder / "node.py"
        script.write_text(NODE % {"port": port, "flood": flood})
        super().__init__(micropython, lib, script)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _publish_packet(topic: str, payload: bytes) -> bytes:
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + payload
    assert len(body) < 128
    return bytes([0x30, len(body)]) + body


def _raw_connect(port: int, cid: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    var = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    s.sendall(bytes([0x10, len(var)]) + var)
    if s.recv(4)[:1] != b"\x20":
        raise RuntimeError("no CONNACK")
    return s


class _RawSubscriber(threading.Thread):
    """Counts QoS0 messages of one fixed size on one topic from a bare MQTT connection.

    paho's receive loop tops out near 50k msgs/s; counting bytes does not.
    """

    def __init__(self, port: int, topic: str, size: int, count: int) -> None:
        super().__init__(daemon=True)
        self.want = count * len(_publish_packet(topic, bytes(size)))
        self.count = count
        self.s = _raw_connect(port, b"bench-rawsub")
        t = topic.encode()
        self.s.sendall(bytes([0x82, 5 + len(t), 0, 1]) + len(t).to_bytes(2, "big") + t + b"\0")
        if self.s.recv(5)[:1] != b"\x90":
            raise RuntimeError("no SUBACK")
        self.first = self.last = 0.0
        self.got = 0

    def run(self) -> None:
        with self.s:
            while self.got < self.want:
                n = len(self.s.recv(1 << 16))
                if not n:
                    return
                self.last = time.perf_counter()
                if not self.got:
                    self.first = self.last
                self.got += n

    def msgs_s(self) -> float:
        return self.count / max(self.last - self.first, 1e-9)


def _raw_publisher(port: int, topic: str, payload: bytes, count: int) -> float:
    """Publish ``count`` QoS0 messages over a bare MQTT connection; return the seconds taken.

    paho tops out near 60k msgs/s; pre-encoded packets written in large chunks do not, so
    the node, not the publisher, sets the rate.
    """
    packet = _publish_packet(topic, payload)
    with _raw_connect(port, b"bench-rawpub") as s:
        chunk = packet * 500
        t0 = time.perf_counter()
        for _ in range(count // 500):
            s.sendall(chunk)
        s.sendall(packet * (count % 500))
        s.sendall(b"\xe0\x00")  # DISCONNECT
        return time.perf_counter() - t0


def _percentile(sorted_us: list[float], q: float) -> float:
    return sorted_us[min(len(sorted_us) - 1, int(q * len(sorted_us)))]


def bench(micropython: Path, port: int, pings: int, flood: int, size: int) -> dict[str, float]:
    """Run the three measurements against the broker on ``port``; return the numbers."""
    folder = Path(tempfile.mkdtemp(prefix="bench_mqtt_"))
    node = _Node(micropython, folder, port, flood)
    got: queue.Queue[float] = queue.Queue()

    def on_message(c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        got.put(time.perf_counter())

    host = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-host")
    host.on_message = on_message
    host.connect("127.0.0.1", port)
    host.loop_start()
    try:
        node.expect("READY")
        host.subscribe("bench/pong")
        time.sleep(0.2)
        payload = bytes(size)
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            host.publish("bench/ping", payload)
            rtts.append((got.get(timeout=5) - t0) * 1e6)
        rtts.sort()
        node.send("mark")  # allocation per echoed message over 100 pings (gc off: keep it short)
        node.expect("MARKED")
        for _ in range(100):
            host.publish("bench/ping", payload)
            got.get(timeout=5)
        node.send("unmark")
        alloc = node.expect("ALLOC")
        t0 = time.perf_counter()
        _raw_publisher(port, "bench/flood", payload, flood)
        f = node.expect("FLOOD", timeout=60)
        host_s = time.perf_counter() - t0
        sub = _RawSubscriber(port, "bench/down", size, flood)
        sub.start()
        node.send(f"blast {flood} {size}")
        b = node.expect("BLAST", timeout=60)
        sub.join(30)
        return {
            "rtt_p50_us": statistics.median(rtts), "rtt_p90_us": _percentile(rtts, 0.90),
            "rtt_p99_us": _percentile(rtts, 0.99), "rtt_max_us": rtts[-1],
            "up_msgs": float(f[1]), "up_node_msgs_s": int(f[1]) / max(int(f[2]), 1) * 1000,
            "up_wall_msgs_s": flood / host_s,
            "down_sent": float(b[1]), "down_recv": sub.got / sub.want * flood,
            "down_node_msgs_s": int(b[1]) / max(int(b[2]), 1) * 1000,
            "down_host_msgs_s": sub.msgs_s(),
            "alloc_per_echo_bytes": int(alloc[1]) / max(int(alloc[2]), 1),
            "heap_after_gc_bytes": float(alloc[3]), "heap_free_bytes": float(alloc[4]),
        }
    finally:
        host.loop_stop()
        host.disconnect()
        node.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pings", type=int, default=2000, help="sequential round trips")
    ap.add_argument("--flood", type=int, default=20000, help="messages per throughput run")
    ap.add_argument("--size", type=int, default=100, help="payload bytes")
    ap.add_argument("--port", type=int, help="a running broker on 127.0.0.1 (default: start one)")
    ap.add_argument("--micropython", help="MicroPython Unix-port binary")
    args = ap.parse_args(argv)
    micropython = find_micropython(args.micropython)
    broker = None
    port = args.port
    if port is None:
        if not os.path.exists(MOSQUITTO):
            print(f"{MOSQUITTO} not found; pass --port of a running broker", file=sys.stderr)
            return 2
        broker, port = _start_mosquitto(Path(tempfile.mkdtemp(prefix="bench_broker_")))
    try:
        r = bench(micropython, port, args.pings, args.flood, args.size)
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(5)
    print(f"MQTT client bench: MicroPython node (100k heap) <-> mosquitto <-> paho, "
          f"{args.size}-byte QoS0 payloads")
    print(f"  round trip ({args.pings} sequential pings): p50 {r['rtt_p50_us']:.0f} us, "
          f"p90 {r['rtt_p90_us']:.0f} us, p99 {r['rtt_p99_us']:.0f} us, "
          f"max {r['rtt_max_us']:.0f} us")
    print(f"  host -> node: {r['up_msgs']:.0f}/{args.flood} received, "
          f"{r['up_node_msgs_s']:.0f} msgs/s at the node "
          f"({r['up_wall_msgs_s']:.0f} msgs/s wall, from a raw-socket publisher)")
    print(f"  node -> host: {r['down_sent']:.0f} published in a burst at "
          f"{r['down_node_msgs_s']:.0f} msgs/s (into socket and broker buffers), "
          f"{r['down_recv']:.0f} received at {r['down_host_msgs_s']:.0f} msgs/s")
    print(f"  node heap: {r['alloc_per_echo_bytes']:.0f} B allocated per echoed message "
          f"(receive + publish), {r['heap_after_gc_bytes']:.0f} B in use after gc, "
          f"{r['heap_free_bytes']:.0f} B free")
    return 0


if __name__ == "__main__":
    sys.exit(main())
