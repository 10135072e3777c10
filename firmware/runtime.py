# The node runtime: drives one protocol/ node on MicroPython (board or Unix port) over MQTT.
#
# Rules:
# - All protocol decisions live in protocol/ (node.py: the replica, its failure detector and
#   the policy that joins them); this module only moves bytes between MQTT topics and the
#   node, publishes what it outputs, applies injected faults and reports status.
# - Topics (DESIGN.md section 2), cluster c, node i:
#     ebft/c/from/i            broadcast by i; every node subscribes to each peer's (not
#                              from/+: MQTT 3.1.1 has no "no local", and the broker would
#                              send a node each of its own broadcasts back)
#     ebft/c/to/j/from/i       point to point
#     ebft/c/req/<client>      requests (every replica subscribes ebft/c/req/+)
#     ebft/c/rep/<client>      replies
#     ebft/c/status/i          retained HEARTBEAT (the status map, authenticated); the Last
#                              Will sets it to an authenticated OFFLINE
#     ebft/c/event/i           CBOR lists: replica events, control outcomes, suspicions
# - A peer's status messages are its heartbeats (the heartbeat interval is
#   status_interval_ms), its OFFLINE its Last Will, both stamped (boots, connection, status
#   number) and judged by the node (protocol/node.py: peer_status); network faults cut them
#   like any other traffic from the peer. The node's ticks come every TICK_MS; each suspicion
#   and recovery is published as ["suspect", peer, phi * 100] or ["trust", peer].
# - A topic names its sender: one that names no replica of the cluster is dropped unread.
# - Memory stays bounded: no per-message state here.
import gc
import json
import sys

import asyncio
from binascii import unhexlify

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import bytes, int, len, list, max, range

try:
    from micropython import const
except ImportError:  # CPython
    const = int  # CPython: const(x) is x

from edgebft.firmware import board, store
from edgebft.firmware.faults import Faults
from edgebft.firmware.mqtt import MQTTClient, login_of
from edgebft.protocol import cbor
from edgebft.protocol import messages
from edgebft.protocol import replica as rp
from edgebft.protocol.node import STATUS_INTERVAL_MS, TICK_MS, Node
from edgebft.protocol.stake import Stake

CONFIG_PATH = "edgebft.json"
BOOTS_PATH = "boots"
_MQTT_HEADER_BYTES_MAX = const(128)  # fixed header, topic and packet id around a message
# The MQTT client's read buffer (with a header's room) and transmit batch buffer. A message up
# to MESSAGE_BYTES_MAX still passes: bigger than these, it gets a bytearray of its own, as
# none did in 30 s of 64 clients with three primary crashes (a pre-prepare, the largest
# message in common use, is at most ~810 bytes). Both are allocated while the node is built,
# so each byte comes out of the GC threshold: at 1 KB, not 2 (2.2 KB less heap held), 256
# clients over 10,000 keys had 1 out-of-heap restart in 6 runs against 8 in 3 of 6, and 64
# clients ran no faster. A delay fault's burst, released at once, used to lose what did not
# fit the batch buffer behind a backlog; it now waits for the next tick (Faults.release).
_MQTT_BUFFER_BYTES = const(1024)
# Collect once the heap left free at boot but a 32 KB reserve has been allocated (at least
# 4 KB): each collection marks the whole live heap (~100 KB), so collecting often costs what
# a board cannot spare. Measured at the default 160 KB heap, over 10,000 keys: 1 client ~185,
# ~215 and ~305 req/s and 16 clients ~330, ~360 and ~415 req/s collecting after a quarter,
# half and all but 16 KB of the free heap. The fault lab (four faults in 14 s) runs clean at
# 160 KB with it; at 128 KB a node's state transfer check ran out of heap now and then with
# every policy tried (17-20 KB free, in pieces). The reserve was 16 KB while cbor's per-item
# functions took their frames from the heap, which counts them as allocated (cbor.py's
# header). Without those, the heap fills further between collections, and pieces of 0.5-1 KB
# go missing with 17-36 KB free: at 64 clients 16 KB ran nodes out of heap in 2 runs of 6;
# at 256 clients 24 KB did (13 restarts and 11 view changes in a run, 454 req/s against 773
# before); 32 KB ran 2 runs at 256 and 3 at 64 clients without one (760-769 and 687-813
# req/s), 40 KB too, slower (675 at 256). Measured again once the outbox was presized and
# page reads took no temporary: at 64 clients 24 KB gave 1-2 restarts in each of 3 runs and
# 395-714 req/s, against none and 784-837 at 32 KB, alternated. Without a threshold
# (collecting only when the heap is full): 59-175 req/s, restarts in every run.
# "gc_threshold_bytes" overrides it.
_GC_THRESHOLD_MIN_BYTES = const(4096)
_GC_RESERVE_BYTES = const(32768)
_ERROR_LOG_MS = const(10000)
_PUBLISHED_EVENTS = ("equivocation", "view_change", "view", "fetch", "transferred", "restored",
                     "epoch", "store_error")


