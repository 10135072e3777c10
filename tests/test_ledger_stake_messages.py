"""Ledger semantics, stake arithmetic and message validation."""

from __future__ import annotations

import hashlib

import pytest

from conftest import new_ledger
from edgebft.protocol import cbor
from edgebft.protocol import ledger as ledger_module
from edgebft.protocol import messages as m
from edgebft.protocol.pagestore import PAGE_BYTES_MAX
from edgebft.protocol.stake import Stake

DIGEST = hashlib.sha256(b"d").digest()


def test_ledger_ops_and_failures() -> None:
    ledger = new_ledger({"a": [10, 1], "b": [0, 2]})
    assert ledger.execute(["transfer", "a", "b", 4], 1) == [True, 6]
    assert ledger.execute(["balance", "b"], 1) == [True, 4]
    assert ledger.execute(["transfer", "b", "a", 5], 2) == [False, "insufficient funds"]
    assert ledger.execute(["transfer", "a", "b", 0], 1) == [False, "bad transfer"]
    assert ledger.execute(["transfer", "a", "b", -1], 1) == [False, "bad transfer"]
    assert ledger.execute(["transfer", "a", "c", 1], 1) == [False, "no such account"]
    assert ledger.execute(["open", ""], 1) == [False, "bad open"]
    assert ledger.execute(["put", "k", b"v"], 1) == [True, None]
    assert ledger.execute(["get", "k"], 1) == [True, b"v"]
    assert ledger.execute(["get", "missing"], 1) == [True, None]
    assert ledger.execute(["put", "big", b"x" * 100], 1) == [False, "value too large"]
    assert ledger.execute(["nope"], 1) == [False, "bad op"]
    assert ledger.execute("put", 1) == [False, "bad op"]
    assert ledger.execute(["put", "", 1], 1) == [False, "bad op"]
    assert (ledger.balance("a"), ledger.balance("b"), ledger.store.count) == (6, 4, 3)


def test_bad_genesis_entries_are_refused() -> None:
    for genesis in ({"a": 10}, {"a": [10]}, {"a": [-1, 0]}, {"a*": [0, 5]},
                    {"a*": [2, 5], "b*": [2, 5]}, {"": [1, 0]}):
        with pytest.raises(ValueError, match="bad genesis entry"):
            new_ledger(genesis)


def test_ledger_store_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "ENTRIES_MAX", 64)
    ledger = new_ledger()
    for i in range(64):
        assert ledger.execute(["put", f"k{i}", i], 1) == [True, None]
    assert ledger.execute(["put", "one-more", 1], 1) == [False, "store full"]
    assert ledger.execute(["put", "k0", 7], 1) == [True, None], "overwriting stays possible"
    assert ledger.execute(["open", "new"], 1) == [False, "store full"]
    assert ledger.execute(["transfer", "k1", "new", 1], 1) == [False, "no such account"]


def test_keys_ground_into_one_page_fill_only_that_page() -> None:
    """A client that grinds names into one page, each of the longest kind (32 four-byte
    characters) with the largest value, fills that page to PAGE_ENTRIES_MAX entries: one
    more is refused with "page full", the page's entries can still be rewritten at their
    largest, other pages take new keys, and no page outgrows PAGE_BYTES_MAX."""
    ledger = new_ledger()
    store = ledger.store
    biggest = b"x" * (ledger_module.VALUE_BYTES_MAX - 2)  # a byte string encodes with 2 more
    names = (f"{chr(0x1D11E) * 28}{n:04d}" for n in range(10_000))
    target = store.page_of("k" + next(names))
    ground = [name for name in names if store.page_of("k" + name) == target]
    for name in ground[:ledger_module.PAGE_ENTRIES_MAX]:
        assert ledger.execute(["put", name, biggest], 1) == [True, None]
    assert ledger.execute(["put", ground[-1], 1], 1) == [False, "page full"]
    assert ledger.execute(["put", ground[0], biggest[:-1]], 1) == [True, None]
    assert ledger.execute(["put", ground[1], biggest], 1) == [True, None]
    other = next(f"n{n}" for n in range(1000) if store.page_of(f"kn{n}") != target)
    assert ledger.execute(["put", other, biggest], 1) == [True, None]
    store.flush()
    size = len(store.flash.read(store.file_at(target)))
    assert size <= PAGE_BYTES_MAX
    assert size > 0.9 * PAGE_BYTES_MAX, "the page is nearly full"
    assert store.entries_in_page("k" + ground[0]) == ledger_module.PAGE_ENTRIES_MAX


