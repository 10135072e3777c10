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
#   by open() after a power cut, which visits each of those versions in turn, oldest first. So at any instant of a power cut
#   or SIGKILL, open() finds the state of h (a torn batch beyond h is discarded) and checks it
#   against h's record (every page read, every entry hashed) before the replica trusts it.
# - State transfer of checkpoint c streams parts: part 0 is c's record, part 1 + i page i of
#   the ledger, part 1 + L + i page i of the client table (L ledger pages), each as of c, read
#   from flash in chunks. The receiver (Fetch) stages what it fetches on flash, fetches only the
#   pages whose tags differ from its own stable ones (all of them after a failed check), and
#   install() switches to the new state only once the record matches the vouched digest and
#   the pages match the record's digests. A checkpoint being served stays readable while the
#   stable checkpoint moves on (pin(): its versions are not folded and its record is kept, for
#   at most _PINNED_VERSIONS_MAX versions), so a transfer under load can finish.
# - Flash writes per checkpoint interval: the pages its batches changed, each once (when the
#   cache evicts it, or at the checkpoint) and the record; per stable checkpoint: the commit
#   record and renames. A version above h is not trusted after a restart (open() deletes it),
#   so its pages need not reach flash before its checkpoint is taken.
import hashlib

from . import cbor
from .pagestore import (PAGE_BYTES_MAX, PageError, PageStore, delete_all, marked, page_tag,
                        set_tag, sum_bytes)

STABLE = "stable"
_STAGE = "X."
LEDGER_PAGES = 256  # a page holds ~1/256 of the keys: give a large ledger more pages
CLIENT_PAGES = 64
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
    """The checkpoint digest of a record's meta."""
    return hashlib.sha256(cbor.encode(meta)).digest()


def _store_digest(meta, s):
    """(digest as an int, entries) of store s (0: ledger, 1: clients) in a record's meta."""
    return int.from_bytes(meta[2 + 2 * s], "big"), meta[3 + 2 * s]


class StateError(ValueError):
    """The flash does not hold a state that verifies (open) or a transfer that does."""


class State:
    """Both page stores of one replica on ``flash`` (protocol/flash.py's interface)."""

    def __init__(self, flash, interval, ledger_pages=LEDGER_PAGES, client_pages=CLIENT_PAGES,
                 cache_pages=4, policy="lru"):
        self.flash = flash
        self.interval = interval  # K: versions are multiples of it
        self.ledger = PageStore(flash, "L", ledger_pages, cache_pages, policy)
        self.clients = PageStore(flash, "C", client_pages, cache_pages, policy)
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
            meta, end = self._read_meta(h)
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

    def _read_meta(self, seq, name=None):
        """(meta, where its tags start) of checkpoint ``seq``'s record (file ``name``, by
        default its own), reading only the meta; StateError when the record is missing or
        malformed (it may come from a peer): its size must be the meta and both stores'
        tags."""
        name = name or _record_name(seq)
        size = self.flash.size(name)
        if size < 0:
            raise StateError("no record of checkpoint %d" % seq)
        try:
            meta, end = cbor.decode_prefix(self.flash.read_at(name, 0, _META_BYTES_MAX), 0)
        except cbor.DecodeError as e:
            raise StateError("bad record of checkpoint %d: %s" % (seq, e))
        if type(meta) is not list or len(meta) != 6 or meta[0] != seq \
                or size != end + len(self.ledger.tags) + len(self.clients.tags):
            raise StateError("bad record of checkpoint %d" % seq)
        return meta, end

    def _tags_at(self, s, start):
        """Where store s's tags start in a record whose tags start at ``start``."""
        return start + (len(self.ledger.tags) if s else 0)

    def _tags_match(self, name, start, s, tags):
        """Does record ``name`` (tags from ``start``) hold ``tags`` for store s?"""
        at = self._tags_at(s, start)
        for o in range(0, len(tags), _TAG_WINDOW):
            n = min(_TAG_WINDOW, len(tags) - o)
            if self.flash.read_at(name, at + o, n) != tags[o:o + n]:
                return False
        return True

    def _load_tags(self, name, start, s, into):
        """Copy store s's tags from record ``name`` (tags from ``start``) into ``into``."""
        at = self._tags_at(s, start)
        for o in range(0, len(into), _TAG_WINDOW):
            n = min(_TAG_WINDOW, len(into) - o)
            chunk = self.flash.read_at(name, at + o, n)
            if chunk is None or len(chunk) != n:
                raise StateError("record %s cut short" % name)
            into[o:o + n] = chunk

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
        meta = self.meta(seq, small)
        self.flash.write(_record_name(seq), (cbor.encode(meta), self.ledger.tags,
                                             self.clients.tags))
        if seq not in self.records:
            self.records.append(seq)
        return meta_digest(meta)

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

    def rollback(self, meta, start):
        """Forget everything executed after the stable checkpoint, whose record's meta and
        where its tags start the caller has read."""
        name = _record_name(self.h)
        for s in range(2):
            store = self.stores[s]
            store.discard(self.h, *_store_digest(meta, s))
            self._load_tags(name, start, s, store.tags)
        for c in [c for c in self.records if c > self.h]:
            self.flash.delete(_record_name(c))
            self.records.remove(c)

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

    def install(self, fetch):
        """Switch to the checkpoint a complete Fetch staged, if the pages (staged, else ours
        as of h) match its record (whose digest the Fetch checked). Returns the record's meta;
        StateError (the stage cleared) when they do not. The check reads only the staged
        pages and ours they replace: our digest as of h, less what those held, plus what the
        staged ones hold (open() verified ours)."""
        seq = fetch.seq
        try:
            meta = self._read_meta(seq, self.stage_name(0))[0]
            own_meta, own_start = self._read_meta(self.h)
            for s in range(2):
                store = self.stores[s]
                base = 1 + s * self.ledger.pages
                total, count = _store_digest(own_meta, s)
                for i in range(store.pages):
                    if not marked(fetch.staged, base + i):
                        continue
                    old = store.page_sum(i, self.flash.read(store.file_at(i, self.h)))
                    new = store.page_sum(i, self.flash.read(self.stage_name(base + i)))
                    total += new[0] - old[0]
                    count += new[1] - old[1]
                if sum_bytes(total) != meta[2 + 2 * s] or count != meta[3 + 2 * s]:
                    raise StateError("pages do not match the record")
        except (PageError, StateError, ValueError, TypeError) as e:
            self.clear_stage()
            raise StateError(str(e))
        # Our tags as of h, then the staged pages' own (the record's tags are not trusted).
        self.rollback(own_meta, own_start)
        own_meta = None
        self._commit(self.h, (seq,))  # a power cut from here on deletes version seq
        for part in range(1, self.parts()):
            if marked(fetch.staged, part):
                store, i = self._store_page(part)
                name = self.stage_name(part)
                set_tag(store.tags, i, page_tag(self.flash.read(name)))
                self.flash.rename(name, store.name(i, seq))
                store.mark(i, seq)
        self.flash.write(_record_name(seq), (cbor.encode(meta), self.ledger.tags,
                                             self.clients.tags))
        self.flash.delete(self.stage_name(0))
        self.records.append(seq)
        self.stable(seq)
        for s in range(2):
            self.stores[s].reset(*_store_digest(meta, s))
        return meta


