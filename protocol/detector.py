# The phi-accrual failure detector (Hayashibara, Defago, Yared and Katayama, "The phi accrual
# failure detector", SRDS 2004), computed as Akka computes it
# (akka-remote/src/main/scala/akka/remote/PhiAccrualFailureDetector.scala).
#
# Rules:
# - Sans-I/O: heartbeat(now_ms), offline(now_ms) and check(now_ms) are the only inputs; time is
#   an argument (a monotonic millisecond count that does not wrap), nothing here reads a clock.
# - phi = -log10(1 - F(t)), t the time since the last heartbeat and F the normal CDF with the
#   mean and standard deviation of the recent inter-arrival intervals, approximated as in Akka
#   by the logistic function: y = (t - mean) / std, x = y * (1.5976 + 0.070566 * y * y),
#   1 - F = e / (1 + e) with e = exp(-x). Akka writes phi = -log10(e / (1 + e)) for t > mean
#   and -log10(1 - 1 / (1 + e)) otherwise; both equal log10(1 + exp(x)), computed here as
#   max(x, 0) / ln 10 + log10(1 + exp(-|x|)), which neither overflows nor takes log10(0)
#   (Akka's form reaches log10(0) from y ~ 21.6 in doubles, ~ 10.7 on a float32 port).
# - As in Akka: the acceptable pause is added to the mean; std is at least min_std_ms; the
#   first heartbeat seeds the history with two intervals, first_interval_ms -/+ a quarter of
#   it (so a peer that sends one heartbeat and dies is still suspected); phi is 0.0 before
#   the first heartbeat (an unmonitored peer counts as healthy); an interval is recorded only
#   if phi was below the threshold when its heartbeat arrived (a long outage does not skew
#   the statistics).
# - Memory is bounded: the last `window` intervals live in a preallocated ring (array 'i'),
#   with a running sum and sum of squares (exact ints), so heartbeat() and phi() are O(1).
# - Detector keeps one PhiAccrual per replica id in range(n). offline() (the MQTT Last Will
#   status) suspects a peer at once until its next heartbeat; the heartbeat that ends an
#   outage restarts the peer's clock without recording the gap. Each transition (suspect,
#   recover) is reported once by check(); reports are bounded (at most two per peer).
#
# Our defaults, for MCUs heartbeating every ~200 ms (target: suspect within 3 intervals,
# 600 ms, of the last heartbeat) instead of Akka's 8.0 / 1000 / 100 ms / 3 s / 1 s:
# - threshold 8.0 (Akka's): phi >= 8 once t >= mean + pause + 5.2 std (see crossing_y()).
# - min_std_ms 50: a regular 200 ms stream is suspected 200 + 5.2 * 50 = 461 ms after its last
#   heartbeat (2.3 intervals), while one lost heartbeat (a 400 ms gap, phi 4.74) is tolerated.
# - acceptable_pause_ms 0: a pause would delay every suspicion by as much; with 200 ms
#   heartbeats and min_std 50 the budget left for it under 600 ms is ~139 ms.
# - window 100 intervals (400 bytes per peer; 20 s of history at 200 ms) instead of 1000.
# - first_interval_ms 500: a peer is suspected 500 + 5.2 * 125 = 1153 ms after its only
#   heartbeat. It must not be far below the real heartbeat period: the seeds put the first
#   crossing at 2.3 * first_interval_ms, and a heartbeat arriving later than that is not
#   recorded (phi had crossed), so a period above ~1150 ms would never be learned and the
#   peer would flap suspect/recover forever (Akka behaves alike). With 200 ms heartbeats the
#   seeds widen std until the window pushes them out: 788 ms to suspicion after 16 beats,
#   461 ms once only real intervals remain (100 beats, 20 s). Pass the real period if known.
import math
from array import array

THRESHOLD = 8.0
WINDOW = 100
MIN_STD_MS = 50
ACCEPTABLE_PAUSE_MS = 0
FIRST_INTERVAL_MS = 500
PHI_SCALE = 10           # phis() reports phi in tenths: CBOR status messages carry no floats
PHI_REPORT_MAX = 1000    # ... capped at phi 100.0
INTERVAL_MAX_MS = 0x3FFFFFFF  # longer intervals are recorded as this (fits array 'i')

_LN10 = math.log(10.0)


