"""Read-only requests (PBFT, TOCS 2002, 5.1.3; issue 13): every replica answers at once from
its executed state, nothing is ordered, and the client takes a result only from matching
replies over 2/3 of stake; a liar within the bound changes nothing, beyond it the client finds
the read undecided and asks again, ordered."""

from __future__ import annotations

import hashlib

from edgebft.protocol import auth
from edgebft.protocol import messages as m
from edgebft.protocol import replica as rp
from edgebft.protocol.client import ClientCore
from edgebft.protocol.stake import Stake

N = 4
STAKE = Stake([1] * N)
SECRETS = [hashlib.sha256(b"reads %d" % i).digest() for i in range(N)]
CLIENT = 9


def keys_for(i: int) -> list[bytes]:
    return [hashlib.sha256(b"reads %d %d" % (min(i, j), max(i, j))).digest() for j in range(N)]


def setup() -> tuple[list[rp.Replica], ClientCore]:
    rs = [rp.Replica(i, STAKE, keys_for(i), SECRETS[i], genesis={"acct0": [50, CLIENT]})
          for i in range(N)]
    client = ClientCore(CLIENT, STAKE, [rp.client_key(SECRETS[i], CLIENT) for i in range(N)])
    return rs, client


def ordered(rs: list[rp.Replica], client: ClientCore, op: list) -> list:
    """Run ``op`` through the normal case; the accepted result."""
    wire = client.request(op)
    queue = [(i, wire) for i in range(N)]
    result = None
    while queue:
        to, wire = queue.pop(0)
        r = rs[to]
        r.receive(wire, 0)
        for dest, out in r.out:
            if dest == rp.TO_ALL:
                queue.extend((j, out) for j in range(N) if j != to)
            elif rp.is_client(dest):
                accepted, value = client.on_reply(out)
                result = value if accepted else result
            else:
                queue.append((dest, out))
        del r.out[:]
    return result


def read_replies(rs: list[rp.Replica], client: ClientCore, op: list) -> list[bytes]:
    """Send the read-only request to every replica; their replies (wires to the client)."""
    wire = client.read(op)
    replies = []
    for r in rs:
        r.receive(wire, 0)
        assert [rp.is_client(dest) for dest, _ in r.out] == [True], "a reply, nothing else"
        replies += [out for _, out in r.out]
        del r.out[:]
    return replies


def lie(reply: bytes, result: list) -> bytes:
    """``reply`` with another result, authenticated by the replica that sent it."""
    msg = m.decode(reply)
    body = m.body(m.REPLY, msg.sender, msg.view, msg.client, msg.timestamp, result)
    return body + auth.Mac(rp.client_key(SECRETS[msg.sender], CLIENT)).tag(body)


def test_a_read_is_answered_at_once_from_the_executed_state() -> None:
    rs, client = setup()
    assert ordered(rs, client, ["put", "k", "v1"]) == [True, None]
    executed = [r.last_exec for r in rs]
    replies = read_replies(rs, client, ["get", "k"])
    assert [r.last_exec for r in rs] == executed, "nothing ordered, nothing executed"
    results = [client.on_reply(w) for w in replies]
    assert results[:2] == [(False, None)] * 2, "two of four are not over 2/3 of stake"
    assert results[2] == (True, [True, "v1"])


def test_a_read_of_a_write_changes_nothing() -> None:
    rs, client = setup()
    replies = read_replies(rs, client, ["put", "k", "evil"])
    assert [client.on_reply(w)[0] for w in replies].count(True) == 1
    assert client.accepted
    assert all(r.ledger.get("k") is None for r in rs)
    assert m.decode(replies[0]).result == [False, "not a read"]


def test_one_liar_is_outvoted_two_make_the_read_undecided() -> None:
    rs, client = setup()
    ordered(rs, client, ["put", "k", "true value"])
    replies = read_replies(rs, client, ["get", "k"])
    replies[0] = lie(replies[0], [True, "forged"])
    outcome = [client.on_reply(w) for w in replies]
    assert (True, [True, "true value"]) in outcome
    replies = read_replies(rs, client, ["get", "k"])
    replies[0] = lie(replies[0], [True, "forged"])
    replies[1] = lie(replies[1], [True, "forged"])
    assert not client.undecided()
    for w in replies[:3]:
        assert client.on_reply(w) == (False, None)
    assert not client.undecided(), "the liars and the one still silent could make 3 of 4"
    assert client.on_reply(replies[3]) == (False, None)
    assert client.undecided(), "2 against 2: no result can reach 3 of 4 any more"
    assert ordered(rs, client, ["get", "k"]) == [True, "true value"], "the ordered read decides"
