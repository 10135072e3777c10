# The node runtime: drives one protocol/ replica from MQTT on MicroPython (board or Unix port).
#
# Rules:
# - All protocol decisions live in protocol/; this module only moves bytes between MQTT topics
#   and Replica.receive(), publishes what the replica outputs, and reports status.
# - Topics (DESIGN.md section 2), cluster c, node i:
#     ebft/c/from/i            broadcast by i; every node subscribes ebft/c/from/+
#     ebft/c/to/j/from/i       point to point
#     ebft/c/req/<client>      requests (every replica subscribes ebft/c/req/+)
#     ebft/c/rep/<client>      replies
#     ebft/c/status/i          retained CBOR status map; the Last Will sets it to b"offline"
#     ebft/c/event/i           CBOR lists: replica events, control outcomes, suspicions
# - Failure detection (protocol/detector.py): a peer's status messages are its heartbeats, so
#   the heartbeat interval is status_interval_ms; its b"offline" (the broker's Last Will for
#   it) suspects it at once. Network faults cut heartbeats like any other traffic from the
#   peer. The detector measures durations on the node's clock without the injected skew (a
#   skew offsets the clock, it does not make time pass). It is checked every timer tick; each
#   suspicion and recovery is published as ["suspect", peer, phi * 100] or ["trust", peer],
#   and a suspected primary starts a view change (Replica.suspect), again in each view it
#   leads. Status maps carry "phi", every replica's phi * 100 (0 for ourselves).
# - Memory stays bounded: no per-message state here; status keeps a ring of _CHECKPOINTS_KEPT.
import gc
import json
import time

import asyncio
from binascii import unhexlify

try:
    from micropython import const
except ImportError:  # CPython
    const = int  # CPython: const(x) is x

from edgebft.firmware import store
from edgebft.firmware.faults import Faults
from edgebft.firmware.mqtt import MQTTClient, MQTTError
from edgebft.protocol import cbor
from edgebft.protocol import messages
from edgebft.protocol import replica as rp
from edgebft.protocol.detector import Detector
from edgebft.protocol.stake import Stake

CONFIG_PATH = "edgebft.json"
BOOTS_PATH = "boots"
OFFLINE = b"offline"
_CHECKPOINTS_KEPT = const(4)
_STATUS_INTERVAL_MS = const(500)
_MQTT_HEADER_BYTES_MAX = const(128)  # fixed header, topic and packet id around a message
_TICK_MS = const(20)
# A timer tick this late means the node itself stood still (a SIGSTOP, a long flash write):
# that time counts for none of the replica's timeouts nor the detector's, so that what the
# peers sent meanwhile is read before they are judged (never two ticks in a row: a node that
# is merely slow still times out).
_STALL_MS = const(100)
# A suspected primary starts a view change only when requests wait and nothing executed for
# this long: a primary that a lossy link hides from our detector while the cluster goes on
# (an omission fault) is not worth leaving the others for, alone in a higher view.
_NO_PROGRESS_MS = const(50)
# Collect after allocating the heap left free at boot but a reserve (at least 4 KB): each
# collection marks the whole live heap (~100 KB) and sweeps the rest, so collecting after a
# quarter of the free heap, as nodes did, spent a third of a node's CPU on it (16 clients at
# 160k: 1.27 ms of CPU per commit against 0.91 with this policy). The reserve leaves room for a
# message in flight when a collection is due. "gc_threshold_bytes" overrides it.
_GC_THRESHOLD_MIN_BYTES = const(4096)
_GC_RESERVE_BYTES = const(16384)
_PUBLISHED_EVENTS = ("equivocation", "view_change", "view", "fetch", "transferred", "restored",
                     "epoch", "store_error")


def load_config(path=CONFIG_PATH):
    """Read the node's configuration (written by the host's image builder)."""
    with open(path) as f:
        return json.load(f)


