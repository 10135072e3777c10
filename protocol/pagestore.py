# A key-value map on flash in fixed pages, with a bounded page cache and an incremental digest.
#
# Rules:
# - Key k lives in page page_of(k) (SHA-256 of its CBOR, mod the page count), one of `pages`.
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
# - Incremental digest: `total` is the sum of entry_hash(k, v) over all entries modulo 2^2048
#   (AdHash, Bellare and Micciancio 1997). A put changes it by one subtraction and one addition,
#   so a checkpoint never reads the state. The modulus is wide because a narrow AdHash falls to
#   Wagner's generalized birthday attack (mod 2^256 in about 2^31 hashes): a Byzantine replica
#   serving a state transfer must not find another multiset with the same sum.
# - `tags` holds a 2-byte tag per page (0: empty, else SHA-256 of its bytes, 0 mapped to 1): a
#   replica behind compares them with its own to fetch only the pages that differ. Tags are
#   hints, never trusted: a transferred state is checked against the digest.
# - RAM is bounded by the cache (`cache_pages` decoded pages, policy of cache.py) and the tags
#   (2 bytes per page), whatever the number of keys. Pages written since the last flush are
#   dirty; flush() writes them (the state flushes at each checkpoint), and evicting one
#   writes it first, so a page changed by many batches of an interval is written once.
import hashlib

from . import cbor
from .cache import Cache

