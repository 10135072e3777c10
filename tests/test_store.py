"""The state on flash: cache policies, the incremental digest, power cuts, corrupt pages and
state transfer of a large state (protocol/cache.py, pagestore.py, state.py)."""

from __future__ import annotations

import hashlib
import random
from array import array
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from test_replica import Net

from conftest import run_mp
from edgebft.cipher import aes
from edgebft.protocol import messages as m
from edgebft.protocol import replica as rp
from edgebft.protocol.cache import Cache
from edgebft.protocol.flash import MemFlash
from edgebft.protocol.pagestore import (
    CACHE_PAGES,
    PAGE_OVERHEAD_BYTES,
    PageError,
    PageStore,
    add_term,
    marked_pages,
    page_tag,
    page_term,
)
from edgebft.protocol.state import CLIENT_PAGE_ENTRIES_MAX, State

POLICIES = ("lru", "lfu", "fifo")


class ReferenceCache:
    """The policies as written in their definitions, with no shortcuts."""

    def __init__(self, capacity: int, policy: str) -> None:
        self.capacity, self.policy = capacity, policy
        self.values: OrderedDict[int, int] = OrderedDict()  # insertion order
        self.last_use: dict[int, int] = {}
        self.uses: dict[int, int] = {}
        self.clock = 0

    def _use(self, key: int) -> None:
        self.clock += 1
        self.last_use[key] = self.clock
        self.uses[key] += 1

    def get(self, key: int) -> int | None:
        if key not in self.values:
            return None
        self._use(key)
        return self.values[key]

    def put(self, key: int, value: int) -> tuple[int, int] | None:
        if key in self.values:
            self.values[key] = value
            self._use(key)
            return None
        evicted = self.evict() if len(self.values) == self.capacity else None
        self.values[key] = value
        self.uses[key] = 0
        self._use(key)
        return evicted


    def evict(self, keep: int | None = None) -> tuple[int, int] | None:
        others = [k for k in self.values if k != keep]
        if not others:
            return None
        if self.policy == "fifo":
            victim = others[0]
        elif self.policy == "lru":
            victim = min(others, key=lambda k: self.last_use[k])
        else:
            victim = min(others, key=lambda k: (self.uses[k], self.last_use[k]))
        del self.uses[victim], self.last_use[victim]
        return victim, self.values.pop(victim)


# (kind, key, value): kind 0 gets key, 1 puts key -> value, 2 evicts with key kept
ops = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 7), st.integers(0, 99)),
               max_size=200)


@pytest.mark.parametrize("policy", POLICIES)
@given(capacity=st.integers(1, 5), script=ops)
def test_each_cache_policy_evicts_as_its_reference_model(policy: str, capacity: int,
                                                          script: list[tuple[int, int, int]]
                                                          ) -> None:
    cache, model = Cache(capacity, policy), ReferenceCache(capacity, policy)
    for kind, key, value in script:
        if kind == 1:
            assert cache.put(key, value) == model.put(key, value)
        elif kind == 2:
            assert cache.evict(key) == model.evict(key)
        else:
            assert cache.get(key) == model.get(key)
        assert len(cache) <= capacity
    assert sorted(cache.items()) == sorted(model.values.items())


def test_policies_differ_on_one_trace_and_hits_are_counted() -> None:
    """a is used often, then b and c come: LRU keeps the recent, LFU the frequent, FIFO
    neither."""
    kept = {}
    for policy in POLICIES:
        cache = Cache(2, policy)
        cache.put("a", 1)
        cache.get("a")
        cache.get("a")
        cache.put("b", 2)
        cache.get("b")
        cache.put("c", 3)
        kept[policy] = sorted(k for k, _ in cache.items())
        assert cache.counts == [3, 0]
        cache.get("zzz")
        assert cache.counts == [3, 1]
    assert kept == {"lru": ["b", "c"], "lfu": ["a", "c"], "fifo": ["b", "c"]}
    with pytest.raises(ValueError):
        Cache(2, "random")


class _SeenFlash(MemFlash):
    """A MemFlash that keeps every buffer a page was read into (alive: ids stay unique)."""

    def __init__(self) -> None:
        super().__init__()
        self.buffers: list[bytearray] = []

    def read_into(self, name: str, buf: bytearray) -> bytearray | None:
        self.buffers.append(buf)
        return super().read_into(name, buf)


def test_page_reads_recycle_a_few_buffers_whatever_their_number() -> None:
    """2,000 gets and puts of 256 clients' entries (8 pages of a client table): every page
    read goes into the buffer of a page evicted before, so the reads take 5 buffers in all
    (the cache's and _SPARES_MAX spares), not a fresh block now and then. With one spare
    kept, 1,145 reads took 32: each a fresh ~480-byte block, the allocation nodes at 256
    clients most often ran out of heap in."""
    flash = _SeenFlash()
    store = PageStore(flash, "C", 64, span=32)
    rng = random.Random(1)
    for n in range(2000):
        client = rng.randrange(256)
        if rng.random() < 0.5:
            store.get(client)
        else:
            store.put(client, [n, [True, None]])
    assert len(flash.buffers) > 1000, "most operations read a page"
    assert len({id(b) for b in flash.buffers}) <= CACHE_PAGES + 2


