# The phi-accrual failure detector (Hayashibara, Defago, Yared and Katayama, "The phi accrual
# failure detector", SRDS 2004) with Akka's formula
# (akka-remote/src/main/scala/akka/remote/PhiAccrualFailureDetector.scala), in fixed point, for
# a node with a 100 KB heap.
#
# Rules:
# - Sans-I/O: heartbeat(peer, now_ms), offline(peer, now_ms) and check(now_ms) are the inputs;
#   time is an argument (monotonic ms), nothing here reads a clock. The output is `events`, a
#   list the caller empties after each input: ("suspect", peer, phi_x100) when a peer becomes
#   suspected, ("trust", peer) when a suspected peer heartbeats again. Each input adds at most
#   one event per peer.
# - phi = log10(1 + exp(x)), x = y * (1.5976 + 0.070566 * y * y), y = (t - mean - pause) / std,
#   t the time since the last heartbeat, mean and std those of the recent inter-arrival
#   intervals, std at least min_std_ms: Akka's logistic approximation of -log10(1 - F(t)) for
#   the normal CDF F. Akka writes -log10(e / (1 + e)), e = exp(-x), which is the same number.
# - Integers only (a float is a 16-byte heap object on the 64-bit Unix port; a small int is
#   free): y in 1/256, mean and std in 1/16 ms, phi in 1/10000 (phi_e4), reported as phi * 100
#   rounded. y is clamped to -16..16 (phi(16) > 137), where every intermediate stays below
#   2**30, a small int even on a 32-bit board. phi_e4 is within 30 (phi within 0.003) of the
#   exact formula for phi <= 10, and within 3e-4 of it relatively above.
# - As in Akka: the first heartbeat seeds the history with first_ms -/+ a quarter of it (a
#   peer that sends one heartbeat and dies is still suspected); phi is 0 before the first
#   heartbeat (an unmonitored peer counts as healthy); an interval is recorded only if phi was
#   below the threshold when its heartbeat arrived (an outage does not skew the statistics).
#   offline() (the peer's MQTT Last Will) suspects it at once; the heartbeat that ends an
#   outage restarts its clock without recording the gap.
# - Memory is fixed at construction and small (0.7 KB live for 4 replicas, window 16, plus
#   ~1 KB for the module, on the 64-bit Unix port), in as few objects as possible (each
#   costs its header and a 16-byte block minimum): `buf`, one flat ring of `window` intervals
#   per peer (array 'h', 2 bytes each, capped at 32767 ms); `state`, one array 'i' of the
#   parameters and four ints per peer (not 'q': reading 'q' allocates a long int on
#   MicroPython); `since`, the arrival times (a list: they outgrow 32 bits). No input
#   allocates, except the event tuple of a transition.
# - Names are few and mostly ones the node has already interned (since, state, buf, update,
#   suspect...): every new name is a qstr, and the node sits a few qstrs below MicroPython's
#   next qstr pool, which would cost ~7 KB at once.
# - Lazy: heartbeat() stores an interval and marks the peer's statistics stale; they (mean,
#   std and the delay, the time since the last heartbeat at which phi reaches the threshold)
#   are recomputed at most once per heartbeat, when next needed. check() then only compares
#   now - since with the delay; phi itself is computed only for a report (phi(), the events).
#
# Defaults. window 16 instead of Akka's 1000: with 500 ms heartbeats that is 8 s of history,
# enough for a mean and a deviation that min_std_ms floors anyway, and it forgets the seeds
# after 16 beats; 1000 samples per peer would be 2 KB each, updated in O(window). threshold 8
# (Akka's): phi reaches 8 at y = 5.23, so a regular stream is suspected mean + pause +
# 5.23 * min_std_ms after its last heartbeat. min_std_ms 100 and pause 0: a 500 ms stream is
# suspected after ~1 s, and a node stalled up to ~520 ms (a collection, a busy host) is not.
# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import bytearray, int, min, range, type

try:
    from micropython import const
except ImportError:  # CPython (a function here would cost heap on MicroPython, int does not)
    const = int

