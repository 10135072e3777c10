# The PBFT replica (Castro and Liskov, TOCS 2002; shared/PBFT-NOTES.md gives the rules cited).
#
# Rules:
# - Sans-I/O: receive(wire, now_ms), tick(now_ms) and suspect(now_ms) are the only inputs.
#   Outputs accumulate in self.out as (dest, wire) pairs and events in self.events as tuples;
#   the caller drains both after every call, the outbox with route(), which names each
#   destination: every other replica (TO_ALL), replica j (j >= 0) or client c (to_client(c),
#   an int too: no allocation per reply). next_timer() says when tick() is next due.
# - Peer input never raises and never trips an assert: a check drops it and counts why in
#   self.drops. Asserts guard only our own invariants.
# - Every quorum is by stake (stake.Stake): "2f+1" is more than 2/3 of stake, "f+1" more
#   than 1/3 (PBFT-NOTES preamble).
# - Normal case N1-N7 here; view change V1-V2, VC1-3, ACK1-4, NV1-3, BV1-4, AF1-3 in
#   viewchange.py (ViewChanging, beside the decision procedure); timers T1-T5 (doubling);
#   STATUS as a negative acknowledgement (RT1-2); state transfer of a stable checkpoint in
#   parts streamed from flash in transfer.py (StateTransfer; state.py: only the pages that
#   differ from ours). Replica is those two mixins plus this file: one object, one state.
# - Status (self.status): NORMAL, or VIEW_CHANGE from sending VIEW-CHANGE until a NEW-VIEW is
#   installed; it moves only by ViewChanging._to, which checks viewchange._NEXT_STATUS. A
#   state transfer (self.transfer) and recovery after a restore (recovering()) are not
#   statuses: either may run in both (a view change may wait for the state it starts from;
#   a restored replica changes views while it may not vote on what it voted before).
# - The executed state lives on flash (state.State: the ledger's pages, the client table's
#   pages, checkpoint records): RAM holds page caches, whatever the number of keys or clients.
#   Pages a batch changes stay in the cache until it evicts them or the next checkpoint
#   writes them (nothing above the stable checkpoint survives a restart, so a page needs to
#   reach flash only before the record that names it); a checkpoint writes its record (its digest
#   covers both stores' incremental digests, so taking it reads no page); a stable checkpoint
#   is committed on flash, and only it survives a restart. A request from a client the
#   table has no room for (a page of it holds CLIENT_PAGE_ENTRIES_MAX others) executes as
#   [False, "client table full"] and is not recorded, the same on every replica.
# - A replica that lags executes a sequence number on a commit certificate (matching
#   commits over 2/3 of stake in its view) plus a batch that hashes to the certified digest,
#   even without its own prepare: the certificate proves correct replicas prepared it.
#   So does a replica left alone in a view change while the others go on in a lower view
#   (self.left: the view it left, or a higher one the others installed without it): in a
#   view change its log holds nothing else, so it collects there the commits of that one
#   view (commits of different views prove nothing together; a commit of a higher one
#   clears the log and moves self.left up), its peers answer its STATUS with their commits
#   and batches, and it votes on nothing. Its VIEW-CHANGE stays true, so it is ready when the
#   others change view; installing a view clears the log. Without this it caught up only by
#   state transfer at each checkpoint (still its way if a Byzantine peer moves self.left
#   past the others' view: one commit does that).
# - Crash recovery (PBFT-NOTES RC3, the "bound" variant): durable() holds the view entered
#   and the stable checkpoint, and whether it was still changing to that view (then from
#   which); the flash holds the stable state. durable() changes when a view change starts,
#   when a view installs and at each checkpoint (bounded flash writes). A restored replica
#   never votes in its persisted view for a sequence number up to h + window, the most it may
#   have voted on before the crash; restored in a view change, it resumes it.
# - Write-ahead of P (RC3 (b), its P entries only): a replica appends each P entry it makes
#   (seq, digest, view) to PREPARED_LOG on flash before the COMMIT that follows it leaves, and
#   a restore puts the entries above h back in its oplog; the log is rewritten with those
#   entries at each stable checkpoint, and when appends make it longer than
#   _PREPARED_LOG_BYTES_MAX. So a restart (a crash, or the in-place one after a MemoryError)
#   no longer makes its VIEW-CHANGE omit what it prepared: a request that committed was
#   prepared by replicas with over 2/3 of stake, and every VIEW-CHANGE quorum meets one of
#   them that reports it (A1). Without it, two replicas restarting together on a fragmented
#   heap while a third recovered from a crash were more than f amnesic replicas, and the
#   emulated cluster executed two different batches at one sequence number (bench --clients
#   64 --nemesis crash,broker-restart,oom). Q entries and COMMITs are not logged, so a
#   restored replica still votes on nothing up to h + window in its persisted view.
# - Epochs (DESIGN.md section 3): the validator set is the ledger's, put in force at a
#   checkpoint B by Ledger.end_epoch(); every correct replica switches at the same B. The sets
#   of the sequence numbers in the window are kept (self.sets); the set of sequence number s
#   is the one in force after the last epoch start below s, and a view installed from
#   checkpoint L runs under the set in force after L (self.vstake). A view installed from
#   below B (self.view_low < self.ledger.since) is "frozen": it ends the old epoch. No replica
#   executes past B in it, and no correct replica votes past a checkpoint it has not executed
#   (_may_vote), so in a view of the old set nothing past B prepares, commits or executes,
#   and the sequence numbers of the two sets never meet in one certificate. A replica that
#   executed B stays in the frozen view, voting under the old set for what the others still
#   lack, until B is stable; then it starts the view change, and the new view (from checkpoint
#   B, which over 2/3 of the old stake hold) runs the new epoch. A NEW-VIEW is judged by the
#   set in force at its checkpoint, so replicas on both sides of B judge it alike.
# - Slashing: a replica that sees its primary equivocate (two pre-prepares for one slot, or
#   its pre-prepare contradicted by prepares carrying over 1/3 of stake) accuses it with a
#   request from its own client id REPLICA_CLIENT_BASE + me, authenticated like a replica
#   message; the ledger slashes once accusers hold over 1/3 of stake (ledger.py).
# - Memory is bounded by the window: the log is a ring of 2K slots in preallocated arrays
#   (protocol/log.py); batch bodies are kept until stable on flash (log.Oplog), and RAM holds
#   only the batches of sequence numbers not yet executed (pipeline_max of them from a
#   correct primary, at most the window's from any).
import hashlib

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import bytes, int, len, list, max, min, range, sorted, sum, tuple, type

try:
    from micropython import const
except ImportError:  # CPython
    const = int  # CPython: const(x) is x

from . import auth, cbor
from . import messages as m
from .ledger import Ledger
from .log import Log, Oplog, stake_of
from .spill import Spill
from .stake import Stake
from .state import CLIENT_PAGE_ENTRIES_MAX, State
from .transfer import StateTransfer
from .viewchange import NORMAL, VIEW_CHANGE, ViewChanging

TO_ALL = -1
_CLIENT_BASE = const(-2)  # the destination of client c is _CLIENT_BASE - c


def to_client(client):
    """The outbox destination of a reply to ``client``."""
    return _CLIENT_BASE - client


def is_client(dest):
    return dest <= _CLIENT_BASE


