# Stake: weights, quorums and the primary of each view.
#
# Every quorum is by stake, never by count (DESIGN.md section 3), in integer arithmetic only:
# - a quorum certificate needs strictly more than 2/3 of total stake  (PBFT's "2f+1");
# - a weak certificate needs strictly more than 1/3 of total stake    (PBFT's "f+1"),
#   so it holds at least one correct replica while Byzantine stake stays below 1/3.
# With n = 3f+1 equal stakes these are exactly 2f+1 and f+1 replicas.
#
# The primary of each view is chosen by CometBFT's weighted round robin ("Proposer Selection
# Procedure", spec/consensus/proposer-selection.md of github.com/cometbft/cometbft), with the
# arithmetic of its Go implementation (types/validator_set.go: IncrementProposerPriority,
# RescalePriorities, shiftByAvgProposerPriority, incrementProposerPriority,
# getValWithMostPriority). Each replica with stake holds a priority A(i); one run is
#
#   1. scale   (spec "Proposer Priority Range"): diff = max(A) - min(A); if diff > 2*P, divide
#              every A(i) by ratio = ceil(diff / (2*P)). Go: `ratio := (diff + diffMax - 1) /
#              diffMax` and `ProposerPriority /= ratio` on int64, which TRUNCATES toward zero
#              (-7 / 4 == -1), not Python's floor (-7 // 4 == -2): see _quo.
#   2. centre  (spec "Validator Removal"): A(i) -= avg, avg = sum(A) / n. Go computes avg with
#              big.Int.Div, which is EUCLIDEAN division: for n > 0 that is floor, i.e. Python's
#              `//` (-13 / 3 == -5). (The spec's "New Validator" table writes avg = -4 for a sum
#              of -13 over 3 validators; the Go code, which every CometBFT node runs, gives -5.
#              The elected proposer is the same there; we follow the code.)
#   3. elect   (spec "Basic Algorithm"): A(i) += VP(i) for all; the proposer is the max A(i),
#              ties to the lower replica id (Go: lower address); then A(prop) -= P.
#
# P is the total stake and n the number of replicas with stake: a replica with zero stake is not
# in the validator set at all (CometBFT removes a validator whose power becomes 0), so it holds
# no priority, is never averaged over and is never elected. Go clips priorities to int64; with
# P <= MaxTotalVotingPower = MaxInt64/8 the clip never fires, and Python ints never overflow.
#
# An epoch's validator set starts with every priority 0 (what CometBFT's NewValidatorSet ends up
# with: all members enter at the same -1.125*P and centring brings them to 0), and the primary
# of view v is the proposer of run v+1: view 0's primary is the first pick. A validator joining
# an existing set starts at new_validator_priority(P) (spec "New Validator", the "-C*P" rule);
# Stake(weights, priorities) takes carried-over priorities for that use.

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import abs, int, len, list, max, min, range, sum, type


def _quo(a, b):
    """Go's integer division for b > 0: the quotient truncated toward zero."""
    q = abs(a) // b
    return q if a >= 0 else -q


def new_validator_priority(total):
    """Initial priority of a validator added to a set of total stake ``total`` (itself included).

    Spec "New Validator": A(V) = -1.125 * P; Go computeNewPriorities: -(P + (P >> 3)), so the
    penalty is exactly -P when P < 8.
    """
    return -(total + (total >> 3))


def proposer_step(powers, prio, total):
    """One run of the proposer selection over ``powers`` (all > 0) and ``prio`` (updated in
    place), with ``total`` = sum(powers). Returns the index of the elected proposer."""
    n = len(prio)
    diff_max = 2 * total
    diff = max(prio) - min(prio)
    if diff > diff_max:
        ratio = (diff + diff_max - 1) // diff_max
        for i in range(n):
            prio[i] = _quo(prio[i], ratio)
    avg = sum(prio) // n
    best = 0
    for i in range(n):
        a = prio[i] - avg + powers[i]
        prio[i] = a
        if a > prio[best]:
            best = i
    prio[best] -= total
    return best


