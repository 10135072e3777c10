# A node: one replica, its failure detector and the policy that joins them. A board runs it
# (firmware/runtime.py only moves bytes between MQTT and it) and so does the simulator
# (host/sim/simulator.py), so the seeds exercise the policy the boards run.
#
# Rules:
# - Sans-I/O. Inputs: message(wire, sender, clock), peer_status(wire, peer, clock) and
#   tick(clock), where clock is the node's monotonic clock in ms (since boot) and
#   sender the replica a message came from (None: a client's request). Outputs: the replica's
#   `out` and `events` and the detector's `events`, which the driver routes and empties after
#   each input.
# - Time: the replica runs on clock + skew_ms (an injected clock fault); the detector measures
#   durations on the clock itself, which a skew offsets but does not speed up.
# - Heartbeats: a peer's status messages (HEARTBEAT, every status interval) feed the
#   detector; its OFFLINE (the Last Will the broker publishes for it) suspects it at once. Any
#   message from a suspected peer is a heartbeat too: a node that was cut off itself must not
#   go on suspecting the primary of a view it just installed until that primary's next status.
# - A status is trusted only when authentic (tagged with the peer's keys, as protocol
#   messages are) and fresh: stamped (boot, conn, seq), its boot count, its connection to the
#   broker in that boot and its status number in that connection, newer than the peer's last
#   one taken. A Last Will names the connection it was left with (prepared at connect time)
#   and counts unless a later connection already spoke. So a forged status, a replayed one,
#   or the Last Will of an earlier boot or connection changes no suspicion; each is counted in
#   "status_rejected". Boot counts live on the node's flash: a node whose flash is wiped
#   starts again from boot 0, and its peers take its statuses again once they restart.
# - Stall gate: a tick _STALL_MS or more after the previous one means the node itself stood
#   still (a SIGSTOP, a long flash write): that time counts for none of the replica's timeouts
#   nor the detector's, so what the peers sent meanwhile is read before they are judged. Never
#   two ticks in a row: a node that is merely slow still times out. A tick while the driver's
#   link is down (tick(clock, linked=False): a broker outage) does nothing, so the outage
#   is such a stall too; and for _RELINK_GRACE_MS after the link is back neither the
#   detector nor the replica's view-change timer judges anyone, and no suspicion, not even one
#   a Last Will raised, starts a view change: the peers come back over their reconnect
#   back-off. (A broker that shuts down publishes every client's Will: a primary that
#   reconnected last was still suspected when its backups were back, and they left it.)
# - Suspicion gate: a suspected primary starts a view change (Replica.suspect) only when
#   requests wait and nothing executed for _NO_PROGRESS_MS: a primary that a lossy link hides
#   from our detector while the cluster goes on (an omission fault) is not worth leaving the
#   others for, alone in a higher view. Checked after every heartbeat and tick, in each view.
# - No input stops a node: an exception the replica raises on a message (other than
#   MemoryError, which is the heap's and not the input's: the runtime restarts the node from
#   flash; the replica handles it only where it had changed nothing: serving a FETCH, or
#   building a wire to send, which is then lost as the network may lose it) drops
#   that message, is counted in "errors" and kept in `error` (its type and text) for the
#   status. The simulator turns this off (contain=False): there an exception is a bug to
#   report, not an input to survive.
# - counts: "stalls" (ticks that found a stall), "suspicions" (view changes the detector
#   started) and "errors": the simulator's seeds and the status report them.
# - Memory: fixed; `checkpoints` keeps the newest _CHECKPOINTS_KEPT executed [seq, digest].
# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import int, len, memoryview, range, type

try:
    from micropython import const
except ImportError:  # CPython
    const = int

from . import auth
from . import messages as m
from .detector import Detector
from .viewchange import NORMAL, VIEW_CHANGE

TICK_MS = const(20)
STATUS_INTERVAL_MS = const(500)  # the default heartbeat (status) interval
_STALL_MS = const(100)
# After the link comes back, peers reconnect over up to a second (their back-off) and report
# within a status interval after: judge none of them before this long.
_RELINK_GRACE_MS = const(2000)
_NO_PROGRESS_MS = const(50)
_CHECKPOINTS_KEPT = const(4)


