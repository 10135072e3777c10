# State transfer, receiving side: the Fetch that stages a checkpoint's parts on flash, the
# record tags it goes by, its check() of the staged state, and install(), which switches to it.
# Loaded only when a replica first fetches a state (transfer.py): a node that loads its
# modules into its heap (a board without ROMFS) boots in less.
#
# Rules: see state.py's header (state transfer of checkpoint c, the staging area, what the
# check reads) and transfer.py's (one transfer at a time, resumed, fetched whole after a
# failed check).
from . import cbor
from .pagestore import PAGE_BYTES_MAX, PageError, marked, page_tag, set_tag, sum_bytes
from .state import (_FLASH_RESERVE_BYTES, _META_BYTES_MAX, _TAG_WINDOW, StateError,
                    _record_name, _store_digest, meta_digest)

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import bytearray, len, range, str


def _rollback(state, meta, start):
    """Forget everything executed after the stable checkpoint, whose record's meta and
    where its tags start the caller has read."""
    name = _record_name(state.h)
    for s in range(2):
        store = state.stores[s]
        store.discard(state.h, *_store_digest(meta, s))
        state.load_tags(name, start, s, store.tags)
    for c in [c for c in state.records if c > state.h]:
        state.flash.delete(_record_name(c))
        state.records.remove(c)


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
        o = self.state.tags_at(s, 0) + 2 * i
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
                meta, start = state.read_meta(self.seq, name)
                if meta_digest(meta) != self.digest:
                    raise StateError("record does not match the checkpoint digest")
            except (StateError, ValueError, TypeError):
                state.flash.delete(name)
                self.offset = 0
                return "bad record"
            self.target = RecordTags(state, name, start)
            self.own = RecordTags(state, _record_name(state.h), state.read_meta(state.h)[1])
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
        if self.full:
            return  # every page, whatever the tags say
        while self.part < state.parts():
            store, i = state._store_page(self.part)
            s = 0 if store is state.ledger else 1
            assert self.target is not None and self.own is not None  # part 0 is in
            tag, own = self.target.at(s, i), self.own.at(s, i)
            if tag == 0:
                if own != 0:
                    state.flash.write(state.stage_name(self.part), b"")
                    self._stage(self.part)
            elif tag != own:
                return
            self.part += 1

    def check(self):
        """The record's meta, if the pages this Fetch staged (complete), else ours as of h,
        match it (take() checked the record against the digest); StateError (the stage
        cleared) when they do not. Reads only, so a MemoryError (a heap too fragmented for a
        page) leaves the stage and our state as they were: the caller checks again later.
        The check reads only the staged pages and ours they replace: our digest as of h,
        less what those held, plus what the staged ones hold (open() verified ours)."""
        state = self.state
        try:
            meta = state.read_meta(self.seq, state.stage_name(0))[0]
            own_meta = state.read_meta(state.h)[0]
            for s in range(2):
                store = state.stores[s]
                base = 1 + s * state.ledger.pages
                total, count = _store_digest(own_meta, s)
                for i in range(store.pages):
                    if not marked(self.staged, base + i):
                        continue
                    old = store.page_sum(i, state.flash.read(store.file_at(i, state.h)))
                    new = store.page_sum(i, state.flash.read(state.stage_name(base + i)))
                    total += new[0] - old[0]
                    count += new[1] - old[1]
                if sum_bytes(total) != meta[2 + 2 * s] or count != meta[3 + 2 * s]:
                    raise StateError("pages do not match the record")
        except (PageError, StateError, ValueError, TypeError) as e:
            state.clear_stage()
            raise StateError(str(e))
        return meta

    def install(self, meta):
        """Switch to the checkpoint this Fetch staged, whose record's ``meta`` check()
        returned. A power cut or MemoryError from here on leaves a commit record that the
        restore goes by: our state as of h, or the new one whole."""
        state = self.state
        seq = self.seq
        own_meta, own_start = state.read_meta(state.h)
        # Our tags as of h, then the staged pages' own (the record's tags are not trusted).
        _rollback(state, own_meta, own_start)
        own_meta = None
        state._commit(state.h, (seq,))  # a power cut from here on deletes version seq
        for part in range(1, state.parts()):
            if marked(self.staged, part):
                store, i = state._store_page(part)
                name = state.stage_name(part)
                set_tag(store.tags, i, page_tag(state.flash.read(name)))
                state.flash.rename(name, store.name(i, seq))
                store.mark(i, seq)
        state.flash.write(_record_name(seq), (cbor.encode(meta), state.ledger.tags,
                                             state.clients.tags))
        state.flash.delete(state.stage_name(0))
        state.records.append(seq)
        state.stable(seq)
        for s in range(2):
            state.stores[s].reset(*_store_digest(meta, s))
