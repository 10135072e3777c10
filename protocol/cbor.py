# Deterministic CBOR (RFC 8949 section 4.2.1), the wire encoding of every EdgeBFT message.
#
# Rules:
# - Exactly these types: int in [-2**64, 2**64 - 1], bytes (encode also takes bytearray and a
#   memoryview of bytes), str, list (encode also takes tuple; decode always gives list), dict
#   with int/str/bytes keys, True, False, None. No floats, tags, undefined or other simple values.
# - Encoding is deterministic: shortest heads, definite lengths, map keys sorted by the bytewise
#   order of their encodings (4.2.1, not the length-first order of 4.2.3 that cbor2's
#   canonical=True uses: the two differ only for maps whose keys encode to different lengths
#   with the shorter one sorting later bytewise, e.g. {"a": 1, 256: 2}).
# - Decoding accepts only what encode produces, so decode(data) succeeds exactly when
#   encode(decode(data)) == data. Peer bytes are untrusted: every malformed input raises
#   DecodeError and nothing else, lengths are checked against the buffer before anything is
#   allocated, and nesting is bounded by _DEPTH_MAX (recursion depth is bounded too).
# - Portable: runs unchanged on MicroPython and CPython; imports only struct.
#   MicroPython's str() accepts overlong forms, surrogates and code points above U+10FFFF, so
#   non-ASCII text is checked here (RFC 3629 section 4).
# - Heads are appended byte by byte to one bytearray; decoding indexes into the input bytes.
# - Memory (MicroPython): encode() appends into one module-level bytearray that keeps the
#   capacity of the largest encoding so far, then copies out exactly the bytes encoded. A
#   fresh bytearray grew by reallocation, each step a block that may move and leave a hole:
#   on a nearly full heap those holes made a 1 KB page encoding fail with 30 KB free. A page
#   bound for flash is written from the scratch itself (encode_transient). Not on CPython,
#   where host threads may encode at once.
# - Frames (MicroPython): a call whose locals and stack need more than 11 slots (88 bytes on
#   a 64-bit port, 44 on an ESP32) takes its frame from the heap, and that block counts
#   towards the collector's threshold though it is freed on return. The functions called
#   per item (_item, _array, skip, _enc) stay within 11 (tests/test_hot_paths.py): at 16
#   clients they ran ~180 times per request per replica, ~30 KB of frames, more than
#   everything the replica allocates and keeps. Hence loops by index, not by for (an
#   iterator takes four slots), and the rare cases in helpers of their own.
# - Globals (MicroPython): a name is looked up in the module's globals first, and a name that
#   is not there probes that table up to an empty slot, which in a nearly full table may be
#   most of it; only then come the builtins. So every module a node runs binds the builtins
#   it uses as globals (from builtins import ...; tests/test_hot_paths.py checks it): decoding
#   a PRE-PREPARE took 36% less time, and a node's CPU per commit fell ~9% at 64 clients
#   (bench, the collection policy unchanged).

import struct

# Bound as globals, not found as builtins (Globals, above).
from builtins import (bytearray, bytes, dict, getattr, int, len, list, memoryview, min, range, str,
                      tuple, type)

try:
    from micropython import const
    SHARED_SCRATCH = True  # one thread: a module may reuse one buffer (here and pagestore.py)
except ImportError:
    const = int  # CPython: const(x) is x
    SHARED_SCRATCH = False

# Containers nested in one item. Our messages nest 3 deep (message, batch, request); 16 leaves
# room for the ledger's values and keeps recursion far from MicroPython's stack limit.
_DEPTH_MAX = const(16)
_UINT_END = 1 << 64  # ints must lie in [-_UINT_END, _UINT_END)

# Empty at import (a board that loads our modules into its heap has no 2 KB to spare then);
# it grows once, to the largest encoding, and stays that size.
_scratch = bytearray() if SHARED_SCRATCH else None
_at = [0] if SHARED_SCRATCH else None  # decode_item's offset cell

_MT_UINT = const(0x00)
_MT_NINT = const(0x20)
_MT_BYTES = const(0x40)
_MT_TEXT = const(0x60)
_MT_ARRAY = const(0x80)
_MT_MAP = const(0xA0)
_FALSE = const(0xF4)
_TRUE = const(0xF5)
_NULL = const(0xF6)


class EncodeError(ValueError):
    """The value holds an unsupported type, an int out of range or nests too deep."""