class RecordTags:
    """The page tags a record on flash holds, read a window at a time (see _TAG_WINDOW)."""

    def __init__(self, state, name, start):
        self.state = state
        self.name = name
        self.start = start
        self.base = -1       # the offset (from start) of the window read
        self.window = b""

    def at(self, s, i):
        """Store s's tag of page i; -1 when the record cannot be read (a page to fetch)."""
        o = self.state._tags_at(s, 0) + 2 * i
        if not self.base <= o < self.base + len(self.window) - 1:
            self.base = o
            self.window = self.state.flash.read_at(self.name, self.start + o, _TAG_WINDOW)
            if self.window is None or len(self.window) < 2:
                self.window = b""
                return -1
        return self.window[o - self.base] << 8 | self.window[o - self.base + 1]


class Fetch:
    """The receiving side of one state transfer of checkpoint (``seq``, ``digest``): which
    part to ask for next, and the chunks staged on flash. ``full``: fetch every page, whatever
    the tags say (after a transfer that failed its check: the tags may have lied). A source
    cannot fill our flash: the record must match the digest before any page is asked for, and
    no part is staged into the last _FLASH_RESERVE_BYTES of the flash."""

    def __init__(self, state, seq, digest, full=False):
        self.state = state
        self.seq = seq
        self.digest = digest
        self.full = full
        self.part = 0      # the part being fetched
        self.offset = 0    # bytes of it staged
        self.target = None  # the record's RecordTags, once part 0 is in
        self.own = None     # our record's, as of our stable checkpoint then
        self.bytes = 0     # bytes received
        self.record_max = _META_BYTES_MAX + 2 * (state.parts() - 1)
        self.staged = bytearray((state.parts() + 7) // 8)  # bitmap of the pages staged
        state.clear_stage()

    def want(self):
        """(part, offset) to ask for next, or None once everything is staged."""
        return None if self.part >= self.state.parts() else (self.part, self.offset)

    def take(self, part, offset, total, data):
        """Stage the chunk wanted (see want()). None when taken, else why it was refused."""
        if offset + len(data) > total \
                or total > (self.record_max if part == 0 else PAGE_BYTES_MAX):
            return "bad chunk"
        if offset == 0 and total > self.state.flash.free() - _FLASH_RESERVE_BYTES:
            return "no room on flash for the state"
        name = self.state.stage_name(part)
        if offset == 0:
            self.state.flash.write(name, data)
        else:
            self.state.flash.append(name, data)
        self.offset += len(data)
        self.bytes += len(data)
        if self.offset < total:
            return None
        if part == 0:
            state = self.state
            try:
                meta, start = state._read_meta(self.seq, name)
                if meta_digest(meta) != self.digest:
                    raise StateError("record does not match the checkpoint digest")
            except (StateError, ValueError, TypeError):
                state.flash.delete(name)
                self.offset = 0
                return "bad record"
            self.target = RecordTags(state, name, start)
            self.own = RecordTags(state, _record_name(state.h), state._read_meta(state.h)[1])
        else:
            self._stage(part)
        self._advance()
        return None

    def _stage(self, part):
        self.staged[part >> 3] |= 1 << (part & 7)

    def _advance(self):
        """Move to the next page that differs from ours (empty ones are staged here)."""
        state = self.state
        self.offset = 0
        self.part += 1
        while self.part < state.parts():
            store, i = state._store_page(self.part)
            s = 0 if store is state.ledger else 1
            assert self.target is not None and self.own is not None  # part 0 is in
            tag, own = self.target.at(s, i), self.own.at(s, i)
            if self.full:
                return
            if tag == 0:
                if own != 0:
                    state.flash.write(state.stage_name(self.part), b"")
                    self._stage(self.part)
            elif tag != own:
                return
            self.part += 1
