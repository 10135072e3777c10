# The request/reply side of a client (PBFT-NOTES N1; DESIGN.md section 3), shared by the host.
#
# Rules:
# - A client has at most one request outstanding; timestamps grow strictly per client.
# - A result is accepted once replies that match in (timestamp, result) carry strictly more
#   than 1/3 of stake (a weak certificate): at least one of them is from a correct replica.
# - A read-only request (read(): ["read", op], answered by each replica from its executed
#   state without ordering, PBFT's 5.1.3) needs matching replies over 2/3 of stake instead;
#   when the replies received can no longer reach that (they disagree: concurrent writes,
#   a lagging or lying replica), undecided() says so and the caller asks again, ordered.
# - Each replica counts once per request, with its first authentic reply.
# - Retransmission (RFC 6298's timer, with Karn's rule): the caller publishes the outstanding
#   request, calls sent(now_ms), and publishes it again once retransmit_due(now_ms). The
#   timeout is the smoothed round trip plus four times its variation, within
#   [RETRANSMIT_MIN_MS, RETRANSMIT_MAX_MS]; each retransmission of a request doubles it, up
#   to the larger of that estimate, twice the smoothed round trip and RETRANSMIT_BACKOFF_MS.
#   Only a request accepted after one send gives a sample (a reply to a retransmitted one
#   may answer either send). Each request starts from the estimate: a backoff kept for the
#   requests after (RFC 6298 5.7) made the first retransmission after a fault come later
#   than the replicas' view-change timer (1 s: T1 fires when nothing executes for that
#   long), and a request lost to a restarted primary cost a view change (bench --nemesis
#   crash,broker-restart,oom: 4-5 view changes a run instead of 2-3). A fixed 500 ms made a
#   loaded cluster collapse: at 256 closed-loop clients the queue held requests past 500 ms,
#   clients sent most requests two or three times, and every copy cost each replica a
#   decode, a MAC and a page of its client table (measured: 241 req/s, 19% past the 2 s
#   deadline). Past capacity, where every request waits longer than the floor (1,024
#   closed-loop clients), no round trip is ever measured and clients still send each request
#   two or three times.
# - Times are ms from one monotonic clock of the caller's (never wrapping: a board's ticks_ms
#   wraps), ints or floats.
from . import auth, cbor
from . import messages as m

RETRANSMIT_MIN_MS = 500   # the timeout's floor, and its value before a round trip is measured
RETRANSMIT_MAX_MS = 4000  # the estimate's ceiling
# Backing off doubles a request's timeout up to twice the smoothed round trip, or this:
# short enough that a cluster back from a fault (a broker restarting) is retried soon. Backed
# off up to RETRANSMIT_MAX_MS (and kept for the requests after), the bench recovered from a
# broker restart in 1.5-2.3 s instead of about 1.1 s.
RETRANSMIT_BACKOFF_MS = 1000