def load_config(path=CONFIG_PATH):
    """Read the node's configuration (written by the host's image builder)."""
    with open(path) as f:
        return json.load(f)


def _copied(payload):
    """bytes(payload), or None when the heap has no piece for it."""
    try:
        return bytes(payload)
    except MemoryError:
        return None


class Runtime:
    """One node attached to the broker named in its configuration, on a board (its ``led``
    and ``watchdog``, the boot's ``reset_cause``; ``restarts`` in place before this one:
    see main())."""

    def __init__(self, config, led, watchdog, reset_cause="power-on", restarts=0):
        self.me = config["node"]
        cluster = config["cluster"]
        # Topics are bytes, as the MQTT client hands them to on_message (mqtt.py's header)
        self.prefix = b"ebft/%s/" % cluster.encode()
        self.topic_all = b"%sfrom/%d" % (self.prefix, self.me)
        self.topic_status = b"%sstatus/%d" % (self.prefix, self.me)
        self.topic_event = b"%sevent/%d" % (self.prefix, self.me)
        self.topic_ctl = b"%sctl/%d" % (self.prefix, self.me)
        self.topic_req = b"%sreq/" % self.prefix
        self.faults = Faults(self.me, unhexlify(config["control_key"]))
        self.status_interval_ms = config.get("status_interval_ms", STATUS_INTERVAL_MS)
        args = (self.me, Stake(config["stake"]), [unhexlify(k) for k in config["keys"]],
                unhexlify(config["client_secret"]))
        kwargs = {"genesis": config.get("genesis"),
                  "checkpoint_interval": config.get("checkpoint_interval", rp.CHECKPOINT_INTERVAL),
                  "batch_max": config.get("batch_max", 16),
                  "pipeline_max": config.get("pipeline_max", 4),
                  "view_timeout_ms": config.get("view_timeout_ms", 1000),
                  # State's options: page counts, cache_pages, policy ("lru", "lfu", "fifo"),
                  # cache_bytes
                  "store": config.get("store"), "flash": store.Flash()}
        # Boots counted in flash (this one included): a host tells a node that booted again (a
        # reset, a crash, a watchdog) from one that merely went quiet, whatever its uptime.
        self.boots = store.load_int(BOOTS_PATH) + 1
        store.save_int(self.boots, BOOTS_PATH)
        saved = store.load()
        if saved is None:
            replica = rp.Replica(*args, **kwargs)
        else:
            replica = rp.Replica.restore(saved, *args, **kwargs)
        self.clock = board.Clock().now  # ms since boot, never wrapping
        # "detector": Detector's keyword arguments (threshold as phi * 100, window, min_std_ms,
        # pause_ms).
        self.node = Node(replica, self.status_interval_ms, config.get("detector"))
        broker = config["broker"]
        self.mqtt = MQTTClient(
            "ebft-%s-%d" % (cluster, self.me), broker["host"], broker.get("port", 1883),
            keepalive=config.get("keepalive_s", 10), **login_of(broker), will=self.will,
            on_message=self.on_message,
            max_packet=messages.MESSAGE_BYTES_MAX + _MQTT_HEADER_BYTES_MAX,
            rx_chunk=_MQTT_BUFFER_BYTES + _MQTT_HEADER_BYTES_MAX, tx_max=_MQTT_BUFFER_BYTES)
        self.senders = (self.send_all, self.send_to, self.send_reply)  # bound once: route()
        self.heap_peak = 0
        # Bytes allocated between collections: run_lives sets it unless the config does.
        self.gc_threshold = config.get("gc_threshold_bytes") or 0
        self.led = led
        self.reset_cause = reset_cause
        self.restarts = restarts    # in-place restarts after a MemoryError (run_lives)
        self.watchdog = watchdog
        self.stable = False         # ran board.STABLE_MS (its boot did not crash)
        self.conn = 0               # connection attempts to the broker in this boot
        self.status_seq = 0         # statuses published on the current connection
        self.status_skipped = 0
        self.errors_logged = 0      # node.counts["errors"] when log_errors() last printed ...
        self.error_logged_ms = -_ERROR_LOG_MS  # ... and when

    def will(self):
        """The Last Will of the connection about to be made: OFFLINE for it, which peers
        take only while no later connection of ours spoke (MQTTClient calls this per attempt)."""
        self.conn += 1
        self.status_seq = 0
        return self.topic_status, self.node.will_wire(self.boots, self.conn), True, 0

    def sender(self, topic):
        """The replica the last level of ``topic`` names, or -1 when it names none of the
        cluster's (digits only: no sign, no spaces)."""
        tail = topic[topic.rfind(b"/") + 1:]
        if not 0 < len(tail) <= 3 or not tail.isdigit():
            return -1
        j = int(tail)
        return j if j < self.node.replica.stake.n else -1

    def on_message(self, topic, payload, retain):
        # Runs per message: this and the helpers it calls for the common cases keep their
        # frames within 11 slots (protocol/cbor.py's header), off the heap.
        if topic == self.topic_ctl:
            self.on_control(payload)
            return
        j = None  # a client's request
        if not topic.startswith(self.topic_req):
            j = self.sender_to_deliver(topic, payload)
            if j < 0:
                return
        self.deliver(payload, j)  # a request, or a replica's: .../from/<j>, .../to/<me>/from/<j>

    def on_control(self, payload):
        command = self.faults.on_control(bytes(payload))
        self.node.skew_ms = self.faults.skew_ms
        self.mqtt.publish(self.topic_event, cbor.encode(["control", command or "rejected"]))

    def sender_to_deliver(self, topic, payload):
        """The replica whose protocol message on ``topic`` is left for deliver(); -1 when
        nothing is left to do with it: a topic that names no replica of the cluster
        (dropped), our own status echoed, a fault's loss, or a status (handed to the node
        here)."""
        j = self.sender(topic)
        if j < 0:
            self.node.drop("bad topic")
            return -1
        if j == self.me or self.faults.drop(j):
            return -1
        if topic.startswith(b"status", len(self.prefix)):  # .../status/<j>
            # a retained one too: it starts the clock of a peer silent since before we
            # subscribed
            self.node.peer_status(payload, j, self.clock())
            self.drain()
            return -1
        return j

    def deliver(self, payload, j):
        """Hand a request (``j`` None) or replica j's message to the node, then publish what
        it outputs."""
        wire = _copied(payload)
        if wire is None:  # no piece for the copy: the message is lost, as on the network
            self.node.drop("no heap to receive")
            return
        self.node.message(wire, j, self.clock())  # MemoryError: main() restarts us
        self.drain()

    def send_all(self, wire):
        faults = self.faults
        if not (faults.drop_permille and faults.drop_peers is None and faults.drop(-1)):
            self.send(self.topic_all, wire)

    def send_to(self, j, wire):
        if not self.faults.drop(j):
            self.send(b"%sto/%d/from/%d" % (self.prefix, j, self.me), wire)

    def send_reply(self, client, wire):
        """Publish a reply on its client's topic."""
        self.send(b"%srep/%d" % (self.prefix, client), wire)

    def send(self, topic, wire):
        """Publish, unless a delay fault holds the message back (Faults.release sends it)."""
        if not self.faults.hold(self.clock(), topic, wire):
            for _ in range(self.faults.copies()):
                self.mqtt.publish(topic, wire)

    def log_errors(self):
        """One line for the messages that raised since the last one, at most every
        _ERROR_LOG_MS (a flood of bad input must not become a flood of log lines)."""
        errors = self.node.counts["errors"]
        clock = self.clock()
        if errors != self.errors_logged and clock - self.error_logged_ms >= _ERROR_LOG_MS:
            print("dropped %d message(s) that raised; last: %s" % (
                errors - self.errors_logged, self.node.error))
            self.errors_logged = errors
            self.error_logged_ms = clock

    def drain(self):
        """Persist what must survive a crash, then publish the node's outputs (write-ahead):
        the replica's messages and events, the detector's suspicions."""
        r = self.node.replica
        if r.dirty:
            store.save(r.durable())
        self.faults.misbehave(r)
        rp.route(r.out, *self.senders)
        if r.events:  # (helpers: drain runs per message, and a for loop over events would
            self.publish_events(r.events, _PUBLISHED_EVENTS)  # take its frame to the heap)
        if self.node.detector.events:
            self.publish_events(self.node.detector.events, None)

    def publish_events(self, events, kinds):
        """Publish the events whose kind is in ``kinds`` (None: every one), then forget them
        all."""
        for event in events:
            if kinds is None or event[0] in kinds:
                self.mqtt.publish(self.topic_event, cbor.encode(list(event)))
        del events[:]

    def status(self):
        """The status map published on ebft/c/status/i (CBOR, canonical): the node's, and
        the heap, the transport and the faults here."""
        gc.collect()
        used = gc.mem_alloc()
        if used > self.heap_peak:
            self.heap_peak = used
        clock = self.clock()
        status = self.node.status(clock)
        status["node"] = self.me
        status["heap_used"] = used
        status["heap_free"] = gc.mem_free()
        status["heap_peak"] = self.heap_peak
        status["gc_threshold"] = self.gc_threshold
        status["mqtt_rx"] = self.mqtt.rx_msgs
        status["mqtt_tx"] = self.mqtt.tx_msgs
        status["mqtt_dropped"] = self.mqtt.tx_dropped
        status["reconnects"] = self.mqtt.reconnects
        status["uptime_ms"] = clock
        status["boots"] = self.boots
        status["restarts"] = self.restarts
        status["reset_cause"] = self.reset_cause
        # Shown first: a fault injected since the last tick is already in "faults" below.
        self.led.show(self.led_state(), clock)
        status["led"] = self.led.state
        status["status_skipped"] = self.status_skipped
        status["faults"] = self.faults.describe()
        status["fault_dropped"] = self.faults.dropped
        status["ctl_rejected"] = self.faults.rejected
        return status

    async def report(self):
        while True:
            try:
                self.status_seq += 1
                wire = self.node.status_wire(self.boots, self.conn, self.status_seq,
                                             self.status())
                self.mqtt.publish(self.topic_status, wire, retain=True)
            except MemoryError:
                self.status_skipped += 1  # a fragmented heap: try again next interval
            await asyncio.sleep_ms(self.status_interval_ms)

    async def timers(self):
        """Tick the node (its timers, the failure detector; told whether the broker link is
        up), release held messages, feed the watchdog and show the node's state on the
        LED."""
        while True:
            clock = self.clock()
            self.node.tick(clock, self.mqtt.connected)
            self.drain()
            self.log_errors()
            self.faults.release(clock, self.mqtt.publish)
            self.watchdog.feed()
            self.led.show(self.led_state(), clock)
            if not self.stable and clock >= board.STABLE_MS:
                self.stable = True
                board.stable()
            await asyncio.sleep_ms(TICK_MS)

    def led_state(self):
        """"connecting" without the broker; "fault" with a fault injected, or a store that
        failed verification at boot until a stable checkpoint replaced it; else "primary" or
        "backup"."""
        if not self.mqtt.connected:
            return "connecting"
        replica = self.node.replica
        if self.faults.injected() or (replica.state.error and replica.state.h < 0):
            return "fault"
        return "primary" if replica.primary() == self.me else "backup"

    async def run(self):
        # The client connects, reconnects with back-off and re-subscribes by itself; a
        # subscription not acknowledged in time (a broker that is slow to start) is retried.
        link = asyncio.create_task(self.mqtt.run())
        await asyncio.sleep_ms(0)  # let the link task start
        peers = [b"from/%d" % j for j in range(self.node.replica.stake.n) if j != self.me]
        for topic in peers + [b"req/+", b"to/%d/from/+" % self.me, b"ctl/%d" % self.me,
                              b"status/+"]:
            await self.mqtt.subscribe_retrying(self.prefix + topic)
        print("edgebft node %d up: %d replicas, broker %s:%d%s" % (
            self.me, self.node.replica.stake.n, self.mqtt.host, self.mqtt.port,
            " over TLS" if self.mqtt.tls else ""))
        # Whichever of the three ends, by an exception (a MemoryError: main restarts the
        # node), ends the node. Started and left alone, a timers task that ran out of heap
        # died by itself ("Task exception wasn't retrieved"): the node went on with no ticks
        # (no retransmission, no view-change timer), and asyncio's context for that message
        # held the dead task, so the whole node, into the next life, whose restore then ran
        # out of heap at every try.
        await asyncio.gather(link, asyncio.create_task(self.report()),
                             asyncio.create_task(self.timers()))


