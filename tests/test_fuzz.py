"""Fuzzing the node's input paths (issue 12): no input a peer, a client or a stranger on the
broker can send makes the protocol raise.

Targets, each fed raw bytes and, where a decoder would stop raw bytes at the door, mutated real
wires that get past it:

- ``cbor.decode``: DecodeError only, and agreement with cbor2 on what it accepts;
- ``messages.decode``: MessageError only;
- ``Replica.receive``: never raises (its own invariants are checked after every input) for
  raw bytes, and for real wires of a cluster run whose CBOR body is mutated at one place and
  then authenticated again with the sender's keys: a Byzantine replica or client, whose
  messages pass every MAC check, reaching every handler;
- ``Node.peer_status``: never raises, and a mutated status changes no stamp unless authentic;
- ``Faults.on_control``: never raises, for raw bytes and for authentic commands with mutated
  arguments.

CI runs FUZZ_EXAMPLES (300) examples per target, derandomized so a run replays; a longer
campaign draws afresh each time: ``bash tools/fuzz.sh [EXAMPLES]`` (EDGEBFT_FUZZ_EXAMPLES;
hypothesis prints how to reproduce a failure). Every input that ever failed becomes an
@example or a test of its own here.
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
from typing import Any

import cbor2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgebft.firmware.faults import Faults
from edgebft.protocol import auth, cbor
from edgebft.protocol import messages as m
from edgebft.protocol import replica as rp
from edgebft.protocol.client import ClientCore
from edgebft.protocol.node import STATUS_INTERVAL_MS, Node
from edgebft.protocol.stake import Stake

FUZZ_EXAMPLES = int(os.environ.get("EDGEBFT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                derandomize="EDGEBFT_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

N = 4
STAKE = Stake([1] * N)
SECRETS = [hashlib.sha256(b"fuzz secret %d" % i).digest() for i in range(N)]
CONTROL_KEY = b"c" * 32
CLIENT = 7


def keys_for(i: int) -> list[bytes]:
    return [hashlib.sha256(b"fuzz %d %d" % (min(i, j), max(i, j))).digest() for j in range(N)]


def replicas() -> list[rp.Replica]:
    genesis = {"acct0": [1000, CLIENT], "acct1": [10, CLIENT]}
    return [rp.Replica(i, STAKE, keys_for(i), SECRETS[i], genesis=genesis, checkpoint_interval=2)
            for i in range(N)]


def record_wires() -> list[tuple[int, bytes]]:
    """(sender, wire) of every message of a short cluster run: requests of every kind, the
    normal case, checkpoints, a view change (the backups suspect the primary) and state
    transfer (a replica that missed everything catches up). Sender -1: the client."""
    rs = replicas()
    client = ClientCore(CLIENT, STAKE, [rp.client_key(SECRETS[i], CLIENT) for i in range(N)])
    wires: list[tuple[int, bytes]] = []
    late = 3  # hears nothing until the end

    def deliver(queue: list[tuple[int, bytes, int]], now: int) -> None:
        while queue:
            to, wire, sender = queue.pop(0)
            if to == late and now < 10_000:
                continue
            r = rs[to]
            r.receive(wire, now)
            for dest, out in r.out:
                wires.append((to, out))
                if dest == rp.TO_ALL:
                    queue.extend((j, out, to) for j in range(N) if j != to)
                elif not rp.is_client(dest):
                    queue.append((dest, out, to))
            del r.out[:]
            del r.events[:]

    ops: list[Any] = [["put", "k", 1], ["get", "k"], ["transfer", "acct0", "acct1", 5],
                      ["put", "k2", b"v"], ["stake", "acct0", 1, 1], ["put", "k", [1, {"a": 2}]]]
    now = 0
    for op in ops:
        wire = client.request(op)
        wires.append((-1, wire))
        deliver([(i, wire, -1) for i in range(N)], now)
        now += 10
    for i in (1, 2):
        rs[i].suspect(now)
        deliver([(j, w, i) for dest, w in rs[i].out for j in range(N) if j != i], now)
    now += 5000
    for r in rs:
        r.tick(now)
        deliver([(j, w, r.me) for dest, w in r.out for j in range(N) if j != r.me], now)
    wire = client.request(["put", "after", 2])
    wires.append((-1, wire))
    deliver([(i, wire, -1) for i in range(N)], 20_000)
    for t in (20_100, 20_200, 20_300):
        for r in rs:
            r.tick(t)
            deliver([(j, w, r.me) for dest, w in r.out for j in range(N) if j != r.me], t)
    return wires


WIRES = record_wires()
KINDS_SEEN = {m.decode(w).kind for _, w in WIRES}


def test_the_corpus_covers_the_message_kinds() -> None:
    assert {m.REQUEST, m.PRE_PREPARE, m.PREPARE, m.COMMIT, m.CHECKPOINT, m.VIEW_CHANGE,
            m.VC_ACK, m.NEW_VIEW, m.STATUS} <= KINDS_SEEN, KINDS_SEEN


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4),
    max_leaves=12)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place inside ``value`` (list indices, dict keys) a mutation may replace."""
    found = [prefix]
    if isinstance(value, list):
        for i, item in enumerate(value):
            found += paths(item, (*prefix, i))
    elif isinstance(value, dict):
        for k, item in value.items():
            found += paths(item, (*prefix, k))
    return found


def replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    value = copy.copy(value)
    value[path[0]] = replaced(value[path[0]], path[1:], new)
    return value


def authenticated(sender: int, body: bytes) -> bytes:
    """``body`` tagged as ``sender`` (a replica, or the client for -1) tags it."""
    if sender < 0:
        return body + auth.authenticator(
            [auth.Mac(rp.client_key(SECRETS[i], CLIENT)) for i in range(N)], body)
    return body + auth.authenticator([auth.Mac(k) for k in keys_for(sender)], body)


@FUZZ
@given(st.binary(max_size=300))
@example(b"\x9f")            # an indefinite-length array
@example(b"\xfb" + bytes(8))  # a float
def test_cbor_decode_raises_only_decode_error(data: bytes) -> None:
    try:
        value = cbor.decode(data)
    except cbor.DecodeError:
        return
    assert cbor2.loads(data) == value  # what it accepts, it reads as the reference does


@FUZZ
@given(st.binary(max_size=600))
def test_message_decode_raises_only_message_error(data: bytes) -> None:
    try:
        m.decode(data)
    except m.MessageError:
        pass


@FUZZ
@given(st.binary(max_size=600), st.integers(0, N - 1))
def test_raw_bytes_never_raise_in_a_replica(data: bytes, to: int) -> None:
    r = replicas()[to]
    r.receive(data, 100)
    for _, wire in WIRES[:20]:
        r.receive(wire, 200)  # and it still works on what follows


@FUZZ
@given(st.data())
def test_mutated_authentic_wires_never_raise_in_a_replica(data: st.DataObject) -> None:
    rs = replicas()
    target = data.draw(st.integers(0, N - 1))
    prefix = data.draw(st.integers(0, len(WIRES) - 1))
    for sender, wire in WIRES[:prefix]:  # bring the target to a state of the run
        if sender != target:
            rs[target].receive(wire, 1000)
    sender, wire = WIRES[prefix]
    msg = m.decode(wire)
    fields = cbor.decode(msg.body)
    path = data.draw(st.sampled_from(paths(fields)))
    mutated = replaced(fields, path, data.draw(cbor_values))
    try:
        body = cbor.encode(mutated)
    except cbor.EncodeError:
        return  # nothing a peer could send
    if sender == target:
        sender = (target + 1) % N
        if isinstance(mutated, list) and len(mutated) > 2:
            body = cbor.encode(replaced(mutated, (2,), sender))
    rs[target].receive(authenticated(sender, body), 2000)
    rs[target].tick(3000)


