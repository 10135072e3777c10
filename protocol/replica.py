# The PBFT replica, normal case (Castro and Liskov, TOCS 2002, section 4.2; PBFT-NOTES N1-N7).
#
# Rules:
# - Sans-I/O: receive(wire, now_ms) is the only input. Outputs accumulate in self.out as
#   (dest, wire) pairs (dest: TO_ALL, a replica id >= 0, or (TO_CLIENT, client id)) and
#   events in self.events as tuples; the caller drains both after every call.
# - Peer input never raises and never trips an assert: an ignore_* predicate drops it and
#   counts why in self.drops. Asserts guard only our own invariants.
# - Every quorum is by stake (stake.Stake): prepared = pre-prepare + matching prepares,
#   committed = prepared + matching commits, stable = matching checkpoints, each > 2/3 stake.
# - Memory is bounded by the window and allocated once: the log (protocol/log.py) is a ring
#   of `window` = 2K slots in preallocated arrays; a slot drops its batch once executed;
#   checkpoint votes only for multiples of K inside the window; the reply cache holds at most
#   CLIENTS_MAX clients (evicted deterministically).
import hashlib

from . import auth, cbor
from . import messages as m
from .ledger import Ledger
from .log import Log

TO_ALL = -1
TO_CLIENT = -2

CLIENTS_MAX = 256
PENDING_MAX = 512  # primary: requests waiting for a batch; beyond it clients retransmit
REQUEST_BYTES_MAX = 512  # a request wire; a pre-prepare of batch_max requests must fit
_PRE_PREPARE_OVERHEAD_BYTES = 128  # body fields and authenticator besides the batch
_MACS_CLIENT_MAX = 64  # derived client keys kept; more are derived again on demand


def batch_digest(batch):
    """The digest a pre-prepare carries: SHA-256 of the CBOR array of request wires."""
    return hashlib.sha256(cbor.encode(batch)).digest()


def client_key(client_secret, client):
    """The key client ``client`` shares with the replica whose client secret is given."""
    return auth.derive(client_secret, ("client:%d" % client).encode())


