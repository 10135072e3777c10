# The replica's executed state on flash: the ledger's and the client table's page stores, the
# checkpoint records, the stable checkpoint, and state transfer in parts streamed from flash.
#
# Rules:
# - Checkpoint c has a record "ck<c>": CBOR(meta), then the ledger's tags and the client
#   table's tags as raw bytes (written in pieces: never one allocation of the whole), where
#   meta is [c, the ledger's small state (history digest, stake), ledger digest, ledger entries,
#   client digest, client entries]. The checkpoint digest is SHA-256 of CBOR(meta): it covers
#   both stores' incremental digests, the validator set and the last executed sequence number,
#   and computing it reads no page.
# - "stable" holds "h v1 v2 ...": the stable checkpoint h and every version that has files
#   when it is written (versions are checkpoint numbers; execution adds at most h + K and
#   h + 2K before the next commit). Writing it is the commit; the folds that follow are redone
#   by open() after a power cut, which visits each of those versions in turn, oldest first.
#   So at any instant of a power cut or SIGKILL, open() finds the state of h (a torn batch
#   beyond h is discarded) and checks it against h's record (every page read, every entry
#   hashed) before the replica trusts it.
# - State transfer of checkpoint c streams parts: part 0 is c's record, part 1 + i page i of
#   the ledger, part 1 + L + i page i of the client table (L ledger pages), each as of c, read
#   from flash in chunks. The receiver (fetch.py's Fetch, a module loaded by the first
#   transfer) stages what it fetches on flash, fetches only the pages whose tags differ from
#   its own stable ones (all of them after a failed check), and its check() reads the staged
#   pages (nothing else changes) before install() switches to the new state: only once the
#   record matches the vouched digest and the pages match the record's digests. A checkpoint
#   being served stays readable while the stable checkpoint moves on (pin(): its versions are
#   not folded and its record is kept, for at most _PINNED_VERSIONS_MAX versions), so a
#   transfer under load can finish.
# - Flash writes per checkpoint interval: the pages its batches changed, each once (when the
#   cache evicts it, or at the checkpoint) and the record; per stable checkpoint: the commit
#   record and renames. A version above h is not trusted after a restart (open() deletes it),
#   so its pages need not reach flash before its checkpoint is taken.
import hashlib

from . import cbor
from .pagestore import CACHE_BYTES, CACHE_PAGES, PageStore, delete_all, sum_bytes

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import int, len, list, min, range, set, sorted, type

STABLE = "stable"
_STAGE = "X."
LEDGER_PAGES = 256  # a page holds ~1/256 of the keys: give a large ledger more pages
CLIENT_PAGES = 64
# The client table is placed by runs of CLIENTS_PER_PAGE ids (pagestore.py): clients 0 .. 31
# share page 0, and so on, wrapping around the pages. A page holds at most
# CLIENT_PAGE_ENTRIES_MAX clients (replicas' own ids aside), so with the default pages the
# table serves 4,096 ids in sequence; a new client whose page is full is refused
# ("client table full", replica.py). An entry is [timestamp, result], under 250 bytes for
# every op's result on a cluster of up to 12 replicas, so a page stays within PAGE_BYTES_MAX.
CLIENTS_PER_PAGE = 32
CLIENT_PAGE_ENTRIES_MAX = 64
_META_BYTES_MAX = 1024  # a record's meta (a record adds 2 bytes of tag per page)
# A record's tags are read from flash this many bytes at a time, never whole: 2 bytes a page
# make 2 KB and more for a large ledger, and a node that had 30 KB free in pieces ran out of
# heap reading a 2.8 KB record whole in the middle of a state transfer.
_TAG_WINDOW = 64
_PINNED_VERSIONS_MAX = 32  # a pin that holds more unfolded versions than this is dropped
_FLASH_RESERVE_BYTES = 65536  # a transfer never stages into the last of the flash


def _record_name(seq):
    return "ck%d" % seq


def meta_digest(meta):
    """The checkpoint digest of a record's meta (encoded in cbor's scratch and hashed at
    once: a meta is about 600 bytes, and on a node at 64 clients an allocation of that size
    was where the heap ran out, in pieces, at checkpoints)."""
    return hashlib.sha256(cbor.encode_transient(meta)).digest()


def _store_digest(meta, s):
    """(digest as an int, entries) of store s (0: ledger, 1: clients) in a record's meta."""
    return int.from_bytes(meta[2 + 2 * s], "big"), meta[3 + 2 * s]


