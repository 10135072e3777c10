# The primary's overflow of client requests, kept on flash: a FIFO of request wires.
#
# Rules:
# - In RAM a primary queues at most _PENDING_MAX requests for a batch (replica.py). The rest
#   wait here, in arrival order, and the primary takes them back as its queue drains; while
#   any wait here, a new request goes behind them (never ahead). Dropped, a request came
#   again only when its client sent it again, 0.5 s or more later: at 64 closed-loop clients
#   13% of requests needed a second send, and some timed out after a third.
# - The file NAME holds records: a 2-byte big-endian length, then a wire of at most
#   ``wire_bytes_max`` bytes. push() appends one; pop() reads the oldest. The file is deleted
#   when it has been read to the end, and when the queue is cleared (a view change) or built
#   (a restart: it is not state, and a power cut may have torn its last record).
# - At most RECORDS_MAX records are held; then push() refuses, and the request is dropped as
#   before (the flash a queue takes is bounded: RECORDS_MAX * (2 + wire_bytes_max) bytes,
#   66 KB for requests of 256 bytes).
# - Copies stay out. A client sends its request again while it waits here, and those copies,
#   spilled too, filled the queue: 256 application clients writing (about the cluster's
#   capacity) got ~2,000 fresh requests dropped a 20 s run and 2.6-6% timed out. A deeper
#   queue took them (512 records: none) but lost past capacity, holding more requests whose
#   clients had given up (1,024 closed-loop clients: 115-156 req/s with 512 records, 88 with
#   1,024, against 228-255 with 256), and so did dropping records older than 1-2 s. So each
#   record has a key (the caller's, a nonzero 32-bit int naming the request), and holds(key)
#   tells whether a record with it is held, from a ring of the held records' keys in RAM
#   (4 bytes a record, searched in C): with it, 256 application clients got 5,823 requests
#   committed and none timed out, and 1,024 bench clients 256 req/s. Two requests whose keys
#   collide in the queue at once (about RECORDS_MAX in 2^32) cost the later one a
#   retransmission.
# - An append the flash fails (full) drops the request and clears the queue: a record torn
#   at the end would end it at the next pop anyway.
# - A wire was decoded and authenticated before it was pushed; the caller checks what pop()
#   returns again all the same (replica._refill_pending). A record whose length is out of bounds or that is
#   cut short (a flash that lost data, an append that failed) ends the queue.
# - RAM: four ints and the keys (4 * RECORDS_MAX bytes).
NAME = "Q"
RECORDS_MAX = 256
_FREE = bytes(4)


class Spill:
    """A FIFO of byte strings (1 to ``wire_bytes_max`` bytes) in one file on ``flash``."""

    def __init__(self, flash, wire_bytes_max):
        assert 0 < wire_bytes_max < 1 << 16
        self.flash = flash
        self.wire_bytes_max = wire_bytes_max
        self.offset = 0  # where the oldest record held starts
        self.end = 0     # bytes appended since the file was last deleted
        self.held = 0    # records pushed and not popped
        self.first = 0   # the oldest record's slot in keys
        self.keys = bytearray(4 * RECORDS_MAX)  # slot (first + k) % RECORDS_MAX: record k's
        flash.delete(NAME)

    def __len__(self):
        return self.held

    def holds(self, key):
        """Is a record of ``key`` held?"""
        return key.to_bytes(4, "big") in self.keys

    def push(self, wire, key):
        """Append ``wire`` under ``key`` (nonzero, < 2^32); False (and nothing written) when
        RECORDS_MAX are held."""
        assert 0 < key < 1 << 32
        n = len(wire)
        assert 0 < n <= self.wire_bytes_max
        if self.held >= RECORDS_MAX:
            return False
        self.end += 2 + n  # first: clear() deletes what a failed append left
        try:
            self.flash.append(NAME, bytes((n >> 8, n & 0xFF)) + wire)
        except OSError:
            self.clear()
            return False
        slot = 4 * ((self.first + self.held) % RECORDS_MAX)
        self.keys[slot:slot + 4] = key.to_bytes(4, "big")
        self.held += 1
        return True

    def pop(self):
        """The oldest wire held, or None when none is (or the file lost it)."""
        if not self.held:
            return None
        record = self.flash.read_at(NAME, self.offset, 2 + self.wire_bytes_max) or b""
        n = record[0] << 8 | record[1] if len(record) >= 2 else 0
        if not 0 < n <= self.wire_bytes_max or len(record) < 2 + n:
            self.clear()
            return None
        wire = record[2:2 + n]  # length and wire in one read
        self.offset += 2 + n
        self._free_first()
        self.held -= 1
        if not self.held:
            self.clear()
        return wire

    def clear(self):
        """Forget every record and delete the file."""
        if self.end:
            self.flash.delete(NAME)
        while self.held:
            self._free_first()
            self.held -= 1
        self.offset = 0
        self.end = 0
        self.first = 0

    def _free_first(self):
        slot = 4 * self.first
        self.keys[slot:slot + 4] = _FREE
        self.first = (self.first + 1) % RECORDS_MAX