class DecodeError(ValueError):
    """The bytes are not exactly one deterministic CBOR item of the supported types."""


def encode(obj):
    """Encode ``obj`` as deterministic CBOR.

    Args:
        obj: a value of the supported types (module header), nested at most _DEPTH_MAX deep.
    Returns:
        bytes; decode() of them gives ``obj`` back (tuples and bytearrays come back as list
        and bytes).
    Raises:
        EncodeError: unsupported type, int out of range, dict key not int/str/bytes, too deep.
    """
    return bytes(encode_transient(obj))


def encode_transient(obj):
    """encode(obj) as a bytearray for a caller that uses it at once and keeps nothing of it
    (a page written to flash): on MicroPython the module's scratch itself, which the next
    encode overwrites, so no copy is allocated."""
    buf = _scratch
    if buf is None:
        buf = bytearray()
    else:
        buf[:] = b""  # empty, its capacity kept
    _enc(buf, obj, 0)
    return buf


def _head(buf, mt, n):
    # The shortest head for major type ``mt`` (already shifted) and argument 0 <= n < 2**64.
    if n < 24:
        buf.append(mt | n)
    elif n < 0x100:
        buf.append(mt | 24)
        buf.append(n)
    elif n < 0x10000:
        buf.append(mt | 25)
        buf.append(n >> 8)
        buf.append(n & 0xFF)
    elif n < 0x100000000:
        buf += struct.pack(">BI", mt | 26, n)
    else:
        buf += struct.pack(">BQ", mt | 27, n)


def _key0(pair):
    return pair[0]


def _enc(buf, obj, depth):
    t = type(obj)
    if t is int:
        if 0 <= obj < 24:
            buf.append(obj)  # a small uint, the commonest item: its head alone, no call
        elif obj >= 0:
            if obj >= _UINT_END:
                raise EncodeError("int above 2**64 - 1")
            _head(buf, _MT_UINT, obj)
        else:
            if obj < -_UINT_END:
                raise EncodeError("int below -2**64")
            _head(buf, _MT_NINT, -1 - obj)
    elif t is bytes or t is bytearray:
        _head(buf, _MT_BYTES, len(obj))
        buf += obj
    elif t is memoryview:
        if getattr(obj, "itemsize", 1) != 1:  # CPython: len() counts items, not bytes
            raise EncodeError("memoryview of items wider than a byte")
        _head(buf, _MT_BYTES, len(obj))
        buf += obj
    elif t is str:
        obj = _utf8(obj)
        _head(buf, _MT_TEXT, len(obj))
        buf += obj
    elif t is list or t is tuple:
        if depth >= _DEPTH_MAX:
            raise EncodeError("nested deeper than _DEPTH_MAX")
        _head(buf, _MT_ARRAY, len(obj))
        depth += 1
        i = 0
        while i < len(obj):
            _enc(buf, obj[i], depth)
            i += 1
    elif t is dict:
        if depth >= _DEPTH_MAX:
            raise EncodeError("nested deeper than _DEPTH_MAX")
        _enc_map(buf, obj, depth)
    elif obj is True:
        buf.append(_TRUE)
    elif obj is False:
        buf.append(_FALSE)
    elif obj is None:
        buf.append(_NULL)
    else:
        raise EncodeError("unsupported type " + t.__name__)


def _utf8(s):
    try:
        return s.encode()
    except UnicodeError:  # CPython: lone surrogates
        raise EncodeError("str not encodable as UTF-8") from None


def _enc_map(buf, obj, depth):
    pairs = []
    for k, v in obj.items():
        tk = type(k)
        if tk is not int and tk is not str and tk is not bytes:
            raise EncodeError("dict key not int, str or bytes")
        kb = bytearray()
        _enc(kb, k, depth + 1)
        pairs.append((bytes(kb), v))
    # Distinct keys of these types have distinct encodings: the order is strict.
    pairs.sort(key=_key0)
    _head(buf, _MT_MAP, len(pairs))
    for kb, v in pairs:
        buf += kb
        _enc(buf, v, depth + 1)


def decode(data):
    """Decode ``data``, which must hold exactly one item.

    Args:
        data: bytes, bytearray or memoryview (the latter two are copied once).
    Returns:
        the value; byte strings come back as bytes, arrays as list.
    Raises:
        DecodeError: malformed, non-deterministic, unsupported or trailing bytes.
    """
    if type(data) is not bytes:
        data = bytes(data)
    at = [0]
    obj = _item(data, at, 0)
    if at[0] != len(data):
        raise DecodeError("trailing bytes")
    return obj