@FUZZ
@given(st.data())
def test_mutated_statuses_never_raise_and_count_only_when_authentic(data: st.DataObject) -> None:
    nodes = [Node(r, STATUS_INTERVAL_MS) for r in replicas()]
    me, peer = nodes[0], nodes[1]
    genuine = peer.status_wire(1, 1, 5, {"view": 0, "phi": [0, 0, 0, 0]})
    me.peer_status(genuine, 1, 0)
    fields = cbor.decode(m.decode(genuine).body)
    path = data.draw(st.sampled_from(paths(fields)))
    mutated = replaced(fields, path, data.draw(cbor_values))
    try:
        body = cbor.encode(mutated)
    except cbor.EncodeError:
        return
    stamp = me.stamps[1]
    me.peer_status(body + m.decode(genuine).auth, 1, 10)  # the old tags: a forgery
    assert me.stamps[1] == stamp
    me.peer_status(data.draw(st.binary(max_size=200)), 1, 20)
    assert me.stamps[1] == stamp
    me.peer_status(authenticated(1, body), 1, 30)  # an insider's: may count, never raises


@FUZZ
@given(st.binary(max_size=300), cbor_values, st.sampled_from(
    ["omission", "delay", "partition", "duplicate", "skew", "byzantine", "heal", "nonsense"]))
@example(b"", ["x"], "omission")          # found: a permille of another type
@example(b"", [500, "ab"], "omission")    # found: peers a string, failing later in drop()
@example(b"", [10, [1]], "delay")         # found: a jitter of another type, failing in hold()
@example(b"", ["equivocate", 3], "byzantine")  # found: colluders not a list
def test_control_commands_never_raise_nor_leave_a_fault_that_does(raw: bytes, args: Any,
                                                                 command: str) -> None:
    """Forged bytes are refused; an authentic command with any arguments either takes effect
    with arguments every hook can use, or is refused (the host is trusted, its bugs are not)."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as flash:  # the nonce is saved in the working folder
        os.chdir(flash)
        try:
            faults = Faults(0, CONTROL_KEY)
            assert faults.on_control(raw) is None
            body = cbor.encode([1, m.CONTROL, m.HOST, 10**6, command,
                                args if isinstance(args, list) else [args]])
            faults.on_control(body + auth.Mac(CONTROL_KEY).tag(body))
            for j in range(-1, N):
                faults.drop(j)
            faults.copies()
            faults.hold(0, "t", b"wire")
            faults.release(10**7, lambda topic, wire: True)
            cbor.encode(faults.describe())  # the status carries it
            r = replicas()[0]
            r.out.append((rp.TO_ALL, WIRES[1][1]))
            faults.misbehave(r)
        finally:
            os.chdir(here)


def test_found_a_view_change_with_an_entry_that_is_no_list() -> None:
    """Found by the mutation fuzzer: P = [None] in an authentic VIEW-CHANGE raised a
    TypeError in valid_shape (the node's guard counted it; the replica must drop it)."""
    r = replicas()[0]
    body = m.body(m.VIEW_CHANGE, 1, 1, 0, [[0, r.own_checkpoints[0]]], [None], [])
    r.receive(authenticated(1, body), 100)
    assert r.drops.get("bad view-change") == 1


def test_found_a_new_view_naming_a_sender_that_is_no_int() -> None:
    """Found by the mutation fuzzer: a NEW-VIEW listing [[4, 2, 0], digest] as a VIEW-CHANGE
    made the replica look up an unhashable key."""
    rs = replicas()
    r = rs[0]
    r.suspect(0)  # into view 1, waiting for its NEW-VIEW
    body = m.body(m.NEW_VIEW, 1, 1, [[[4, 2, 0], bytes(32)]], 0, [])
    r.receive(authenticated(1, body), 100)
    assert r.new_view is None and r.status == "view change"
