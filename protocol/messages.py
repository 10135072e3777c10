# EdgeBFT wire messages: encode, decode and validate (protocol/SPEC.md is the normative text).
#
# Rules:
# - A message on the wire is ONE deterministic-CBOR array, the body, followed by its
#   authenticator: the raw bytes of one TAG_BYTES tag per receiver (a broadcast), or one tag
#   (a reply, to its client). The tags cover the body bytes exactly as received.
# - Every body starts [VERSION, type, sender, ...]; the remaining fields are fixed per type.
# - decode() checks shape and field types and raises MessageError (never anything else) for
#   any input. It does not check MACs: that needs keys and is the replica's job.
from . import auth, cbor

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import bytes, int, len, list, memoryview, range, setattr, str, type

try:
    from micropython import const
except ImportError:  # CPython
    const = int  # CPython: const(x) is x

TYPE_CHECKING = False  # True only to a type checker (tools/typecheck.sh)

VERSION = 1

REQUEST = 1      # [v, 1, client, timestamp, op]                      auth: one tag per replica
PRE_PREPARE = 2  # [v, 2, replica, view, seq, digest, batch]          batch: [request wire...]
PREPARE = 3      # [v, 3, replica, view, seq, digest]
COMMIT = 4       # [v, 4, replica, view, seq, digest]
REPLY = 5        # [v, 5, replica, view, client, timestamp, result]  auth: one tag (the client's)
CHECKPOINT = 6   # [v, 6, replica, seq, digest]
VIEW_CHANGE = 7  # [v, 7, replica, view, h, C, P, Q]                 see viewchange.py
VC_ACK = 8       # [v, 8, replica, view, owner, vc digest]          VIEW-CHANGE-ACK
NEW_VIEW = 9     # [v, 9, replica, view, [[sender, vc digest]...], min, [digest...]]
STATUS = 10      # [v, 10, replica, view, limbo, h, last executed, [seq missing a batch...]]
BATCH = 11       # [v, 11, replica, seq, digest, batch]             a batch body, by digest
FETCH = 12       # [v, 12, replica, seq, digest, part, offset]        state transfer request
CHUNK = 13       # [v, 13, replica, seq, digest, part, offset, total, data]  its reply
CONTROL = 14     # [v, 14, HOST, nonce, command, args]  auth: one tag (the node's control key)
HEARTBEAT = 15   # [v, 15, replica, boot, conn, seq, status map]     on its status topic
OFFLINE = 16     # [v, 16, replica, boot, conn]                      its Last Will

HOST = 0xFFFF    # the sender id of the host's control commands

DIGEST_BYTES = 32
MESSAGE_BYTES_MAX = 2048  # an MQTT payload the device buffers whole; bounds a batch too
_ID_MAX = const(0xFFFF)
_U64_MAX = 0xFFFFFFFFFFFFFFFF

# Field kinds for validation.
_U = const(0)    # unsigned int < 2**64
_D = const(1)    # digest: bytes of DIGEST_BYTES
_ANY = const(2)  # any CBOR value (op, result)
_B = const(3)    # batch: list of bytes
_L = const(4)    # list (its items are checked by the consumer)
_BYTES = const(5)
_BOOL = const(6)
_STR = const(7)

_FIELDS = {  # kind -> its fields after the sender, flat: name, field kind, name, field kind ...
    REQUEST: ("timestamp", _U, "op", _ANY),
    PRE_PREPARE: ("view", _U, "seq", _U, "digest", _D, "batch", _B),
    PREPARE: ("view", _U, "seq", _U, "digest", _D),
    COMMIT: ("view", _U, "seq", _U, "digest", _D),
    REPLY: ("view", _U, "client", _U, "timestamp", _U, "result", _ANY),
    CHECKPOINT: ("seq", _U, "digest", _D),
    VIEW_CHANGE: ("view", _U, "h", _U, "c", _L, "p", _L, "q", _L),
    VC_ACK: ("view", _U, "owner", _U, "digest", _D),
    NEW_VIEW: ("view", _U, "vcs", _L, "low", _U, "chosen", _L),
    STATUS: ("view", _U, "limbo", _BOOL, "h", _U, "last_exec", _U, "missing", _L),
    BATCH: ("seq", _U, "digest", _D, "batch", _B),
    FETCH: ("seq", _U, "digest", _D, "part", _U, "offset", _U),
    CHUNK: ("seq", _U, "digest", _D, "part", _U, "offset", _U, "total", _U, "data", _BYTES),
    CONTROL: ("nonce", _U, "command", _STR, "args", _L),
    HEARTBEAT: ("boot", _U, "conn", _U, "seq", _U, "status", _ANY),
    OFFLINE: ("boot", _U, "conn", _U),
}


class MessageError(ValueError):
    """Malformed, truncated, oversized or unknown input from the network."""


class Message:
    """A decoded message. ``kind`` and ``sender`` always; the type's fields as attributes.

    ``wire`` is the whole message as received (bytes); ``body`` is a memoryview of its body
    bytes, which the authenticator covers, and ``auth`` one of the trailing tag bytes: no
    copy of either is made (copying a PRE-PREPARE's body took ~700 bytes in one piece per
    message, which a fragmented heap may lack). A decoded stamp has no wire.
    Treat instances as immutable, except that a handler may set a field it has consumed to
    None, to free the heap early.
    """

    def __init__(self, kind, sender, wire, end):
        self.kind = kind
        self.sender = sender
        self.wire = wire
        if wire is None:
            self.body = self.auth = None
        else:
            view = memoryview(wire)
            self.body = view[:end]
            self.auth = view[end:]

    if TYPE_CHECKING:  # the fields decode() sets, by type: any name, to a type checker
        def __getattr__(self, name):
            return self.__dict__[name]



