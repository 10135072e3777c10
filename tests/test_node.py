"""protocol/node.py on its own (sans-I/O): a message that makes the replica raise is dropped and
counted, not the end of the node, unless the driver asks for the exception (the simulator);
MemoryError always reaches the driver; the status keeps the newest checkpoints, each once."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from conftest import run_mp
from edgebft.protocol import replica as rp
from edgebft.protocol.client import ClientCore
from edgebft.protocol.node import STATUS_INTERVAL_MS, Node
from edgebft.protocol.stake import Stake

N = 4
STAKE = Stake([1] * N)
SECRETS = [hashlib.sha256(b"secret %d" % i).digest() for i in range(N)]


def keys_for(i: int) -> list[bytes]:
    return [hashlib.sha256(bytes([min(i, j), max(i, j)])).digest() for j in range(N)]


def cluster(contain: bool = True) -> tuple[list[Node], ClientCore]:
    nodes = [Node(rp.Replica(i, STAKE, keys_for(i), SECRETS[i], genesis={"a": [100, 7]},
                             checkpoint_interval=2), STATUS_INTERVAL_MS, contain=contain)
             for i in range(N)]
    client = ClientCore(7, STAKE, [rp.client_key(SECRETS[i], 7) for i in range(N)])
    return nodes, client


def run(nodes: list[Node], wire: bytes, clock: int) -> None:
    """Deliver a client's request to every node, then every message until none is left."""
    queue: list[tuple[int, bytes, int | None]] = [(i, wire, None) for i in range(N)]
    while queue:
        to, w, sender = queue.pop(0)
        nodes[to].message(w, sender, clock)
        r = nodes[to].replica
        rp.route(r.out,
                 lambda wire, src=to: queue.extend((j, wire, src) for j in range(N) if j != src),
                 lambda j, wire, src=to: queue.append((j, wire, src)), lambda c, wire: None)
        del r.events[:]


def break_execution(node: Node, error: type[BaseException]) -> None:
    """A planted bug: the node's ledger raises ``error`` on the next put."""
    execute = node.replica.ledger.execute

    def broken(op: Any, *args: Any) -> Any:
        if op[0] == "put":
            raise error("planted")
        return execute(op, *args)

    node.replica.ledger.execute = broken  # type: ignore[method-assign]


def test_a_message_that_raises_is_counted_and_the_node_goes_on() -> None:
    nodes, client = cluster()
    break_execution(nodes[3], IndexError)
    run(nodes, client.request(["put", "k", 1]), 10)
    assert nodes[3].counts["errors"] >= 1
    assert nodes[3].error == "IndexError: planted"
    status = nodes[3].status(10)
    assert status["errors"] == nodes[3].counts["errors"] and status["error"] == nodes[3].error
    assert [n.counts["errors"] for n in nodes[:3]] == [0, 0, 0]
    run(nodes, client.request(["transfer", "a", "b", 1]), 20)  # the others go on
    assert [n.replica.last_exec for n in nodes[:3]] == [2, 2, 2]


def test_the_simulator_gets_the_exception_and_memory_errors_always_pass() -> None:
    nodes, client = cluster(contain=False)
    break_execution(nodes[3], IndexError)
    with pytest.raises(IndexError):
        run(nodes, client.request(["put", "k", 1]), 10)
    nodes, client = cluster()
    break_execution(nodes[3], MemoryError)
    with pytest.raises(MemoryError):
        run(nodes, client.request(["put", "k", 1]), 10)


def test_the_checkpoint_ring_keeps_the_newest_four_once_each() -> None:
    nodes, client = cluster()
    for k in range(12):
        run(nodes, client.request(["put", f"k{k}", k]), 10 * k)
    node = nodes[0]
    node.tick(200)  # a tick after the messages adds no checkpoint
    seqs = [seq for seq, _ in node.checkpoints]
    assert seqs == [6, 8, 10, 12]
    assert node.status(200)["checkpoints"] == node.checkpoints


PEERS, _ = cluster()  # the statuses and Wills the tests below send, each from its own node


def beats(node: Node, clock: int, until: int) -> int:
    """Node 0 hears node 1's statuses every STATUS_INTERVAL_MS from ``clock`` to ``until``;
    returns the next status number."""
    seq = 1
    while clock < until:
        node.peer_status(PEERS[1].status_wire(1, 1, seq, {"n": seq}), 1, clock)
        node.tick(clock)
        seq += 1
        clock += STATUS_INTERVAL_MS
    return seq