def test_a_reset_keeps_the_cached_pages_buffers_for_the_next_reads() -> None:
    """A reset (a state transfer installed, versions discarded) drops the cached pages but
    not their bytearrays: the next reads go into them, as into an evicted page's. Before,
    each read after a reset took a fresh block until the cache evicted again."""
    flash = _SeenFlash()
    store = PageStore(flash, "C", 64, span=32)
    for client in range(0, 32 * CACHE_PAGES, 32):  # pages enough to fill the cache
        store.put(client, [client, [True, None]])
    store.flush()
    assert not store._spares, "nothing evicted: no spare buffer"
    held = {id(b) for b in flash.buffers}
    store.reset(store.total, store.count)
    seen = len(flash.buffers)  # flash.buffers keeps them all alive: ids stay unique
    for client in range(0, 32 * 2, 32):
        assert store.get(client) == [client, [True, None]]
    assert len(flash.buffers) == seen + 2
    assert {id(b) for b in flash.buffers[seen:]} <= held


_MP_LENGTHEN = """
import gc
from edgebft.firmware.store import Flash
flash = Flash({folder!r})
flash.write("long", bytes(range(200)) * 3)
flash.write("short", b"x" * 100)
buf = flash.read_into("long", bytearray())
growth = []
for _ in range(3):
    flash.read_into("short", buf)  # shrinks it: the block keeps its 600 bytes
    gc.collect()
    before = gc.mem_alloc()
    flash.read_into("short", buf)
    short = gc.mem_alloc() - before
    gc.collect()
    before = gc.mem_alloc()
    got = flash.read_into("long", buf)
    growth.append(gc.mem_alloc() - before - short)
    assert got is buf and bytes(buf) == bytes(range(200)) * 3
print(max(growth))
"""


def test_a_page_read_into_a_shrunk_buffer_takes_no_block_of_its_size(
        micropython: Path, mp_lib: Path, tmp_path: Path) -> None:
    """On MicroPython, a device Flash reads a 600-byte file into a buffer that held 600 bytes
    and was shrunk to 100: beyond what reading the 100-byte file allocates (the file object,
    its path), it allocates under 128 bytes. It lengthened the buffer with a temporary
    bytes of the difference (500 bytes here), a block that a fragmented heap lacked."""
    proc = run_mp(micropython, mp_lib, _MP_LENGTHEN.format(folder=str(tmp_path / "state")))
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 128


@given(st.sets(st.integers(0, 1023), min_size=1))
def test_marked_pages_lists_the_set_bits_of_a_version_bitmap(pages: set[int]) -> None:
    store = PageStore(MemFlash(), "L", 1024)
    for i in pages:
        store.mark(i, 3)
    assert list(marked_pages(store.versions[3])) == sorted(pages)


_SUMS = st.integers(0, (1 << 2048) - 1)


@given(_SUMS, st.one_of(st.just(0), _SUMS), st.one_of(st.just(0), _SUMS))
def test_add_term_is_the_sum_modulo_2_to_the_2048(total: int, new: int, old: int) -> None:
    assert add_term(total, new, old) == (total + new - old) % (1 << 2048)


_MP_ADD_TERM = """
import gc
from edgebft.protocol.pagestore import add_term
total = (1 << 2047) + 12345
term = (1 << 2040) + 678
def allocated(f):
    gc.collect()
    before = gc.mem_alloc()
    f()
    return gc.mem_alloc() - before
print(allocated(lambda: total - term), allocated(lambda: total + term),  # one int each
      allocated(lambda: add_term(total, 0, term)), allocated(lambda: add_term(total, term, 0)))
"""


def test_a_term_added_or_removed_allocates_one_2048_bit_int(
        micropython: Path, mp_lib: Path) -> None:
    """On MicroPython, removing a term from a total (no wrap-around) allocates what one
    subtraction of 2048-bit ints does, and adding one what one addition does:
    ``total += new - old`` allocated two (288-320 bytes each here), and these blocks were
    where nodes under omission at 256 clients most often ran out of heap."""
    proc = run_mp(micropython, mp_lib, _MP_ADD_TERM)
    assert proc.returncode == 0, proc.stderr
    subtraction, addition, removed, added = (int(x) for x in proc.stdout.split())
    assert subtraction >= 256 and addition >= 256
    assert removed <= subtraction and added <= addition