def test_an_op_that_adds_two_entries_to_a_page_counts_both() -> None:
    """A transfer between two genesis-range accounts not yet written adds both to the store:
    into a page one short of full it is refused, so no page ever holds more than
    PAGE_ENTRIES_MAX entries."""
    ledger = new_ledger({"acct*": [1000, 50]})
    store = ledger.store
    pages: dict[int, list[int]] = {}
    for n in range(1000):
        pages.setdefault(store.page_of(f"aacct{n}"), []).append(n)
    target, (src, dst) = next((p, ns[:2]) for p, ns in pages.items() if len(ns) >= 2)
    filler = (f"f{n}" for n in range(100_000) if store.page_of(f"kf{n}") == target)
    while store.entries_in_page(f"aacct{src}") < ledger_module.PAGE_ENTRIES_MAX - 1:
        assert ledger.execute(["put", next(filler), 0], 1) == [True, None]
    assert ledger.execute(["transfer", f"acct{src}", f"acct{dst}", 1], src) \
        == [False, "page full"]
    assert ledger.balance(f"acct{dst}") == 50, "nothing moved"
    assert ledger.execute(["put", next(filler), 0], 1) == [True, None], "one more fits"
    assert store.entries_in_page(f"aacct{src}") == ledger_module.PAGE_ENTRIES_MAX


def test_ledger_digest_chains_history() -> None:
    a, b = new_ledger(), new_ledger()
    da = a.commit_batch(1, DIGEST, [[0, 1, [True, None]]])
    db = b.commit_batch(1, DIGEST, [[0, 1, [True, None]]])
    assert da == db
    assert a.commit_batch(2, DIGEST, []) != b.commit_batch(2, DIGEST, [[0, 2, [True, 1]]])


@pytest.mark.parametrize("weights,quorum,weak", [
    ([1, 1, 1, 1], 3, 2),         # n = 3f+1, f = 1: 2f+1 and f+1
    ([1] * 7, 5, 3),              # f = 2
    ([30, 25, 25, 20], 67, 34),   # by stake: > 2/3 and > 1/3 of 100
])
def test_stake_thresholds_are_strict(weights: list[int], quorum: int, weak: int) -> None:
    stake = Stake(weights)
    assert stake.is_quorum(quorum) and not stake.is_quorum(quorum - 1)
    assert stake.is_weak(weak) and not stake.is_weak(weak - 1)


def test_stake_rejects_bad_sets_and_rotates_primary() -> None:
    for bad in ([], [0, 0], [1, -1], [1.5]):
        with pytest.raises(ValueError):
            Stake(bad)
    stake = Stake([1, 0, 1, 1])
    assert [stake.primary(v) for v in range(4)] == [0, 2, 3, 0]


def test_message_round_trip_and_field_checks() -> None:
    body = m.body(m.PREPARE, 2, 5, 9, DIGEST)
    msg = m.decode(body + b"T" * 32)
    assert (msg.kind, msg.sender, msg.view, msg.seq, msg.digest) == (m.PREPARE, 2, 5, 9, DIGEST)
    assert msg.body == body and msg.auth == b"T" * 32
    bad = [
        cbor.encode([2, m.PREPARE, 2, 5, 9, DIGEST]),       # version
        cbor.encode([1, 99, 2, 5, 9, DIGEST]),              # type
        cbor.encode([1, m.PREPARE, 2, 5, 9]),               # field count
        cbor.encode([1, m.PREPARE, 2, 5, 9, b"short"]),     # digest size
        cbor.encode([1, m.PREPARE, 2, -5, 9, DIGEST]),      # negative view
        cbor.encode([1, m.PREPARE, 70000, 5, 9, DIGEST]),   # sender id
        cbor.encode([1, m.PRE_PREPARE, 0, 0, 1, DIGEST, [1]]),  # batch of non-bytes
        cbor.encode({"a": 1}),
        b"\x00" * (m.MESSAGE_BYTES_MAX + 1),
    ]
    for wire in bad:
        with pytest.raises(m.MessageError):
            m.decode(wire)




def test_request_fields_are_what_decode_reads() -> None:
    wire = m.body(m.REQUEST, 7, 12, ["put", "k", [1, "x"]]) + b"T" * 32
    msg = m.decode(wire)
    fields = m.request_fields(wire)
    assert fields == [m.VERSION, m.REQUEST, 7, 12, ["put", "k", [1, "x"]]]
    assert (fields[2], fields[3], fields[4]) == (msg.sender, msg.timestamp, msg.op)