def main():
    """Run the node for good (run_lives), on the board that main.py booted."""
    config = load_config()
    led = board.Led(config.get("led"))
    if config.get("wifi") and board.ON_BOARD:
        from edgebft.firmware import wifi
        wifi.connect(config["wifi"], led)
    watchdog = board.Watchdog(config.get("watchdog_ms", 0))
    config = None
    cause = board.reset_cause()
    run_lives(lambda restarts: Runtime(load_config(), led, watchdog, cause, restarts))


def run_lives(build):
    """Run node after node for good: ``build(restarts)`` makes one (a Runtime, restored from
    flash after the first), and each runs until a MemoryError anywhere (a heap too fragmented
    for one more allocation, in building it too). Then the node restarts in place, as a
    board's reset would but in the same process (the modules stay loaded): every object of
    the old node is dropped, and the next is restored from flash like after a crash (a new
    boot for its peers; ``restarts`` in its status counts these)."""
    restarts = 0
    while True:
        _live(build, restarts)
        asyncio.new_event_loop()  # the old node's tasks go with the old loop
        restarts += 1


def _live(build, restarts):
    """One life of a node, built and run in its own frame, which is gone before the next
    is built: the collector scans a frame's value stack whole, stale slots included, and a
    slot left from running the old node can keep all of it alive (seen on the Unix port in
    a loop that built and ran a node in one frame). Running out of heap while building is
    a restart too: when main() built the node outside its handler, that MemoryError ended
    the process (a node gone for good, in a restore under 256 clients)."""
    gc.threshold(_GC_THRESHOLD_MIN_BYTES)
    try:
        node = build(restarts)
        gc.collect()
        node.gc_threshold = node.gc_threshold or max(_GC_THRESHOLD_MIN_BYTES,
                                                     gc.mem_free() - _GC_RESERVE_BYTES)
        gc.threshold(node.gc_threshold)
        asyncio.run(node.run())
    except MemoryError as e:
        # run() dropped the broker link on its way out (peers get our Will)
        gc.collect()  # what was free, in pieces too small: the heap's fragmentation
        print("out of memory (%d bytes free after collection): restarting from flash"
              % gc.mem_free())
        sys.print_exception(e)