class Node:
    """One replica attached to the broker named in its configuration."""

    def __init__(self, config):
        self.me = config["node"]
        cluster = config["cluster"]
        self.prefix = "ebft/%s/" % cluster
        self.topic_all = "%sfrom/%d" % (self.prefix, self.me)
        self.topic_status = "%sstatus/%d" % (self.prefix, self.me)
        self.topic_event = "%sevent/%d" % (self.prefix, self.me)
        self.topic_ctl = "%sctl/%d" % (self.prefix, self.me)
        self.topic_req = "%sreq/" % self.prefix
        self.faults = Faults(self.me, unhexlify(config["control_key"]))
        self.status_interval_ms = config.get("status_interval_ms", _STATUS_INTERVAL_MS)
        args = (self.me, Stake(config["stake"]), [unhexlify(k) for k in config["keys"]],
                unhexlify(config["client_secret"]))
        kwargs = {"genesis": config.get("genesis"),
                  "checkpoint_interval": config.get("checkpoint_interval", rp.CHECKPOINT_INTERVAL),
                  "batch_max": config.get("batch_max", 16),
                  "pipeline_max": config.get("pipeline_max", 4),
                  "view_timeout_ms": config.get("view_timeout_ms", 1000),
                  # State's options: page counts, cache_pages, policy ("lru", "lfu", "fifo")
                  "store": config.get("store"), "flash": store.Flash()}
        # Boots counted in flash (this one included): a host tells a node that booted again (a
        # reset, a crash, a watchdog) from one that merely went quiet, whatever its uptime.
        self.boots = store.load_int(BOOTS_PATH) + 1
        store.save_int(self.boots, BOOTS_PATH)
        saved = store.load()
        if saved is None:
            self.replica = rp.Replica(*args, **kwargs)
        else:
            self.replica = rp.Replica.restore(saved, *args, **kwargs)
        # "detector": Detector's keyword arguments (threshold as phi * 100, window, min_std_ms,
        # pause_ms); the first heartbeat's seeds assume the status interval.
        self.detector = Detector(self.replica.stake.n, self.me, first_ms=self.status_interval_ms,
                                 **config.get("detector", {}))
        broker = config["broker"]
        self.mqtt = MQTTClient(
            "ebft-%s-%d" % (cluster, self.me), broker["host"], broker.get("port", 1883),
            keepalive=config.get("keepalive_s", 10),
            will=(self.topic_status, OFFLINE, True, 0), on_message=self.on_message,
            max_packet=messages.MESSAGE_BYTES_MAX + _MQTT_HEADER_BYTES_MAX,
            rx_chunk=messages.MESSAGE_BYTES_MAX + _MQTT_HEADER_BYTES_MAX,
            tx_max=messages.MESSAGE_BYTES_MAX)
        self.checkpoints = []  # [[seq, digest]], the newest _CHECKPOINTS_KEPT executed
        self.heap_peak = 0
        self.executed = 0      # the replica's last_exec when it last moved ...
        self.progress_ms = 0   # ... and when (replica time)
        self.status_skipped = 0
        self.ticks = time.ticks_ms()
        self.clock_ms = 0  # ms since boot, never wrapping (ticks_ms wraps after ~12 days)

    def now(self):
        """The replica's clock: monotonic ms since boot, plus an injected skew."""
        t = time.ticks_ms()
        self.clock_ms += time.ticks_diff(t, self.ticks)
        self.ticks = t
        return self.clock_ms + self.faults.skew_ms

    def on_message(self, topic, payload, retain):
        if topic == self.topic_all:
            return  # our own broadcast, echoed by the broker
        if topic == self.topic_ctl:
            command = self.faults.on_control(bytes(payload))
            self.mqtt.publish(self.topic_event, cbor.encode(["control", command or "rejected"]))
            return
        if topic.startswith("status", len(self.prefix)):  # .../status/<j>
            j = int(topic[topic.rfind("/") + 1:])
            if j == self.me or self.faults.drop(j):
                return
            now = self.now()
            if len(payload) == len(OFFLINE) and bytes(payload) == OFFLINE:
                self.detector.offline(j, now - self.faults.skew_ms)
            else:  # a retained one too: it starts the clock of a peer silent since before
                self.detector.heartbeat(j, now - self.faults.skew_ms)  # we subscribed
            self.detected(now)
            return
        if not topic.startswith(self.topic_req):  # from a replica: .../from/<j>
            j = int(topic[topic.rfind("/") + 1:])
            if self.faults.drop(j):
                return
            if self.detector.suspect[j]:
                # Any message shows a suspected peer alive (the detector records no interval
                # for it): a node that was cut off itself must not go on suspecting the
                # primary of a view it just installed until that primary's next status.
                self.detector.heartbeat(j, self.now() - self.faults.skew_ms)
        try:
            self.replica.receive(bytes(payload), self.now())
        except MemoryError:
            gc.collect()
            print("out of memory: %d bytes free after collection" % gc.mem_free())
            raise  # a board's watchdog reboots it; it restores from flash
        self.drain()

    def drain(self):
        """Persist what must survive a crash, then publish the replica's outputs (write-ahead),
        and fold its events into the status."""
        r = self.replica
        if r.dirty:
            store.save(r.durable())
        faults = self.faults
        faults.misbehave(r)
        for dest, wire in r.out:
            if dest == rp.TO_ALL:
                if faults.drop_permille and faults.drop_peers is None and faults.drop(-1):
                    continue
                topic = self.topic_all
            elif type(dest) is tuple:
                topic = "%srep/%d" % (self.prefix, dest[1])
            else:
                if faults.drop(dest):
                    continue
                topic = "%sto/%d/from/%d" % (self.prefix, dest, self.me)
            if not faults.hold(self.now(), topic, wire):
                self.mqtt.publish(topic, wire)
        del r.out[:]
        for event in r.events:
            if event[0] == "executed" and event[1] % r.K == 0:
                self.checkpoints.append([event[1], event[2]])
                if len(self.checkpoints) > _CHECKPOINTS_KEPT:
                    self.checkpoints.pop(0)
            elif event[0] in _PUBLISHED_EVENTS:
                self.mqtt.publish(self.topic_event, cbor.encode(list(event)))
        del r.events[:]

    def detected(self, now):
        """Publish the detector's events; start a view change (at replica time ``now``) if the
        primary is suspected and the replica is stuck (see _NO_PROGRESS_MS)."""
        d = self.detector
        for event in d.events:
            self.mqtt.publish(self.topic_event, cbor.encode(list(event)))
        del d.events[:]
        r = self.replica
        if r.last_exec != self.executed:
            self.executed = r.last_exec
            self.progress_ms = now
        if (d.suspect[r.primary()] and not r.limbo and r.waiting
                and now - self.progress_ms >= _NO_PROGRESS_MS):
            r.suspect(now)
            self.drain()

    def status(self):
        """The status map published on ebft/c/status/i (CBOR, canonical)."""
        gc.collect()
        used = gc.mem_alloc()
        if used > self.heap_peak:
            self.heap_peak = used
        r = self.replica
        clock = self.now() - self.faults.skew_ms
        return {
            "node": self.me, "view": r.view, "limbo": r.limbo,
            "view_changes": r.counts["view_changes"], "primary": r.primary(), "seq": r.seq,
            "last_exec": r.last_exec, "digest": r.ledger.digest, "stable": r.h,
            "checkpoints": self.checkpoints, "heap_used": used, "heap_free": gc.mem_free(),
            "heap_peak": self.heap_peak, "rx": r.counts["rx"], "tx": r.counts["tx"],
            "executed_requests": r.counts["executed_requests"], "drops": r.drops,
            "pending": len(r.pending), "slots": len(r.live_slots()),
            "store": r.state.counts(), "transfer_bytes": r.counts["transfer_bytes"],
            "mqtt_rx": self.mqtt.rx_msgs, "mqtt_tx": self.mqtt.tx_msgs,
            "mqtt_dropped": self.mqtt.tx_dropped, "reconnects": self.mqtt.reconnects,
            "uptime_ms": clock, "boots": self.boots,
            "status_skipped": self.status_skipped,
            "faults": self.faults.describe(), "fault_dropped": self.faults.dropped,
            "ctl_rejected": self.faults.rejected,
            "phi": [self.detector.phi(j, clock) for j in range(r.stake.n)],
        }

    async def report(self):
        while True:
            try:
                self.mqtt.publish(self.topic_status, cbor.encode(self.status()), retain=True)
            except MemoryError:
                self.status_skipped += 1  # a fragmented heap: try again next interval
            await asyncio.sleep_ms(self.status_interval_ms)

    async def timers(self):
        """Drive the replica's timers (view change, retransmission) and the failure detector."""
        r = self.replica
        before = self.now() - self.faults.skew_ms
        stalled = False
        while True:
            now = self.now()
            clock = now - self.faults.skew_ms
            gap = clock - before
            stalled = not stalled and gap >= _STALL_MS
            if stalled:
                r.stalled(gap)
                self.detector.stalled(gap, clock)
            if now >= r.next_timer():
                r.tick(now)
                self.drain()
            self.detector.check(clock)
            self.detected(now)
            before = clock
            for topic, wire in self.faults.due(now):
                self.mqtt.publish(topic, wire)
            await asyncio.sleep_ms(_TICK_MS)

    async def run(self):
        # The client connects, reconnects with back-off and re-subscribes by itself; a
        # subscription not acknowledged in time (a broker that is slow to start) is retried.
        link = asyncio.create_task(self.mqtt.run())
        await asyncio.sleep_ms(0)  # let the link task start
        for topic in ("from/+", "req/+", "to/%d/from/+" % self.me, "ctl/%d" % self.me,
                      "status/+"):
            while True:
                try:
                    await self.mqtt.subscribe(self.prefix + topic)
                    break
                except MQTTError as e:
                    print("subscribe %s: %r; retrying" % (topic, e))
                    await asyncio.sleep_ms(200)
        print("edgebft node %d up: %d replicas, broker %s:%d" % (
            self.me, self.replica.stake.n, self.mqtt.host, self.mqtt.port))
        asyncio.create_task(self.report())
        asyncio.create_task(self.timers())
        await link


def main():
    gc.threshold(_GC_THRESHOLD_MIN_BYTES)
    config = load_config()
    node = Node(config)
    gc.collect()
    gc.threshold(config.get("gc_threshold_bytes") or
                 max(_GC_THRESHOLD_MIN_BYTES, gc.mem_free() - _GC_RESERVE_BYTES))
    config = None
    asyncio.run(node.run())