SUM_BYTES = 256  # the digest: a sum modulo 2^2048
_SUM_MOD = 1 << (8 * SUM_BYTES)
PAGE_BYTES_MAX = 16384  # a page file larger than this is corrupt (a transferred one: refused)
_BATCH = 32  # names listed at a time: a flash holds thousands
_COUNTERS = tuple(bytes((i,)) for i in range(SUM_BYTES // 32))  # block i hashes this first
# entry_hash's blocks, read into an int at once; one buffer where there is one thread
_HASH_SCRATCH = bytearray(SUM_BYTES) if cbor.SHARED_SCRATCH else None


def delete_all(flash, prefix):
    """Delete every name that starts with ``prefix``, a few at a time."""
    while True:
        names = flash.names(prefix, _BATCH)
        if not names:
            return
        for name in names:
            flash.delete(name)


def entry_hash(key, value):
    """The AdHash term of one entry: SHA-256 in counter mode over its CBOR, 2048 bits. Each
    block is hashed from its counter byte then the encoding, into one buffer: no copy of the
    encoding per block (this runs twice for every write a request makes)."""
    enc = cbor.encode_transient([key, value])  # hashed at once
    out = _HASH_SCRATCH or bytearray(SUM_BYTES)
    for i in range(SUM_BYTES // 32):
        block = hashlib.sha256(_COUNTERS[i])
        block.update(enc)
        out[32 * i:32 * i + 32] = block.digest()
    return int.from_bytes(out, "big")


def add_term(total, new, old):
    """total + new - old reduced modulo 2^2048, for terms and a total already reduced: a
    comparison and at most one more addition instead of a division (a put's hot path)."""
    total += new - old
    if total < 0:
        return total + _SUM_MOD
    if total >= _SUM_MOD:
        return total - _SUM_MOD
    return total


def sum_bytes(total):
    """The digest's bytes of a sum of entry hashes (reduced modulo 2^2048)."""
    return (total % _SUM_MOD).to_bytes(SUM_BYTES, "big")


def page_tag(data):
    """The tag of a page's bytes (0 for an empty page)."""
    if not data:
        return 0
    d = hashlib.sha256(data).digest()
    return (d[0] << 8 | d[1]) or 1


def set_tag(tags, i, tag):
    tags[2 * i] = tag >> 8
    tags[2 * i + 1] = tag & 0xFF


def marked(bits, i):
    """Is page i's bit set in a version's bitmap?"""
    return bits[i >> 3] & (1 << (i & 7))


class PageError(ValueError):
    """A page file that is not a valid page of its store."""


class PageStore:
    """A map from keys (all str or all int) to CBOR values, in ``pages`` pages on ``flash``."""

    def __init__(self, flash, name, pages, cache_pages=8, policy="lru"):
        assert pages > 0
        self.flash = flash
        self.prefix = name + ".p"   # base pages
        self.vprefix = name + ".v"  # versions
        self.pages = pages
        self.cache = Cache(cache_pages, policy)  # page -> {key: value}
        self.dirty = {}        # page -> True: changed since it was last written
        self.versions = {}     # version -> bytearray bitmap of the pages written in it
        self.version = 0       # the version writes go to
        self.total = 0         # AdHash of the entries
        self.count = 0         # number of entries
        self.tags = bytearray(2 * pages)
        self._last_key = None  # page_of's memo
        self._last_page = 0

    # ----------------------------------------------------------------- names and pages

    def page_of(self, key):
        """The page of ``key``: the first 4 bytes of SHA-256 of its CBOR, big-endian, modulo
        the page count (reduced byte by byte: no int past 31 bits, none allocated on a
        board). The last key asked is remembered: an operation reads then writes one key."""
        if key == self._last_key:
            return self._last_page
        d = hashlib.sha256(cbor.encode_transient(key)).digest()
        n = self.pages
        i = 0
        for b in range(4):
            i = (i * 256 + d[b]) % n
        self._last_key = key
        self._last_page = i
        return i

    def name(self, i, version=None):
        if version is None:
            return "%s%d" % (self.prefix, i)
        return "%s%d.%d" % (self.vprefix, version, i)

    def file_at(self, i, seq=None):
        """The file of page i as of checkpoint ``seq`` (None: the newest version)."""
        best = -1
        for v in self.versions:
            bits = self.versions[v]
            if v > best and (seq is None or v <= seq) and marked(bits, i):
                best = v
        return self.name(i) if best < 0 else self.name(i, best)

    def decode_page(self, i, data, check=True):
        """The entries of page i's bytes as a dict; PageError unless it is a valid page of this
        store (sorted keys of one type, each in this page, within the size bound). Without
        ``check``, for our own pages (verified when the store was opened), keys are not hashed
        again to check their page."""
        if not data:
            return {}
        if len(data) > PAGE_BYTES_MAX:
            raise PageError("page %d: %d bytes" % (i, len(data)))
        try:
            flat = cbor.decode(data)
        except Exception as e:  # any malformed input is one kind of error here
            raise PageError("page %d: %s" % (i, e))
        if type(flat) is not list or not flat or len(flat) % 2:
            raise PageError("page %d: not a list of entries" % i)
        page = {}
        last = None
        for j in range(0, len(flat), 2):
            k = flat[j]
            if type(k) not in (int, str):
                raise PageError("page %d: bad entry" % i)
            if last is not None and (type(k) is not type(last) or not last < k):
                raise PageError("page %d: entries out of order" % i)
            if check and self.page_of(k) != i:
                raise PageError("page %d: misplaced key" % i)
            page[k] = flat[j + 1]
            last = k
        return page

    def encode_page(self, page):
        """The bytes of a page, for use at once (cbor.encode_transient: the next encoding
        overwrites them)."""
        if not page:
            return b""
        flat = [None] * (2 * len(page))
        j = 0
        for k in sorted(page):
            flat[j] = k
            flat[j + 1] = page[k]
            j += 2
        return cbor.encode_transient(flat)

    def _page(self, i):
        page = self.cache.get(i)
        if page is None:
            page = self.decode_page(i, self.flash.read(self.file_at(i)), False)
            evicted = self.cache.put(i, page)
            if evicted is not None and evicted[0] in self.dirty:
                self._write(evicted[0], evicted[1])
        return page

    def _write(self, i, page):
        data = self.encode_page(page)
        # Not atomic: the current version is above the stable checkpoint, and a restart
        # deletes what it finds of it (State.open); a page is read back only by this run.
        self.flash.write(self.name(i, self.version), data, False)
        self.mark(i, self.version)
        set_tag(self.tags, i, page_tag(data))
        self.dirty.pop(i, None)

    def mark(self, i, version):
        """Page i has a file of ``version`` (written, or installed by a state transfer)."""
        bits = self.versions.get(version)
        if bits is None:
            bits = self.versions[version] = bytearray((self.pages + 7) // 8)
        bits[i >> 3] |= 1 << (i & 7)

    # ----------------------------------------------------------------- the map

    def get(self, key):
        return self._page(self.page_of(key)).get(key)

    def put(self, key, value):
        i = self.page_of(key)
        page = self._page(i)
        old = page.get(key)
        if old is None:
            self.count += 1
        self.total = add_term(self.total, entry_hash(key, value),
                              0 if old is None else entry_hash(key, old))
        page[key] = value
        self.dirty[i] = True

    def delete(self, key):
        """Remove ``key`` (nothing when absent)."""
        i = self.page_of(key)
        page = self._page(i)
        old = page.pop(key, None)
        if old is not None:
            self.count -= 1
            self.total = add_term(self.total, 0, entry_hash(key, old))
            self.dirty[i] = True

    def flush(self):
        """Write every dirty page (to the current version)."""
        for i in list(self.dirty):
            self._write(i, self.cache.get(i))

    # ----------------------------------------------------------------- versions

    def fold(self, h):
        """Make the versions <= h the base: the state as of h becomes the stable one."""
        for v in sorted(self.versions):
            if v > h:
                break
            bits = self.versions.pop(v)
            for i in range(self.pages):
                if marked(bits, i):
                    self.flash.rename(self.name(i, v), self.name(i))

    def discard(self, h, total, count):
        """Forget everything written after checkpoint h, whose digest and entry count the
        caller gives (and then h's tags, into self.tags): the state becomes that of h."""
        for v in list(self.versions):
            if v > h:
                bits = self.versions.pop(v)
                for i in range(self.pages):
                    if marked(bits, i):
                        self.flash.delete(self.name(i, v))
        self.reset(total, count)

    def reset(self, total, count, tags=None):
        """Drop the cache: the pages now hold ``count`` entries of digest ``total``, and the
        tags given (None: self.tags, which the caller keeps right)."""
        self.cache.clear()
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
        """(sum of entry hashes, entries, tag) of page i's bytes; PageError if invalid."""
        page = self.decode_page(i, data)
        total = 0
        for k in page:
            total += entry_hash(k, page[k])
        return total, len(page), page_tag(data)
