# A key-value map on flash in fixed pages, with a bounded page cache and an incremental digest.
#
# Rules:
# - Key k lives in page page_of(k), one of `pages`: by default SHA-256 of its CBOR, mod the
#   page count; in a store of int keys placed by runs (span > 0), k // span mod the page count,
#   so keys issued in sequence (client ids) share pages. The client table is placed by runs: a
#   cluster's active clients are a few pages that its cache keeps, where hashing scattered 64
#   clients over 64 pages and every request missed (measured: bench --clients 64, 375 req/s
#   hashed, 511 with them all in one page). Client ids are not chosen by who sends: each
#   needs keys the operator derives, so none can be ground into one page.
#   A page is a file holding one flat canonical CBOR array, key, value, key, value ..., its
#   entries sorted by key (all keys of one store have one type); an empty page is a missing
#   or empty file. Flat, not an array of [key, value] pairs: a page of 40 entries decodes
#   with 40 fewer lists (tools/bench_memory.py's page: 24.4 KB allocated with pairs, 21.1 KB
#   flat, on the Unix port) and is 40 bytes shorter.
# - Copy-on-write by version: the pages as of the stable checkpoint are files "<name>.p<i>";
#   a page written while executing up to checkpoint v goes to "<name>.v<v>.<i>". The state as
#   of checkpoint c is, per page, its newest version <= c, else its base file, so the stable
#   checkpoint and the ones above it stay readable (and servable) while execution goes on.
#   fold(h) makes the versions <= h the new base (renames, oldest first, so it can be redone
#   after a power cut); discard(h) deletes the versions above h.
# - Incremental digest: `total` is the sum of page_term(bytes) over the pages modulo 2^2048
#   (AdHash, Bellare and Micciancio 1997, over pages: a page's bytes are the canonical
#   encoding of its entries, so equal entries give equal pages and equal sums). A page's term
#   leaves the total when the page first changes after it was last written, and comes back,
#   of its new bytes, when it is written (flush() or eviction): so the total is the digest
#   whenever no page is dirty (a checkpoint flushes first), a checkpoint never reads the
#   state, and a page that many requests of an interval change while cached (the client
#   table's: every request writes one) is hashed twice per interval, not twice per request.
#   The modulus is wide because a narrow AdHash falls to Wagner's generalized birthday
#   attack (mod 2^256 in about 2^31 hashes): a Byzantine replica serving a state transfer
#   must not find another multiset with the same sum.
# - `tags` holds a 2-byte tag per page (0: empty, else the first two bytes of its term, 0
#   mapped to 1): a replica behind compares them with its own to fetch only the pages that
#   differ. Tags are hints, never trusted: a transferred state is checked against the digest.
# - RAM is bounded by the cache and the tags (2 bytes per page), whatever the number of
#   keys: at most `cache_pages` pages (policy of cache.py) in at most `cache_bytes` of heap,
#   or only the page in use when it takes more (the ledger keeps a page within
#   PAGE_BYTES_MAX). A cached page is its bytes as on flash and the offsets of its entries,
#   never a decoded dict: a get finds its key's encoding at one of the offsets and decodes
#   one value; a put or delete splices one entry into the bytes (in place when the entry
#   keeps its size). A dict of a 40-entry page was 3.4 KB of heap for 372 bytes on flash,
#   and decoding one and encoding it back cost a page miss 330 us and 22 KB of allocation on
#   the Unix port.
#   Pages written since the last flush are dirty; flush() writes them (the state flushes
#   at each checkpoint), and evicting one writes it first, so a page changed by many
#   batches of an interval is written once.
# - A page's bytes are a bytearray, changed in place and recycled: a page read from flash
#   is read into the buffer of a page evicted before (`_spares`, at most _SPARES_MAX, which
#   nothing else references), so reading one takes no new block while it fits the old. On
#   a 64-client bench over 10,000 keys most operations read a page (~480 bytes); fresh
#   blocks of that size were where nodes under omission at 256 clients ran out of
#   contiguous heap. With one spare, a page that fitted the cache without an eviction left
#   the next read none, and an eviction of two pages threw a buffer away: client-table
#   reads at 256 clients still took fresh blocks, the most frequent out-of-heap restart.
import hashlib
from array import array

