# pyright: reportAttributeAccessIssue=false
# (StateTransfer is a mixin of replica.Replica: the attributes it reads are the replica's.)
# State transfer (PBFT-NOTES N7): a replica that lags behind a checkpoint replicas with over
# 1/3 of stake vouch for fetches its state, part by part, and serves its own to others.
#
# Rules:
# - A mixin of replica.Replica (its fields and helpers; TigerBeetle peels its replica the same
#   way): these methods read and write the replica's state, and nothing else calls them.
# - One transfer at a time (self.transfer, a Transfer, or None). Its checkpoint is above h;
#   it ends when complete and verified (_install_state; a check that finds no heap is
#   tried again at the next tick, with the stage kept), when the replica executes past it
#   (replica._mark_stable drops it), or it moves to a newer checkpoint a source offers.
# - The parts come from flash (state.State.read_part) in chunks of _CHUNK_BYTES, and go to a
#   staging area on flash (state.Fetch): RAM holds one chunk, whatever the size of the state.
#   The staged state is checked against its digest before it replaces ours; a state that
#   fails the check is fetched again whole (fetch_full), since the page tags we trusted to
#   skip pages may have lied.
# - A served checkpoint stays readable (pinned) for _PIN_MS after each fetch, even when our
#   stable checkpoint moves on: a long transfer under load finishes instead of restarting.
# - A source that sent no chunk since the last retransmission tick is asked again, and the
#   next source only after _PATIENCE_TICKS such ticks: under load a chunk's round trip may
#   outlast a tick, and another source may no longer hold the checkpoint (it offers its
#   stable one: the transfer starts over).
# - A checkpoint is installed only when replicas with over 1/3 of stake vouch for it (N7).
#   When a source offers its stable checkpoint instead of the one asked for, the transfer
#   moves to the newest checkpoint such replicas report, or else to the offer: then it
#   counts the source (the offer is its authenticated claim), asks every replica for its
#   checkpoint votes (a STATUS), and counts each CHECKPOINT for it that arrives while it
#   runs (a vote broadcast before came when that checkpoint was beyond our window, where
#   only each replica's newest is kept).
# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import int, len, list, range

try:
    from micropython import const
except ImportError:  # CPython
    const = int

from . import messages as m
from .state import StateError
from .viewchange import NORMAL, VIEW_CHANGE

# A state transfer chunk. Each takes two blocks of its size at either end (the part read and
# the wire at the source; the received copy and its decoded data at the fetcher), and a
# fetcher is a node behind, often with the most fragmented heap: at 256 clients one fetching
# 1 KB chunks dropped 48 messages it had no heap to receive and never finished. 512 bytes:
# tools/bench_transfer.py 10000 caught up in 4.98 s against 5.01 s with 1 KB (the time is
# the restart and the check, not the chunks' round trips).
_CHUNK_BYTES = const(512)
_PIN_MS = const(1000)       # a checkpoint served stays readable this long after a fetch
_PATIENCE_TICKS = const(3)  # ticks without a chunk before the next source is asked


class Transfer:
    """A state transfer under way: checkpoint (seq, digest), the replicas asked in turn
    (``sources``, the one asked now at ``source`` modulo their number), whether the
    checkpoint was vouched for when the transfer started or moved to it, the replicas that
    vouched for it since (``voters``, at most one entry per replica), and the Fetch staging
    it."""

    def __init__(self, seq, digest, sources, vouched, fetch):
        assert sources
        self.seq = seq
        self.digest = digest
        self.sources = sources
        self.source = 0
        self.vouched = vouched
        self.voters = []
        self.fetch = fetch
        self.mark = -1  # fetch.bytes at the last retransmission tick
        self.stalls = 0  # retransmission ticks since fetch.bytes last moved


