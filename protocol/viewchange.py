# pyright: reportAttributeAccessIssue=false
# (ViewChanging is a mixin of replica.Replica: the attributes it reads are the replica's.)
# View change without signatures: the new primary's decision procedure (PBFT-NOTES 3.4).
#
# Rules:
# - Pure functions over VIEW-CHANGE records; the replica decides what enters the set S
#   (its own VIEW-CHANGE, and others it verified itself that enough replicas acknowledged).
# - Counts are by stake (PBFT-NOTES preamble): "2f+1" = Stake.is_quorum, "f+1" = is_weak.
# - decide() is deterministic in its inputs: the new primary and every backup run it on the
#   same S and must get the same answer, which is how backups check a NEW-VIEW.
# - The conditions of a request choice are conjunctive (A1 and A2); A3, holding the batch,
#   is the replica's job after the decision (it fetches what it lacks).
# - ViewChanging, at the end, holds the replica's view-change handlers (V1-V2, VC1-3,
#   ACK1-4, NV1-3, BV1-4, AF1-3), a mixin of replica.Replica: they read and write its state
#   and drive the decision procedure above. They move the replica's status between NORMAL
#   and VIEW_CHANGE only through Replica._to (its transition table).
import hashlib

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import bytes, int, len, list, max, min, range, sorted, type

try:
    from micropython import const
except ImportError:  # CPython
    const = int

from . import cbor
from . import messages as m

# A replica's status (Replica.status) and the statuses each may move to (ViewChanging._to):
# a view change starts from a normal view, or from a view change for a lower view (T3, T4);
# only installing a NEW-VIEW ends one.
NORMAL = "normal"
VIEW_CHANGE = "view change"
_NEXT_STATUS = {NORMAL: (VIEW_CHANGE,), VIEW_CHANGE: (VIEW_CHANGE, NORMAL)}

NULL_DIGEST = hashlib.sha256(cbor.encode([])).digest()  # the empty batch: a null request
_VC_TIMEOUT_FACTOR_MAX = const(32)  # the doubling view-change timeout stops at 32 T


class ViewChange:
    """A decoded VIEW-CHANGE: [1, 7, sender, view, h, C, P, Q] and its digest.

    C: [[seq, digest]] checkpoints held (h's included); P: [[seq, digest, view]] prepared;
    Q: [[seq, digest, view]] pre-prepared or prepared (what the sender voted for), less the
    entries its P entry already implies.
    """

    def __init__(self, sender, view, h, c, p, q, digest, shared=None):
        """``shared`` (optional, digest -> digest) makes equal digests of several ViewChanges
        one object: n VIEW-CHANGEs mostly name the same batches, and on a 100 KB node each
        32-byte digest costs ~80 bytes of heap."""
        if shared is None:
            shared = {}
        self.sender = sender
        self.view = view
        self.h = h
        self.c = c
        self.p = {}
        for seq, d, v in p:
            self.p[seq] = (shared.setdefault(d, d), v)
        self.q = {}
        for seq, d, v in q:
            self.q.setdefault(seq, []).append((shared.setdefault(d, d), v))
        self.digest = digest

    def max_seq(self):
        top = self.h
        for seq in self.p:
            if seq > top:
                top = seq
        for seq in self.q:
            if seq > top:
                top = seq
        return top


def valid_shape(view, h, c, p, q, k, window):
    """Checks a VIEW-CHANGE's contents can be trusted to be well formed (VC3)."""
    if view == 0 or h % k:
        return False
    if len(c) > window // k + 1 or len(p) > window or len(q) > 2 * window:
        return False
    for entry in c:
        if (type(entry) is not list or len(entry) != 2 or type(entry[0]) is not int
                or type(entry[1]) is not bytes):
            return False
    for entries in (p, q):
        for entry in entries:
            if (type(entry) is not list or len(entry) != 3 or type(entry[0]) is not int
                    or type(entry[1]) is not bytes):
                return False
            if type(entry[2]) is not int or entry[2] >= view or not h < entry[0] <= h + window:
                return False
    return True


def choose_checkpoint(vcs, stake):
    """(min, digest): the highest checkpoint that f+1 list and 2f+1 are at or below (CK2-3)."""
    best = None
    for vc in vcs:
        for seq, digest in vc.c:
            if best is not None and seq <= best[0]:
                continue
            listed = [w.sender for w in vcs if [seq, digest] in w.c]
            below = [w.sender for w in vcs if w.h <= seq]
            if stake.is_weak(stake.of(listed)) and stake.is_quorum(stake.of(below)):
                best = (seq, digest)
    return best


