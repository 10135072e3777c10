# Stake: weights, quorums and the primary of each view.
#
# Every quorum is by stake, never by count (DESIGN.md section 3), in integer arithmetic only:
# - a quorum certificate needs strictly more than 2/3 of total stake  (PBFT's "2f+1");
# - a weak certificate needs strictly more than 1/3 of total stake    (PBFT's "f+1"),
#   so it holds at least one correct replica while Byzantine stake stays below 1/3.
# With n = 3f+1 equal stakes these are exactly 2f+1 and f+1 replicas.


class Stake:
    """The validator set of one epoch: ``weights[i]`` is replica i's stake (>= 0)."""

    def __init__(self, weights):
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

    def of(self, replicas):
        """The stake held by the replica ids in ``replicas`` (an iterable of distinct ids)."""
        s = 0
        for i in replicas:
            s += self.weights[i]
        return s

    def is_quorum(self, stake):
        """True when ``stake`` is strictly more than 2/3 of the total."""
        return 3 * stake > 2 * self.total

    def is_weak(self, stake):
        """True when ``stake`` is strictly more than 1/3 of the total."""
        return 3 * stake > self.total

    def primary(self, view):
        """The primary of ``view``: round robin over replicas with stake."""
        voting = [i for i in range(self.n) if self.weights[i] > 0]
        return voting[view % len(voting)]

    def faults_tolerated(self):
        """The f of PBFT's n = 3f+1 when stakes are equal (reported in summaries)."""
        return (self.n - 1) // 3
