# Byzantine behaviours: rewrite what a replica sends (DESIGN.md section 4).
#
# Rules:
# - A Byzantine replica runs the ordinary Replica; misbehave() rewrites its outbox, so the
#   same menu serves the simulator and a node's fault hooks. The replica's own keys sign
#   what it forges: a Byzantine replica can authenticate anything as itself, nothing as
#   another.
# - "equivocate" is the coordinated attack of colluding replicas: a primary sends the real
#   pre-prepare to even-numbered replicas and to its colluders and a null pre-prepare (the
#   empty batch) to the others; every colluder votes for what it got to even-numbered
#   replicas and for the null batch to odd-numbered ones. With colluders holding 1/3 of
#   stake or more, the two halves can commit different batches at one sequence number;
#   below 1/3 they cannot (the simulator checks both).
# - "view-skew" votes for past and future views: every message that carries a view
#   (pre-prepare, prepare, commit, view-change, its ack, new-view, status) also goes out as
#   copies stamped view-1 (when there is one) and view+1..view+VIEW_SKEW_AHEAD, correctly
#   authenticated; the message itself goes out only half the time, so the replica's votes
#   in the current view cannot be relied on either. Correct replicas must count none of the
#   copies toward a quorum of another view. Checkpoints, batches and state transfer carry
#   no view and go out unchanged.
# - randbits(k) is the caller's random source (seeded in the simulator).
import hashlib

from . import auth, cbor
from . import messages as m
from .replica import TO_ALL, is_client
from .viewchange import NULL_DIGEST

BEHAVIOURS = ("silent", "wrong-digest", "forge", "replay", "flood", "equivocate", "view-skew")
REPLAY_KEPT = 32
VIEW_SKEW_AHEAD = 2
# The kinds whose body is [VERSION, kind, sender, view, ...] (replies to clients stay honest).
_VIEWED = (m.PRE_PREPARE, m.PREPARE, m.COMMIT, m.VIEW_CHANGE, m.VC_ACK, m.NEW_VIEW, m.STATUS)


def _signed(replica, kind, *fields):
    return m.wire(replica.macs, kind, replica.me, *fields)


def _to_each(replica, wire_for):
    """Point-to-point copies of a broadcast: [(j, wire_for(j))] for every other replica."""
    return [(j, wire_for(j)) for j in range(replica.stake.n) if j != replica.me]


def _equivocate(replica, dest, wire, colluders):
    if dest != TO_ALL:
        return [(dest, wire)]
    try:
        msg = m.decode(wire)
    except m.MessageError:
        return [(dest, wire)]
    if msg.kind == m.PRE_PREPARE:
        null = _signed(replica, m.PRE_PREPARE, msg.view, msg.seq, NULL_DIGEST, [])
        return _to_each(replica, lambda j: wire if j % 2 == 0 or j in colluders else null)
    if msg.kind in (m.PREPARE, m.COMMIT):
        null = _signed(replica, msg.kind, msg.view, msg.seq, NULL_DIGEST)
        return _to_each(replica, lambda j: wire if j % 2 == 0 else null)
    return [(dest, wire)]


def _wrong_digest(replica, dest, wire):
    try:
        msg = m.decode(wire)
    except m.MessageError:
        return [(dest, wire)]
    if msg.kind not in (m.PREPARE, m.COMMIT):
        return [(dest, wire)]
    wrong = hashlib.sha256(b"wrong" + msg.digest).digest()
    return [(dest, _signed(replica, msg.kind, msg.view, msg.seq, wrong))]


def _view_skew(replica, dest, wire, randbits):
    try:
        msg = m.decode(wire)
    except m.MessageError:
        return [(dest, wire)]
    if msg.kind not in _VIEWED:
        return [(dest, wire)]
    result = [(dest, wire)] if randbits(1) else []
    fields = cbor.decode(msg.body)
    assert type(fields) is list  # a body decode() took
    for view in range(max(msg.view - 1, 0), msg.view + VIEW_SKEW_AHEAD + 1):
        if view != msg.view:
            fields[3] = view
            result.append((dest, replica.authenticated(cbor.encode(fields))))
    return result


def _forge(dest, wire, randbits):
    # Flip one bit of the authenticator (the last n tags): receivers cannot verify it.
    i = len(wire) - 1 - randbits(8) % (auth.TAG_BYTES * 2)
    forged = bytearray(wire)
    forged[i] ^= 1 << randbits(3)
    return [(dest, bytes(forged))]


def misbehave(replica, behaviour, randbits, colluders=(), sent=None):
    """Rewrite ``replica.out`` in place according to ``behaviour`` (one of BEHAVIOURS).

    ``colluders``: the other Byzantine replica ids (equivocate); ``sent``: a list this call
    may keep past messages in for "replay" (bounded by REPLAY_KEPT).
    """
    out = replica.out
    if behaviour == "silent":
        del out[:]
        return
    result = []
    for dest, wire in out:
        if is_client(dest):  # replies to clients stay honest: clients are not the target
            result.append((dest, wire))
        elif behaviour == "equivocate":
            result.extend(_equivocate(replica, dest, wire, colluders))
        elif behaviour == "wrong-digest":
            result.extend(_wrong_digest(replica, dest, wire))
        elif behaviour == "view-skew":
            result.extend(_view_skew(replica, dest, wire, randbits))
        elif behaviour == "forge":
            result.extend(_forge(dest, wire, randbits))
        elif behaviour == "replay":
            result.append((dest, wire))
            if sent is not None:
                if sent:
                    result.append((TO_ALL, sent[randbits(16) % len(sent)]))
                sent.append(wire)
                del sent[:-REPLAY_KEPT]
        elif behaviour == "flood":
            result.append((dest, wire))
            for _ in range(2):
                result.append((TO_ALL, bytes(randbits(8) for _ in range(1 + randbits(6)))))
        else:
            raise ValueError("unknown behaviour %r" % (behaviour,))
    out[:] = result