def _check(kind_of_field, value):
    if kind_of_field == _U:
        return type(value) is int and 0 <= value <= _U64_MAX
    if kind_of_field == _D:
        return type(value) is bytes and len(value) == DIGEST_BYTES
    if kind_of_field == _B:
        if type(value) is not list:
            return False
        for item in value:
            if type(item) is not bytes:
                return False
        return True
    if kind_of_field == _L:
        return type(value) is list
    if kind_of_field == _BYTES:
        return type(value) is bytes
    if kind_of_field == _BOOL:
        return value is True or value is False
    if kind_of_field == _STR:
        return type(value) is str
    return True


def decode(wire):
    """Parse ``wire`` into a Message; raise MessageError when it is not a valid message."""
    msg, fields = _framed(wire)
    spec = _FIELDS[msg.kind]
    k = len(spec)
    i = len(fields)
    while k:  # from the last field, by index: a for loop's iterator would not fit the frame
        k -= 2
        i -= 1
        if not _check(spec[k + 1], fields[i]):
            raise MessageError("type %d: bad field %s" % (msg.kind, spec[k]))
        setattr(msg, spec[k], fields[i])
    return msg


def _framed(wire):
    """(a Message of ``wire``'s kind, sender, body and tags; the fields of its body), its
    version, kind, sender and field count checked (not the fields themselves). Runs per
    message: its frame stays within 11 slots (cbor.py's header), the rarer work in helpers."""
    if len(wire) > MESSAGE_BYTES_MAX:
        raise MessageError("oversized message: %d bytes" % len(wire))
    if type(wire) is not bytes:
        wire = bytes(wire)
    fields, end = _body_of(wire)
    if type(fields) is not list or len(fields) < 3:
        raise MessageError("not a message array")
    if fields[0] != VERSION:
        raise MessageError("unknown version %r" % (fields[0],))
    kind = fields[1]
    spec = _FIELDS.get(kind) if type(kind) is int else None
    if spec is None:
        raise MessageError("unknown message type %r" % (kind,))
    if type(fields[2]) is not int or not 0 <= fields[2] <= _ID_MAX:
        raise MessageError("bad sender %r" % (fields[2],))
    if len(fields) != 3 + len(spec) // 2:
        raise _field_count_error(kind, fields, spec)
    return Message(kind, fields[2], wire, end), fields


def _body_of(wire):
    """(the CBOR item ``wire`` starts with, the offset past it); MessageError if none. (Not
    ``except ... as e``: naming the exception takes a second handler's slots, and the frame
    of this per-message call to the heap.)"""
    try:
        return cbor.decode_prefix(wire, 0)
    except cbor.DecodeError:
        raise MessageError("bad CBOR")


def _field_count_error(kind, fields, spec):
    return MessageError("type %d: %d fields, want %d" % (kind, len(fields), 3 + len(spec) // 2))


def request_fields(wire):
    """[version, REQUEST, client, timestamp, op] of a request ``wire`` that decode() already
    accepted (a batch's, checked when its pre-prepare was): no Message is made. A Message's
    attributes go into a table that grows by steps as they are set, ~600 bytes per decode,
    most of it left as garbage at once; this is decoded once per request per replica."""
    fields = cbor.decode_prefix(wire, 0)[0]
    assert type(fields) is list
    return fields


def decode_stamp(body):
    """The HEARTBEAT or OFFLINE whose body is ``body`` (bytes or a memoryview), decoded up to
    its stamp: a Message with kind, sender, boot, conn and, for a HEARTBEAT, seq (wire, body
    and auth None). A heartbeat's status map, which its peers do not need, is not decoded (nor
    checked: the host's decode() does that). Raise MessageError for anything else."""
    try:
        fields, length = cbor.decode_uints(body, 6)  # [v, kind, sender, boot, conn, seq]
    except cbor.DecodeError as e:
        raise MessageError("bad CBOR: %s" % e)
    if length < 5 or fields[0] != VERSION or not (fields[1] == HEARTBEAT and length == 7
                                                   or fields[1] == OFFLINE and length == 5):
        raise MessageError("not a HEARTBEAT or OFFLINE")
    msg = Message(fields[1], fields[2], None, 0)
    spec = _FIELDS[fields[1]]
    for k in range(3, len(fields)):  # boot, conn, seq: the stamp
        setattr(msg, spec[2 * (k - 3)], fields[k])
    return msg


def body(kind, sender, *fields):
    """Encode the body of a message of ``kind`` (its fields in the order of _FIELDS)."""
    assert len(fields) == len(_FIELDS[kind]) // 2
    return cbor.encode((VERSION, kind, sender) + fields)  # tuples: two allocations, not five


def wire(macs, kind, sender, *fields):
    """The wire of a message of ``kind`` from ``sender`` to every holder of ``macs``: its
    body followed by auth.authenticator(macs, body). The body is encoded and the tags are
    appended in cbor's scratch, so the one allocation the size of the message is the wire
    itself (a board's heap often has 20-30 KB free, none of it in one 2 KB piece)."""
    assert len(fields) == len(_FIELDS[kind]) // 2
    buf = cbor.encode_transient((VERSION, kind, sender) + fields)
    buf += auth.authenticator(macs, buf)
    return bytes(buf)