def fresh_stamp(last, msg):
    """The stamp to keep for a peer after its authentic HEARTBEAT or OFFLINE ``msg`` when it
    is fresh after ``last`` (the stamp kept so far, None for none), else None. A heartbeat's
    stamp is (boot, conn, seq) and must grow; a Will counts unless a later connection spoke,
    and closes its connection: what it stamps, (boot, conn + 1, -1), is above every status of
    that connection and below every status of the next."""
    if msg.kind == m.HEARTBEAT:
        stamp = (msg.boot, msg.conn, msg.seq)
        return stamp if last is None or stamp > last else None
    if last is None or (msg.boot, msg.conn) >= (last[0], last[1]):
        return (msg.boot, msg.conn + 1, -1)
    return None


class Node:
    """``replica`` (protocol/replica.py) watched by a phi-accrual detector of its peers
    (``detector``: Detector's keyword arguments; the first heartbeat's seeds assume
    ``status_interval_ms``). ``clock``: the clock at creation (ms). ``contain``: survive an
    exception a message raises (see the rules above)."""

    def __init__(self, replica, status_interval_ms, detector=None, clock=0, contain=True):
        self.replica = replica
        self.detector = Detector(replica.stake.n, replica.me, first_ms=status_interval_ms,
                                 **(detector or {}))
        self.skew_ms = 0
        self.before = clock     # the clock at the previous tick
        self.unlinked = False   # did a tick find the link down since the last tick that ran?
        self.judge_from = clock  # the detector judges no peer before this clock
        self.stalled = False    # did the previous tick find a stall?
        self.executed = replica.last_exec  # the replica's last_exec when it last moved ...
        self.progress_ms = clock           # ... and when (clock)
        self.checkpoints = []   # [[seq, digest]], the newest _CHECKPOINTS_KEPT executed
        self.counts = {"stalls": 0, "suspicions": 0, "errors": 0, "status_rejected": 0}
        self.stamps = [None] * replica.stake.n  # peer -> (boot, conn, seq) last taken
        self.contain = contain
        self.error = None       # the last exception a message raised: "Type: text"

    def message(self, wire, sender, clock):
        """A protocol message (``sender``: the replica whose topic it came on) or a client's
        request (``sender`` None)."""
        d = self.detector
        assert sender is None or 0 <= sender < d.n  # the driver names only replicas
        if sender is not None and d.suspect[sender]:
            d.heartbeat(sender, clock)
        try:
            self.replica.receive(wire, clock + self.skew_ms)
        except MemoryError:
            raise  # the heap's, not the input's: the runtime restarts the node from flash
        except Exception as e:
            if not self.contain:
                raise
            self.counts["errors"] += 1
            self.error = "%s: %s" % (type(e).__name__, e)
        self._note_events()

    def drop(self, reason):
        """Count an input the driver dropped before the replica saw it (a topic that names no
        replica of the cluster, say), with the replica's own drops, by reason."""
        self.replica._drop(reason)

    def status_wire(self, boot, conn, seq, status):
        """Our heartbeat: the status map ``status``, stamped and authenticated for every
        peer. ``seq`` grows with every status of connection ``conn`` of boot ``boot``."""
        r = self.replica
        return m.wire(r.macs, m.HEARTBEAT, r.me, boot, conn, seq, status)

    def will_wire(self, boot, conn):
        """Our Last Will for connection ``conn`` of boot ``boot`` (set when it connects)."""
        r = self.replica
        return m.wire(r.macs, m.OFFLINE, r.me, boot, conn)

    def peer_status(self, wire, peer, clock):
        """A message on ``peer``'s status topic (any bytes, or a memoryview read during the
        call only): its heartbeat or its Last Will, taken only when authentic, from ``peer``
        and fresh (see the rules above). Its tags, one per replica, end it: the tag for us is
        checked over the bytes before them, then only the stamp is decoded (the status map
        of a heartbeat, ~850 B, is the host's): nothing the size of the message is allocated."""
        r = self.replica
        assert 0 <= peer < r.stake.n and peer != r.me  # the driver names only peers
        view = memoryview(wire)
        end = len(view) - auth.TAG_BYTES * r.stake.n
        msg = None
        if 0 < end and len(view) <= m.MESSAGE_BYTES_MAX and auth.check(
                view[end:], r.me, r.macs[peer], view[:end]):
            try:
                msg = m.decode_stamp(view[:end])
            except m.MessageError:
                pass
        if msg is None or msg.sender != peer:
            self.counts["status_rejected"] += 1
            return
        stamp = fresh_stamp(self.stamps[peer], msg)
        if stamp is None:
            self.counts["status_rejected"] += 1  # a replay, or overtaken
            return
        self.stamps[peer] = stamp
        if msg.kind == m.HEARTBEAT:
            self.detector.heartbeat(peer, clock)
        else:
            self.detector.offline(peer, clock)
        self._detected(clock)

    def tick(self, clock, linked=True):
        """Every TICK_MS: the stall gate, the replica's timers and the detector. ``linked``:
        the driver's link to its peers (the broker connection) is up. Without it nothing
        runs: a node that hears nobody cannot judge its peers, so an outage is a stall (the
        first tick after it finds the gap), not a reason to suspect the primary and change
        views alone."""
        if not linked:
            self.unlinked = True
            return
        r = self.replica
        if self.unlinked:  # back: the cluster reassembles before anyone is blamed
            self.unlinked = False
            self.judge_from = clock + _RELINK_GRACE_MS
            r.stalled(_RELINK_GRACE_MS)
        gap = clock - self.before
        assert gap >= 0  # the clock is monotonic
        self.before = clock
        self.stalled = not self.stalled and gap >= _STALL_MS
        if self.stalled:
            self.counts["stalls"] += 1
            r.stalled(gap)
            self.detector.stalled(gap, clock)
        now = clock + self.skew_ms
        if now >= r.next_timer():
            r.tick(now)
            self._note_events()
        if clock >= self.judge_from:
            self.detector.check(clock)
        self._detected(clock)

    def _detected(self, clock):
        """Start a view change if the primary is suspected and the replica is stuck."""
        r = self.replica
        if r.last_exec != self.executed:
            self.executed = r.last_exec
            self.progress_ms = clock
        if (self.detector.suspect[r.primary()] and r.status == NORMAL and r.waiting
                and clock - self.progress_ms >= _NO_PROGRESS_MS and clock >= self.judge_from):
            r.suspect(clock + self.skew_ms)
            if r.status == VIEW_CHANGE:
                self.counts["suspicions"] += 1
            self._note_events()

    def _note_events(self):
        """Keep the checkpoints the replica executed since (its events stay for the driver,
        which may call this again before it empties them: each checkpoint is kept once).
        Runs per message: by index, as a for loop's iterator would take its frame over 11
        slots (cbor.py's header), to the heap."""
        events = self.replica.events
        i = 0
        while i < len(events):
            self._note(events[i])
            i += 1

    def _note(self, event):
        kept = self.checkpoints
        if (event[0] == "executed" and event[1] % self.replica.K == 0
                and (not kept or event[1] > kept[-1][0])):
            kept.append([event[1], event[2]])
            if len(kept) > _CHECKPOINTS_KEPT:
                kept.pop(0)

    def status(self, clock):
        """The protocol's part of the node's status map (the driver adds its own: heap,
        transport, faults)."""
        r = self.replica
        return {
            "view": r.view, "status": r.status, "view_changes": r.counts["view_changes"],
            "primary": r.primary(), "seq": r.seq, "last_exec": r.last_exec,
            "digest": r.ledger.digest, "stable": r.h, "checkpoints": self.checkpoints,
            "rx": r.counts["rx"], "tx": r.counts["tx"],
            "executed_requests": r.counts["executed_requests"], "drops": r.drops,
            "pending": len(r.pending), "slots": len(r.live_slots()),
            "store": r.state.counts(), "transfer_bytes": r.counts["transfer_bytes"],
            "fetching": None if r.transfer is None else r.transfer.seq,
            "recovering": r.recovering(),
            "stalls": self.counts["stalls"], "suspicions": self.counts["suspicions"],
            "status_rejected": self.counts["status_rejected"],
            "errors": self.counts["errors"], "error": self.error,
            "phi": [self.detector.phi(j, clock) for j in range(r.stake.n)],
        }