def route(out, send_all, send_replica, send_client):
    """Empty the outbox ``out``, handing each wire to its destination's sender:
    send_all(wire), send_replica(j, wire) or send_client(c, wire). The one decoder of
    destinations (to_client() encodes a client's). Runs per message: by index, not a for
    loop, whose iterator would take its frame to the heap (cbor.py's header)."""
    i = 0
    while i < len(out):
        dest = out[i][0]
        if dest == TO_ALL:
            send_all(out[i][1])
        elif dest >= 0:
            send_replica(dest, out[i][1])
        else:
            send_client(_CLIENT_BASE - dest, out[i][1])
        i += 1
    del out[:]


def _decoded(wire):
    """m.decode(wire); None when it is no valid message, False when the heap has no piece
    for its decoding (a fragmented heap: the message is lost, as the network may lose it)."""
    try:
        return m.decode(wire)
    except m.MessageError:
        return None
    except MemoryError:
        return False


# K. PBFT-NOTES suggests 32; measured on the 64-bit Unix port at -X heapsize=100k, K = 32
# (a window of 64) runs out of heap during a view change, and so does K = 16 now and then
# under repeated primary crashes; K = 8 does not (tools/bench_memory.py: bytes per K).
CHECKPOINT_INTERVAL = 8
_PENDING_MAX = const(16)          # primary: requests waiting for a batch (then clients retry)
# Requests seen and not executed (view-change timer, T1), one per client. The primary's
# overflow beyond _PENDING_MAX waits on flash (spill.py), in arrival order: while it holds
# any, a new request goes behind them. Refilling the queue from this table first (as it
# was) let the clients in it take every free slot again at once, and the others starved:
# at 256 closed-loop clients 20% of requests, sent once, passed the 2 s deadline unanswered.
# Each entry holds its request's wire (~230 bytes) until it executes: under load these are
# the node's most numerous medium-lived blocks, strewn among garbage. 64 took the heap a node
# under faults needed (bench --nemesis crash,broker-restart,oom: 8 or 9 MemoryError restarts
# a run instead of 2 or 3). 32 still fragmented it at 256 clients (bench --clients 256 --keys
# 10000, 30 s: 4-11 restarts a run, 7-11 view changes, 324-436 req/s, not live in 2 of 2
# runs, with at most 352 bytes free in one piece of 27 KB free); 8 gave 585-840 req/s with no
# restart or view change in 5 runs, and the same at 64 clients (625-715 req/s either way).
# The table is T1's sample of the requests a replica waits for: fewer entries watch fewer
# clients at once, but an entry stays until its request executes, so a request the primary
# leaves out holds its entry and its timer runs out.
_WAITING_MAX = const(8)
_REQUEST_BYTES_MAX = const(256)   # a request wire (a batch holds at least one)
# The request bytes a batch holds. Bodies in RAM took a budget of 4 KB for the window (341
# bytes a batch). On flash (bench --clients 64 --keys 10000, tmpfs, 160 KB heap, 3 runs each):
# 682 bytes: 842-848 req/s against 710-728, 0.49-0.53 ms of CPU per commit against 0.56-0.63
# (5.1 messages per commit, not 5.9); 1,024 and 1,365 bytes ran nodes out of heap in 4 runs
# of 6, failing to allocate ~1.1 KB at once with 20-31 KB free in pieces.
_BATCH_BYTES_MAX = const(682)
_STATUS_MS = const(100)           # retransmission period (RT1: at most once per 100 ms)
_IDLE_STATUS_TICKS = const(10)    # an idle replica's STATUS period, in retransmission periods
_CATCH_UP_MAX = const(8)          # sequence numbers answered per STATUS
_HEARD_MS = const(500)            # a replica heard from within this long is in reach
_PRE_PREPARE_OVERHEAD_BYTES = const(128)
PREPARED_LOG = "P"                # the P entries written ahead (see the header)
_PREPARED_LOG_BYTES_MAX = const(4096)
# The outbox's capacity, allocated with the replica: what one input outputs when it executes
# pipeline_max batches of batch_max requests (a reply each) with their votes. A list keeps
# its capacity when emptied (route's del out[:]), so the outbox grew once a life, under load:
# at 256 clients its step from 64 to 128 entries wanted a 1 KB block the heap did not have
# (an out-of-heap restart in _send_reply).
_OUTBOX_PRESIZED = const(128)
REPLICA_CLIENT_BASE = 0xF000  # replica i's own client id (its accusations) is this + i


# The encoding's start of a read's op, ["read", the read]: an array of two, then "read".
_READ_HEAD = b"\x82\x64read"


def _is_read(op):
    """Is ``op`` a read-only request's (["read", the read])?"""
    return type(op) is list and len(op) == 2 and op[0] == "read"


def batch_digest(batch):
    """The digest a pre-prepare carries: SHA-256 of the CBOR array of request wires (encoded
    in cbor's scratch: a batch's ~700 bytes in one piece were what a fragmented heap lacked)."""
    return hashlib.sha256(cbor.encode_transient(batch)).digest()


def _request_head(wire):
    """(client, timestamp) that a request ``wire`` starts with, [version, kind, client,
    timestamp, ...], decoded but not checked; None when its head is not a request's."""
    try:
        fields = cbor.decode_uints(wire, 4)[0]
    except cbor.DecodeError:
        return None
    return (fields[2], fields[3]) if len(fields) == 4 and fields[1] == m.REQUEST else None


def presized(n):
    """An empty dict whose table already holds ``n`` entries. MicroPython never shrinks a
    dict's table on delete, so a long-lived table allocated once at start does not grow
    in steps later, when a fragmented 100 KB heap may have no block that large."""
    d = {}
    for i in range(n):
        d[-1 - i] = None
    for i in range(n):
        del d[-1 - i]
    return d


def presized_list(n, filler):
    """An empty list whose capacity already holds ``n`` items (``filler``: one of their type,
    for the type checker): MicroPython keeps a list's capacity when it is emptied, so it
    never grows in steps later, as presized() for a dict."""
    items = [filler] * n
    del items[:]
    return items


def client_key(client_secret, client):
    """The key client ``client`` shares with the replica whose client secret is given."""
    return bytes(auth.ClientKeys(client_secret).derive(client))