def phi_of(time_diff, mean, std):
    """Akka's phi for ``time_diff`` ms since the last heartbeat, N(mean, std) intervals.

    Equal to ``-log10(e / (1 + e))``, ``e = exp(-y * (1.5976 + 0.070566 * y * y))``,
    ``y = (time_diff - mean) / std``; ``std`` must be > 0. Never raises, never infinite for
    finite arguments.
    """
    y = (time_diff - mean) / std
    x = y * (1.5976 + 0.070566 * y * y)
    if x > 0:
        return x / _LN10 + math.log10(1.0 + math.exp(-x))
    return math.log10(1.0 + math.exp(x))


def crossing_y(threshold=THRESHOLD):
    """The y = (t - mean) / std at which phi_of reaches ``threshold`` (bisection)."""
    lo, hi = -10.0, 10.0
    while phi_of(hi, 0.0, 1.0) < threshold:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if phi_of(mid, 0.0, 1.0) < threshold:
            lo = mid
        else:
            hi = mid
    return hi


class PhiAccrual:
    """Suspicion level of one monitored process from its heartbeat arrival times.

    ``heartbeat(now_ms)`` records an arrival; ``phi(now_ms)`` is the suspicion level at
    ``now_ms`` (0.0 before the first heartbeat); ``available(now_ms)`` is ``phi < threshold``.
    The statistics cover the last ``window`` recorded intervals (``count`` of them, at most
    ``window``), the first two of which are the seeds laid by the first heartbeat until they
    are pushed out.
    """

    def __init__(self, threshold=THRESHOLD, window=WINDOW, min_std_ms=MIN_STD_MS,
                 acceptable_pause_ms=ACCEPTABLE_PAUSE_MS, first_interval_ms=FIRST_INTERVAL_MS):
        if not threshold > 0:
            raise ValueError("threshold must be > 0")
        if window < 1:
            raise ValueError("window must be >= 1")
        if not min_std_ms > 0:
            raise ValueError("min_std_ms must be > 0")
        if acceptable_pause_ms < 0:
            raise ValueError("acceptable_pause_ms must be >= 0")
        if first_interval_ms < 1:
            raise ValueError("first_interval_ms must be >= 1")
        self.threshold = threshold
        self.window = window
        self.min_std_ms = min_std_ms
        self.acceptable_pause_ms = acceptable_pause_ms
        self.first_interval_ms = first_interval_ms
        self.ring = array("i", [0] * window)
        self.head = 0          # slot of the oldest interval (the next overwritten when full)
        self.count = 0
        self.total = 0         # sum of the intervals in the ring
        self.total_sq = 0      # sum of their squares
        self.last_ms = None    # arrival of the last heartbeat; None: not monitoring yet

    def _record(self, interval):
        if interval > INTERVAL_MAX_MS:
            interval = INTERVAL_MAX_MS
        ring = self.ring
        if self.count < self.window:
            i = self.head + self.count
            if i >= self.window:
                i -= self.window
            self.count += 1
        else:
            i = self.head
            old = ring[i]
            self.total -= old
            self.total_sq -= old * old
            self.head = i + 1 if i + 1 < self.window else 0
        ring[i] = interval
        self.total += interval
        self.total_sq += interval * interval

    def heartbeat(self, now_ms, sample=True):
        """Record a heartbeat arriving at ``now_ms``.

        The first heartbeat seeds the history (first_interval_ms -/+ a quarter of it). Later
        ones add the interval since the previous heartbeat, unless phi had already reached
        the threshold, ``sample`` is False (the caller knows the gap was an outage), or
        ``now_ms`` is earlier than the last heartbeat (then the clock does not move back).
        """
        last = self.last_ms
        if last is None:
            if self.count == 0:
                first = self.first_interval_ms
                self._record(first - first // 4)
                self._record(first + first // 4)
        elif now_ms < last:
            return
        elif sample and self.phi(now_ms) < self.threshold:
            self._record(now_ms - last)
        self.last_ms = now_ms

    def mean(self):
        """Mean of the recorded intervals (ms); 0.0 when there are none."""
        return self.total / self.count if self.count else 0.0

    def std(self):
        """Standard deviation of the recorded intervals (ms), before the min_std_ms floor."""
        if not self.count:
            return 0.0
        mean = self.total / self.count
        var = self.total_sq / self.count - mean * mean
        return math.sqrt(var) if var > 0 else 0.0

    def intervals(self):
        """The recorded intervals, oldest first (a new list: for tests and diagnostics)."""
        out = []
        i = self.head
        for _ in range(self.count):
            out.append(self.ring[i])
            i = i + 1 if i + 1 < self.window else 0
        return out

    def phi(self, now_ms):
        """Suspicion level at ``now_ms``: 0.0 before the first heartbeat, else Akka's phi of
        the time since the last heartbeat with mean + acceptable_pause_ms and
        max(std, min_std_ms)."""
        if self.last_ms is None:
            return 0.0
        std = self.std()
        if std < self.min_std_ms:
            std = self.min_std_ms
        return phi_of(now_ms - self.last_ms, self.mean() + self.acceptable_pause_ms, std)

    def available(self, now_ms):
        """True while phi(now_ms) is below the threshold."""
        return self.phi(now_ms) < self.threshold


class Detector:
    """Failure detector for the replicas ``range(n)``, one PhiAccrual each (none for ``me``).

    Inputs: ``heartbeat(peer, now_ms)`` for any message proving the peer alive,
    ``offline(peer, now_ms)`` for its MQTT Last Will status, and ``check(now_ms)``, which
    returns the transitions since the previous check, each reported once, in the order they
    happened: ``("suspect", peer, phi)`` when the peer's phi reaches the threshold
    (phi then) or it goes offline (its phi at that moment), ``("recover", peer, phi)`` when a
    suspected peer heartbeats again (its phi just before that heartbeat). Ids outside
    ``range(n)`` and ``me`` are ignored. The remaining keyword arguments go to PhiAccrual.
    """

    def __init__(self, n, me=None, threshold=THRESHOLD, window=WINDOW, min_std_ms=MIN_STD_MS,
                 acceptable_pause_ms=ACCEPTABLE_PAUSE_MS, first_interval_ms=FIRST_INTERVAL_MS):
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self.me = me
        self.peers = [None if j == me else
                      PhiAccrual(threshold, window, min_std_ms, acceptable_pause_ms,
                                 first_interval_ms)
                      for j in range(n)]
        self.down = bytearray(n)       # 1: offline reported, no heartbeat since
        self.suspects = bytearray(n)   # 1: suspected (the state the reports have reached)
        self._events = []              # unreported transitions, at most two per peer

    def _peer(self, peer):
        if type(peer) is not int or not 0 <= peer < self.n:
            return None
        return self.peers[peer]

    def _report(self, kind, peer, phi):
        # A peer's pending reports alternate; a third cancels the two before it.
        events = self._events
        mine = [e for e in events if e[1] == peer]
        if len(mine) >= 2:
            for e in mine:
                events.remove(e)
        events.append((kind, peer, phi))

    def heartbeat(self, peer, now_ms):
        """Peer ``peer`` is alive at ``now_ms``; a suspected peer recovers (reported once)."""
        pa = self._peer(peer)
        if pa is None:
            return
        before = pa.phi(now_ms)
        pa.heartbeat(now_ms, not self.down[peer])
        self.down[peer] = 0
        if self.suspects[peer]:
            self.suspects[peer] = 0
            self._report("recover", peer, before)

    def offline(self, peer, now_ms):
        """Peer ``peer`` announced offline (Last Will): suspected at once, until it heartbeats."""
        pa = self._peer(peer)
        if pa is None:
            return
        self.down[peer] = 1
        if not self.suspects[peer]:
            self.suspects[peer] = 1
            self._report("suspect", peer, pa.phi(now_ms))

    def check(self, now_ms):
        """The transitions since the last check, with any peer whose phi has reached the
        threshold at ``now_ms`` now suspected; a list of (kind, peer, phi)."""
        for j in range(self.n):
            pa = self.peers[j]
            if pa is not None and not self.suspects[j]:
                phi = pa.phi(now_ms)
                if phi >= pa.threshold:
                    self.suspects[j] = 1
                    self._report("suspect", j, phi)
        events = self._events
        self._events = []
        return events

    def suspected(self, peer):
        """True if ``peer`` is suspected: offline since its last heartbeat, or its phi had
        reached the threshold at the last check() and it has not heartbeat since."""
        return self._peer(peer) is not None and self.suspects[peer] == 1

    def phis(self, now_ms, scale=PHI_SCALE):
        """Per-replica phi at ``now_ms`` as ints, phi * scale rounded, at most PHI_REPORT_MAX
        (0 for ``me``): for status messages, whose CBOR carries no floats."""
        out = []
        for pa in self.peers:
            if pa is None:
                out.append(0)
            else:
                v = int(pa.phi(now_ms) * scale + 0.5)
                out.append(v if v < PHI_REPORT_MAX else PHI_REPORT_MAX)
        return out