class ClientCore:
    """Builds authenticated requests for client ``client`` and collects replies.

    ``keys[i]`` is the key this client shares with replica i.
    """

    def __init__(self, client, stake, keys, timestamp=0):
        assert len(keys) == stake.n
        self.client = client
        self.stake = stake
        self.macs = [auth.Mac(k) for k in keys]
        self.timestamp = timestamp
        self.votes = {}  # replica -> encoded result, for the outstanding timestamp
        self.accepted = True  # no request outstanding
        self.read_only = False  # the outstanding request is read-only: a quorum decides
        self.view = 0    # highest view seen in an authentic reply
        self.srtt_ms = 0     # smoothed round trip (0: none measured yet) ...
        self.rttvar_ms = 0   # ... and its variation (RFC 6298)
        self.rto_ms = RETRANSMIT_MIN_MS  # the outstanding request's timeout (backed off)
        self.sends = 0       # of the outstanding request
        self.first_sent_ms = 0
        self.next_send_ms = 0  # when retransmit_due() becomes true

    def request(self, op):
        """Start a new request for ``op``; return its wire bytes."""
        self.timestamp += 1
        self.votes = {}
        self.accepted = False
        self.read_only = False
        self.sends = 0
        return self.request_wire(op)

    def read(self, op):
        """Start a read-only request for the read ``op`` (get, balance, validators); return
        its wire bytes."""
        wire = self.request(["read", op])
        self.read_only = True
        return wire

    def undecided(self):
        """True when the replies so far can no longer make any result reach the threshold
        (a read-only request whose replicas disagree): ask again, ordered."""
        if self.accepted:
            return False
        silent = self.stake.total - self.stake.of(self.votes)
        best = 0
        for r in self.votes:
            s = self.stake.of([j for j in self.votes if self.votes[j] == self.votes[r]])
            if s > best:
                best = s
        return not self._decides(best + silent)

    def _decides(self, stake):
        """Do matching replies holding ``stake`` decide the outstanding request?"""
        return self.stake.is_quorum(stake) if self.read_only else self.stake.is_weak(stake)

    def request_wire(self, op):
        """The wire bytes of the outstanding request (for retransmission)."""
        return m.wire(self.macs, m.REQUEST, self.client, self.timestamp, op)

    def sent(self, now_ms):
        """The outstanding request was published at ``now_ms``: its first send (the timeout is
        the estimate), or again (the timeout doubles)."""
        if self.sends == 0:
            self.first_sent_ms = now_ms
            self.rto_ms = self.estimate_ms()
        else:
            self.rto_ms = min(2 * self.rto_ms, max(self.estimate_ms(), 2 * self.srtt_ms,
                                                   RETRANSMIT_BACKOFF_MS))
        self.sends += 1
        self.next_send_ms = now_ms + self.rto_ms

    def retransmit_due(self, now_ms):
        """Should the outstanding request be published again at ``now_ms``?"""
        return not self.accepted and self.sends > 0 and now_ms >= self.next_send_ms

    def _measured(self, rtt_ms):
        rtt_ms = max(rtt_ms, 1)  # srtt_ms 0 means none measured
        if not self.srtt_ms:
            self.srtt_ms = rtt_ms
            self.rttvar_ms = rtt_ms // 2
        else:
            self.rttvar_ms = (3 * self.rttvar_ms + abs(self.srtt_ms - rtt_ms)) // 4
            self.srtt_ms = (7 * self.srtt_ms + rtt_ms) // 8

    def estimate_ms(self):
        """SRTT + 4 RTTVAR within [RETRANSMIT_MIN_MS, RETRANSMIT_MAX_MS]; the floor until a
        round trip is measured."""
        if not self.srtt_ms:
            return RETRANSMIT_MIN_MS
        return min(max(self.srtt_ms + 4 * self.rttvar_ms, RETRANSMIT_MIN_MS), RETRANSMIT_MAX_MS)

    def on_reply(self, wire, now_ms=None):
        """Handle one reply, which came at ``now_ms`` (None: take no round-trip sample);
        return (True, result) once accepted, else (False, None)."""
        try:
            msg = m.decode(wire)
        except m.MessageError:
            return False, None
        if msg.kind != m.REPLY or msg.client != self.client or msg.sender >= self.stake.n:
            return False, None
        if self.accepted or msg.timestamp != self.timestamp or msg.sender in self.votes:
            return False, None
        if not auth.check(msg.auth, 0, self.macs[msg.sender], msg.body):
            return False, None
        if msg.view > self.view:
            self.view = msg.view
        encoded = cbor.encode(msg.result)
        self.votes[msg.sender] = encoded
        matching = [r for r in self.votes if self.votes[r] == encoded]
        if self._decides(self.stake.of(matching)):
            self.accepted = True
            if now_ms is not None and self.sends == 1:  # Karn: one send, one round trip
                self._measured(now_ms - self.first_sent_ms)
            return True, msg.result
        return False, None