class Replica:
    """One PBFT replica. ``keys[j]`` is the key shared with replica j (keys[me] unused)."""

    def __init__(self, me, stake, keys, client_secret, genesis=None,
                 checkpoint_interval=32, batch_max=16, pipeline_max=4):
        assert 0 <= me < stake.n
        assert len(keys) == stake.n
        assert checkpoint_interval > 0
        self.me = me
        self.stake = stake
        self.macs = [auth.Mac(k) for k in keys]
        self.client_secret = client_secret
        self.client_macs = {}
        self.ledger = Ledger(genesis)
        self.K = checkpoint_interval
        self.window = 2 * checkpoint_interval
        self.batch_max = batch_max
        self.pipeline_max = pipeline_max
        self.view = 0
        self.seq = 0            # last sequence number assigned (primary)
        self.h = 0              # last stable checkpoint
        self.last_exec = 0
        self.log = Log(self.window, stake.n)
        self.checkpoints = {}   # seq -> {replica: digest}
        self.own_checkpoints = {}  # seq -> digest, for seq > h, and h itself
        self.own_checkpoints[0] = self.ledger.digest
        self.replies = {}       # client -> [timestamp, result, seq executed]
        self.pending = []       # primary: request wires waiting for a batch
        self.pending_ids = {}   # (client, timestamp) -> True for requests in pending
        self.out = []
        self.events = []
        self.drops = {}         # reason -> count
        self.counts = {"rx": 0, "tx": 0, "executed_requests": 0}

    # ----------------------------------------------------------------- helpers

    def primary(self):
        return self.stake.primary(self.view)

    def is_primary(self):
        return self.primary() == self.me

    def _drop(self, reason):
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return True

    def _broadcast(self, kind, *fields):
        body = m.body(kind, self.me, *fields)
        self.out.append((TO_ALL, body + auth.authenticator(self.macs, body)))
        self.counts["tx"] += 1

    def _client_mac(self, client):
        mac = self.client_macs.get(client)
        if mac is None:
            if len(self.client_macs) >= _MACS_CLIENT_MAX:
                self.client_macs.clear()
            mac = auth.Mac(client_key(self.client_secret, client))
            self.client_macs[client] = mac
        return mac

    def _authentic(self, msg):
        if msg.kind == m.REQUEST:
            return auth.check(msg.auth, self.me, self._client_mac(msg.sender), msg.body)
        if msg.sender >= self.stake.n or msg.sender == self.me:
            return False
        return auth.check(msg.auth, self.me, self.macs[msg.sender], msg.body)

    def _in_window(self, seq):
        return self.h < seq <= self.h + self.window

    def live_slots(self):
        """Sequence numbers with a live slot (h < seq), for tests and status."""
        return self.log.live(self.h)

    # ----------------------------------------------------------------- input

    def receive(self, wire, now_ms):
        """Handle one message from the network (any bytes)."""
        self.counts["rx"] += 1
        try:
            msg = m.decode(wire)
        except m.MessageError:
            self._drop("malformed")
            return
        if not self._authentic(msg):
            self._drop("unauthentic")
            return
        handler = _HANDLERS.get(msg.kind)
        if handler is None:
            self._drop("unexpected type")
            return
        handler(self, msg)
        self._check_invariants()

    def on_request(self, msg):
        cached = self.replies.get(msg.sender)
        if cached is not None and msg.timestamp <= cached[0]:
            if msg.timestamp == cached[0]:
                self._send_reply(msg.sender, cached[0], cached[1])
            else:
                self._drop("old request")
            return
        if not self.is_primary():
            return  # the primary batches it; backups watch it later (view-change timers)
        key = (msg.sender, msg.timestamp)
        if key in self.pending_ids:
            return
        if len(msg.body) + len(msg.auth) > REQUEST_BYTES_MAX:
            self._drop("request too large")
            return
        if len(self.pending) >= PENDING_MAX:
            self._drop("pending full")
            return
        self.pending_ids[key] = True
        self.pending.append(msg.body + msg.auth)
        self._cut_batches()

    def ignore_phase(self, msg):
        """Common checks for pre-prepare, prepare and commit; True to drop."""
        if msg.view != self.view:
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
                self.events.append(("equivocation", msg.sender, self.view, msg.seq))
            return
        if batch_digest(msg.batch) != msg.digest or not self._batch_valid(msg.batch):
            self._drop("bad batch")
            return
        self._accept(i, msg.seq, msg.digest, msg.batch)
        self._broadcast(m.PREPARE, self.view, msg.seq, msg.digest)
        self._check_prepared(msg.seq, i)

    def _accept(self, i, seq, digest, batch):
        log = self.log
        log.accept(i, digest, batch)
        # The primary's pre-prepare stands for its prepare (PBFT-NOTES N3).
        log.vote(log.prepares, i, self.primary(), digest)
        if not self.is_primary():
            log.vote(log.prepares, i, self.me, digest)

    def _batch_valid(self, batch):
        if len(batch) > self.batch_max:
            return False
        for wire in batch:
            try:
                req = m.decode(wire)
            except m.MessageError:
                return False
            if req.kind != m.REQUEST or not self._authentic(req):
                return False
        return True

    def on_prepare(self, msg):
        if self.ignore_phase(msg):
            return
        if msg.sender == self.primary():
            self._drop("prepare from primary")
            return
        self._on_vote(msg, self.log.prepares)

    def on_commit(self, msg):
        if self.ignore_phase(msg):
            return
        self._on_vote(msg, self.log.commits)

    def _on_vote(self, msg, votes):
        log = self.log
        i = log.claim(msg.seq)
        if log.committed(i) or log.voted(votes, i, msg.sender):
            return
        if not log.vote(votes, i, msg.sender, msg.digest):
            self._drop("vote for another digest")
            return
        if votes is log.prepares:
            self._check_prepared(msg.seq, i)
        else:
            self._check_committed(msg.seq, i)

    def on_checkpoint(self, msg):
        if msg.seq <= self.h or msg.seq > self.h + self.window or msg.seq % self.K:
            self._drop("checkpoint outside window")
            return
        votes = self.checkpoints.get(msg.seq)
        if votes is None:
            votes = self.checkpoints[msg.seq] = {}
        votes[msg.sender] = msg.digest
        self._check_stable(msg.seq)

    # ----------------------------------------------------------------- certificates

    def _stake_matching(self, votes, digest):
        """Stake of the replicas whose vote in ``votes`` (replica -> digest) is ``digest``."""
        s = 0
        for j in votes:
            if votes[j] == digest:
                s += self.stake.weights[j]
        return s

    def _check_prepared(self, seq, i):
        log = self.log
        if log.prepared(i) or not log.accepted(i):
            return
        if not self.stake.is_quorum(log.stake(log.prepares, i, self.stake.weights)):
            return
        log.mark_prepared(i)
        log.vote(log.commits, i, self.me, log.digests[i])
        self._broadcast(m.COMMIT, self.view, seq, log.digests[i])
        self._check_committed(seq, i)

    def _check_committed(self, seq, i):
        log = self.log
        if log.committed(i) or not log.prepared(i):
            return
        if not self.stake.is_quorum(log.stake(log.commits, i, self.stake.weights)):
            return
        log.mark_committed(i)
        self._execute_ready()

    def _check_stable(self, seq):
        own = self.own_checkpoints.get(seq)
        votes = self.checkpoints.get(seq)
        if own is None or votes is None:
            return
        if not self.stake.is_quorum(self._stake_matching(votes, own)):
            return
        self.h = seq
        for old in [s for s in self.checkpoints if s <= seq]:
            del self.checkpoints[old]
        for old in [s for s in self.own_checkpoints if s < seq]:
            del self.own_checkpoints[old]
        self.events.append(("stable", seq, own))
        self._cut_batches()

    # ----------------------------------------------------------------- execution

    def _execute_ready(self):
        log = self.log
        while True:
            i = log.find(self.last_exec + 1)
            if i < 0 or not log.committed(i):
                return
            self._execute(self.last_exec + 1, i)
            self._cut_batches()

    def _execute(self, seq, i):
        log = self.log
        assert seq == self.last_exec + 1
        assert log.committed(i)
        results = []
        for wire in log.batches[i]:
            req = m.decode(wire)  # validated when the pre-prepare was accepted
            cached = self.replies.get(req.sender)
            if cached is not None and req.timestamp <= cached[0]:
                continue  # executed before: exactly once
            result = self.ledger.execute(req.op)
            self._cache_reply(req.sender, req.timestamp, result, seq)
            self._send_reply(req.sender, req.timestamp, result)
            results.append([req.sender, req.timestamp, result])
            self.pending_ids.pop((req.sender, req.timestamp), None)
        self.counts["executed_requests"] += len(results)
        log.mark_executed(i)
        self.last_exec = seq
        digest = self.ledger.commit_batch(seq, log.digests[i], results)
        self.events.append(("executed", seq, digest))
        if seq % self.K == 0:
            self.own_checkpoints[seq] = digest
            votes = self.checkpoints.get(seq)
            if votes is None:
                votes = self.checkpoints[seq] = {}
            votes[self.me] = digest
            self._broadcast(m.CHECKPOINT, seq, digest)
            self._check_stable(seq)

    def _cache_reply(self, client, timestamp, result, seq):
        if client not in self.replies and len(self.replies) >= CLIENTS_MAX:
            # Deterministic eviction (same on every replica): the least recently executed.
            oldest = min(self.replies, key=lambda c: self.replies[c][2])
            del self.replies[oldest]
        self.replies[client] = [timestamp, result, seq]

    def _send_reply(self, client, timestamp, result):
        body = m.body(m.REPLY, self.me, self.view, client, timestamp, result)
        tag = self._client_mac(client).tag(body)
        self.out.append(((TO_CLIENT, client), body + tag))
        self.counts["tx"] += 1

    # ----------------------------------------------------------------- primary

    def _cut_batches(self):
        """Primary: turn pending requests into pre-prepares while the pipeline has room."""
        if not self.is_primary():
            return
        while (self.pending and self.seq - self.last_exec < self.pipeline_max
               and self.seq + 1 <= self.h + self.window):
            count = 0
            size = _PRE_PREPARE_OVERHEAD_BYTES
            while count < min(self.batch_max, len(self.pending)):
                size += len(self.pending[count]) + 3
                if size > m.MESSAGE_BYTES_MAX:
                    break
                count += 1
            batch = self.pending[:count]
            del self.pending[:count]
            self.seq += 1
            digest = batch_digest(batch)
            self._accept(self.log.claim(self.seq), self.seq, digest, batch)
            self._broadcast(m.PRE_PREPARE, self.view, self.seq, digest, batch)
            self._check_prepared(self.seq, self.seq % self.window)

    # ----------------------------------------------------------------- invariants

    def _check_invariants(self):
        assert self.h <= self.last_exec
        assert self.h % self.K == 0
        assert len(self.replies) <= CLIENTS_MAX
        assert len(self.pending) <= PENDING_MAX
        if self.is_primary():
            assert self.seq >= self.last_exec


_HANDLERS = {
    m.REQUEST: Replica.on_request,
    m.PRE_PREPARE: Replica.on_pre_prepare,
    m.PREPARE: Replica.on_prepare,
    m.COMMIT: Replica.on_commit,
    m.CHECKPOINT: Replica.on_checkpoint,
}
