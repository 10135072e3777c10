# The primary's overflow of client requests, kept on flash: a FIFO of request wires.
#
# Rules:
# - In RAM a primary queues at most _PENDING_MAX requests for a batch (replica.py). The rest
#   wait here, in arrival order, and the primary takes them back as its queue drains; while
#   any wait here, a new request goes behind them (never ahead). Dropped, a request came
#   again only when its client sent it again, 0.5 s or more later: at 64 closed-loop clients
#   13% of requests needed a second send, and some timed out after a third.
# - The file NAME holds records: a 2-byte big-endian length, the wire's CRC-32 (4 bytes,
#   big-endian), then the wire, of at most ``wire_bytes_max`` bytes. push() appends one;
#   pop() reads the oldest. The file is deleted when it has been read to the end, and when
#   the queue is cleared (a view change) or built (a restart: it is not state, and a power
#   cut may have torn its last record).
# - At most RECORDS_MAX records are held; then push() refuses, and the request is dropped as
#   before (the flash a queue takes is bounded: RECORDS_MAX * (6 + wire_bytes_max) bytes,
#   67 KB for requests of 256 bytes). A client's copies (retransmissions while its request
#   waits) are records too, skipped when popped (replica._refill_pending). The bound trades
#   capacity for overload (20 s runs over 10,000 keys): 256 application clients that all
#   write fill 256 records with copies and 2.6-6% of their requests time out (none at 512
#   records), but past capacity a deeper queue holds more requests whose clients gave up, and
#   they are ordered all the same (1,024 closed-loop clients: 228-255 req/s at 256 records,
#   115-156 at 512, 88 at 1,024). Keeping copies out of the queue gave both, but lost more
#   requests at a broker restart, for a cause not found (commits dc6441b and 92d7092).
# - An append the flash fails (full) drops the request and clears the queue: a record torn
#   at the end would end it at the next pop anyway.
# - A wire was decoded and authenticated before it was pushed, and pop() returns it only when
#   its CRC still matches, so the caller does not check its MAC again (replica._refill_pending:
#   a second check cost the primary a client Mac derived and an HMAC for most requests at 64
#   clients). A record whose length is out of bounds, that is cut short or whose CRC does not
#   match (a flash that lost or changed data, an append that failed) ends the queue.
# - RAM: three ints.

from binascii import crc32

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import bytes, int, len

NAME = "Q"
RECORDS_MAX = 256
_HEAD_BYTES = 6  # length, CRC-32


class Spill:
    """A FIFO of byte strings (1 to ``wire_bytes_max`` bytes) in one file on ``flash``."""

    def __init__(self, flash, wire_bytes_max):
        assert 0 < wire_bytes_max < 1 << 16
        self.flash = flash
        self.wire_bytes_max = wire_bytes_max
        self.offset = 0  # where the oldest record held starts
        self.end = 0     # bytes appended since the file was last deleted
        self.held = 0    # records pushed and not popped
        flash.delete(NAME)

    def __len__(self):
        return self.held

    def push(self, wire):
        """Append ``wire``; False (and nothing written) when RECORDS_MAX are held."""
        n = len(wire)
        assert 0 < n <= self.wire_bytes_max
        if self.held >= RECORDS_MAX:
            return False
        self.end += _HEAD_BYTES + n  # first: clear() deletes what a failed append left
        c = crc32(wire)
        try:
            self.flash.append(NAME, bytes((n >> 8, n & 0xFF, c >> 24, c >> 16 & 0xFF,
                                           c >> 8 & 0xFF, c & 0xFF)) + wire)
        except OSError:
            self.clear()
            return False
        self.held += 1
        return True

    def pop(self):
        """The oldest wire held, or None when none is (or the file lost or changed it)."""
        if not self.held:
            return None
        record = self.flash.read_at(NAME, self.offset, _HEAD_BYTES + self.wire_bytes_max) or b""
        n = record[0] << 8 | record[1] if len(record) >= _HEAD_BYTES else 0
        if not 0 < n <= self.wire_bytes_max or len(record) < _HEAD_BYTES + n:
            self.clear()
            return None
        wire = record[_HEAD_BYTES:_HEAD_BYTES + n]  # head and wire in one read
        if crc32(wire) != int.from_bytes(record[2:_HEAD_BYTES], "big"):
            self.clear()
            return None
        self.offset += _HEAD_BYTES + n
        self.held -= 1
        if not self.held:
            self.clear()
        return wire

    def clear(self):
        """Forget every record and delete the file."""
        if self.end:
            self.flash.delete(NAME)
        self.offset = 0
        self.end = 0
        self.held = 0