def _choose_request(vcs, stake, seq):
    """The digest for ``seq`` (A1 and A2), NULL_DIGEST (B), or None if undecided (C)."""
    relevant = [vc for vc in vcs if vc.h < seq]
    candidates = []
    for vc in relevant:
        entry = vc.p.get(seq)
        if entry is not None and entry not in candidates:
            candidates.append(entry)
    candidates.sort(key=lambda e: -e[1])
    for d, v in candidates:
        a1 = []
        for vc in relevant:
            other = vc.p.get(seq)
            if other is None or other[1] < v or (other[1] == v and other[0] == d):
                a1.append(vc.sender)
        a2 = []
        for vc in vcs:
            # A P entry (d, v') is also a Q entry: its sender voted for d in view v'.
            entries = vc.q.get(seq, [])
            prepared = vc.p.get(seq)
            for qd, qv in entries + ([prepared] if prepared is not None else []):
                if qd == d and qv >= v:
                    a2.append(vc.sender)
                    break
        if stake.is_quorum(stake.of(a1)) and stake.is_weak(stake.of(a2)):
            return d
    unprepared = [vc.sender for vc in relevant if seq not in vc.p]
    if stake.is_quorum(stake.of(unprepared)):
        return NULL_DIGEST
    return None


def decide(vcs, stake):
    """Run the decision procedure on the VIEW-CHANGEs ``vcs`` (the set S).

    Returns (min, min_digest, [digest for min+1 .. max-1]) or None while undecided (need
    more VIEW-CHANGEs). ``vcs`` must already hold more than 2/3 of stake.
    """
    if not stake.is_quorum(stake.of([vc.sender for vc in vcs])):
        return None
    checkpoint = choose_checkpoint(vcs, stake)
    if checkpoint is None:
        return None
    low = checkpoint[0]
    high = low
    for vc in vcs:
        if vc.h <= low and vc.max_seq() > high:
            high = vc.max_seq()
    chosen = []
    for seq in range(low + 1, high + 1):
        d = _choose_request(vcs, stake, seq)
        if d is None:
            return None
        chosen.append(d)
    assert len(chosen) == high - low
    return low, checkpoint[1], chosen