def _from_scratch(store: PageStore, model: dict[Any, Any]) -> int:
    """The digest of ``model``'s entries placed in ``store``'s pages, computed anew: each
    page the canonical flat array of its sorted entries, its digest expanded to 2048 bits by
    the keystream of AES-256-CTR keyed with it, from counter 0 (cryptography's CTR mode)."""
    total = 0
    for i in range(store.pages):
        flat = [x for k in sorted(model) if store.page_of(k) == i for x in (k, model[k])]
        if flat:
            digest = hashlib.sha256(cbor2.dumps(flat)).digest()
            ctr = Cipher(algorithms.AES(digest), modes.CTR(bytes(16))).encryptor()
            total += int.from_bytes(ctr.update(bytes(256)), "big")
    return total % (1 << 2048)


_PAGES = [b"", b"\x82\x61k\x01", cbor2.dumps([f"kk{i}" for i in range(80)]),
          bytes(range(256)) * 4]

_MP_TERMS = """
from edgebft.protocol.pagestore import page_tag, page_term
for page in {pages!r}:
    term, tag = page_term(page)
    print(term, tag, page_tag(page))
"""


def test_micropython_terms_equal_cpython_and_the_aes_ctr_keystream(
        micropython: Path, mp_lib: Path) -> None:
    """A board's cryptolib and the host's cipher (edgebft.cipher, on cryptography) give the
    same terms and tags, and both are AES-256-CTR's keystream under the page's digest."""
    proc = run_mp(micropython, mp_lib, _MP_TERMS.format(pages=_PAGES))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for page, line in zip(_PAGES, lines, strict=True):
        term, tag = page_term(page)
        assert line.split() == [str(term), str(tag), str(page_tag(page))]
        if page:
            key = hashlib.sha256(page).digest()
            stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(
                bytes(256))
            assert term == int.from_bytes(stream, "big")
            assert tag == page_tag(page) == ((stream[0] << 8 | stream[1]) or 1)
        else:
            assert (term, tag) == (0, 0)


def test_the_host_cipher_refuses_what_cryptolib_would_not_do_here() -> None:
    with pytest.raises(ValueError, match="only ECB"):
        aes(bytes(32), 2)
    with pytest.raises(ValueError, match="multiple of the block size"):
        aes(bytes(32), 1).encrypt(bytes(15))
    out = bytearray(32)
    assert aes(bytes(32), 1).encrypt(bytes(32), out) is out
    assert bytes(out) == aes(bytes(32), 1).encrypt(bytes(32))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=6),
                          st.one_of(st.integers(-5, 10**12), st.binary(max_size=8))),
                max_size=60),
       st.integers(1, 3), st.sampled_from(POLICIES))