from . import cbor
from .auth import AES_ECB, aes
from .cache import Cache

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import (bytearray, bytes, int, iter, len, list, max, memoryview, next, range, sorted,
                      str, tuple, type)

SUM_BYTES = 256  # the digest: a sum modulo 2^2048
_SUM_MOD = 1 << (8 * SUM_BYTES)
# A page file larger than this is corrupt (a transferred one: refused). The ledger keeps its
# pages below it (ledger.PAGE_ENTRIES_MAX).
PAGE_BYTES_MAX = 16384
# The pages a store caches take at most this much heap (a cached page takes its length and
# PAGE_OVERHEAD_BYTES: its cache entry, its [bytes, offsets] and the offsets, measured on the
# Unix port), or one page when larger. A node at the default 160 KB heap has little to spare:
# at 64 clients, 16 pages a store (6 KB in all) ran every node out of heap, over and over,
# where 4 (the default, 1.5 KB) did not. A node with more heap may be given more
# ("store": {"cache_bytes": N} in edgebft.json).
CACHE_BYTES = 1536
CACHE_PAGES = 4  # pages a store caches, by default
_SPARES_MAX = 2  # buffers of evicted pages kept for the next reads
PAGE_OVERHEAD_BYTES = 128
_BATCH = 32  # names listed at a time: a flash holds thousands
# The AES blocks a term encrypts: block i is i as 16 big-endian bytes (counter mode)
_COUNTER_BLOCKS = bytes(b for i in range(SUM_BYTES // 16) for b in i.to_bytes(16, "big"))
_COUNTER_0 = _COUNTER_BLOCKS[:16]
# page_term's blocks, read into an int at once; one buffer where there is one thread
_HASH_SCRATCH = bytearray(SUM_BYTES) if cbor.SHARED_SCRATCH else None


def delete_all(flash, prefix):
    """Delete every name that starts with ``prefix``, a few at a time."""
    while True:
        names = flash.names(prefix, _BATCH)
        if not names:
            return
        for name in names:
            flash.delete(name)


def page_term(data):
    """(AdHash term, tag) of a page's bytes: (0, 0) for an empty page; else the term is the
    page's SHA-256 digest expanded to 2048 bits by AES-256 in counter mode keyed with it
    (block i is AES of i as 16 big-endian bytes, i < 16: ECB over _COUNTER_BLOCKS), into one
    buffer read as a big-endian int, and the tag its first two bytes (0 read as 1). One
    cipher object where SHA-256 in counter mode took eight hash objects and their digests:
    a term allocated 1,216 bytes instead of 2,688 on the Unix port, and at 64 clients
    (two terms a request) nodes ran 7% faster (tools/bench, alternated)."""
    if not data:
        return 0, 0
    out = _HASH_SCRATCH or bytearray(SUM_BYTES)
    _cipher(data).encrypt(_COUNTER_BLOCKS, out)
    return int.from_bytes(out, "big"), (out[0] << 8 | out[1]) or 1


def page_tag(data):
    """page_term(data)'s tag, from its first block alone."""
    if not data:
        return 0
    d = _cipher(data).encrypt(_COUNTER_0)
    return (d[0] << 8 | d[1]) or 1


def _cipher(data):
    """AES-256 keyed with the SHA-256 digest of a page's bytes: what expands it to a term."""
    return aes(hashlib.sha256(data).digest(), AES_ECB)


def add_term(total, new, old):
    """total + new - old reduced modulo 2^2048, for terms and a total already reduced: a
    comparison and at most one more addition instead of a division (a put's hot path).
    A term that is 0 takes no arithmetic: the callers add or remove one term at a time,
    and each operation on 2048-bit ints allocates a 256-byte block (``new - old`` first
    took one more), the allocation nodes under omission at 256 clients most often ran out
    of heap in."""
    if old:
        total -= old
        if total < 0:
            total += _SUM_MOD
    if new:
        total += new
        if total >= _SUM_MOD:
            total -= _SUM_MOD
    return total


def sum_bytes(total):
    """The digest's bytes of a sum of entry hashes (reduced modulo 2^2048)."""
    return (total % _SUM_MOD).to_bytes(SUM_BYTES, "big")


def set_tag(tags, i, tag):
    tags[2 * i] = tag >> 8
    tags[2 * i + 1] = tag & 0xFF


def marked(bits, i):
    """Is page i's bit set in a version's bitmap?"""
    return bits[i >> 3] & (1 << (i & 7))


def marked_pages(bits):
    """The pages whose bits are set in a version's bitmap, ascending: a generator, a byte
    of the bitmap at a time. A version marks a few of a large store's pages (fold() over
    1,024 pages was 1,024 calls of marked()), or all of them (a state transferred whole:
    as a list, 8 KB for 1,024 pages, which a node installing one ran out of heap for)."""
    for k in range(len(bits)):
        if bits[k]:
            for i in range(8 * k, 8 * k + 8):
                if marked(bits, i):
                    yield i


class PageError(ValueError):
    """A page file that is not a valid page of its store."""


class PageStore:
    """A map from keys (all str or all int) to CBOR values, in ``pages`` pages on ``flash``."""

    def __init__(self, flash, name, pages, cache_pages=CACHE_PAGES, policy="lru",
                 cache_bytes=CACHE_BYTES, span=0):
        assert pages > 0 and span >= 0
        self.flash = flash
        self.prefix = name + ".p"   # base pages
        self.vprefix = name + ".v"  # versions
        self.pages = pages
        self.span = span       # > 0: int keys, placed by runs of span keys (else hashed)
        self.cache = Cache(cache_pages, policy)  # page -> [bytes, entry offsets]
        self.cache_bytes = cache_bytes
        self.cached = 0        # heap of the cached pages: their lengths and overheads
        self.dirty = {}        # page -> True: changed since it was last written (term out)
        self.versions = {}     # version -> bytearray bitmap of the pages written in it
        self.version = 0       # the version writes go to
        self.total = 0         # AdHash of the pages that are not dirty
        self.count = 0         # number of entries
        self.tags = bytearray(2 * pages)
        self._spares = []      # bytearrays no page holds any more, for the next reads
        self._last_key = None  # page_of's memo: a key, its page and its encoding
        self._last_page = 0
        self._last_encoding = b""

    # ----------------------------------------------------------------- names and pages

    def page_of(self, key):
        """The page of ``key``: key // span modulo the page count when placed by runs (a
        non-negative int), else the first 4 bytes of SHA-256 of its CBOR, big-endian, modulo
        the page count (reduced byte by byte: no int past 31 bits, none allocated on a
        board). The last key asked is remembered, and its encoding, which finds its entry:
        an operation reads then writes one key."""
        if key == self._last_key:
            return self._last_page
        encoding = cbor.encode(key)
        n = self.pages
        if self.span:
            i = key // self.span % n
        else:
            d = hashlib.sha256(encoding).digest()
            i = 0
            for b in range(4):
                i = (i * 256 + d[b]) % n
        self._last_key = key
        self._last_page = i
        self._last_encoding = encoding
        return i

    def _find(self, page, key):
        """_search(page's bytes, its offsets, key, key's encoding), for the key page_of() was
        last asked."""
        assert key == self._last_key
        return _search(page[0], page[1], key, self._last_encoding)

    def name(self, i, version=None):
        if version is None:
            return "%s%d" % (self.prefix, i)
        return "%s%d.%d" % (self.vprefix, version, i)

    def file_at(self, i, seq=None):
        """The file of page i as of checkpoint ``seq`` (None: the newest version). Runs per
        page read: no for loop (its iterator takes four slots), so its frame stays within 11
        slots (cbor.py's header), off the heap."""
        best = -1
        versions = iter(self.versions)
        v = next(versions, -1)  # versions are never negative
        while v >= 0:
            if v > best and (seq is None or v <= seq) and marked(self.versions[v], i):
                best = v
            v = next(versions, -1)
        return self.name(i) if best < 0 else self.name(i, best)

    def check_page(self, i, data):
        """The offsets of the entries of page i's bytes; PageError unless they are a valid
        page of this store: canonical CBOR (so equal entries make equal bytes, hence equal
        terms), keys of one type sorted and each in this page, within the size bound."""
        if not data:
            return array("I")
        if len(data) > PAGE_BYTES_MAX:
            raise PageError("page %d: %d bytes" % (i, len(data)))
        try:
            flat = cbor.decode(data)
        except Exception as e:  # any malformed input is one kind of error here
            raise PageError("page %d: %s" % (i, e))
        if type(flat) is not list or not flat or len(flat) % 2:
            raise PageError("page %d: not a list of entries" % i)
        last = None
        for j in range(0, len(flat), 2):
            k = flat[j]
            if type(k) not in (int, str) or self.span and (type(k) is not int or k < 0):
                raise PageError("page %d: bad entry" % i)
            if last is not None and (type(k) is not type(last) or not last < k):
                raise PageError("page %d: entries out of order" % i)
            if self.page_of(k) != i:
                raise PageError("page %d: misplaced key" % i)
            last = k
        return _offsets(i, data)

    def _page(self, i):
        """Page i as the cache holds it: [its bytes (a bytearray), the offsets of its
        entries]. Our own pages were verified when the store was opened (or written by this
        run): only their heads are read here."""
        page = self.cache.get(i)
        if page is None:
            spare = self._spares.pop() if self._spares else bytearray()
            data = self.flash.read_into(self.file_at(i), spare)
            if data is None:  # no file: an empty page, in the spare buffer
                spare[0:] = b""
                data = spare
            page = [data, _offsets(i, data)]
            self.cached += len(data) + PAGE_OVERHEAD_BYTES
            self._evicted(self.cache.put(i, page))
            self._trim(i)
        return page

    def _trim(self, keep):
        """Evict pages other than ``keep`` while the cache holds over cache_bytes."""
        while self.cached > self.cache_bytes and self._evicted(self.cache.evict(keep)):
            pass

    def _evicted(self, evicted):
        """Account for the (page, [bytes, offsets]) the cache evicted, writing it if it is
        dirty; False when ``evicted`` is None (nothing was)."""
        if evicted is None:
            return False
        i, page = evicted
        self.cached -= len(page[0]) + PAGE_OVERHEAD_BYTES
        if i in self.dirty:
            self._write(i, page[0])
        self._recycle(page[0])
        return True

    def _recycle(self, data):
        """Keep the bytearray of a page no longer cached as a spare, while there is room."""
        if len(self._spares) < _SPARES_MAX and len(data) <= self.cache_bytes:
            self._spares.append(data)

    def _write(self, i, data):
        # Not atomic: the current version is above the stable checkpoint, and a restart
        # deletes what it finds of it (State.open); a page is read back only by this run.
        self.flash.write(self.name(i, self.version), data, False)
        self.mark(i, self.version)
        term, tag = page_term(data)
        self.total = add_term(self.total, term, 0)
        set_tag(self.tags, i, tag)
        self.dirty.pop(i, None)

    def mark(self, i, version):
        """Page i has a file of ``version`` (written, or installed by a state transfer)."""
        bits = self.versions.get(version)
        if bits is None:
            bits = self.versions[version] = bytearray((self.pages + 7) // 8)
        bits[i >> 3] |= 1 << (i & 7)

    # ----------------------------------------------------------------- the map

    def entries_in_page(self, key):
        """The number of entries in ``key``'s page."""
        return len(self._page(self.page_of(key))[1])

    # get, put and _change run per operation; like cbor's per-item functions (cbor.py's
    # header) they keep their frames within 11 slots, the deeper expressions in helpers.

    def get(self, key):
        page = self._page(self.page_of(key))
        j = self._find(page, key)
        return None if j < 0 else _value(page, j)

    def put(self, key, value):
        page = self._page(self.page_of(key))
        j = self._find(page, key)
        if j < 0:
            self.count += 1
        entry = _entry(key, value)
        self._change(page, j, entry)

    def delete(self, key):
        """Remove ``key`` (nothing when absent)."""
        page = self._page(self.page_of(key))
        j = self._find(page, key)
        if j >= 0:
            self.count -= 1
            self._change(page, j, None)

    def _change(self, page, j, entry):
        """_splice(page, j, entry) on the cached page of the key page_of() was last asked
        (as _find), which becomes dirty (its term leaves the total, until it is written);
        then trim the cache to its budget."""
        i = self._last_page
        if i not in self.dirty:
            self._make_dirty(i, page)
        size = len(page[0])
        _splice(page, j, entry)  # in place: page[0] stays the same bytearray
        self.cached += len(page[0]) - size
        self._trim(i)

    def _make_dirty(self, i, page):
        self.total = add_term(self.total, 0, page_term(page[0])[0])
        self.dirty[i] = True

    def flush(self):
        """Write every dirty page (to the current version)."""
        for i, page in self.cache.items():
            if i in self.dirty:  # every dirty page is cached: eviction writes it
                self._write(i, page[0])

    # ----------------------------------------------------------------- versions

    def fold(self, h):
        """Make the versions <= h the base: the state as of h becomes the stable one."""
        for v in sorted(self.versions):
            if v > h:
                break
            for i in marked_pages(self.versions.pop(v)):
                self.flash.rename(self.name(i, v), self.name(i))

    def discard(self, h, total, count):
        """Forget everything written after checkpoint h, whose digest and entry count the
        caller gives (and then h's tags, into self.tags): the state becomes that of h."""
        for v in list(self.versions):
            if v > h:
                for i in marked_pages(self.versions.pop(v)):
                    self.flash.delete(self.name(i, v))
        self.reset(total, count)

    def reset(self, total, count, tags=None):
        """Drop the cache: the pages now hold ``count`` entries of digest ``total``, and the
        tags given (None: self.tags, which the caller keeps right). The cached pages'
        bytearrays become spares: after a state transfer installed, reads found none and
        each took a fresh block, where nodes at 256 clients ran out of contiguous heap."""
        for _, page in self.cache.items():
            self._recycle(page[0])
        self.cache.clear()
        self.cached = 0
        self.dirty = {}
        self.total = total
        self.count = count
        if tags is not None:
            self.tags[:] = tags

    def recover(self, h, versions):
        """After a restart at stable checkpoint h: fold what a power cut left unfolded at or
        below h, oldest version first, and delete the versions above h (nothing is known of
        them in RAM). ``versions``: every version that may have files, ascending."""
        for v in versions:
            prefix = "%s%d." % (self.vprefix, v)
            while True:
                names = self.flash.names(prefix, _BATCH)
                if not names:
                    break
                for name in names:
                    if v > h:
                        self.flash.delete(name)
                    else:
                        self.flash.rename(name, self.name(int(name[len(prefix):])))
        self.versions = {}

    def wipe(self):
        delete_all(self.flash, self.vprefix)
        delete_all(self.flash, self.prefix)
        self.versions = {}
        self.reset(0, 0, bytes(len(self.tags)))

    def scan(self):
        """Check every base page. Returns (total, count, tags) of the state they hold;
        PageError when a page is invalid."""
        total = 0
        count = 0
        tags = bytearray(len(self.tags))
        for i in range(self.pages):
            page_total, page_count, tag = self.page_sum(i, self.flash.read(self.name(i)))
            total += page_total
            count += page_count
            set_tag(tags, i, tag)
        return total % _SUM_MOD, count, tags

    def page_sum(self, i, data):
        """(term, entries, tag) of page i's bytes; PageError if invalid."""
        entries = len(self.check_page(i, data))
        term, tag = page_term(data)
        return term, entries, tag


# ----------------------------------------------------------------- a page's bytes
# A page is [k0, v0, k1, v1 ...]: an array head, then entry j (the encodings of key j and
# value j) at offsets[j], up to offsets[j + 1] (the last: up to the end).


def _offsets(i, data):
    """The offsets of the entries of page i's bytes, read from their heads (an array("I"):
    4 bytes an entry); PageError if the heads do not add up to one array of entries."""
    offsets = array("I")
    if not data:
        return offsets
    if data[0] >> 5 != 4 or data[0] & 31 > 27:
        raise PageError("page %d: not a list of entries" % i)
    if not _read_heads(data, offsets) or _head_count(data) != 2 * len(offsets):
        raise PageError("page %d: not a list of entries" % i)
    return offsets


_TRUNCATED = (IndexError, ValueError)  # what cbor.skip raises for heads cut short


def _read_heads(data, offsets):
    """Append the offset of each entry of a page's ``data`` to ``offsets``; False unless
    their heads are whole and end where ``data`` does. Runs per page read: the handler here,
    the loop in _append_heads and no ``except ... as`` (a second handler's slots) keep the
    frames within 11 slots (cbor.py's header)."""
    try:
        return _append_heads(data, offsets)
    except _TRUNCATED:
        return False


def _append_heads(data, offsets):
    at = _head_bytes(data)
    while at < len(data):
        offsets.append(at)
        at = cbor.skip(data, at)  # the key
        at = cbor.skip(data, at)  # the value
    return at == len(data)


def _head_bytes(data):
    """The length of the array head that ``data`` starts with."""
    ai = data[0] & 31
    return 1 if ai < 24 else 1 + (1 << (ai - 24))


def _head_count(data):
    """The item count in the array head that ``data`` starts with."""
    size = _head_bytes(data)
    if size == 1:
        return data[0] & 31
    return int.from_bytes(data[1:size], "big")


def _value(page, j):
    """The value of entry j of ``page`` ([bytes, offsets]), decoded."""
    data = page[0]
    return cbor.decode_item(data, cbor.skip(data, page[1][j]))


def _entry(key, value):
    """The encoding of entry (key, value): [key, value]'s less its array head (in cbor's
    scratch: valid until the next encoding)."""
    return memoryview(cbor.encode_transient([key, value]))[1:]


def _search(data, offsets, key, encoding):
    """The index of ``key``'s entry, else -1 - (the index it would be inserted at). Its
    ``encoding`` is looked for at each entry's offset (an item's encoding is never a prefix
    of another's), which allocates nothing; only a key that is absent is placed by a binary
    search, which decodes log2(entries) keys."""
    j = 0
    while j < len(offsets):  # no range(): its counters would take the frame over 11 slots
        if data.startswith(encoding, offsets[j]):
            return j
        j += 1
    return -1 - _insertion_point(data, offsets, key)


def _insertion_point(data, offsets, key):
    """The index at which absent ``key`` goes among the sorted entries."""
    lo = 0
    hi = len(offsets)
    while lo < hi:
        mid = (lo + hi) >> 1
        if cbor.decode_item(data, offsets[mid]) < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _splice(page, j, entry):
    """Change the page ``page`` ([bytes, offsets], changed in place) at j, an index as
    _search gives it: j >= 0 replaces entry j with ``entry`` (a key's and a value's
    encodings) or removes it (``entry`` None); j < 0 inserts ``entry`` before entry -1 - j.
    All in place on the page's bytearray: a rewritten entry (_rewrite), or an insertion or a
    removal (_rebuild)."""
    if j >= 0 and entry is not None:
        _rewrite(page[0], page[1], j, entry)
    else:
        _rebuild(page, j, entry)


def _rewrite(data, offsets, j, entry):
    """Write ``entry`` over entry j of a page's bytearray ``data`` in place, and shift the
    offsets after it in place: the bytearray grows or shrinks within its block where it can
    (MicroPython keeps what it shrank by as room to grow). A client's entry, [timestamp,
    result], changes size with most requests, and its page, ~480 bytes, was built again each
    time."""
    end = offsets[j + 1] if j + 1 < len(offsets) else len(data)
    shift = len(entry) - (end - offsets[j])
    data[offsets[j]:end] = entry
    j += 1
    while shift and j < len(offsets):
        offsets[j] += shift
        j += 1


def _rebuild(page, j, entry):
    """_splice() for an insertion or a removal, in place: the entry's bytes go in or out of
    the page's bytearray with one slice assignment, its array head is written again (it
    grows by a byte at 24 items), and the offsets are built again from the old ones, shifted
    (an array of 4 bytes an entry; the bytes are never built again: a fresh ~480-byte block
    per insertion was where nodes ran out of contiguous heap)."""
    data, offsets = page
    n = len(offsets)
    head_old = _head_bytes(data) if data else 0
    if j >= 0:  # entry j goes
        start = offsets[j]
        end = offsets[j + 1] if j + 1 < n else len(data)
        after = j + 1
        n_new = n - 1
    else:  # the entry goes in before entry j
        j = -1 - j
        start = end = offsets[j] if j < n else max(len(data), head_old)
        after = j
        n_new = n + 1
    if n_new == 0:
        data[0:] = b""
        page[1] = array("I")
        return
    size = 0 if entry is None else len(entry)
    data[start:end] = b"" if entry is None else entry
    head = cbor.array_head(2 * n_new)
    data[0:head_old] = head
    grow = len(head) - head_old
    moved = array("I")
    for k in range(j):
        moved.append(offsets[k] + grow)
    if entry is not None:
        moved.append(start + grow)
    for k in range(after, n):
        moved.append(offsets[k] + grow + size - (end - start))
    page[1] = moved
