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
import hashlib

from . import cbor

NULL_DIGEST = hashlib.sha256(cbor.encode([])).digest()  # the empty batch: a null request


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
        if len(entry) != 2 or type(entry[0]) is not int or type(entry[1]) is not bytes:
            return False
    for entries in (p, q):
        for entry in entries:
            if len(entry) != 3 or type(entry[0]) is not int or type(entry[1]) is not bytes:
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
    return low, checkpoint[1], chosen