# state[0:4]: the parameters: first_ms, min_std_ms and pause_ms (these two in 1/16 ms), yk
# (the least y, in 1/256, at which phi reaches the threshold). Peer j's four ints from
# 4 + 4 * j: mean + pause and max(std, min_std) (1/16 ms), the delay (ms; phi reaches the
# threshold at since[j] + delay), and its flags.
_FIRST = const(0)
_MIN_SD = const(1)
_PAUSE = const(2)
_YK = const(3)
_MU = const(4)
_SD = const(5)
_DELAY = const(6)
_FLAGS = const(7)
# flags: the fill (bits 0-7: below window, the count of intervals and the next slot; from
# window up, full, the oldest (next overwritten) slot at fill - window), and:
_OFFLINE = const(0x100)  # offline announced, no heartbeat since
_STALE = const(0x200)  # intervals recorded since mean, std and delay were computed
_FILL = const(0xFF)


def phi_e4(y):
    """10000 * phi at y = (t - mean - pause) / std given in 1/256 (an int); nondecreasing in y,
    0 <= phi_e4(y) <= phi_e4(4096) ~ 1.37e6 (y is clamped to -4096..4096)."""
    if y > 4096:
        y = 4096
    elif y < -4096:
        y = -4096
    # x = y * 1.5976 + y^3 * 0.070566, in 1/256; the coefficients in 1/4096 (6544, 289).
    x = (y * 6544 + ((y * y >> 8) * y >> 8) * 289) >> 12
    u = -x if x < 0 else x
    k = u >> 6
    g = 0
    if k < 32:
        # 10000 * log10(1 + exp(-u)) at u = k / 4, k = 0..32, two bytes each (big-endian):
        # the log10(1 + exp(-|x|)) term of phi, interpolated, 0 for |x| >= 8.
        t = (b"\x0b\xc2\t\xc5\x08\x0b\x06\x90\x05P\x04F\x03k\x02\xb8\x02'\x01\xb3\x01W\x01\r"
             b"\x00\xd3\x00\xa5\x00\x81\x00e\x00O\x00>\x000\x00%\x00\x1d\x00\x17\x00\x12\x00"
             b"\x0e\x00\x0b\x00\x08\x00\x07\x00\x05\x00\x04\x00\x03\x00\x02\x00\x02\x00\x01")
        a = t[2 * k] << 8 | t[2 * k + 1]
        g = a + (((t[2 * k + 2] << 8 | t[2 * k + 3]) - a) * (u & 63) >> 6)
    return (x * 4343 >> 8) + g if x > 0 else g  # 4343: 10000 / ln 10