class StateTransfer:
    """Replica's state transfer: fetching (on_chunk) and serving (on_fetch) checkpoints."""

    def _maybe_fetch_state(self, seq, digest):
        """Fetch checkpoint (seq, digest) once replicas with over 1/3 of stake vouch for it
        and we have not executed up to it (N7: a lagging replica)."""
        if self.transfer is not None or seq <= self.last_exec:
            return
        stuck = self.last_exec == self.progress_mark
        if seq <= self.last_exec + self.K and not (self.status == VIEW_CHANGE or stuck):
            return  # close behind and moving: normal catch-up gets us there
        votes = self.checkpoints.get(seq, {})
        if self._backed(seq, votes, digest):
            sources = [j for j in votes if votes[j] == digest and j != self.me]
            self._start_transfer(seq, digest, sources)

    def _start_transfer(self, seq, digest, sources):
        assert self.transfer is None  # one at a time
        assert seq > self.last_exec and self.me not in sources
        if not sources:
            sources = [j for j in range(self.stake.n) if j != self.me]
        self.transfer = Transfer(seq, digest, sources, True, self._new_fetch(seq, digest))
        self.events.append(("fetch", seq, digest))
        self._fetch_next()

    def _new_fetch(self, seq, digest):
        """The Fetch that stages checkpoint (seq, digest); fetch.py is loaded by the first
        transfer, not at boot: a node that loads its modules into its heap boots in less."""
        from . import fetch
        return fetch.Fetch(self.state, seq, digest, self.fetch_full)

    def _fetch_next(self):
        t = self.transfer
        want = None if t is None else t.fetch.want()
        assert t is not None and want is not None  # only while a transfer misses parts
        part, offset = want
        self._send(t.sources[t.source % len(t.sources)], m.FETCH, t.seq, t.digest, part, offset)

    def _vouched(self, t):
        """Do replicas with over 1/3 of stake report transfer t's checkpoint?"""
        votes = self.checkpoints.get(t.seq, {})
        holders = [j for j in range(self.stake.n) if j in t.voters or votes.get(j) == t.digest
                   or self.ahead.get(j) == (t.seq, t.digest)]
        return self.stake.is_weak(self.stake.of(holders))

    def _newest_vouched(self):
        """(seq, digest, reporters) of the newest checkpoint beyond our window that replicas
        with over 1/3 of stake report as their newest; None when there is none."""
        best = None
        for j in self.ahead:
            seq, digest = self.ahead[j]
            if best is None or seq > best[0]:
                agree = self._reporting(seq, digest)
                if self.stake.is_weak(self.stake.of(agree)):
                    best = (seq, digest, agree)
        return best

    def _move_transfer(self, t, seq, digest, vouched, sources):
        """Fetch checkpoint (seq, digest) instead, from ``sources`` (which vouch for it)
        first."""
        t.seq, t.digest, t.vouched, t.source, t.stalls = seq, digest, vouched, 0, 0
        t.voters = list(sources)
        t.sources = sources + [j for j in t.sources if j not in sources]
        t.fetch = self._new_fetch(seq, digest)

    def _count_vote(self, msg):
        """A CHECKPOINT for the checkpoint we fetch vouches for it."""
        t = self.transfer
        if t is not None and msg.seq == t.seq and msg.digest == t.digest \
                and msg.sender not in t.voters:
            t.voters.append(msg.sender)

    def on_fetch(self, msg):
        """Serve a part of a checkpoint we hold, and keep serving it (pinned) for _PIN_MS after
        each fetch even if our stable checkpoint moves on: a transfer of many pages under load
        then finishes instead of starting over at every checkpoint. Serving changes nothing
        but the pin, so a heap too fragmented for the chunk (two ~1 KB pieces: the bytes read,
        the wire) drops the fetch, which its sender repeats, rather than restart us from
        flash: that restart would make a second replica behind."""
        try:
            self._serve(msg)
        except MemoryError:
            self._drop("fetch: heap fragmented")

    def _serve(self, msg):
        got = None
        held = self.own_checkpoints.get(msg.seq)
        if self.serving is not None and self.serving[0] == msg.seq:
            held = self.serving[1]
        if held == msg.digest:
            got = self.state.read_part(msg.seq, msg.part, msg.offset, _CHUNK_BYTES)
        seq, digest, part, offset = msg.seq, msg.digest, msg.part, msg.offset
        if got is None:
            if self.h <= msg.seq:
                self._drop("fetch of a state not held")
                return
            # That state is gone here (our window moved on): offer our stable one.
            seq, digest, part, offset = self.h, self.own_checkpoints[self.h], 0, 0
            got = self.state.read_part(seq, 0, 0, _CHUNK_BYTES)
        self.state.pin(seq)
        self.serving = (seq, digest, self.now + _PIN_MS)
        total, data = got
        if offset <= total:
            self._send(msg.sender, m.CHUNK, seq, digest, part, offset, total, data)

    def on_chunk(self, msg):
        t = self.transfer
        if t is not None and msg.part == 0 and msg.offset == 0 and msg.seq > t.seq \
                and msg.seq > self.last_exec:
            # The checkpoint we fetch is gone at the source, which offers its stable one
            # instead. Fetch the newest that replicas with over 1/3 of stake report, when it
            # is no older: vouched for, and its reporters hold it. Else take the offer, which
            # is checked against its digest and its vouchers when complete.
            newest = self._newest_vouched()
            if newest is not None and newest[0] >= msg.seq:
                self._move_transfer(t, newest[0], newest[1], True, newest[2])
            else:
                self._move_transfer(t, msg.seq, msg.digest, False, [msg.sender])
                self._send_status()  # the others' votes for it
            if t.seq != msg.seq or t.digest != msg.digest:
                self._fetch_next()
                return
        if t is None or msg.seq != t.seq or msg.digest != t.digest \
                or t.fetch.want() != (msg.part, msg.offset):
            return
        refused = t.fetch.take(msg.part, msg.offset, msg.total, msg.data)
        if refused:
            self._drop(refused)
            return
        if t.fetch.want() is not None:
            self._fetch_next()
            return
        self._finish_transfer(t)

    def _finish_transfer(self, t):
        """Install transfer t's checkpoint, staged whole, once vouched for and checked. A
        heap with no piece for the check (a page read, its entries) keeps the transfer, to
        be checked again at the next retransmission tick: the check changes nothing, and a
        restart from flash would start the transfer over (a replica behind under 256
        clients fetched, ran out of heap checking, restarted, and fetched again)."""
        if t.seq <= self.last_exec or not (t.vouched or self._vouched(t)):
            self.transfer = None
            self.state.clear_stage()
            self._drop("state not vouched for")
            return
        try:
            meta = t.fetch.check()
        except MemoryError:
            self._drop("no heap to check the transferred state")
            return
        except StateError:
            self.transfer = None
            self.fetch_full = True  # the tags we went by may have lied: take every page
            self._drop("transferred state does not verify")
            return
        self.transfer = None
        t.fetch.install(meta)
        self.fetch_full = False
        self.counts["transfer_bytes"] += t.fetch.bytes
        self._install_state(t.seq, t.digest, meta)

    def _install_state(self, seq, digest, meta):
        """Adopt checkpoint ``seq``, just installed on flash, as our executed, stable state."""
        assert seq > self.last_exec
        self._adopt(meta, digest)
        for client in list(self.waiting):
            del self.waiting[client]
            del self.waiting_wires[client]
        self._forget_executed()
        if self.status == NORMAL:
            self.vc_deadline = None  # T1 runs while requests wait: none do now
        self.events.append(("transferred", seq, digest))
        self._broadcast(m.CHECKPOINT, seq, digest)  # peers may still need our vote
        self._mark_stable(seq)
        self._vote_held_back(seq)
        self._execute_ready()
        if self.status == VIEW_CHANGE:
            self._after_view_change_input()  # a new view may have waited for this state

    def _retransmit_fetch(self):
        """RT1 during a transfer: no chunk since the last tick, so ask the source again; none
        for _PATIENCE_TICKS ticks, so ask the next one. A transfer staged whole whose check
        found no heap is checked again."""
        t = self.transfer
        assert t is not None  # called during a transfer only
        if t.fetch.want() is None:
            self._finish_transfer(t)
            return
        if t.fetch.bytes != t.mark:
            t.mark = t.fetch.bytes
            t.stalls = 0
            return
        t.stalls += 1
        if t.stalls >= _PATIENCE_TICKS:
            t.stalls = 0
            t.source += 1
        self._fetch_next()

    def _release_served(self, now_ms):
        """Unpin the checkpoint we serve once nobody fetched it for _PIN_MS."""
        if self.serving is not None and now_ms >= self.serving[2]:
            self.serving = None
            self.state.unpin()