def test_only_authentic_fresh_statuses_move_the_detector() -> None:
    nodes, _ = cluster()
    me = nodes[0]
    seq = beats(me, 0, 5000)
    clock = 5000
    assert not me.detector.suspect[1]
    rejected = me.counts["status_rejected"]
    # Forged: a stranger's key, node 2 posing as 1, garbage; replayed: an old status.
    stranger = Node(rp.Replica(1, STAKE, [b"k" * 32] * N, SECRETS[1]), STATUS_INTERVAL_MS)
    hostile = [stranger.will_wire(9, 9), PEERS[2].will_wire(9, 9), b"\x00" * 40, b"offline",
               PEERS[1].status_wire(1, 1, seq - 3, {})]
    for wire in hostile:
        me.peer_status(wire, 1, clock)
    assert not me.detector.suspect[1], "no forged Will or replay suspects a live peer"
    assert me.counts["status_rejected"] == rejected + len(hostile)
    # The genuine Will of an earlier boot, and of an earlier connection of this boot: ignored.
    me.peer_status(PEERS[1].will_wire(0, 5), 1, clock)
    me.peer_status(PEERS[1].status_wire(1, 2, 1, {}), 1, clock)  # it reconnected
    me.peer_status(PEERS[1].will_wire(1, 1), 1, clock)
    assert not me.detector.suspect[1]
    # Its current connection's Will counts; then that connection's statuses are over.
    me.peer_status(PEERS[1].will_wire(1, 2), 1, clock)
    assert me.detector.suspect[1], "the Will of the live connection suspects it at once"
    me.peer_status(PEERS[1].status_wire(1, 2, 2, {}), 1, clock + 10)
    assert me.detector.suspect[1], "a status of the connection its Will closed: a replay"
    me.peer_status(PEERS[1].status_wire(2, 1, 1, {}), 1, clock + 20)
    assert not me.detector.suspect[1], "a status of its next boot trusts it again"


def test_replayed_statuses_do_not_keep_a_dead_peer_trusted() -> None:
    nodes, _ = cluster()
    me = nodes[0]
    seq = beats(me, 0, 5000)
    recorded = [PEERS[1].status_wire(1, 1, s, {}) for s in range(1, seq)]
    clock = 5000
    while clock < 15_000:  # node 1 died; an attacker replays what it sent
        for wire in recorded:
            me.peer_status(wire, 1, clock)
        me.tick(clock)
        clock += STATUS_INTERVAL_MS
    assert me.detector.suspect[1], "phi grew as if nothing came"


def test_a_broker_outage_is_a_stall_and_peers_get_time_to_come_back() -> None:
    """While the link is down (tick(..., linked=False)) the node does nothing; once it is back
    the detector judges no peer for _RELINK_GRACE_MS (they reconnect over their back-off),
    then a peer that stays silent is suspected as usual."""
    nodes, _ = cluster()
    me = nodes[0]
    beats(me, 0, 5000)
    me.tick(4520)  # a tick on time (the 500 ms ticks of beats() alternate as stalls)
    stalls = me.counts["stalls"]
    clock = 5000
    while clock < 9000:  # the broker is gone for 4 s: nothing runs, nothing is judged
        me.tick(clock, linked=False)
        clock += 20
    assert not me.detector.suspect[1] and me.counts["stalls"] == stalls
    while clock < 10_900:  # back; node 1 has not reconnected yet
        me.tick(clock)
        clock += 20
    assert not me.detector.suspect[1], "within the grace: no judgement"
    assert me.counts["stalls"] == stalls + 1, "the outage was one stall"
    while clock < 13_000:
        me.tick(clock)
        clock += 20
    assert me.detector.suspect[1], "still silent after the grace: suspected"


def outbox_to(node: Node, to: int) -> list[bytes]:
    """What ``node`` sent to replica ``to`` (broadcasts included); its outbox emptied."""
    sent: list[bytes] = []
    rp.route(node.replica.out, sent.append,
             lambda j, wire: sent.append(wire) if j == to else None, lambda c, wire: None)
    return sent


def tick_with_backups(nodes: list[Node], clock: int) -> None:
    """Tick node 1 and the backups 2 and 3, which talk to it (0, the primary, is away)."""
    nodes[1].tick(clock)
    for j in (2, 3):
        nodes[j].tick(clock)
        for wire in outbox_to(nodes[j], 1):
            nodes[1].message(wire, j, clock)