def decode_prefix(data, offset=0):
    """Decode the one item starting at ``offset``; bytes after it are left alone.

    Used for a CBOR message followed by a trailing authenticator.

    Returns:
        (value, end): ``end`` is the offset just past the item.
    Raises:
        DecodeError: as decode() (but trailing bytes are fine), or offset outside ``data``.
    """
    if type(data) is not bytes:
        data = bytes(data)
    if offset < 0 or offset > len(data):
        raise DecodeError("offset outside the buffer")
    at = [offset]
    obj = _item(data, at, 0)
    return obj, at[0]


def decode_item(data, offset):
    """decode_prefix(data, offset)[0], for ``data`` of type bytes or bytearray (byte
    strings come back as bytes), allocating nothing but the item itself on MicroPython (its
    offset cell is the module's: one thread). A page's key and value lookups run this
    several times per request."""
    if type(data) is not bytes and type(data) is not bytearray:
        raise DecodeError("not bytes")
    if offset < 0 or offset > len(data):
        raise DecodeError("offset outside the buffer")
    at = _at if _at is not None else [0]
    at[0] = offset
    return _item(data, at, 0)


def decode_uints(data, count):
    """Decode the first ``count`` items of the array that ``data`` starts with, which must be
    unsigned ints, and nothing after them: the fields a reader needs ahead of a large last
    one it does not.

    Args:
        data: bytes or a memoryview (not copied); must start with an array of fewer than 24
            items (a one-byte head).
    Returns:
        (ints, length): the first min(count, length) items, and the array's length.
    Raises:
        DecodeError: no such array, an item not an unsigned int, or one decode() rejects.
    """
    if not data or data[0] >> 5 != 4 or data[0] & 31 >= 24:
        raise DecodeError("not a short array")
    length = data[0] & 31
    ints = []
    at = [1]
    count = min(count, length)
    while count:  # no range(): its counters would take the frame over 11 slots (above)
        count -= 1
        if at[0] >= len(data) or data[at[0]] >> 5:
            raise DecodeError("not an unsigned int")
        ints.append(_item(data, at, 1))
    return ints, length


def skip(b, at):
    """The offset just past the item that starts at b[at], reading only heads: nothing is
    allocated for the item's contents. For bytes decode() accepted once (a page read from
    our own flash): nothing is checked beyond the heads, and bytes that are not CBOR raise
    DecodeError or IndexError."""
    mt = b[at] >> 5
    n = b[at] & 31
    at += 1
    if n >= 24:
        if n == 24:
            n = b[at]
            at += 1
        elif n == 25:
            n = (b[at] << 8) | b[at + 1]
            at += 2
        elif n == 26:
            n = struct.unpack_from(">I", b, at)[0]
            at += 4
        elif n == 27:
            n = struct.unpack_from(">Q", b, at)[0]
            at += 8
        else:
            raise DecodeError("indefinite length or reserved head")
    if mt == 2 or mt == 3:
        return at + n
    if mt == 4 or mt == 5:
        if mt == 5:
            n *= 2
        while n:
            at = skip(b, at)
            n -= 1
    elif mt == 6:
        raise DecodeError("tag")
    return at


def array_head(n):
    """The head of an array of ``n`` items, as bytes (the first 1 to 9 bytes of its
    encoding)."""
    buf = bytearray()
    _head(buf, _MT_ARRAY, n)
    return bytes(buf)


def _item(b, at, depth):
    # Contract: decode the item at b[at[0]:] (b is bytes; a memoryview for decode_uints),
    # return it and leave at[0] just past it, or raise DecodeError. Every length is checked
    # against len(b) before it is used. The offset lives in the one-cell list ``at``, not
    # in a returned (value, offset) pair: on MicroPython that pair was a tuple allocated per
    # item, a third of what decoding a page of 40 entries allocated.
    i = at[0]
    if i >= len(b):
        raise DecodeError("truncated")
    ib = b[i]
    if ib < 24:  # fast path: small uint, the commonest item in our messages
        at[0] = i + 1
        return ib
    if ib >> 5 == 7:
        at[0] = i + 1
        if ib == _FALSE:
            return False
        if ib == _TRUE:
            return True
        if ib == _NULL:
            return None
        raise DecodeError("float, break or simple value other than false/true/null")
    n = ib & 31
    if n < 24:
        i += 1
    else:
        n = _argument(b, i, n)
        i = at[0] = i + 1 + (1 << (ib & 31) - 24)
    ib >>= 5  # the major type
    if ib == 0:
        at[0] = i
        return n
    if ib == 1:
        at[0] = i
        return -1 - n
    if ib == 2 or ib == 3:
        n += i
        if n > len(b):
            raise DecodeError("string longer than the buffer")
        at[0] = n
        if ib == 3:
            return _text(b[i:n])
        return b[i:n] if type(b) is not bytearray else bytes(b[i:n])
    if ib == 6:
        raise DecodeError("tag")
    if depth >= _DEPTH_MAX:
        raise DecodeError("nested deeper than _DEPTH_MAX")
    at[0] = i
    depth += 1  # the items'
    if ib == 4:
        return _array(b, at, n, depth)
    return _map(b, at, n, depth)