def test_incremental_digest_equals_a_recomputation_from_scratch(
        puts: list[tuple[str, Any]], cache_pages: int, policy: str) -> None:
    flash = MemFlash()
    store = PageStore(flash, "T", 8, cache_pages, policy)
    model: dict[str, Any] = {}
    for n, (key, value) in enumerate(puts):
        store.version = 4 * (n // 5 + 1)  # a few versions, some folded below
        store.put(key, value)
        model[key] = value
        assert store.get(key) == value
        if n % 7 == 6:
            store.flush()
            store.fold(4 * (n // 10))
    store.flush()  # the total leaves out the dirty pages' terms until they are written
    assert store.total == _from_scratch(store, model)
    assert store.count == len(model)
    store.flush()
    store.fold(1 << 30)
    total, count, tags = store.scan()
    assert (total, count, bytes(tags)) == (store.total, store.count, bytes(store.tags))
    assert all(store.get(k) == v for k, v in model.items())


_VALUES = st.one_of(st.integers(-5, 10**12), st.binary(max_size=40), st.none(),
                    st.lists(st.text(max_size=30), max_size=3))
_OPS = st.lists(st.tuples(st.sampled_from(("put", "put", "delete", "get")),
                          st.integers(0, 60), _VALUES), max_size=150)


def _apply(store: PageStore, ops: list[tuple[str, int, Any]]) -> dict[str, Any]:
    """Run ``ops`` on ``store`` and a dict alike, checking every get; return the dict."""
    model: dict[str, Any] = {}
    for kind, n, value in ops:
        key = f"key{n}"
        if kind == "put":
            store.put(key, value)
            model[key] = value
        elif kind == "delete":
            store.delete(key)
            model.pop(key, None)
        assert store.get(key) == model.get(key)
        cached = [len(page[0]) + PAGE_OVERHEAD_BYTES for _, page in store.cache.items()]
        assert store.cached == sum(cached)
        assert store.cached <= store.cache_bytes or len(cached) == 1, "the cache's budget"
    return model


def _page_bytes(store: PageStore) -> list[bytes]:
    store.flush()
    return [store.flash.read(store.file_at(i)) or b"" for i in range(store.pages)]


@settings(max_examples=80, deadline=None)
@given(_OPS, st.integers(1, 3), st.sampled_from((1, 400, 8192)))
def test_spliced_pages_are_the_reference_encoding_of_their_entries(
        ops: list[tuple[str, int, Any]], cache_pages: int, cache_bytes: int) -> None:
    """Puts, deletes and gets splice entries into a page's bytes in place: every page ends
    as cbor2's encoding of its entries, sorted and flat, and the digest and count are a
    recomputation's. The cache keeps to its budget in bytes (but for the page in use),
    writing the dirty pages it evicts."""
    store = PageStore(MemFlash(), "T", 3, cache_pages, cache_bytes=cache_bytes)
    model = _apply(store, ops)
    pages = _page_bytes(store)  # flushed
    assert store.total == _from_scratch(store, model)
    assert store.count == len(model)
    for i, data in enumerate(pages):
        flat = [x for k in sorted(model) if store.page_of(k) == i for x in (k, model[k])]
        assert data == (cbor2.dumps(flat) if flat else b"")
    store.fold(1 << 30)  # the written version becomes the base, which scan() verifies
    assert store.scan() == (store.total, store.count, store.tags)


_MP_PAGES = """
from edgebft.firmware.store import Flash
from edgebft.protocol.flash import MemFlash
from edgebft.protocol.pagestore import PageStore
store = PageStore({flash}, "T", 3, 2)
for kind, n, value in {ops!r}:
    key = "key%d" % n
    if kind == "put":
        store.put(key, value)
    elif kind == "delete":
        store.delete(key)
store.flush()
print([(store.flash.read(store.file_at(i)) or b"").hex() for i in range(3)], store.total)
"""


@pytest.mark.parametrize("flash", ["MemFlash()", "Flash({folder!r})"])
def test_pages_spliced_on_micropython_are_cpythons(micropython: Path, mp_lib: Path,
                                                   tmp_path: Path, flash: str) -> None:
    """The same operations leave the same page bytes and digest on MicroPython (arrays of
    offsets, memoryview slices, and with a device's Flash, page buffers read into again as
    pages of other sizes come and go) as on CPython."""
    rng = random.Random(7)
    ops = [(rng.choice(("put", "put", "delete")), rng.randrange(50),
            rng.choice((rng.randrange(10**9), "v" * rng.randrange(40), [1, b"x"], None)))
           for _ in range(400)]
    store = PageStore(MemFlash(), "T", 3, 2)
    _apply(store, ops)
    expected = [data.hex() for data in _page_bytes(store)]
    flash = flash.format(folder=str(tmp_path / "state"))
    proc = run_mp(micropython, mp_lib, _MP_PAGES.format(ops=ops, flash=flash))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{expected!r} {store.total}"


def _busy_cluster(requests: int, clients: int = 8) -> tuple[Net, list[Any]]:
    """A 4-replica cluster (K = 4) after ``requests`` puts of distinct keys, in batches."""
    net = Net(n=4, k=4)
    cores = [net.client(c) for c in range(clients)]
    done = 0
    while done < requests:
        for core in cores[:requests - done]:
            net.submit(core.request(["put", f"key{done}", [done, "v" * 40]]))
            done += 1
        net.run()
    return net, cores


def _miss_puts(net: Net, cores: list[Any]) -> None:
    """Replica 3 is down while 48 puts overwrite keys: it falls over a window behind."""
    net.down.add(3)
    for n in range(48):
        net.submit(cores[n % len(cores)].request(["put", f"key{n}", -n]))
        net.run()


def _transferred(r: rp.Replica) -> bool:
    return any(e[0] == "transferred" for e in r.events)


def _tick(net: Net, ticks: int, until: Any = lambda: False) -> None:
    """Fire every timer 200 ms apart, delivering everything, ``ticks`` times or until
    ``until()``."""
    for _ in range(ticks):
        if until():
            return
        net.tick(net.now + 200)
        net.run()


def test_a_power_cut_at_any_operation_leaves_a_flash_that_opens_and_verifies() -> None:
    """Cut the flash after every one of a replica's last operations (page writes, left torn
    when the cut falls in one, a record, the commit, the folds): a restart opens the stable
    checkpoint of that instant, verifies it, and its digest is the one the cluster agreed
    on."""
    net, _ = _busy_cluster(60)
    r = net.replicas[1]
    agreed = {e[1]: e[2] for e in r.events if e[0] == "checkpoint"}
    flash = r.state.flash
    assert any(torn is not None for _, _, torn in flash.journal), "no page write to tear"
    for cut in range(len(flash.journal) + 1):
        torn = MemFlash()
        torn.files = dict(flash.files)
        torn.journal = list(flash.journal)
        torn.unsent = len(torn.journal)  # any operation, whatever messages followed it
        torn.cut(cut)
        restored = rp.Replica.restore(r.durable(), 1, net.stake, net.keys.pairwise[1],
                                      net.keys.client_secrets[1], checkpoint_interval=4,
                                      flash=torn)
        assert restored.state.error is None, (cut, restored.state.error)
        assert restored.h <= r.h and restored.h == restored.last_exec
        assert restored.own_checkpoints[restored.h] == agreed[restored.h], cut


def test_a_power_cut_never_undoes_what_a_sent_message_followed() -> None:
    """A node that died before an operation never sent what came after it: cut() stops at
    the last sent() (the P entries a COMMIT follows, replica.py)."""
    flash = MemFlash()
    flash.write("a", b"1")
    flash.append("P", b"entry")
    flash.sent()
    flash.write("b", b"2", False)
    flash.write("c", b"3")
    flash.cut(10)
    assert flash.files == {"a": b"1", "P": b"entry", "b": b""}, "b torn, c undone, no more"


def _restart(net: Net, i: int) -> None:
    """Replica i restarts from its flash and durable() (a crash, or a MemoryError)."""
    r = net.replicas[i]
    net.replicas[i] = rp.Replica.restore(r.durable(), i, net.stake, net.keys.pairwise[i],
                                         net.keys.client_secrets[i], checkpoint_interval=4,
                                         genesis={"a": [100, 7], "b": [0, 8]},
                                         flash=r.state.flash)


def test_batches_executed_before_every_replica_restarts_are_re_proposed_from_flash() -> None:
    """Every replica restarts after executing 3 batches past its last checkpoint: each comes
    back at that checkpoint, and the batches' P entries come back from the log written ahead.
    Their bodies must too, from the oplog's files: the cluster sat in a new view with every
    replica missing them, executing nothing, and a put its client saw accepted was gone (an
    emulated cluster whose 4 nodes ran out of heap under 256 clients and a lossy node)."""
    net, cores = _busy_cluster(40)
    for n in range(6):
        net.submit(cores[n % len(cores)].request(["put", f"x{n}", n]))
        net.run()
    assert {(r.h, r.last_exec) for r in net.replicas} == {(24, 27)}
    assert (True, [True, None]) in [cores[5].on_reply(w) for w in net.replies.pop(5)]
    for i in range(4):
        _restart(net, i)
    assert {r.last_exec for r in net.replicas} == {24}
    net.submit(cores[0].request(["put", "later", 1]))
    net.run()
    _tick(net, 100, lambda: all(r.ledger.get("later") == 1 for r in net.replicas))
    assert [r.missing for r in net.replicas] == [{}] * 4
    assert all(r.ledger.get("later") == 1 for r in net.replicas), "executing again"
    assert all(r.ledger.get("x5") == 5 for r in net.replicas), "the accepted put is kept"
    assert len({r.state.ledger.total for r in net.replicas}) == 1


def test_a_transfer_whose_vouchers_restarted_behind_it_ends_once_they_execute_it_again() -> None:
    """Replicas 0 and 1 vouch for checkpoint 24 to replica 2, which lags and starts fetching
    it; then 0, 1 and 3 restart and come back at 20, their last stable checkpoint, so no
    source holds 24 ("fetch of a state not held"), and replica 1 stays down. The other two
    must re-execute 21-27 from their flash in a new view with replica 2 (3 of 4 are needed),
    which gets 24 and goes on with them. The field signature of the stall: every node at one
    stable checkpoint, one fetching the next, 256 clients timing out."""
    net, cores = _busy_cluster(40)

    def cut_off(to: int, msg: m.Message) -> bool:
        return msg.kind == m.CHECKPOINT or to == 2

    net.down.add(2)
    for n in range(6):  # 21-27, with every checkpoint vote lost: 24 is stable nowhere
        net.submit(cores[n % len(cores)].request(["put", f"x{n}", n]))
        net.run(dropped=cut_off)
    net.down.clear()
    for _ in range(2):  # replica 2 hears nothing: it is "stuck", so close votes make it fetch
        net.tick(net.now + 200)
        net.run(dropped=cut_off)
    for i in (0, 1):
        net.replicas[i]._send(2, m.CHECKPOINT, 24, net.replicas[i].own_checkpoints[24])
        net._collect(i)
    net.run(dropped=lambda to, msg: to == 2 and msg.kind != m.CHECKPOINT)
    lagging = net.replicas[2]
    assert lagging.transfer is not None and lagging.transfer.seq == 24
    for i in (0, 1, 3):
        _restart(net, i)
    assert [r.h for r in net.replicas] == [20] * 4
    net.down.add(1)
    _tick(net, 5)
    assert lagging.transfer is not None and "fetch of a state not held" in net.replicas[0].drops
    net.submit(cores[0].request(["put", "later", 1]))
    net.run()
    _tick(net, 100, lambda: lagging.ledger.get("later") == 1)
    up = [net.replicas[i] for i in (0, 2, 3)]
    assert all(r.ledger.get("later") == 1 for r in up), [(r.h, r.last_exec) for r in up]
    assert all(r.ledger.get("x5") == 5 for r in up)
    assert len({r.state.ledger.total for r in up}) == 1


def test_a_corrupt_page_fails_verification_and_the_replica_recovers_by_transfer() -> None:
    net, cores = _busy_cluster(40)
    flash = net.replicas[3].state.flash
    page = next(name for name in sorted(flash.files) if name.startswith("L.p"))
    flash.files[page] = flash.files[page][:-1] + b"\x00"
    _restart(net, 3)
    restored = net.replicas[3]
    assert restored.state.error and "verification" in restored.state.error
    assert ("store_error", restored.state.error) in restored.events
    assert restored.h == 0 and restored.ledger.get("key0") is None, "back to genesis"
    for n in range(24):  # the others go on; checkpoints beyond its window make it fetch
        net.submit(cores[n % len(cores)].request(["put", f"later{n}", n]))
        net.run()
        net.tick(net.now + 200)
        net.run()
    assert _transferred(restored)
    assert restored.ledger.get("key39") == [39, "v" * 40]
    assert restored.state.ledger.total == net.replicas[0].state.ledger.total


def test_a_replica_behind_fetches_only_the_pages_that_differ() -> None:
    """600 keys, then replica 3 misses a few dozen puts: its transfer moves a small part of
    the state, and it converges on the others' digest."""
    net, cores = _busy_cluster(600)
    full = sum(len(v) for k, v in net.replicas[0].state.flash.files.items()
               if k.startswith(("L.p", "C.p")))
    _miss_puts(net, cores)
    net.down.clear()
    behind = net.replicas[3]
    _tick(net, 20, lambda: _transferred(behind))
    assert _transferred(behind)
    assert any(e[0] == "fetch" for e in behind.events), "the start is an event too"
    moved = behind.counts["transfer_bytes"]
    assert 0 < moved < full // 4, (moved, full)
    _tick(net, 10)  # then it executes what the others executed past the checkpoint
    assert behind.last_exec == net.replicas[0].last_exec
    assert behind.state.ledger.total == net.replicas[0].state.ledger.total
    assert behind.ledger.get("key5") == -5 and behind.ledger.get("key599")[0] == 599



def test_a_primary_caught_up_by_transfer_forgets_the_requests_it_executed() -> None:
    """The primary misses every PREPARE and COMMIT while 48 clients write: the backups
    execute, and it catches up by state transfer. The requests the transferred state
    executed leave its queue and its pending ids (only execution took them out: they stayed
    until a view change, and the table grew with them)."""
    net = Net(n=4, k=4)
    primary = net.replicas[0]
    for turn in range(4):  # 12 new clients a turn: each sends one request
        for c in range(12 * turn, 12 * turn + 12):
            net.submit(net.client(c).request(["put", f"k{c}", turn]))
        net.run(dropped=lambda to, msg: to == 0 and msg.kind in (m.PREPARE, m.COMMIT))
    assert any(e[0] == "transferred" for e in primary.events)
    assert primary.last_exec < net.replicas[1].last_exec, "it is still behind the others"

    def executed(client: int, timestamp: int) -> bool:
        entry = primary.clients.get(client)
        return entry is not None and timestamp <= entry[0]

    assert primary.pending_ids, "requests are still queued and in flight"
    assert not [c for c, t in primary.pending_ids.items() if executed(c, t)]
    assert not [w for w in primary.pending if executed(*rp._request_head(w))]
    assert any(executed(c, 1) for c in range(48)), "the transfer executed some of them"

def test_1024_clients_each_execute_exactly_once() -> None:
    """Every client's last timestamp and reply is kept (on flash): after 1,024 clients each
    ran one put, a retransmission of the first client's request is answered from the client
    table and does not execute again."""
    net = Net(n=4, k=4)
    cores = [net.client(c) for c in range(1024)]
    wires = []
    for start in range(0, len(cores), 16):  # as many as a primary queues (clients retry)
        for core in cores[start:start + 16]:
            wires.append(core.request(["put", f"c{core.client}", core.client]))
            net.submit(wires[-1])
        net.run()
    for r in net.replicas:
        assert r.clients.count == 1024
        assert r.ledger.get("c1023") == 1023
    before = [r.last_exec for r in net.replicas]
    net.replies.clear()
    net.submit(wires[0])
    net.run()
    assert [r.last_exec for r in net.replicas] == before, "answered, not executed again"
    accepted = [cores[0].on_reply(w) for w in net.replies.get(0, [])]
    assert any(ok for ok, _ in accepted), "the cached reply comes back"
    assert net.replicas[0].clients.get(0)[1] == [True, None]


def test_client_ids_in_sequence_share_pages_and_a_page_refuses_what_is_not_its_own() -> None:
    """The client table is placed by runs: ids 0 .. 31 in page 0, 32 .. 63 in page 1, wrapping
    around; a page holding a str key or an id of another run fails verification."""
    store = State(MemFlash(), 4).clients
    assert [store.page_of(c) for c in (0, 31, 32, 63, 64 * 32 - 1, 64 * 32, 0xF000 + 3)] \
        == [0, 0, 1, 1, 63, 0, 0]
    assert store.check_page(1, cbor2.dumps([32, [1, [True, None]], 63, [2, [True, 5]]])) \
        == array("I", [1, 8])
    for misfit in ([0, [1, None]], ["a", [1, None]], [-32, [1, None]]):
        with pytest.raises(PageError):
            store.check_page(1, cbor2.dumps(misfit))


def test_a_client_whose_page_is_full_is_refused_and_the_others_go_on() -> None:
    """With one client page, the first CLIENT_PAGE_ENTRIES_MAX clients are recorded; the next
    one's put does not execute, on any replica, and it is told why; a recorded client's next
    request still executes, and so does a replica's own (an accusation must never be
    refused)."""
    net = Net(n=4, k=4, store={"client_pages": 1})
    cores = [net.client(c) for c in range(CLIENT_PAGE_ENTRIES_MAX + 1)]
    for start in range(0, len(cores), 16):
        for core in cores[start:start + 16]:
            net.submit(core.request(["put", f"c{core.client}", core.client]))
        net.run()
    late = cores[-1]
    results = [late.on_reply(w) for w in net.replies.get(late.client, [])]
    assert (True, [False, "client table full"]) in results
    net.submit(cores[0].request(["put", "c0", "again"]))
    net.run()
    for r in net.replicas:
        assert r.clients.count == CLIENT_PAGE_ENTRIES_MAX
        assert r.clients.get(late.client) is None and r.ledger.get(f"c{late.client}") is None
        assert r.ledger.get("c0") == "again" and r.ledger.get("c1") == 1
    digests = {r.ledger.digest for r in net.replicas}
    assert len(digests) == 1, "refused the same way everywhere"
    net.replicas[1]._equivocation(0, 1)  # replica 1 accuses its primary: a request of its own
    net.run()
    for _ in range(3):  # replica 1 left the view: it executes on the others' commits
        net.tick(net.now + 1000)
        net.run()
    assert all(r.clients.get(rp.REPLICA_CLIENT_BASE + 1) is not None for r in net.replicas)


def test_lying_tags_fail_the_check_and_a_full_fetch_recovers() -> None:
    """The tags of a record are hints the digest does not cover: sources whose records claim
    that every page equals the behind replica's make it fetch nothing; the state it assembles
    fails its check, and it fetches every page the next time."""
    net, cores = _busy_cluster(200)
    behind = net.replicas[3]
    _miss_puts(net, cores)
    state = behind.state
    tag_bytes = len(state.ledger.tags) + len(state.clients.tags)  # a record ends with them
    own = state.flash.files[f"ck{state.h}"][-tag_bytes:]
    for source in net.replicas[:3]:
        files = source.state.flash.files
        for name in [name for name in files if name.startswith("ck")]:
            files[name] = files[name][:-tag_bytes] + own
    net.down.clear()
    _tick(net, 40, lambda: _transferred(behind))
    assert behind.drops.get("transferred state does not verify", 0) >= 1
    assert _transferred(behind)
    _tick(net, 10)
    assert behind.last_exec == net.replicas[0].last_exec
    assert behind.state.ledger.total == net.replicas[0].state.ledger.total


def test_a_transfer_that_does_not_fit_the_flash_is_refused_and_resumes_with_room() -> None:
    """No part is staged into the flash's last 64 KB: a replica short of flash refuses the
    state, says why, and fetches it once there is room."""
    net, cores = _busy_cluster(200)
    behind = net.replicas[3]
    flash = behind.state.flash
    _miss_puts(net, cores)
    flash.capacity = sum(len(d) for d in flash.files.values()) + 65536 + 100
    net.down.clear()
    _tick(net, 10)
    assert behind.drops.get("no room on flash for the state", 0) >= 1
    assert not _transferred(behind)
    flash.capacity = 1 << 30
    _tick(net, 20, lambda: _transferred(behind))
    assert _transferred(behind)


def test_a_source_out_of_heap_drops_the_fetch_and_the_transfer_still_completes() -> None:
    """Serving a chunk changes nothing but a pin, so a source whose heap has no piece for it
    (MemoryError reading the part) drops that FETCH and goes on, where a restart from flash
    would put a second replica behind; the fetcher asks again and the transfer completes."""
    net, cores = _busy_cluster(200)
    behind = net.replicas[3]
    _miss_puts(net, cores)
    failures = [6]  # the first six reads of a part, at any source, find no heap
    for source in net.replicas[:3]:
        def read_at(name: str, offset: int, n: int, read: Any = source.state.flash.read_at
                    ) -> bytes | None:
            if failures[0] and not name.startswith("ck"):
                failures[0] -= 1
                raise MemoryError
            return read(name, offset, n)
        source.state.flash.read_at = read_at  # type: ignore[method-assign]
    net.down.clear()
    _tick(net, 40, lambda: _transferred(behind))
    assert failures == [0]
    assert sum(r.drops.get("fetch: heap fragmented", 0) for r in net.replicas[:3]) == 6
    assert _transferred(behind)
    _tick(net, 10)
    assert behind.last_exec == net.replicas[0].last_exec
    assert behind.state.ledger.total == net.replicas[0].state.ledger.total


def test_a_record_is_read_for_its_meta_alone() -> None:
    """A checkpoint record is its meta, then two tag bytes a page: a transfer's part 0, its
    check and the restore read the meta as the tags leave it (~580 bytes, measured here),
    not 1 KB, a block the fetcher's fragmented heap lacked at 256 clients."""
    net, cores = _busy_cluster(200)
    behind = net.replicas[3]
    flash = behind.state.flash
    tags = len(behind.state.ledger.tags) + len(behind.state.clients.tags)
    metas: list[tuple[str, int, int]] = []  # (record, bytes asked for, its meta's bytes)

    def read_at(name: str, offset: int, n: int, read: Any = flash.read_at) -> bytes | None:
        if offset == 0 and (name.startswith("ck") or name == "X.0"):
            metas.append((name[:2], n, len(flash.files[name]) - tags))
        return read(name, offset, n)
    flash.read_at = read_at  # type: ignore[method-assign]
    _miss_puts(net, cores)
    net.down.clear()
    _tick(net, 40, lambda: _transferred(behind))
    assert _transferred(behind)
    _restart(net, 3)
    assert {record for record, _, _ in metas} == {"ck", "X."}
    assert all(n == meta for _, n, meta in metas), metas
    assert max(meta for _, _, meta in metas) < 600


def test_a_fetcher_out_of_heap_checking_the_staged_state_checks_it_again_and_installs() -> None:
    """The check of a transfer staged whole reads its pages, and changes nothing: a heap
    with no piece for them (MemoryError reading a staged page) keeps the transfer and its
    stage, and the next tick checks again, where a restart from flash started the transfer
    over (a replica behind under 256 clients fetched, ran out of heap checking, restarted,
    and fetched again)."""
    net, cores = _busy_cluster(200)
    behind = net.replicas[3]
    _miss_puts(net, cores)
    failures = [2]  # the fetcher's first two checks find no heap for a staged page

    def read(name: str, read: Any = behind.state.flash.read) -> bytes | None:
        if failures[0] and name.startswith("X.") and name != "X.0":
            failures[0] -= 1
            raise MemoryError
        return read(name)
    behind.state.flash.read = read  # type: ignore[method-assign]
    net.down.clear()
    _tick(net, 40, lambda: behind.drops.get("no heap to check the transferred state") == 1)
    t = behind.transfer
    assert t is not None and t.fetch.want() is None, "the transfer is staged and kept"
    staged = t.fetch.bytes
    _tick(net, 40, lambda: _transferred(behind))
    assert failures == [0] and behind.drops["no heap to check the transferred state"] == 2
    assert _transferred(behind)
    assert behind.counts["transfer_bytes"] == staged, "nothing was fetched again"
    _tick(net, 10)
    assert behind.last_exec == net.replicas[0].last_exec
    assert behind.state.ledger.total == net.replicas[0].state.ledger.total


@pytest.mark.parametrize("votes_lost", [False, True])
def test_a_transfer_moved_to_a_newer_checkpoint_is_vouched_for_and_installed(
        votes_lost: bool) -> None:
    """A fetcher cut off mid-transfer while the others move on: its source's pin lapses and
    it offers its stable checkpoint instead. The fetcher moves to the newest checkpoint the
    others report, or, when it holds no such reports (``votes_lost``), to the offer, and asks
    the others for their votes: either way the state it then fetches is installed, not thrown
    away as not vouched for (a node restarted under a 64-client load fetched seven ~190 KB
    states that way before one was installed)."""
    net, cores = _busy_cluster(200)
    behind = net.replicas[3]
    _miss_puts(net, cores)
    net.down.clear()
    chunks = [0]

    def cut_after_three_chunks(to: int, msg: m.Message) -> bool:
        if to == 3 and msg.kind == m.CHUNK:
            chunks[0] += 1
            return chunks[0] > 3
        return False

    while chunks[0] <= 3:
        net.tick(net.now + 200)
        net.run(dropped=cut_after_three_chunks)
    t = behind.transfer
    assert t is not None and t.fetch.bytes > 0
    first = t.seq
    net.down.add(3)
    for n in range(48):  # the others go on, well past the checkpoint fetched and the pin
        net.submit(cores[n % len(cores)].request(["put", f"key{n}", n * n]))
        net.run()
    net.tick(net.now + 2000)
    net.run()
    if votes_lost:
        behind.ahead.clear()
    net.down.clear()
    _tick(net, 40, lambda: _transferred(behind))
    assert _transferred(behind)
    assert behind.h > first, "installed a newer checkpoint than the one it started with"
    assert "state not vouched for" not in behind.drops, behind.drops
    _tick(net, 10)
    assert behind.last_exec == net.replicas[0].last_exec
    assert behind.state.ledger.total == net.replicas[0].state.ledger.total
    assert behind.ledger.get("key47") == 47 * 47