def test_a_primary_whose_will_came_with_the_broker_is_not_left_within_the_grace() -> None:
    """A broker that shuts down publishes every client's Last Will (mosquitto on SIGTERM), so
    a backup comes back from the outage still suspecting the primary, with a request waiting.
    Within _RELINK_GRACE_MS it starts no view change (the primary reconnects over its back-off,
    and its first heartbeat clears the suspicion); a primary that stays silent past the grace
    is left as usual (hil_tests/test_demo.py rides out a real broker restart)."""
    for primary_returns in (True, False):
        nodes, client = cluster()
        me = nodes[1]  # a backup of view 0
        me.tick(0)
        me.message(client.request(["put", "k", 1]), None, 0)
        assert me.replica.waiting, "the request waits for the primary"
        clock = 0
        while clock < 40:  # the broker shuts down: 0's Will, then our own link drops
            me.tick(clock)
            clock += 20
        me.peer_status(PEERS[0].will_wire(0, 1), 0, clock)
        assert me.detector.suspect[0]
        while clock < 3000:
            me.tick(clock, linked=False)
            clock += 20
        while clock < 4900:  # back, within the grace: 2 and 3 talk to us, 0 not yet back
            tick_with_backups(nodes, clock)
            clock += 20
        assert me.replica.status == "normal", "no view change within the grace"
        if primary_returns:
            me.peer_status(PEERS[0].status_wire(0, 2, 1, {}), 0, clock)
            assert not me.detector.suspect[0] and me.replica.status == "normal"
            continue
        while clock < 7000:  # 0 stays silent
            tick_with_backups(nodes, clock)
            clock += 20
        assert me.replica.status == "view change", "silent past the grace: left"


_MP_HEAP_PER_MESSAGE = r"""
import gc, hashlib
from edgebft.protocol import messages as m
from edgebft.protocol import replica as rp
from edgebft.protocol.node import Node, STATUS_INTERVAL_MS
from edgebft.protocol.stake import Stake
N = 4
stake = Stake([1] * N)
def keys(i):
    return [hashlib.sha256(bytes([min(i, j), max(i, j)])).digest() for j in range(N)]
nodes = [Node(rp.Replica(i, stake, keys(i), b"s" * 32), STATUS_INTERVAL_MS) for i in range(2)]
def allocated(f, *args):
    gc.collect(); gc.disable(); before = gc.mem_alloc()
    out = f(*args)
    used = gc.mem_alloc() - before
    gc.enable()
    return used, out
heard = []
for seq, entries in ((1, 2), (2, 48)):
    status = {"key %d" % i: "v" * 24 for i in range(entries)}
    buf = bytearray(nodes[1].status_wire(1, 1, seq, status))  # as the MQTT client holds it
    used, _ = allocated(nodes[0].peer_status, memoryview(buf), 1, seq)
    heard.append((len(buf), used, nodes[0].stamps[1]))
print(heard[1][0] - heard[0][0], heard[1][1] - heard[0][1], heard[1][2])
built = []
for data in (b"d" * 10, b"d" * 1000):
    used, wire = allocated(m.wire, nodes[0].replica.macs, m.CHUNK, 0, 5, b"x" * 32, 1, 0, 9, data)
    assert wire == m.body(m.CHUNK, 0, 5, b"x" * 32, 1, 0, 9, data) + rp.auth.authenticator(
        nodes[0].replica.macs, m.body(m.CHUNK, 0, 5, b"x" * 32, 1, 0, 9, data))
    built.append((len(wire), used))
print(built[1][0] - built[0][0], built[1][1] - built[0][1])
"""


def test_heartbeats_and_wires_take_heap_that_does_not_grow_with_them_on_micropython(
        micropython: Path, mp_lib: Path) -> None:
    """A node hears a heartbeat from the MQTT client's buffer (a memoryview): it checks the
    tag and decodes the stamp, allocating nothing that grows with the status map (the
    host's part, ~850 B on a node). A wire is allocated once, at its size: a 1 KB chunk
    costs 1 KB more heap, not the 2-3 KB of a body copied and then joined with its tags."""
    proc = run_mp(micropython, mp_lib, _MP_HEAP_PER_MESSAGE)
    assert proc.returncode == 0, proc.stderr
    heard, built = proc.stdout.splitlines()
    grown, more_heap, stamp = heard.split(" ", 2)
    assert int(grown) > 1000 and int(more_heap) < 64, heard
    assert stamp == "(1, 1, 2)", "the larger heartbeat counted"
    grown, more_heap = (int(x) for x in built.split())
    assert grown > 980 and grown <= more_heap < grown + 64, built
