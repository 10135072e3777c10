# The message log of one view: a ring of `window` slots in preallocated parallel arrays.
#
# Rules:
# - Slot i holds sequence number seq with i = seq % window, live while h < seq <= h + window
#   (the caller owns h and only asks for sequence numbers inside the window).
# - A slot records ONE digest: the accepted pre-prepare's, or before it arrives, the digest of
#   the first vote. Votes are bits per replica (so at most 32 replicas): a vote for the slot's
#   digest sets its sender's bit; a vote for another digest is refused (the caller counts it).
#   A pre-prepare that contradicts the provisional digest replaces it and clears the votes:
#   correct replicas of one view only ever vote for the primary's digest.
# - Memory is allocated once here (about 40 bytes a slot, plus the digests and batches it
#   refers to); a 100 KB heap cannot afford an object per slot (about 300 bytes each on a
#   64-bit port).
import hashlib
from array import array

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import bytearray, int, range, sorted

try:
    from micropython import const
except ImportError:  # CPython
    const = int  # CPython: const(x) is x

from . import cbor

_ACCEPTED = const(1)   # the pre-prepare is here (digest and batch are the primary's)
_PREPARED = const(2)
_COMMITTED = const(4)
_EXECUTED = const(8)

REPLICAS_MAX = const(32)  # a slot's votes are bits of one word (the host refuses more)


def stake_of(mask, weights):
    """The stake of the replicas with a bit in ``mask`` (bit j: replica j)."""
    s = 0
    j = 0
    while mask:
        if mask & 1:
            s += weights[j]
        mask >>= 1
        j += 1
    return s


class Log:
    """Slots for ``window`` consecutive sequence numbers of ``n`` replicas."""

    def __init__(self, window, n):
        assert window > 0
        assert 0 < n <= REPLICAS_MAX
        self.window = window
        zeros = [0] * window
        self.seqs = array("Q", zeros)
        self.digests = [None] * window
        self.batches = [None] * window
        self.flags = bytearray(window)
        self.prepares = array("I", zeros)  # bit j: replica j's prepare for digests[i]
        self.commits = array("I", zeros)   # bit j: replica j's commit for digests[i]

    def find(self, seq):
        """The slot index of ``seq`` if anything is logged for it, else -1."""
        i = seq % self.window
        if seq and self.seqs[i] == seq:
            return i
        return -1

    def claim(self, seq):
        """The slot index of ``seq``, reset first if it held an older sequence number."""
        i = seq % self.window
        if self.seqs[i] != seq:
            assert self.seqs[i] < seq
            self.seqs[i] = seq
            self.digests[i] = None
            self.batches[i] = None
            self.flags[i] = 0
            self.prepares[i] = 0
            self.commits[i] = 0
        return i

    def clear(self):
        """Forget every slot (a new view starts from an empty log)."""
        for i in range(self.window):
            self.seqs[i] = 0
            self.digests[i] = None
            self.batches[i] = None
            self.flags[i] = 0
            self.prepares[i] = 0
            self.commits[i] = 0

    def live(self, h):
        """Sequence numbers above ``h`` with a slot, ascending."""
        return sorted(s for s in self.seqs if s > h)

    # ---- the pre-prepare

    def accepted(self, i):
        return self.flags[i] & _ACCEPTED != 0

    def accept(self, i, digest, batch):
        """Record the pre-prepare; votes for another provisional digest are discarded."""
        assert not self.flags[i] & _ACCEPTED
        if self.digests[i] != digest:
            self.prepares[i] = 0
            self.commits[i] = 0
        self.digests[i] = digest
        self.batches[i] = batch
        self.flags[i] |= _ACCEPTED

    def attach(self, i, batch):
        """Give the slot its batch when it came from elsewhere than the pre-prepare (the caller
        checked it hashes to the slot's digest)."""
        assert self.digests[i] is not None
        self.batches[i] = batch

    # ---- votes

    def vote(self, votes, i, sender, digest):
        """Record ``sender``'s vote in ``votes`` (self.prepares or self.commits).

        Returns False when it is refused: a different digest from the slot's.
        """
        d = self.digests[i]
        if d is None:
            self.digests[i] = digest
        elif d != digest:
            return False
        votes[i] |= 1 << sender
        return True

    def voted(self, votes, i, sender):
        return votes[i] >> sender & 1 == 1

    def stake(self, votes, i, weights):
        """The stake of the replicas with a bit in ``votes[i]``."""
        return stake_of(votes[i], weights)

    # ---- progress flags

    def prepared(self, i):
        return self.flags[i] & _PREPARED != 0

    def committed(self, i):
        return self.flags[i] & _COMMITTED != 0

    def executed(self, i):
        return self.flags[i] & _EXECUTED != 0

    def mark_prepared(self, i):
        assert self.flags[i] & _ACCEPTED
        self.flags[i] |= _PREPARED

    def mark_committed(self, i):
        """Committed: our prepared certificate plus commits, or a commit certificate alone
        (a lagging replica), either way with the batch in hand."""
        assert self.batches[i] is not None
        self.flags[i] |= _COMMITTED

    def mark_executed(self, i):
        """Executed: the batch is no longer needed here (the digest stays for the view)."""
        assert self.flags[i] & _COMMITTED
        self.flags[i] |= _EXECUTED
        self.batches[i] = None


