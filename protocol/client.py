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
from . import auth, cbor
from . import messages as m


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

    def request(self, op):
        """Start a new request for ``op``; return its wire bytes."""
        self.timestamp += 1
        self.votes = {}
        self.accepted = False
        self.read_only = False
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

    def on_reply(self, wire):
        """Handle one reply; return (True, result) once accepted, else (False, None)."""
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
            return True, msg.result
        return False, None