class Detector:
    """Phi-accrual failure detector for the replicas ``range(n)`` but ``me``.

    ``threshold`` is phi * 100 (800: Akka's 8.0); ``suspect[j]`` is 1 while replica j is
    suspected. Ids outside ``range(n)`` and ``me`` are ignored. Raises ValueError for a
    threshold phi cannot reach, a window outside 2..127, or a non-positive min_std_ms or
    first_ms.
    """

    def __init__(self, n, me, threshold=800, window=16, min_std_ms=100, pause_ms=0,
                 first_ms=500):
        if not (2 <= window <= 127 and min_std_ms > 0 and first_ms > 0 and pause_ms >= 0
                and 0 < threshold * 100 <= phi_e4(4096)):
            raise ValueError("threshold")
        from array import array

        self.n = n
        self.me = me
        self.window = window
        self.buf = array("h", bytearray(2 * n * window))  # peer j's ring from j * window
        self.state = st = array("i", bytearray(16 + 16 * n))
        st[_FIRST] = first_ms
        st[_MIN_SD] = min_std_ms << 4
        st[_PAUSE] = pause_ms << 4
        lo, hi = -4096, 4096  # bisection
        while lo < hi:
            mid = (lo + hi) >> 1
            if phi_e4(mid) < threshold * 100:
                lo = mid + 1
            else:
                hi = mid
        st[_YK] = lo
        self.since = [None] * n  # the last heartbeat's arrival (ms); None: not monitored
        self.suspect = bytearray(n)
        self.events = []

    def update(self, j):
        """Recompute peer j's mean, std and delay from its ring (the other methods call this
        when they need them and they are stale)."""
        buf = self.buf
        st = self.state
        w = self.window
        c = st[4 * j + _FLAGS] & _FILL
        if c > w:
            c = w
        base = j * w
        s = 0
        for i in range(base, base + c):
            s += buf[i]
        mean = (s << 4) // c
        v = 0
        for i in range(base, base + c):
            d = (buf[i] << 4) - mean
            v += d * d
        v //= c
        sd = v  # the integer square root of v (Newton's method, from above)
        if v > 1:
            r = (v + 1) >> 1
            while r < sd:
                sd = r
                r = (r + v // r) >> 1
        if sd < st[_MIN_SD]:
            sd = st[_MIN_SD]
        mean += st[_PAUSE]
        st[4 * j + _MU] = mean
        st[4 * j + _SD] = sd
        # y >= yk  <=>  ((t << 4) - mean) << 8 >= yk * sd  <=>  t >= ceil(...) = delay
        st[4 * j + _DELAY] = -(-(st[_YK] * sd + (mean << 8)) >> 12)
        st[4 * j + _FLAGS] &= ~_STALE
        assert sd >= st[_MIN_SD] and c > 0

    def heartbeat(self, peer, now_ms):
        """Peer ``peer`` is alive at ``now_ms``: record the interval since its last heartbeat
        (unless phi had reached the threshold or it was offline); trust it if suspected."""
        if type(peer) is not int or not 0 <= peer < self.n or peer == self.me:
            return
        st = self.state
        k = 4 * peer
        flags = st[k + _FLAGS]
        w = self.window
        last = self.since[peer]
        if last is None:  # the first heartbeat: seed the history
            first = st[_FIRST]
            self.buf[peer * w] = first - (first >> 2)
            self.buf[peer * w + 1] = first + (first >> 2)
            flags = _STALE | 2
        elif now_ms < last:
            return  # the clock does not move back
        elif not flags & _OFFLINE:
            if flags & _STALE:
                self.update(peer)
            t = now_ms - last
            if t < st[k + _DELAY]:
                f = flags & _FILL
                self.buf[peer * w + (f if f < w else f - w)] = t if t < 32767 else 32767
                flags = (flags & ~_FILL) | _STALE | (f + 1 if f + 1 < 2 * w else w)
        self.since[peer] = now_ms
        st[k + _FLAGS] = flags & ~_OFFLINE
        assert 2 <= flags & _FILL < 2 * w  # the ring holds at least the two seeded intervals
        if self.suspect[peer]:
            self.suspect[peer] = 0
            self.events.append(("trust", peer))

    def offline(self, peer, now_ms):
        """Peer ``peer`` announced it is offline (its Last Will): suspected until it heartbeats."""
        if type(peer) is not int or not 0 <= peer < self.n or peer == self.me:
            return
        self.state[4 * peer + _FLAGS] |= _OFFLINE
        if not self.suspect[peer]:
            self.suspect[peer] = 1
            self.events.append(("suspect", peer, self.phi(peer, now_ms)))

    def check(self, now_ms):
        """Suspect every monitored peer whose phi has reached the threshold at ``now_ms``."""
        st = self.state
        for j in range(self.n):
            last = self.since[j]
            if last is None or self.suspect[j]:
                continue
            if st[4 * j + _FLAGS] & _STALE:
                self.update(j)
            if now_ms - last >= st[4 * j + _DELAY]:
                self.suspect[j] = 1
                self.events.append(("suspect", j, self.phi(j, now_ms)))

    def stalled(self, gap_ms, now_ms):
        """We did not run for the last ``gap_ms`` before ``now_ms``: no peer's silence counts
        that time (each last arrival moves on by it, never past ``now_ms``)."""
        since = self.since
        for j in range(self.n):
            if since[j] is not None:
                since[j] = min(since[j] + gap_ms, now_ms)

    def phi(self, peer, now_ms):
        """Peer ``peer``'s phi at ``now_ms`` times 100, rounded (an int: CBOR status messages
        carry no floats); 0 before its first heartbeat, and for ``me``."""
        last = self.since[peer]
        if last is None:
            return 0
        st = self.state
        if st[4 * peer + _FLAGS] & _STALE:
            self.update(peer)
        t = now_ms - last
        if t > 65535:  # y is clamped anyway; this keeps the products small ints
            t = 65535
        y = (((t << 4) - st[4 * peer + _MU]) << 8) // st[4 * peer + _SD]
        return (phi_e4(y) + 50) // 100