class Stake:
    """The validator set of one epoch: ``weights[i]`` is replica i's stake (>= 0).

    ``priorities`` (optional, one int per replica; ignored for zero stake) are the proposer
    priorities the epoch starts from; by default all 0.
    """

    RECENT = 32  # primaries of the last RECENT views computed are kept

    def __init__(self, weights, priorities=None):
        if not weights:
            raise ValueError("empty validator set")
        for w in weights:
            if type(w) is not int or w < 0:
                raise ValueError("stake must be a non-negative int: %r" % (w,))
        self.weights = list(weights)
        self.n = len(weights)
        self.total = sum(weights)
        if self.total <= 0:
            raise ValueError("total stake must be positive")
        # The proposer selection runs over the replicas with stake, in id order.
        self._ids = [i for i in range(self.n) if self.weights[i] > 0]
        self._powers = [self.weights[i] for i in self._ids]
        if priorities is None:
            self._start = [0] * len(self._ids)
        else:
            if len(priorities) != self.n:
                raise ValueError("one priority per replica")
            for p in priorities:
                if type(p) is not int:
                    raise ValueError("priority must be an int: %r" % (p,))
            self._start = [priorities[i] for i in self._ids]
        # Cache: the priorities after the run of view self._view (-1: none run yet), and the
        # primaries of the last RECENT views up to it.
        self._view = -1
        self._prio = list(self._start)
        self._recent = [-1] * self.RECENT
        self._recent_view = [-1] * self.RECENT

    def of(self, replicas):
        """The stake held by the replica ids in ``replicas`` (an iterable of distinct ids)."""
        s = 0
        for i in replicas:
            s += self.weights[i]
        assert 0 <= s <= self.total  # distinct ids
        return s

    def is_quorum(self, stake):
        """True when ``stake`` is strictly more than 2/3 of the total."""
        return 3 * stake > 2 * self.total

    def is_weak(self, stake):
        """True when ``stake`` is strictly more than 1/3 of the total."""
        return 3 * stake > self.total

    def _run(self, prio, runs):
        """Advance ``prio`` by ``runs`` runs; the replica id elected by the last one."""
        best = -1
        for _ in range(runs):
            best = proposer_step(self._powers, prio, self.total)
        return self._ids[best]

    def primary(self, view):
        """The primary of ``view``: the proposer of run view+1 of the weighted round robin.

        Views normally only grow: the state of the highest view asked for is kept and advanced,
        so a sequence of views costs one run per view. An older view is answered from the last
        RECENT primaries, or else recomputed from the start without disturbing the cache.
        """
        if view < 0:
            raise ValueError("negative view")
        if view <= self._view:
            k = view % self.RECENT
            if self._recent_view[k] == view:
                return self._recent[k]
            return self._run(list(self._start), view + 1)
        return self._advance(view)

    def _advance(self, view):
        """primary(view) for a view above every one asked before: runs up to it. Apart from
        primary(), which runs per message and so keeps its frame within the 11 slots
        MicroPython keeps on the C stack (cbor.py's header)."""
        prio = self._prio
        powers = self._powers
        total = self.total
        ids = self._ids
        v = self._view
        r = self.RECENT
        p = None  # view > self._view: the loop runs at least once
        while v < view:
            v += 1
            p = ids[proposer_step(powers, prio, total)]
            self._recent[v % r] = p
            self._recent_view[v % r] = v
        self._view = view
        assert p is not None and self.weights[p] > 0  # only a replica with stake proposes
        return p

    def priorities(self, view):
        """The priorities after the run of ``view`` (view -1: the start), one per replica id,
        None for a replica without stake."""
        if view < -1:
            raise ValueError("view before the start")
        if view == self._view:
            prio = list(self._prio)
        else:
            prio = list(self._start)
            self._run(prio, view + 1)
        out = [None] * self.n  # type: list
        for k in range(len(self._ids)):
            out[self._ids[k]] = prio[k]
        return out

    def faults_tolerated(self):
        """The f of PBFT's n = 3f+1 when stakes are equal (reported in summaries)."""
        return (self.n - 1) // 3