def _argument(b, i, ai):
    # The argument of the long head at b[i] (additional info ai >= 24: 1, 2, 4 or 8 bytes
    # follow), checked to be in the shortest form.
    if ai > 27:
        raise DecodeError("indefinite length or reserved head")
    if i + 1 + (1 << ai - 24) > len(b):
        raise DecodeError("truncated head")
    if ai == 24:
        ai = b[i + 1]
        if ai < 24:
            raise DecodeError("non-shortest head")
    elif ai == 25:
        ai = (b[i + 1] << 8) | b[i + 2]
        if ai < 0x100:
            raise DecodeError("non-shortest head")
    elif ai == 26:
        ai = struct.unpack_from(">I", b, i + 1)[0]
        if ai < 0x10000:
            raise DecodeError("non-shortest head")
    else:
        ai = struct.unpack_from(">Q", b, i + 1)[0]
        if ai < 0x100000000:
            raise DecodeError("non-shortest head")
    return ai


def _array(b, at, n, depth):
    # n items at b[at[0]:], each at ``depth``.
    if n > len(b) - at[0]:  # every item takes at least one byte
        raise DecodeError("array longer than the buffer")
    out = [None] * n  # at its size: a list grown by append leaves its old arrays behind
    i = 0
    while i < n:
        out[i] = _item(b, at, depth)
        i += 1
    return out


def _map(b, at, n, depth):
    # A map of n pairs at b[at[0]:], its keys and values at ``depth``; keys must be
    # int/str/bytes (major types 0-3, lead byte < 0x80) and their encodings strictly
    # increasing, which also rules out duplicates.
    end = len(b)
    if 2 * n > end - at[0]:
        raise DecodeError("map longer than the buffer")
    out = {}
    prev = b""  # below every encoded key
    for _ in range(n):
        k0 = at[0]
        if k0 >= end:
            raise DecodeError("truncated")
        if b[k0] >= 0x80:
            raise DecodeError("map key not int, str or bytes")
        k = _item(b, at, depth)
        kb = b[k0:at[0]]
        if kb <= prev:
            raise DecodeError("map keys unsorted or duplicated")
        prev = kb
        out[k] = _item(b, at, depth)
    return out


def _text(raw):
    # Strict UTF-8 to str. The len() test skips the byte-by-byte check for ASCII text.
    try:
        s = str(raw, "utf-8")
    except UnicodeError:
        raise DecodeError("invalid UTF-8") from None
    if len(s) != len(raw):
        _check_utf8(raw)
    return s


def _check_utf8(s):
    # Well-formed UTF-8 byte sequences, RFC 3629 section 4 (table of lead and second bytes).
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        lo = 0x80
        hi = 0xBF
        if 0xC2 <= c <= 0xDF:
            k = 1
        elif 0xE0 <= c <= 0xEF:
            k = 2
            if c == 0xE0:
                lo = 0xA0  # overlong
            elif c == 0xED:
                hi = 0x9F  # surrogates
        elif 0xF0 <= c <= 0xF4:
            k = 3
            if c == 0xF0:
                lo = 0x90  # overlong
            elif c == 0xF4:
                hi = 0x8F  # above U+10FFFF
        else:
            raise DecodeError("invalid UTF-8")
        if i + k >= n or not lo <= s[i + 1] <= hi:
            raise DecodeError("invalid UTF-8")
        for j in range(i + 2, i + k + 1):
            if not 0x80 <= s[j] <= 0xBF:
                raise DecodeError("invalid UTF-8")
        i += k + 1