class Replica(ViewChanging, StateTransfer):
    """One PBFT replica. ``keys[j]`` is the key shared with replica j (keys[me] unused).
    ``flash`` holds its state (protocol/flash.py's interface; a new MemFlash by default): a
    flash with a stable state on it is opened and verified instead of starting from genesis.
    ``store``: State's keyword arguments (page counts, cache_pages, policy)."""

    def __init__(self, me, stake, keys, client_secret, genesis=None,
                 checkpoint_interval=CHECKPOINT_INTERVAL,
                 batch_max=16, pipeline_max=4, view_timeout_ms=1000, flash=None, store=None):
        assert 0 <= me < stake.n
        assert len(keys) == stake.n
        assert checkpoint_interval > 0
        self.me = me
        self.sets = [(0, stake)]  # (since, Stake) for the sets of the window, oldest first
        self.vstake = stake       # the set the current view runs under
        self.macs = [auth.Mac(k) for k in keys]
        self.client_keys = auth.ClientKeys(client_secret)
        self.client_mac = auth.Mac(b"")  # rekeyed per use: _client_mac
        if flash is None:  # tests and tools; a node always brings its flash (and its RAM)
            from .flash import MemFlash
            flash = MemFlash()
        self.state = State(flash, checkpoint_interval, **(store or {}))
        self.clients = self.state.clients  # client -> [timestamp, result] of its last request
        opened = self.state.open()
        self.ledger = Ledger(self.state.ledger, None if opened else genesis, stake.weights)
        self.K = checkpoint_interval
        self.window = 2 * checkpoint_interval
        self.batch_max = batch_max
        self.pipeline_max = pipeline_max
        self.view_timeout_ms = view_timeout_ms
        self.batch_bytes_max = min(m.MESSAGE_BYTES_MAX - _PRE_PREPARE_OVERHEAD_BYTES,
                                   _BATCH_BYTES_MAX)
        self.now = 0
        self.view = 0
        self.left = 0             # the view we left for the view change under way
        self.status = NORMAL      # VIEW_CHANGE between sending VIEW-CHANGE and installing the
        #                           new view; moved only by _to (viewchange.py)
        self.view_low = 0         # the checkpoint the current view was installed from
        self.accused = []         # replicas this one accused in this epoch
        self.accuse_ts = 0        # timestamp of its last accusation request
        self.contra = {}          # seq -> mask of replicas that prepared another digest
        self.caught = -1          # the last view whose primary we caught equivocating
        self.no_vote_view = -1    # after a restore: no votes in this view ...
        self.no_vote_seq = 0      # ... for sequence numbers up to this one
        self.seq = 0              # last sequence number assigned (primary)
        self.h = 0                # last stable checkpoint
        self.last_exec = 0
        self.log = Log(self.window, stake.n)
        self.oplog = Oplog(self.window, self.state.flash)  # P, Q and bodies across views, seq > h
        self.state.flash.delete(PREPARED_LOG)  # built afresh (restore reads it first)
        self.prepared_log_bytes = 0
        self.checkpoints = {}     # seq -> {replica: digest}, h < seq <= h + window
        self.ahead = {}           # replica -> (seq, digest) of its newest checkpoint beyond
        self.own_checkpoints = {}  # seq -> digest (their records are on flash)
        self.pending = []         # primary: request wires waiting for a batch
        # client -> timestamp of its request in pending or in a batch not yet executed: at
        # most _PENDING_MAX + pipeline_max * batch_max, its table sized for that at start (at
        # 256 clients it grew to 59 and 73 slots, 944 and 1,168 bytes in one piece, when
        # the heap had none: a restart)
        self.pending_ids = presized(self._pending_ids_max())
        self.spill = Spill(self.state.flash, _REQUEST_BYTES_MAX)  # primary: T1 overflow
        self.waiting = presized(_WAITING_MAX)      # client -> timestamp seen, not executed (T1)
        self.waiting_wires = presized(_WAITING_MAX)  # client -> that request's wire
        self.vc_timeout = view_timeout_ms
        self.vc_deadline = None   # view-change timer (T1-T3)
        self.vc_views = {}        # replica -> the highest view of its VIEW-CHANGEs we verified
        self.vcs = {}             # replica -> vc.ViewChange for a view not yet installed
        self.vc_digests = {}      # digest -> the one copy the ViewChanges in self.vcs share
        self.vc_wires = {}        # replica -> its VIEW-CHANGE wire (relayed on STATUS, BV2)
        self.acks = {}            # owner -> {view: {acker: vc digest}}, views >= self.view
        self.acked = {}           # owner -> vc digest acknowledged by me in self.view
        self.new_view = None      # NEW-VIEW of self.view waiting for its VIEW-CHANGEs
        self.nv_wire = None       # primary: the NEW-VIEW it sent for self.view
        self.missing = {}         # seq -> digest whose batch we lack (A3, BV5)
        self.transfer = None      # a transfer.Transfer, while fetching state
        self.fetch_full = False   # the last transfer failed its check: fetch every page
        self.serving = None       # (seq, digest, until): the checkpoint we serve, pinned
        self.status_due = 0
        self.progress_mark = 0    # last_exec at the previous tick
        self.answered = {}        # replica -> time of our last answer to its STATUS
        self.heard = [-1 << 62] * stake.n  # replica -> when we last got a message from it
        self.behind = False       # saw a message of a higher view
        self.ticks = 0            # retransmission periods so far
        self.handed_on = -1       # last_exec when we last handed on what waits (T1)
        self.dirty = True         # durable() changed since the caller last saved it
        # (destination, wire); route() empties it
        self.out = presized_list(_OUTBOX_PRESIZED, (TO_ALL, b""))
        self.events = []
        self.drops = {}
        self.counts = {"rx": 0, "tx": 0, "executed_requests": 0, "view_changes": 0,
                       "transfer_bytes": 0}
        if opened is None:
            self._checkpoint(0)
            self.state.stable(0)
            self.h = 0
        else:
            self._adopt(opened[0], opened[1])
            self.h = self.last_exec
        if self.state.error:
            self.events.append(("store_error", self.state.error))

    # ----------------------------------------------------------------- helpers

    @property
    def stake(self):
        """The set in force after last_exec (since ledger.since): the newest we know."""
        return self.sets[-1][1]

    def primary(self, view=None):
        return self.vstake.primary(self.view if view is None else view)

    def is_primary(self):
        return self.primary() == self.me

    def _drop(self, reason):
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return True

    def authenticated(self, body):
        """``body`` with our authenticator: the wire of a message from us to every replica."""
        return body + auth.authenticator(self.macs, body)

    def _emit(self, dest, wire):
        assert dest != self.me  # never to ourselves
        self.out.append((dest, wire))
        self.counts["tx"] += 1

    def _multicast(self, wire):
        self._emit(TO_ALL, wire)

    def _send(self, dest, kind, *fields):
        """Send a message of ours; one the heap has no piece for is lost, as the network may
        lose it (counted in drops), not a restart: building a wire changes nothing else."""
        try:
            wire = m.wire(self.macs, kind, self.me, *fields)
        except MemoryError:
            self._drop("no heap to send")
            return
        self._emit(dest, wire)

    def _broadcast(self, kind, *fields):
        self._send(TO_ALL, kind, *fields)

    def _client_mac(self, client):
        """Client ``client``'s Mac, used at once: the next call rekeys it for another. Not
        cached: a key derives in 0.5 us (auth.ClientKeys) and a rekey takes 4.8 us, where a
        cache of 16 Macs held 4.3 KB of heap and, at 64 clients, missed at almost every
        request (40,800 derivations on each node for 20,518 requests in 20 s)."""
        mac = self.client_mac
        mac.rekey(self.client_keys.derive(client))
        return mac

    def _authentic(self, msg):
        if msg.kind == m.REQUEST:
            j = msg.sender - REPLICA_CLIENT_BASE
            if j >= 0:
                return j < self.stake.n and auth.check(msg.auth, self.me, self.macs[j], msg.body)
            return auth.check(msg.auth, self.me, self._client_mac(msg.sender), msg.body)
        if msg.sender >= self.stake.n or msg.sender == self.me:
            return False
        return auth.check(msg.auth, self.me, self.macs[msg.sender], msg.body)

    def _in_window(self, seq):
        return self.h < seq <= self.h + self.window

    def _frozen(self):
        """True in a view installed from below the current epoch's first checkpoint."""
        return self.view_low < self.ledger.since

    def _set_at(self, seq):
        """The validator set in force after checkpoint ``seq``: that of a view installed from
        it, and of sequence number seq + 1. None if older than the sets we keep."""
        found = None
        for since, stake in self.sets:
            if since <= seq:
                found = stake
        return found

    def _may_vote(self, seq):
        """May we pre-prepare, prepare or commit ``seq`` in this view? Never past a checkpoint
        we have not executed (it may start an epoch), nor past the epoch's first checkpoint
        in a frozen view, nor what a restore forbids (RC3)."""
        if self._frozen():
            limit = self.ledger.since
        else:
            limit = (self.last_exec // self.K + 1) * self.K
        return seq <= limit and not (self.view == self.no_vote_view and seq <= self.no_vote_seq)

    def recovering(self):
        """True after a restore until every sequence number it may have voted on before the
        crash is stable. Until then it votes on nothing in its old view, so it counts toward
        f for liveness; not for safety, as its VIEW-CHANGEs carry the P entries it wrote
        ahead (PBFT-NOTES RC3)."""
        return self.h < self.no_vote_seq

    def live_slots(self):
        """Sequence numbers with a live slot (h < seq), for tests and status."""
        return self.log.live(self.h)

    # ----------------------------------------------------------------- inputs

    def receive(self, wire, now_ms):
        """Handle one message from the network (any bytes)."""
        self.now = now_ms
        self.counts["rx"] += 1
        if self._unwatched(wire):
            return
        msg = _decoded(wire)
        if not msg:
            self._drop("malformed" if msg is None else "no heap to receive")
            return
        if not self._authentic(msg):
            self._drop("unauthentic")
            return
        if msg.kind != m.REQUEST:
            self.heard[msg.sender] = now_ms
        handler = _HANDLERS.get(msg.kind)
        if handler is None:
            self._drop("unexpected type")
            return
        handler(self, msg)
        self._change_view_if_needed()
        self._check_invariants()

    def tick(self, now_ms):
        """Fire the timers due at ``now_ms``: view change (T1-T3) and retransmission (RT1)."""
        self.now = now_ms
        if self.vc_deadline is not None and now_ms >= self.vc_deadline:
            if self._connected() and not self._behind():
                self._start_view_change(self.view + 1)
            else:  # cut off, or catching up: try again later, without doubling the timeout
                self.vc_deadline = now_ms + self.view_timeout_ms
        if now_ms >= self.status_due:
            self.status_due = now_ms + _STATUS_MS
            self._retransmit()
        self._release_served(now_ms)
        self._change_view_if_needed()
        self._check_invariants()

    def stalled(self, gap_ms):
        """We did not run for the last ``gap_ms`` (the node stood still: a pause, a long flash
        write): that time counts for no timeout. The view-change timer moves on by it, so a
        replica that was frozen reads what its peers sent meanwhile before it judges them."""
        if self.vc_deadline is not None:
            self.vc_deadline += gap_ms

    def next_timer(self):
        """When tick() is next due (ms)."""
        if self.vc_deadline is not None and self.vc_deadline < self.status_due:
            return self.vc_deadline
        return self.status_due

    def suspect(self, now_ms):
        """The failure detector suspects the primary: start a view change (V1)."""
        self.now = now_ms
        if (self.status == NORMAL and not self.is_primary() and self._connected()
                and not self._behind()):
            self._start_view_change(self.view + 1)

    def _connected(self):
        """Have we heard from replicas holding over 2/3 of stake (ourselves included) lately?
        A replica cut off from a quorum cannot complete a view change; one that starts it
        alone stays above the others' view after the cut heals, out of the protocol until
        they change view too. Lately: the last _HEARD_MS. Replicas whose requests do not
        execute multicast STATUS every _STATUS_MS (RT1), so when a timer or the failure
        detector calls for a view change, the replicas in reach have been heard from."""
        since = self.now - _HEARD_MS
        heard = self.heard
        return self.stake.is_quorum(self.stake.of(
            [j for j in range(self.stake.n) if j == self.me or heard[j] >= since]))

    def _behind(self):
        """Is the cluster ahead of us: a state transfer under way, checkpoints beyond our
        window reported by replicas with over 1/3 of stake, or a checkpoint we have not
        executed that replicas with over 1/3 of stake agree on? Then our requests wait because
        we lag (a primary whose messages to us are lost still serves the others), not because
        the primary fails; we catch up by state transfer (N7) instead."""
        if self.transfer is not None or self.stake.is_weak(self.stake.of(self.ahead)):
            return True
        for seq in self.checkpoints:
            if seq > self.last_exec:
                votes = self.checkpoints[seq]
                for j in votes:
                    if self._backed(seq, votes, votes[j]):
                        return True
        return False

    def _change_view_if_needed(self):
        """After each input: leave a frozen view once the epoch's first checkpoint is stable
        (see the header), or a view whose primary we caught equivocating, at once rather than
        at a timeout."""
        if self.status == NORMAL and (self._frozen() and self.h >= self.ledger.since
                               or self.caught == self.view):
            self._start_view_change(self.view + 1)

    # ----------------------------------------------------------------- requests

    def on_request(self, msg):
        if self._answered(msg):
            return
        if len(msg.wire) > _REQUEST_BYTES_MAX:
            self._drop("request too large")
            return
        client = msg.sender
        wire = msg.wire  # shared by the waiting and pending tables
        if self._watches(client):
            self.waiting[client] = msg.timestamp  # one outstanding request per client
            self.waiting_wires[client] = wire
        if self.vc_deadline is None and self.status == NORMAL and client in self.waiting:
            # T1; on the primary the same timer makes it abdicate when its own requests do
            # not execute (libbyz's V1(c)): the backups may be stuck in another view.
            self.vc_deadline = self.now + self.vc_timeout
        if not self.is_primary() or self.status == VIEW_CHANGE:
            return
        if self.pending_ids.get(client) == msg.timestamp:
            return
        if len(self.pending) < _PENDING_MAX and not len(self.spill):
            self.pending_ids[client] = msg.timestamp
            self.pending.append(wire)
        elif not self.spill.push(wire):  # behind every request that came before it
            self._drop("pending full")  # the client sends it again
            return
        self._cut_batches()

    def _unwatched(self, wire):
        """Is ``wire`` a request that on_request would leave alone? At a backup in a normal
        view whose T1 table is full and does not hold its client, one that asks to be ordered
        (no read, not executed before). It is passed over before it is decoded or its MAC
        checked: at 64 clients that is most requests a backup receives, and reading its head
        alone took 2.6 us where decoding it took 13.9 (Unix port). Whatever follows the head
        is left unread, so a malformed one is passed over too, uncounted. Any wire that
        holds a read's op head (_READ_HEAD) anywhere is taken as a possible read and goes the
        whole way: passing over is only ever a saving."""
        if len(wire) < 3 or wire[2] != m.REQUEST:  # array head, version, kind: a byte each
            return False  # not a request: no head to decode (most messages a backup gets)
        if self.status != NORMAL or len(self.waiting) < _WAITING_MAX or self.is_primary():
            return False
        head = _request_head(wire)
        return (head is not None and head[0] not in self.waiting
                and wire.find(_READ_HEAD) < 0 and not self._executed(head[0], head[1]))

    def _watches(self, client):
        """Does T1's table hold ``client``'s request, or have room for it?"""
        return client in self.waiting or len(self.waiting) < _WAITING_MAX

    def _answered(self, msg):
        """Answer the request ``msg`` at once if it asks no ordering: a read, or one executed
        before (its reply again, or a drop for an older one). True when it is done with."""
        op = msg.op
        if _is_read(op):
            # PBFT's read-only optimisation (TOCS 2002, 5.1.3): answered at once from the
            # executed state, not ordered, touching no client table; the client accepts only
            # matching replies over 2/3 of stake, and otherwise asks again, ordered.
            op = self.ledger.read(op[1])  # its result
            self._send_reply(msg.sender, msg.timestamp, op)
            return True
        cached = self._client_entry(msg.sender)
        if cached is None or msg.timestamp > cached[0]:
            return False
        if msg.timestamp == cached[0]:
            self._send_reply(msg.sender, cached[0], cached[1])
        else:
            self._drop("old request")
        return True

    def _cut_batches(self):
        """Primary: turn pending requests into pre-prepares while the pipeline has room."""
        if not self.is_primary() or self.status == VIEW_CHANGE:
            return
        self._refill_pending()
        while (self.pending and self.seq - self.last_exec < self.pipeline_max
               and self.seq + 1 <= self.h + self.window and self._may_vote(self.seq + 1)):
            self._cut_batch()

    def _cut_batch(self):
        """Primary: the next sequence number's pre-prepare, of the pending requests that fit
        a batch. (Apart from _cut_batches, which every replica runs per execution: a frame
        over 11 slots is taken from the heap at each call, cbor.py's header.)"""
        count = 0
        size = 0
        while count < min(self.batch_max, len(self.pending)):
            size += len(self.pending[count])
            if size > self.batch_bytes_max and count:
                break
            count += 1
        batch = self.pending[:count]
        del self.pending[:count]
        self.seq += 1
        digest = batch_digest(batch)
        i = self.log.claim(self.seq)
        self._accept(i, self.seq, digest, batch)
        self._broadcast(m.PRE_PREPARE, self.view, self.seq, digest, batch)
        self._check_prepared(self.seq, i)

    def _refill_pending(self):
        """Primary: move the requests spilled to flash into the queue, oldest first, while it
        has room. A request is skipped, before its MAC is checked, when its head says that its
        client's request is queued already, superseded or executed: most are copies a client
        sent again while the original waited, spilled behind it, which were otherwise
        authenticated and ordered again once the original had executed. The others were
        authenticated before they were spilled, and the spill returns a record only when its
        CRC matches (spill.py): they are not checked again."""
        while len(self.pending) < _PENDING_MAX:
            wire = self.spill.pop()
            if wire is None:
                return
            head = _request_head(wire)
            if head is None or not self._queueable(*head):
                continue
            self.pending_ids[head[0]] = head[1]
            self.pending.append(wire)

    def _queueable(self, client, timestamp):
        """Is ``client``'s request ``timestamp`` neither queued, nor superseded by one we
        have seen, nor executed?"""
        if (self.pending_ids.get(client, -1) >= timestamp
                or self.waiting.get(client, -1) > timestamp):
            return False
        return not self._executed(client, timestamp)

    def _executed(self, client, timestamp):
        """Did ``client``'s request ``timestamp`` (or a later one) execute?"""
        cached = self._client_entry(client)
        return cached is not None and timestamp <= cached[0]

    def _forget_executed(self):
        """Primary, after a state transfer: drop the queued requests that the new state
        executed, and the ids of those queued or in flight. Only _execute takes a client out
        of pending_ids: the ids of the requests a transfer executed stayed until a view
        change, and the table grew with them."""
        keep = []
        for wire in self.pending:
            head = _request_head(wire)
            if head is not None and not self._executed(*head):
                keep.append(wire)
        self.pending[:] = keep
        for client in list(self.pending_ids):
            if self._executed(client, self.pending_ids[client]):
                del self.pending_ids[client]

    # ----------------------------------------------------------------- normal case

    def ignore_phase(self, msg):
        """Common checks for pre-prepare, prepare and commit (N2, N6); True to drop."""
        if msg.view != self.view or self.status == VIEW_CHANGE:
            if msg.view > self.view:
                self.behind = True  # N6: a higher view exists: ask with STATUS
            return self._drop("wrong view")
        if not self._in_window(msg.seq):
            return self._drop("outside window")
        return False

    def on_pre_prepare(self, msg):
        if self.ignore_phase(msg):
            return
        if msg.sender != self.primary():
            self._drop("pre-prepare not from primary")
            return
        log = self.log
        i = log.claim(msg.seq)
        if log.accepted(i):
            if log.digests[i] != msg.digest:
                self._drop("conflicting pre-prepare")
                self._equivocation(msg.sender, msg.seq)
            else:  # retransmitted (RT2): our vote may have been held back (_may_vote)
                self._prepare(msg.seq, i)
                self._check_prepared(msg.seq, i)
            return
        if batch_digest(msg.batch) != msg.digest or not self._batch_valid(msg.batch):
            self._drop("bad batch")
            return
        # Prepares that came first for another digest are discarded by the pre-prepare; they
        # contradict it all the same.
        earlier = log.prepares[i] if log.digests[i] not in (None, msg.digest) else 0
        self._accept(i, msg.seq, msg.digest, msg.batch)
        if earlier:
            self._contradicted(msg.seq, earlier)
        self._check_prepared(msg.seq, i)
        self._check_committed(msg.seq, i)  # commits that came before the batch (as on_batch)

    def _accept(self, i, seq, digest, batch):
        """Log the pre-prepare of ``seq``; a backup multicasts its PREPARE (N2, N3)."""
        log = self.log
        log.accept(i, digest, batch)
        if batch is not None:
            self.oplog.keep_body(seq, digest, batch)
        log.vote(log.prepares, i, self.primary(), digest)  # the pre-prepare is its prepare
        self._prepare(seq, i)

    def _prepare(self, seq, i):
        """Vote for the accepted slot ``i`` of ``seq``: record it (Q), and a backup multicasts
        PREPARE; once only, and not before _may_vote allows (then _execute, or the pre-prepare
        retransmitted, comes back)."""
        log = self.log
        if not self._may_vote(seq) or (log.voted(log.prepares, i, self.me)
                                       and not self.is_primary()):
            return
        digest = log.digests[i]
        self.oplog.voted(seq, digest, self.view)
        if not self.is_primary():
            log.vote(log.prepares, i, self.me, digest)
            self._broadcast(m.PREPARE, self.view, seq, digest)

    def _batch_valid(self, batch):
        if len(batch) > self.batch_max:
            return False
        for wire in batch:
            if self._checked_request(wire) is None:
                return False
        return True

    def _checked_request(self, wire):
        """(client, timestamp) of the authentic REQUEST ``wire`` (a batch's), else None. One
        byte for byte the request we hold from its client was authenticated when it came: it
        is not decoded and checked again (a backup gets most requests from their clients
        before the pre-prepare that orders them)."""
        head = _request_head(wire)
        if head is not None and self.waiting_wires.get(head[0]) == wire:
            return head
        req = _decoded(wire)
        if not req or req.kind != m.REQUEST or not self._authentic(req):
            return None
        return req.sender, req.timestamp

    def on_prepare(self, msg):
        if self.ignore_phase(msg):
            return
        if msg.sender == self.primary():
            self._drop("prepare from primary")
            return
        self._on_vote(msg, self.log.prepares)

    def on_commit(self, msg):
        if (self.status == VIEW_CHANGE and self.left <= msg.view < self.view
                and msg.seq > self.last_exec and self._in_window(msg.seq)):
            if msg.view > self.left:  # the others installed a view we did not: follow it
                self.left = msg.view
                self.log.clear()
            self._on_vote(msg, self.log.commits)  # catching up alone (see the header)
            return
        if self.ignore_phase(msg):
            return
        self._on_vote(msg, self.log.commits)

    def _on_vote(self, msg, votes):
        log = self.log
        i = log.claim(msg.seq)
        if log.executed(i) or log.voted(votes, i, msg.sender):
            return
        if not log.vote(votes, i, msg.sender, msg.digest):
            self._drop("vote for another digest")
            if votes is log.prepares and log.accepted(i):
                self._contradicted(msg.seq, 1 << msg.sender)
            return
        if votes is log.prepares:
            self._check_prepared(msg.seq, i)
        else:
            self._check_committed(msg.seq, i)

    def _contradicted(self, seq, senders):
        """The replicas in the mask ``senders`` prepared another digest than our primary's
        pre-prepare for ``seq``: over 1/3 of stake doing so proves a correct replica got
        another pre-prepare."""
        mask = self.contra.get(seq, 0)
        if mask < 0 or (not mask and len(self.contra) >= self.window):
            return  # reported already (once per slot), or a full table
        mask |= senders
        self.contra[seq] = mask
        if self.vstake.is_weak(stake_of(mask, self.vstake.weights)):
            self.contra[seq] = -1
            self._equivocation(self.primary(), seq)

    def _equivocation(self, offender, seq):
        """Report ``offender`` (an event) and accuse it in the ledger, once per epoch."""
        if offender == self.me:
            return  # our own pre-prepare contradicted: we are the one rewritten (Byzantine)
        self.events.append(("equivocation", offender, self.view, seq))
        if offender == self.primary():
            self.caught = self.view
        if offender in self.accused:
            return
        self.accused.append(offender)
        client = REPLICA_CLIENT_BASE + self.me
        cached = self._client_entry(client)
        self.accuse_ts = max(self.accuse_ts, cached[0] if cached is not None else 0) + 1
        body = m.body(m.REQUEST, client, self.accuse_ts, ["accuse", sorted(self.accused)])
        wire = self.authenticated(body)
        self._multicast(wire)
        self.on_request(m.decode(wire))  # our own copy: T1 waits for it, a primary batches it

    def _check_prepared(self, seq, i):
        """Prepared (N4): record it (P) and multicast COMMIT, if we may vote on ``seq``."""
        log = self.log
        if log.prepared(i) or not log.accepted(i) or not self._may_vote(seq):
            return
        if not self.vstake.is_quorum(log.stake(log.prepares, i, self.vstake.weights)):
            return
        log.mark_prepared(i)
        self.oplog.prepared(seq, log.digests[i], self.view)
        self._write_prepared(seq, log.digests[i])  # before the COMMIT leaves (header)
        log.vote(log.commits, i, self.me, log.digests[i])
        self._broadcast(m.COMMIT, self.view, seq, log.digests[i])
        self._check_committed(seq, i)

    def _check_committed(self, seq, i):
        log = self.log
        if log.committed(i) or log.digests[i] is None:
            return
        if not self._commit_quorum(i):
            return
        if log.batches[i] is None:
            body = self.oplog.body_of(seq, log.digests[i])
            if body is None:
                if seq > self.last_exec:
                    self.missing[seq] = log.digests[i]
                return
            log.attach(i, body)
        log.mark_committed(i)
        self._execute_ready()

    def _commit_quorum(self, i):
        """Do slot i's commits hold a quorum of the view's stake? (Apart from
        _check_committed, run per commit: its frame stays within 11 slots, cbor.py's header.)"""
        return self.vstake.is_quorum(self.log.stake(self.log.commits, i, self.vstake.weights))

    # ----------------------------------------------------------------- execution

    def _execute_ready(self):
        log = self.log
        while True:
            i = log.find(self.last_exec + 1)
            if i < 0 or not log.committed(i) or self._frozen():
                return
            self._execute(self.last_exec + 1, i)
            self._cut_batches()

    def _execute(self, seq, i):
        log = self.log
        assert seq == self.last_exec + 1
        assert log.committed(i)
        assert not self._frozen()  # a frozen view executes nothing (see the header)
        results = []
        self.state.begin(seq)
        for wire in log.batches[i]:
            req = m.request_fields(wire)  # validated when the pre-prepare was accepted
            client = req[2]
            timestamp = req[3]
            if self.waiting.get(client, -1) <= timestamp:
                self.waiting.pop(client, None)
                self.waiting_wires.pop(client, None)
            if self.pending_ids.get(client, -1) <= timestamp:
                self.pending_ids.pop(client, None)
            cached = self._client_entry(client)
            if cached is not None and timestamp <= cached[0]:
                continue  # executed before: exactly once
            replica = client - REPLICA_CLIENT_BASE
            if cached is None and replica < 0 and \
                    self.clients.entries_in_page(client) >= CLIENT_PAGE_ENTRIES_MAX:
                result = [False, "client table full"]  # not executed, so not recorded
            else:
                result = self.ledger.execute(req[4], client, replica)
                self.clients.put(client, [timestamp, result])
            if replica < 0:
                self._send_reply(client, timestamp, result)
            results.append([client, timestamp, result])
        self.counts["executed_requests"] += len(results)
        log.mark_executed(i)
        self.missing.pop(seq, None)
        self.last_exec = seq
        if self.seq < seq:
            self.seq = seq  # never assign a sequence number that executed already
        digest = self.ledger.commit_batch(seq, log.digests[i], results)
        self.events.append(("executed", seq, digest))
        if results:
            self.vc_timeout = self.view_timeout_ms  # T5: reset once a request executes
        self.vc_deadline = None  # T1: stop, restart below if requests still wait
        if self.waiting:
            self.vc_deadline = self.now + self.vc_timeout
        if seq % self.K == 0:
            new_epoch = self.ledger.end_epoch(seq)
            self._checkpoint(seq)
            if new_epoch:
                self._enter_epoch()
            self._broadcast(m.CHECKPOINT, seq, self.own_checkpoints[seq])
            self._check_stable(seq)
            self._vote_held_back(seq)

    def _vote_held_back(self, seq):
        """We executed checkpoint ``seq`` (or adopted it by state transfer): vote for what
        _may_vote held back, the accepted slots up to the next checkpoint."""
        log = self.log
        for later in range(seq + 1, seq + self.K + 1):
            i = log.find(later)
            if i >= 0 and log.accepted(i):
                self._prepare(later, i)
                self._check_prepared(later, i)

    def _enter_epoch(self):
        """Put the ledger's validator set in force (after executing or installing its first
        checkpoint); the current view becomes frozen unless it started there. Keeps the
        sets of the window: at most one per checkpoint in it and the one in force at h."""
        ledger = self.ledger
        self.sets.append((ledger.since, Stake(ledger.validators)))
        if len(self.sets) > self.window // self.K + 1:
            del self.sets[0]
        self.accused = []
        self.contra = {}
        self.events.append(("epoch", ledger.epoch, ledger.since, ledger.validators))

    def _client_entry(self, client):
        """[timestamp, result] of ``client``'s last executed request, or None."""
        entry = self.clients.get(client)
        return entry if type(entry) is list else None

    def _send_reply(self, client, timestamp, result):
        """Reply to ``client``. A reply the heap has no piece for is lost, as _send's messages
        are: the client asks again, and the reply comes from its entry in the client table."""
        try:
            body = m.body(m.REPLY, self.me, self.view, client, timestamp, result)
            wire = body + self._client_mac(client).tag(body)
        except MemoryError:
            self._drop("no heap to send")
            return
        self._emit(to_client(client), wire)

    # ----------------------------------------------------------------- checkpoints

    def _checkpoint(self, seq):
        """Take the checkpoint of ``seq`` (just executed): its record and digest (N7)."""
        digest = self.state.checkpoint(seq, self.ledger.small_state())
        self._hold_checkpoint(seq, digest)
        self.events.append(("checkpoint", seq, digest))

    def _hold_checkpoint(self, seq, digest):
        """Keep our checkpoint of ``seq`` (its record serves state transfer); count our vote."""
        self.own_checkpoints[seq] = digest
        votes = self.checkpoints.get(seq)
        if votes is None:
            votes = self.checkpoints[seq] = {}
        votes[self.me] = digest

    def on_checkpoint(self, msg):
        if msg.seq <= self.h or msg.seq % self.K:
            return
        self._count_vote(msg)
        if msg.seq > self.h + self.window:
            # Beyond the window: keep only each replica's newest (bounded by n); when over
            # 1/3 of stake agree on one, we are behind for good and fetch its state (N7).
            self.ahead[msg.sender] = (msg.seq, msg.digest)
            agree = self._reporting(msg.seq, msg.digest)
            if self.transfer is None and self.stake.is_weak(self.stake.of(agree)):
                self._start_transfer(msg.seq, msg.digest, agree)
            return
        votes = self.checkpoints.get(msg.seq)
        if votes is None:
            votes = self.checkpoints[msg.seq] = {}
        votes[msg.sender] = msg.digest
        self._check_stable(msg.seq)
        self._maybe_fetch_state(msg.seq, msg.digest)

    def _pending_ids_max(self):
        """pending_ids' bound: the requests queued and those in the batches in flight."""
        return _PENDING_MAX + self.pipeline_max * self.batch_max

    def _reporting(self, seq, digest):
        """The replicas whose newest checkpoint beyond our window is (seq, digest)."""
        return [j for j in self.ahead if self.ahead[j] == (seq, digest)]

    def _backed(self, seq, votes, digest):
        """How far the replicas whose vote in ``votes`` (replica -> digest) is ``digest`` back
        checkpoint ``seq``, by the stake of the set that executed it: 2 over 2/3 of it, 1 over
        1/3, else 0. Beyond our last executed sequence number that set may be newer than any we
        know: the newest we know stands in for it."""
        stake = self._set_at(seq - 1) or self.stake
        s = stake.of([j for j in votes if votes[j] == digest])
        return stake.is_weak(s) + stake.is_quorum(s)

    def _check_stable(self, seq):
        own = self.own_checkpoints.get(seq)
        votes = self.checkpoints.get(seq)
        if own is None or votes is None or seq <= self.h:
            return
        if self._backed(seq, votes, own) == 2:
            self._mark_stable(seq)

    def _mark_stable(self, seq):
        """Checkpoint ``seq`` is stable: move h and collect everything at or below it."""
        assert seq >= self.h
        assert seq in self.own_checkpoints
        assert seq <= self.last_exec  # we executed it (or installed its state)
        self.h = seq
        for table in (self.checkpoints, self.missing):
            for old in [s for s in table if s <= seq]:
                del table[old]
        for j in [j for j in self.ahead if self.ahead[j][0] <= seq]:
            del self.ahead[j]
        self.oplog.collect(seq)
        self._rewrite_prepared()
        for old in [s for s in self.own_checkpoints if s < seq]:
            del self.own_checkpoints[old]
        if self.state.h != seq:
            self.state.stable(seq)
        if self.transfer is not None and self.transfer.seq <= seq:
            self.transfer = None  # caught up by executing: the fetch is moot
            self.state.clear_stage()
        self.dirty = True
        self.events.append(("stable", seq, self.own_checkpoints[seq]))
        self._cut_batches()

    def _adopt(self, meta, digest):
        """Take checkpoint meta[0], whose state is on flash and verified, as executed."""
        seq = meta[0]
        self.ledger.load_small(meta[1])
        if self.ledger.validators != self.stake.weights or self.ledger.since != self.sets[-1][0]:
            del self.sets[:]  # we know the set in force at seq, not those before it
            self._enter_epoch()
        self.last_exec = seq
        self._hold_checkpoint(seq, digest)
        if self.seq < seq:
            self.seq = seq

    # ----------------------------------------------------------------- retransmission

    def _retransmit(self):
        """RT1: when stuck, multicast STATUS; in a view change also repeat our VIEW-CHANGE. An idle
        replica still sends one every _IDLE_STATUS_TICKS, so peers can tell it what it missed
        last before the traffic stopped."""
        stuck = self.last_exec == self.progress_mark
        self.progress_mark = self.last_exec
        self.ticks += 1
        if self.transfer is not None:
            self._retransmit_fetch()
            return
        if stuck and self.waiting and self.status == NORMAL and not self.missing:
            self._hand_on_waiting()
        if self.status == VIEW_CHANGE:
            self._multicast(self.vc_wires[self.me])
        elif not (self.behind or stuck and (self.waiting or self.missing or self.live_slots())
                  or self.ticks % _IDLE_STATUS_TICKS == 0):
            return
        self.behind = False
        self._send_status()

    def _send_status(self):
        """Multicast STATUS: where we are, and the batches we miss (RT1)."""
        missing = sorted(self.missing)[:_CATCH_UP_MAX]
        self._broadcast(m.STATUS, self.view, self.status == VIEW_CHANGE, self.h, self.last_exec,
                        missing)

    def _hand_on_waiting(self):
        """T1 while nothing executes: the requests we wait for reach the primary's queue
        again. A primary with nothing queued queues them (one it dropped when its queue was
        full, "pending full", waits in its T1 table still); a backup forwards them to the
        primary, once per stall. Before, a request dropped that way whose client then gave
        up (or crashed) left every replica waiting for it, and once the load stopped the
        first view timeout replaced a correct primary (a view change 3 s after 256
        application clients stopped)."""
        if self.is_primary():
            if self.pending or len(self.spill):
                return
            for client in self.waiting:
                timestamp = self.waiting[client]
                if len(self.pending) < _PENDING_MAX and self._queueable(client, timestamp):
                    self.pending_ids[client] = timestamp
                    self.pending.append(self.waiting_wires[client])
            self._cut_batches()
        elif self.handed_on != self.last_exec:
            self.handed_on = self.last_exec
            self._forward_waiting()

    def _forward_waiting(self):
        """T1: a backup forwards the requests it waits for to the primary."""
        for wire in self.waiting_wires.values():
            self.out.append((self.primary(), wire))

    def on_status(self, msg):
        """RT2: answer a replica that is behind with what it lacks."""
        last = self.answered.get(msg.sender, -_STATUS_MS)
        if self.now - last < _STATUS_MS:
            return
        self.answered[msg.sender] = self.now
        j = msg.sender
        for seq in sorted(self.own_checkpoints):
            # Our checkpoint votes above its stable one, in any view: the vote it lost may be
            # what keeps its window full (a loss fault can take every copy of a checkpoint),
            # or what the others in a frozen view we left still lack to leave it too.
            if seq > msg.h:
                self._send(j, m.CHECKPOINT, seq, self.own_checkpoints[seq])
        if msg.view < self.view or (msg.view == self.view and msg.limbo):
            for k in self.vc_wires:
                if self.vc_views[k] == self.view and k != j:
                    self.out.append((j, self.vc_wires[k]))  # BV2: relay what we verified
            if self.is_primary() and self.status == NORMAL:
                self._resend_new_view(j)
            return
        alone = msg.view > self.view  # in a view change we are not in: our commits only
        if self.status == VIEW_CHANGE or alone and not msg.limbo:
            return
        for seq in msg.missing:
            if type(seq) is int and not self._send_batch(j, seq):
                return
        top = min(self.last_exec, msg.last_exec + _CATCH_UP_MAX)
        for seq in range(max(msg.last_exec, self.h) + 1, self.h + self.window + 1):
            i = self.log.find(seq)
            if i < 0:
                continue
            d = self.log.digests[i]
            if self.log.committed(i) and seq <= top:
                self._send(j, m.COMMIT, self.view, seq, d)
                if not self._send_batch(j, seq):
                    return
            elif alone:
                continue
            elif self.log.voted(self.log.prepares, i, self.me) and self._may_vote(seq):
                if self.is_primary():
                    if self.log.batches[i] is not None:  # a chosen batch we lack: BATCH brings it
                        self._send(j, m.PRE_PREPARE, self.view, seq, d, self.log.batches[i])
                else:
                    self._send(j, m.PREPARE, self.view, seq, d)
            if self.log.voted(self.log.commits, i, self.me) and seq > top:
                self._send(j, m.COMMIT, self.view, seq, d)

    def _write_prepared(self, seq, digest):
        """Append the P entry (seq, digest, view) to PREPARED_LOG (write-ahead, see the
        header); rewrite the log first when it has grown past _PREPARED_LOG_BYTES_MAX."""
        if self.prepared_log_bytes > _PREPARED_LOG_BYTES_MAX:
            self._rewrite_prepared()
        entry = cbor.encode_transient([seq, digest, self.view])  # written at once
        self.state.flash.append(PREPARED_LOG, entry)
        self.prepared_log_bytes += len(entry)

    def _rewrite_prepared(self):
        """Replace PREPARED_LOG by the oplog's P entries above h (atomically)."""
        entries = tuple(cbor.encode(e) for e in self.oplog.entries(self.h)[0])
        if entries:
            self.state.flash.write(PREPARED_LOG, entries)
        elif self.prepared_log_bytes:  # else there is no file: no delete at every checkpoint
            self.state.flash.delete(PREPARED_LOG)
        self.prepared_log_bytes = sum(len(e) for e in entries)

    def _read_prepared(self, data):
        """Put back in the oplog the P entries PREPARED_LOG held (``data``, or None) for
        sequence numbers in the window, from views up to ours, in the order written (a later
        one for a sequence number is newer); a torn last entry is ignored. Then rewrite it."""
        end = 0
        while data and end < len(data):
            try:
                entry, end = cbor.decode_prefix(data, end)
            except cbor.DecodeError:
                break  # the append a crash tore
            if (type(entry) is list and len(entry) == 3 and type(entry[0]) is int
                    and self._in_window(entry[0]) and type(entry[1]) is bytes
                    and len(entry[1]) == m.DIGEST_BYTES and type(entry[2]) is int
                    and 0 <= entry[2] <= self.view):
                self.oplog.prepared(entry[0], entry[1], entry[2])
                self.oplog.voted(entry[0], entry[1], entry[2])
                self.oplog.reclaim_body(entry[0], entry[1])
        self._rewrite_prepared()

    def _send_batch(self, dest, seq):
        """Send replica ``dest`` the BATCH of ``seq`` if we hold its body. False when the heap
        had no piece to read the body back into (counted): the caller stops answering, and
        the replica behind asks again with its next STATUS."""
        i = self.log.find(seq)
        if i < 0 or self.log.digests[i] is None:
            return True
        try:
            body = self.oplog.body_of(seq, self.log.digests[i])
        except MemoryError:
            self._drop("no heap to send")
            return False
        if body is not None:
            self._send(dest, m.BATCH, seq, self.log.digests[i], body)
        return True

    def on_batch(self, msg):
        i = self.log.find(msg.seq)
        if i < 0 or self.log.digests[i] != msg.digest or self.log.batches[i] is not None:
            return
        if batch_digest(msg.batch) != msg.digest or not self._batch_valid(msg.batch):
            self._drop("bad batch")
            return
        self.oplog.keep_body(msg.seq, msg.digest, msg.batch)
        self.missing.pop(msg.seq, None)
        if self.log.accepted(i):
            self.log.attach(i, msg.batch)
            self._check_prepared(msg.seq, i)
        self._check_committed(msg.seq, i)

    # ----------------------------------------------------------------- durability

    def durable(self):
        """What must survive a crash besides the flash state (RC3): [view, h, view_low, left];
        see the header. view_low may be that of an earlier view (not yet installed): lower is
        safe, as it only freezes more. left < view: we were changing view, from view left
        (a restore resumes the view change: restored NORMAL in a view nobody installed, it
        waited alone there for the others to change view)."""
        self.dirty = False
        left = self.left if self.status == VIEW_CHANGE else self.view
        return cbor.encode([self.view, self.h, self.view_low, left])

    @classmethod
    def restore(cls, saved, me, stake, keys, client_secret, **kwargs):
        """Rebuild a replica from durable() bytes and its flash (``flash`` in kwargs) after a
        reboot. The flash's stable checkpoint may be older than the saved h (a power cut
        before its commit record, or a store that failed verification): no votes up to the
        newer of the two plus the window."""
        flash = kwargs.get("flash")
        prepared = flash.read(PREPARED_LOG) if flash is not None else None
        r = cls(me, stake, keys, client_secret, **kwargs)
        fields = cbor.decode(saved)
        assert type(fields) is list  # what durable() wrote
        view, h = fields[0], fields[1]
        view_low = fields[2] if len(fields) > 2 and type(fields[2]) is int else 0
        r.view = view
        r._read_prepared(prepared)
        r.no_vote_view = view
        r.no_vote_seq = max(h, r.h) + r.window
        if r.h:
            r._broadcast(m.CHECKPOINT, r.h, r.own_checkpoints[r.h])  # peers may need our vote
        r.view_low = view_low
        r.vstake = r._set_at(view_low) or r.stake  # none kept: frozen, and left at once
        r.vc_timeout = r.view_timeout_ms
        r.events.append(("restored", view, h))
        left = fields[3] if len(fields) > 3 and type(fields[3]) is int else view
        if left < view:  # our VIEW-CHANGE again, with the P entries written ahead
            r.view = left
            r._start_view_change(view)
        return r

    # ----------------------------------------------------------------- invariants

    def _check_invariants(self):
        """After every input: the invariants the handlers keep between them."""
        assert self.h <= self.last_exec
        assert self.h % self.K == 0
        assert self.h in self.own_checkpoints  # a stable checkpoint is one we hold
        assert self.status is NORMAL or self.status is VIEW_CHANGE
        assert self.status is VIEW_CHANGE or self.new_view is None
        for seq in self.checkpoints:
            assert self.h <= seq <= self.h + self.window
        assert len(self.vcs) <= self.stake.n and len(self.ahead) <= self.stake.n
        assert len(self.pending) <= _PENDING_MAX
        assert len(self.pending_ids) <= self._pending_ids_max()
        assert len(self.waiting) <= _WAITING_MAX
        assert len(self.waiting_wires) == len(self.waiting)
        if self.is_primary() and self.status == NORMAL:
            assert self.seq >= self.last_exec
        if self.transfer is not None:
            assert self.transfer.seq > self.h


_HANDLERS = {
    m.REQUEST: Replica.on_request,
    m.PRE_PREPARE: Replica.on_pre_prepare,
    m.PREPARE: Replica.on_prepare,
    m.COMMIT: Replica.on_commit,
    m.CHECKPOINT: Replica.on_checkpoint,
    m.VIEW_CHANGE: Replica.on_view_change,
    m.VC_ACK: Replica.on_vc_ack,
    m.NEW_VIEW: Replica.on_new_view,
    m.STATUS: Replica.on_status,
    m.BATCH: Replica.on_batch,
    m.FETCH: Replica.on_fetch,
    m.CHUNK: Replica.on_chunk,
}
