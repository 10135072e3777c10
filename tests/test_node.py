"""protocol/node.py on its own (sans-I/O): a message that makes the replica raise is dropped and
counted, not the end of the node, unless the driver asks for the exception (the simulator);
MemoryError always reaches the driver; the status keeps the newest checkpoints, each once."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

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
    nodes = [Node(rp.Replica(i, STAKE, keys_for(i), SECRETS[i], genesis={"a": 100},
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