class Oplog:
    """What outlives a view, per sequence number in the window (PBFT-NOTES VC1, BM1).

    For seq (slot seq % window): P, the digest and view it last prepared in; Q, up to two
    (digest, view) it sent a pre-prepare or prepare for, newest first; and the batch body of
    one digest, kept until the sequence number is stable (re-proposal after a view change,
    BATCH answers to laggers). Preallocated parallel arrays, like Log; digests are shared with
    the messages they came in.

    Bodies are on ``flash``, not in RAM: slot i's in file "O<i>", its canonical CBOR (the
    bytes the digest hashes), written over when the slot is reused; only its digest is in
    RAM. A body read back is checked against its digest, so a torn or stale file reads as
    no body (the replica then fetches it as any batch it lacks). Held in RAM, the bodies of
    a window took its budget of 4 KB of requests (batches of at most 341 bytes at K = 8),
    and bigger batches were not worth their heap; on flash, a node at 64 clients batches
    twice as much (see replica.py). A write need not be atomic; one the flash fails keeps
    no body. Across a restart only the P entries written ahead come back (replica.py), and
    with each the body its slot's file holds, when that file hashes to the P digest
    (reclaim_body): the batches a cluster executed before all its replicas restarted are
    then still there to re-propose, where before every replica missed them and nothing
    executed again.
    """

    def __init__(self, window, flash):
        self.window = window
        self.flash = flash
        zeros = [0] * window
        self.seqs = array("Q", zeros)
        self.p_digest = [None] * window
        self.p_view = array("q", zeros)
        self.q_digest = [None] * (2 * window)
        self.q_view = array("q", [0] * (2 * window))
        self.body_digest = [None] * window

    def _slot(self, seq):
        """The index of ``seq``, resetting a slot that held an older sequence number."""
        i = seq % self.window
        if self.seqs[i] != seq:
            assert self.seqs[i] < seq
            self._free(i)
            self.seqs[i] = seq
        return i

    def _free(self, i):
        self.p_digest[i] = None
        self.q_digest[2 * i] = None
        self.q_digest[2 * i + 1] = None
        self.body_digest[i] = None
        self.seqs[i] = 0

    def collect(self, h):
        """Forget every sequence number at or below ``h`` (stable)."""
        for i in range(self.window):
            if 0 < self.seqs[i] <= h:
                self._free(i)

    def prepared(self, seq, digest, view):
        i = self._slot(seq)
        self.p_digest[i] = digest
        self.p_view[i] = view

    def voted(self, seq, digest, view):
        i = self._slot(seq)
        k = 2 * i
        if self.q_digest[k] == digest:
            self.q_view[k] = view
            return
        self.q_digest[k + 1] = self.q_digest[k]
        self.q_view[k + 1] = self.q_view[k]
        self.q_digest[k] = digest
        self.q_view[k] = view

    def keep_body(self, seq, digest, batch):
        """Write ``batch``, whose digest is ``digest``, as seq's body."""
        i = self._slot(seq)
        if self.body_digest[i] == digest:
            return
        self.body_digest[i] = None  # until the file holds it
        try:
            self.flash.write("O%d" % i, cbor.encode_transient(batch), False)
        except OSError:
            return
        self.body_digest[i] = digest

    def reclaim_body(self, seq, digest):
        """After a restart: the body of (seq, digest), a P entry put back, is slot seq's file
        if that file hashes to ``digest`` (body_of checks it when read)."""
        i = self._slot(seq)
        self.body_digest[i] = digest

    def body_of(self, seq, digest):
        """The batch of (seq, digest) if held, else None."""
        i = seq % self.window
        if self.seqs[i] != seq or self.body_digest[i] != digest:
            return None
        data = self.flash.read("O%d" % i)
        if data is None or hashlib.sha256(data).digest() != digest:
            return None
        return cbor.decode(data)

    def entries(self, h):
        """P and Q lists for a VIEW-CHANGE: [[seq, digest, view]...] for h < seq, ascending.
        Q leaves out what a P entry already says (the same digest and view)."""
        p = []
        q = []
        for seq in sorted(s for s in self.seqs if s > h):
            i = seq % self.window
            if self.p_digest[i] is not None:
                p.append([seq, self.p_digest[i], self.p_view[i]])
            for k in (2 * i, 2 * i + 1):
                d = self.q_digest[k]
                if d is None or d == self.p_digest[i] and self.q_view[k] == self.p_view[i]:
                    continue  # a P entry stands for the same Q entry (viewchange A2)
                q.append([seq, d, self.q_view[k]])
        return p, q
