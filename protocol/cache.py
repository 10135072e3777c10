# A bounded cache with a named eviction policy (the page cache of pagestore.py).
#
# Rules:
# - At most ``capacity`` entries. put() of a new key into a full cache first evicts one entry,
#   chosen by the policy, and returns it so the caller can write it back if it is dirty:
#     "lru"  the entry used least recently (get or put),
#     "lfu"  the entry used least often since it entered, the least recently used among equals,
#     "fifo" the entry that entered first, however often it was used.
# - Deterministic: eviction depends only on the sequence of calls (a use counter, no clock, no
#   dict order), so every port evicts the same entries.
# - counts = [hits, misses] of get()s, for the hit rate the status and the bench report.
# - Memory: one 3-slot list per entry; eviction scans the entries (capacity is small).

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import iter, len, next

POLICIES = ("lru", "lfu", "fifo")


class Cache:
    """key -> value, at most ``capacity`` of them, evicting by ``policy`` (one of POLICIES)."""

    def __init__(self, capacity, policy="lru"):
        if policy not in POLICIES:
            raise ValueError("cache policy %r: want one of %s" % (policy, ", ".join(POLICIES)))
        if capacity < 1:
            raise ValueError("cache capacity must be at least 1")
        self.capacity = capacity
        self.policy = policy
        self.entries = {}  # key -> [value, last use, uses] (fifo: last use is the entry time)
        self.clock = 0
        self.counts = [0, 0]  # hits, misses

    def __len__(self):
        return len(self.entries)

    def get(self, key):
        """The value cached for ``key`` (a use), or None."""
        e = self.entries.get(key)
        if e is None:
            self.counts[1] += 1
            return None
        self.counts[0] += 1
        self._use(e)
        return e[0]

    def put(self, key, value):
        """Cache ``value`` for ``key`` (a use). Returns the evicted (key, value), or None."""
        e = self.entries.get(key)
        if e is not None:
            e[0] = value
            self._use(e)
            return None
        evicted = self.evict() if len(self.entries) >= self.capacity else None
        self.clock += 1
        self.entries[key] = [value, self.clock, 1]
        assert len(self.entries) <= self.capacity
        assert evicted is None or evicted[0] not in self.entries
        return evicted

    def evict(self, keep=None):
        """Remove the entry the policy evicts next, ``keep`` aside, and return it as (key,
        value); None when no other entry is cached. (A cache bounded in bytes by its caller
        evicts this way to make room.)"""
        victim = self._victim(keep)
        if victim is None:
            return None
        return victim, self.entries.pop(victim)[0]

    def clear(self):
        self.entries = {}

    def items(self):
        """(key, value) pairs in no particular order."""
        return [(k, e[0]) for k, e in self.entries.items()]

    def _use(self, e):
        self.clock += 1
        e[2] += 1
        if self.policy != "fifo":
            e[1] = self.clock

    def _victim(self, keep=None):
        """The key the policy evicts, ``keep`` aside, or None when there is no other (entries
        compared in place: no tuple per entry). Runs per page read that misses: no for loop
        (its iterator takes four slots), so its frame stays within 11 slots (cbor.py's
        header), off the heap."""
        best = None
        keys = iter(self.entries)
        k = next(keys, None)  # keys are never None
        while k is not None:
            if k != keep and (best is None or self._before(k, best)):
                best = k
            k = next(keys, None)
        return best

    def _before(self, k, other):
        """Does the policy evict entry ``k`` before entry ``other``?"""
        e = self.entries[k]
        b = self.entries[other]
        if self.policy == "lfu" and e[2] != b[2]:
            return e[2] < b[2]
        return e[1] < b[1]