class ViewChanging:
    """Replica's view change: leaving a view (V1-V2), collecting and acknowledging
    VIEW-CHANGEs, deciding (the new primary) or checking (a backup) the NEW-VIEW, and
    installing it."""

    def _to(self, status):
        """Move to ``status``, as _NEXT_STATUS allows."""
        assert status in _NEXT_STATUS[self.status], (self.status, status)
        self.status = status

    def _start_view_change(self, view):
        """Move to ``view`` and multicast VIEW-CHANGE (V2); also T3 and T4 come here."""
        assert view > self.view or (view == self.view and self.status == NORMAL)
        if self.status == NORMAL:
            self.left = self.view
        self.view = view
        self._to(VIEW_CHANGE)
        self.counts["view_changes"] += 1
        self.vc_timeout = min(2 * self.vc_timeout,  # T5: T, 2T, 4T ...
                              _VC_TIMEOUT_FACTOR_MAX * self.view_timeout_ms)
        self.vc_deadline = None                   # T2: not until 2f+1 VIEW-CHANGEs
        self.log.clear()
        self.contra = {}
        del self.pending[:]
        for client in list(self.pending_ids):
            del self.pending_ids[client]
        self.spill.clear()
        for owner in self.acks:
            entry = self.acks[owner]
            for old in [v for v in entry if v < view]:
                del entry[old]
        self.acked = {}
        self.new_view = None
        self.nv_wire = None
        self.dirty = True
        c = [[s, self.own_checkpoints[s]] for s in sorted(self.own_checkpoints)]
        p, q = self.oplog.entries(self.h)
        body = m.body(m.VIEW_CHANGE, self.me, view, self.h, c, p, q)
        wire = self.authenticated(body)
        self._multicast(wire)
        own = ViewChange(self.me, view, self.h, c, p, q, hashlib.sha256(body).digest(),
                            self.vc_digests)  # others' equal digests share our log's objects
        self.vcs[self.me] = own
        self.vc_views[self.me] = view
        self.vc_wires[self.me] = wire
        self.events.append(("view_change", view))
        for j in self.vcs:
            if j != self.me and self.vcs[j].view == view:
                self._ack(self.vcs[j])
        self._after_view_change_input()

    def on_view_change(self, msg):
        if not valid_shape(msg.view, msg.h, msg.c, msg.p, msg.q, self.K, self.window):
            self._drop("bad view-change")
            return
        known = self.vc_views.get(msg.sender, -1)
        if msg.view <= known:
            if msg.view == self.view and self.status == NORMAL and self.is_primary():
                self._resend_new_view(msg.sender)
            return
        digest = hashlib.sha256(msg.body).digest()
        change = ViewChange(msg.sender, msg.view, msg.h, msg.c, msg.p, msg.q, digest,
                               self.vc_digests)
        self.vc_views[msg.sender] = msg.view
        self.vc_wires[msg.sender] = msg.wire
        msg.p = msg.q = None  # the ViewChange holds them: free the heap before we act on it
        if msg.view > self.view or self.status == VIEW_CHANGE:
            self.vcs[msg.sender] = change  # needed to decide or check the new view
        if msg.view == self.view:
            self._ack(change)
            if self.status == NORMAL and self.is_primary():
                self._resend_new_view(msg.sender)
        elif msg.sender == self.primary() and msg.view > self.view and self.status == NORMAL:
            self._start_view_change(msg.view)  # V1(c): our primary abdicated
            return
        self._after_view_change_input()

    def _ack(self, change):
        """ACK1: acknowledge a VIEW-CHANGE of our view (broadcast: PBFT-NOTES 7.2). Every
        replica acknowledges every other's: across an epoch start, who is the new primary
        depends on the checkpoint the view will start from, unknown yet."""
        if change.sender in self.acked:
            return
        self.acked[change.sender] = change.digest
        self._broadcast(m.VC_ACK, self.view, change.sender, change.digest)

    def on_vc_ack(self, msg):
        """ACK3-4: count acknowledgements; early ones (a view we have not reached) wait."""
        if msg.view < self.view or msg.sender == msg.owner or msg.owner >= self.stake.n:
            return
        if msg.view > self.view + self.stake.n:
            return
        # Kept per view: acks for a later view (a Byzantine replica's, say) never displace
        # those of ours. Bounded: views self.view .. self.view + n, n owners and ackers.
        entry = self.acks.get(msg.owner)
        if entry is None:
            entry = self.acks[msg.owner] = {}
        acks = entry.get(msg.view)
        if acks is None:
            acks = entry[msg.view] = {}
        acks[msg.sender] = msg.digest
        if msg.view == self.view:
            self._after_view_change_input()

    def _after_view_change_input(self):
        self._join_higher_view()
        if self.status == NORMAL:
            return
        self._fetch_listed_checkpoint()
        if self.vc_deadline is None:
            at_or_above = [j for j in self.vc_views if self.vc_views[j] >= self.view]
            if self.stake.is_quorum(self.stake.of(at_or_above)):
                self.vc_deadline = self.now + self.vc_timeout  # T2
        self._try_new_view()
        if self.status == VIEW_CHANGE and self.new_view is not None:
            self._try_install(self.new_view)

    def _fetch_listed_checkpoint(self):
        """In a view change, fetch the newest checkpoint above our state that VIEW-CHANGEs of
        our view carrying over 1/3 of stake list: the new view may start there, and may need
        the validator set in it to even tell who its primary is."""
        if self.transfer is not None:
            return
        best = None
        for j in self.vcs:
            change = self.vcs[j]
            if change.view != self.view:
                continue
            for seq, digest in change.c:
                if seq <= self.last_exec or (best is not None and seq <= best[0]):
                    continue
                listed = [k for k in self.vcs if self.vcs[k].view == self.view
                          and [seq, digest] in self.vcs[k].c]
                if self.stake.is_weak(self.stake.of(listed)):
                    best = (seq, digest, listed)
        if best is not None:
            self._start_transfer(best[0], best[1], [j for j in best[2] if j != self.me])

    def _join_higher_view(self):
        """T4: if replicas with over 1/3 of stake are in higher views, join the lowest."""
        views = sorted([(v, j) for j, v in self.vc_views.items() if j != self.me], reverse=True)
        s = 0
        for view, j in views:
            s += self.stake.weights[j]
            if self.stake.is_weak(s):
                if view > self.view:
                    self._start_view_change(view)
                return

    def _in_set(self, change, stake):
        """ACK4: a VIEW-CHANGE enters S when its sender, the primary and ackers that saw the
        same digest hold over 2/3 of ``stake`` (the primary's own enters at once)."""
        if change.view != self.view:
            return False
        primary = stake.primary(self.view)
        if change.sender == primary:
            return True
        acks = self.acks.get(change.sender, {}).get(self.view, {})
        holders = [change.sender, primary]
        for j in acks:
            if acks[j] == change.digest and j not in holders:
                holders.append(j)
        return stake.is_quorum(stake.of(holders))

    def _try_new_view(self):
        """NV1-NV3: if we are the new view's primary under a set we keep, decide with that
        set and install as soon as S allows. A decision stands only where its set is in force:
        at its checkpoint (_set_at); above our state only the newest set can be, and we fetch
        that state first."""
        for _since, stake in self.sets:
            if stake.primary(self.view) != self.me:
                continue
            members = [self.vcs[j] for j in sorted(self.vcs) if self._in_set(self.vcs[j], stake)]
            decision = decide(members, stake)
            if decision is None:
                continue
            if decision[0] > self.last_exec:
                if stake is self.stake:
                    self._state_first(decision)
                continue
            if self._set_at(decision[0]) is not stake:
                continue
            listed = [[c.sender, c.digest] for c in members]
            body = m.body(m.NEW_VIEW, self.me, self.view, listed, decision[0], decision[2])
            self.nv_wire = self.authenticated(body)
            self._multicast(self.nv_wire)
            self._install(decision, stake)
            return

    def _resend_new_view(self, dest):
        if self.nv_wire is not None:
            self._emit(dest, self.nv_wire)

    def _state_first(self, decision):
        """A view is judged by the validator set of the checkpoint it starts from: when we have
        not reached that checkpoint, fetch its state first (True) and decide again after."""
        low, low_digest = decision[0], decision[1]
        if low <= self.last_exec:
            return False
        if self.transfer is None:
            sources = [j for j in self.vcs if j != self.me and [low, low_digest] in self.vcs[j].c]
            self._start_transfer(low, low_digest, sources)
        return True

    def on_new_view(self, msg):
        if msg.view < self.view or (msg.view == self.view and self.status == NORMAL):
            return
        if msg.low <= self.last_exec:
            stake = self._set_at(msg.low)
            if stake is None or msg.sender != stake.primary(msg.view):
                return
        elif msg.view != self.view and msg.sender != self.stake.primary(msg.view):
            return  # above our state: we fetch it first and judge after (_try_install)
        if msg.view > self.view:
            self._start_view_change(msg.view)
        self.new_view = msg
        self._try_install(msg)

    def _try_install(self, msg):
        """BV1-BV3: install once we hold every listed VIEW-CHANGE and the decision matches."""
        members = []
        for entry in msg.vcs:
            if type(entry) is not list or len(entry) != 2 or type(entry[0]) is not int:
                self.new_view = None
                return
            change = self.vcs.get(entry[0])
            if change is None or change.view != msg.view or change.digest != entry[1]:
                return  # wait: STATUS gets it retransmitted (BV2)
            members.append(change)
        # Judged by the set in force at its checkpoint; above our state, the newest we know
        # tells which state to fetch, and we judge it again once we hold that state.
        stake = self._set_at(msg.low) if msg.low <= self.last_exec else self.stake
        decision = None if stake is None else decide(members, stake)
        if decision is None or decision[0] != msg.low or decision[2] != msg.chosen:
            self._drop("bad new-view")  # BV4: let the timer move us on
            self.new_view = None
            return
        if self._state_first(decision):
            return
        assert stake is not None  # a decision was made with it
        if msg.sender != stake.primary(msg.view):
            self._drop("new-view not from primary")
            self.new_view = None
            return
        self._install(decision, stake)

    def _install(self, decision, stake):
        """AF1-AF3: end the view change and re-prepare the chosen batches in the new view,
        which runs under ``stake``."""
        low, chosen = decision[0], decision[2]
        assert low <= self.last_exec
        self._to(NORMAL)
        self.log.clear()  # commits of the view we left, if we caught up alone (replica.py)
        self.vstake = stake
        self.view_low = low
        self.dirty = True
        for j in [j for j in self.vcs if self.vcs[j].view <= self.view]:
            del self.vcs[j]  # decided: only the wires stay, to relay to laggers (BV2)
        self.vc_digests = {}
        for j in [j for j in self.vc_wires if self.vc_views[j] < self.view]:
            del self.vc_wires[j]
        self.new_view = None
        self.missing = {}
        self.vc_deadline = None
        if self.waiting:
            self.vc_deadline = self.now + self.vc_timeout
        self.events.append(("view", self.view))
        if not self.is_primary():
            self._forward_waiting()  # T1: hand the new primary what still waits
        seq = low
        for digest in chosen:
            seq += 1
            if not self._in_window(seq):
                continue  # at or below our stable checkpoint: nothing to re-prepare
            i = self.log.claim(seq)
            body = self.oplog.body_of(seq, digest)
            if digest == NULL_DIGEST:
                batch = []
            elif body is not None:
                batch = body
            else:
                batch = None
                if seq > self.last_exec:
                    self.missing[seq] = digest
            self._accept(i, seq, digest, batch)
            self._check_prepared(seq, i)
        if self.is_primary():
            self.seq = max(seq, self.last_exec, self.h)
            for wire in list(self.waiting_wires.values()):
                self.on_request(m.decode(wire))  # requests we saw as a backup (T1)
            self._cut_batches()