class StateError(ValueError):
    """The flash does not hold a state that verifies (open) or a transfer that does."""


class State:
    """Both page stores of one replica on ``flash`` (protocol/flash.py's interface)."""

    def __init__(self, flash, interval, ledger_pages=LEDGER_PAGES, client_pages=CLIENT_PAGES,
                 cache_pages=CACHE_PAGES, policy="lru", cache_bytes=CACHE_BYTES):
        self.flash = flash
        self.interval = interval  # K: versions are multiples of it
        self.ledger = PageStore(flash, "L", ledger_pages, cache_pages, policy, cache_bytes)
        self.clients = PageStore(flash, "C", client_pages, cache_pages, policy, cache_bytes,
                                 CLIENTS_PER_PAGE)
        self.stores = (self.ledger, self.clients)
        self.h = -1        # the stable checkpoint (-1: none yet)
        self.records = []  # the checkpoints >= h whose records are on flash, and the pinned one
        self.pinned = -1   # a checkpoint below h still served (see pin()), or -1
        self.error = None  # why the flash failed verification at open(), if it did

    def parts(self):
        return 1 + self.ledger.pages + self.clients.pages

    def open(self):
        """Recover the stable state from flash: (meta, digest), or None when there is none or
        it failed verification (self.error says why; the flash is then wiped)."""
        self.clear_stage()
        saved = self.flash.read(STABLE)
        if saved is None:
            self.wipe()
            return None
        try:
            fields = [int(x) for x in saved.split()]
            h = fields[0]
            meta, end = self.read_meta(h)
            # Execution runs at most a window (2K) past h; a version is its next checkpoint.
            versions = sorted(set(fields[1:]) | {h + self.interval, h + 2 * self.interval})
            for store in self.stores:
                store.recover(h, versions)
            for c in versions:
                if c != h:
                    self.flash.delete(_record_name(c))
            for s in range(2):
                store = self.stores[s]
                total, count, found = store.scan()
                if sum_bytes(total) != meta[2 + 2 * s] or count != meta[3 + 2 * s] \
                        or not self._tags_match(_record_name(h), end, s, found):
                    raise StateError("%s pages do not match checkpoint %d" % ("LC"[s], h))
                store.reset(total, count, found)
        except (ValueError, TypeError, IndexError, OSError) as e:
            self.error = "store failed verification: %s" % e
            self.wipe()
            return None
        self.h = h
        self.records = [h]
        return meta, meta_digest(meta)

    def read_meta(self, seq, name=None):
        """(meta, where its tags start) of checkpoint ``seq``'s record (file ``name``, by
        default its own), reading only the meta; StateError when the record is missing or
        malformed (it may come from a peer): its size must be the meta and both stores'
        tags."""
        name = name or _record_name(seq)
        size = self.flash.size(name)
        if size < 0:
            raise StateError("no record of checkpoint %d" % seq)
        # The meta is what the tags leave: read that, not _META_BYTES_MAX (a 1 KB block that
        # a fetcher's fragmented heap lacked at 256 clients, for a meta of ~580 bytes).
        size -= len(self.ledger.tags) + len(self.clients.tags)
        if not 0 < size <= _META_BYTES_MAX:
            raise StateError("bad record of checkpoint %d" % seq)
        try:
            meta, end = cbor.decode_prefix(self.flash.read_at(name, 0, size), 0)
        except cbor.DecodeError as e:
            raise StateError("bad record of checkpoint %d: %s" % (seq, e))
        if type(meta) is not list or len(meta) != 6 or meta[0] != seq or end != size:
            raise StateError("bad record of checkpoint %d" % seq)
        return meta, end

    def tags_at(self, s, start):
        """Where store s's tags start in a record whose tags start at ``start``."""
        return start + (len(self.ledger.tags) if s else 0)

    def _tag_windows(self, name, start, s, n):
        """(offset, bytes) of store s's first ``n`` tag bytes in record ``name`` (tags from
        ``start``), _TAG_WINDOW bytes at a time; StateError when the record is cut short."""
        at = self.tags_at(s, start)
        for o in range(0, n, _TAG_WINDOW):
            k = min(_TAG_WINDOW, n - o)
            chunk = self.flash.read_at(name, at + o, k)
            if chunk is None or len(chunk) != k:
                raise StateError("record %s cut short" % name)
            yield o, chunk

    def _tags_match(self, name, start, s, tags):
        """Does record ``name`` (tags from ``start``) hold ``tags`` for store s?"""
        for o, chunk in self._tag_windows(name, start, s, len(tags)):
            if chunk != tags[o:o + len(chunk)]:
                return False
        return True

    def load_tags(self, name, start, s, into):
        """Copy store s's tags from record ``name`` (tags from ``start``) into ``into``."""
        for o, chunk in self._tag_windows(name, start, s, len(into)):
            into[o:o + len(chunk)] = chunk

    def wipe(self):
        for store in self.stores:
            store.wipe()
        delete_all(self.flash, "ck")
        self.flash.delete(STABLE)
        self.h = -1
        self.records = []

    def begin(self, seq):
        """Execution of ``seq`` starts: its writes belong to the next checkpoint's version."""
        version = (seq + self.interval - 1) // self.interval * self.interval
        for store in self.stores:
            store.version = version

    def flush(self):
        for store in self.stores:
            store.flush()

    def meta(self, seq, small):
        """The record's meta for checkpoint ``seq`` (just executed) of ``small`` ledger state."""
        return [seq, small, sum_bytes(self.ledger.total), self.ledger.count,
                sum_bytes(self.clients.total), self.clients.count]

    def checkpoint(self, seq, small):
        """Write checkpoint ``seq``'s record; its digest."""
        self.flush()
        encoded = cbor.encode_transient(self.meta(seq, small))  # written and hashed at once
        self.flash.write(_record_name(seq), (encoded, self.ledger.tags, self.clients.tags))
        digest = hashlib.sha256(encoded).digest()
        if seq not in self.records:
            self.records.append(seq)
        return digest

    def stable(self, seq):
        """Checkpoint ``seq`` (recorded) is stable: commit it, then fold and collect."""
        self._commit(seq)
        self.h = seq
        self._collect()

    def _commit(self, h, extra=()):
        """Write the commit record: h, and the versions that have (or are about to have)
        files."""
        versions = set(self.ledger.versions) | set(self.clients.versions) | set(extra)
        self.flash.write(STABLE, " ".join(["%d" % v for v in [h] + sorted(versions)]).encode())

    def pin(self, seq):
        """Keep checkpoint ``seq`` (held) readable when the stable one moves past it, until
        unpin() (or until it holds too many versions)."""
        if seq in self.records:
            self.pinned = seq

    def unpin(self):
        self.pinned = -1
        self._collect()

    def _collect(self):
        """Fold the versions up to h, or up to the pinned checkpoint; delete the records below
        h but the pinned one's."""
        if self.pinned >= self.h or len(self.ledger.versions) > _PINNED_VERSIONS_MAX:
            self.pinned = -1
        keep = self.pinned
        for store in self.stores:
            store.fold(self.h if keep < 0 else keep)
        for old in [c for c in self.records if c < self.h and c != keep]:
            self.flash.delete(_record_name(old))
            self.records.remove(old)

    def counts(self):
        """For the status: page cache hits and misses, flash writes and bytes written, ledger
        entries, clients, and the verification error of open()."""
        return {"hits": self.ledger.cache.counts[0] + self.clients.cache.counts[0],
                "misses": self.ledger.cache.counts[1] + self.clients.cache.counts[1],
                "writes": self.flash.writes, "bytes": self.flash.bytes_written,
                "keys": self.ledger.count, "clients": self.clients.count,
                "error": self.error}

    # ----------------------------------------------------------------- state transfer: serving

    def part_file(self, seq, part):
        """The flash name of ``part`` of checkpoint ``seq`` (held: recorded, >= h), or None."""
        if seq not in self.records or part < 0 or part >= self.parts():
            return None
        if part == 0:
            return _record_name(seq)
        store, i = self._store_page(part)
        return store.file_at(i, seq)

    def _store_page(self, part):
        i = part - 1
        if i < self.ledger.pages:
            return self.ledger, i
        return self.clients, i - self.ledger.pages

    def read_part(self, seq, part, offset, n):
        """(total bytes, the bytes at ``offset``) of a part of a held checkpoint, or None."""
        name = self.part_file(seq, part)
        if name is None:
            return None
        size = self.flash.size(name)
        if size < 0:
            return 0, b""  # an empty page
        return size, self.flash.read_at(name, offset, n)

    # ----------------------------------------------------------------- state transfer: receiving

    def stage_name(self, part):
        return "%s%d" % (_STAGE, part)

    def clear_stage(self):
        delete_all(self.flash, _STAGE)
