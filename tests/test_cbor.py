"""Deterministic CBOR codec: golden vectors, cbor2 as the reference, fuzzing, MicroPython."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import run_mp
from edgebft.protocol import cbor

VECTORS = Path(str(resources.files("edgebft.protocol"))) / "vectors"
VALID = VECTORS / "cbor.txt"
INVALID = VECTORS / "cbor_invalid.txt"
CBOR2_DIFFERS = "[cbor2 length-first order differs]"


def _read(path: Path) -> list[tuple[bytes, str]]:
    out = []
    for line in path.read_text().splitlines():
        code, _, comment = line.partition("#")
        if code.strip():
            out.append((bytes.fromhex(code.strip()), comment.strip()))
    return out


VALID_VECTORS = _read(VALID)
INVALID_VECTORS = _read(INVALID)


def _ids(vectors: list[tuple[bytes, str]]) -> list[str]:
    return [comment for _, comment in vectors]


def test_vector_files_cover_enough():
    assert len(VALID_VECTORS) >= 40
    assert len(INVALID_VECTORS) >= 40
    assert len({data for data, _ in VALID_VECTORS}) == len(VALID_VECTORS)


@pytest.mark.parametrize(("data", "comment"), VALID_VECTORS, ids=_ids(VALID_VECTORS))
def test_valid_vector_round_trips(data: bytes, comment: str):
    value = cbor.decode(data)
    assert cbor.encode(value) == data
    assert cbor.decode_prefix(data + b"\xff\x00", 0) == (value, len(data))
    assert cbor2.loads(data) == value
    if CBOR2_DIFFERS in comment:
        # cbor2 sorts map keys length-first (RFC 8949 4.2.3); we sort bytewise (4.2.1).
        assert cbor2.dumps(value, canonical=True) != data
        assert sorted(cbor2.dumps(value, canonical=True)) == sorted(data)
    else:
        assert cbor2.dumps(value, canonical=True) == data


@pytest.mark.parametrize(("data", "comment"), INVALID_VECTORS, ids=_ids(INVALID_VECTORS))
def test_invalid_vector_rejected(data: bytes, comment: str):
    with pytest.raises(cbor.DecodeError):
        cbor.decode(data)


@pytest.mark.parametrize("n", [0, 23, 24, 255, 256, 65535, 65536])
def test_long_lengths_match_cbor2(n: int):
    for value in (b"\xab" * n, "s" * n, [None] * n, {i: None for i in range(n)}):
        data = cbor.encode(value)
        assert data == cbor2.dumps(value, canonical=True)
        assert cbor.decode(data) == value


def test_accepted_input_types():
    assert cbor.encode(bytearray(b"ab")) == cbor.encode(memoryview(b"ab")) == b"\x42ab"
    assert cbor.encode((1, (2,))) == cbor.encode([1, [2]])
    assert cbor.decode(bytearray(b"\x82\x01\x02")) == [1, 2]
    assert cbor.decode(memoryview(b"\x00\x41a")[1:]) == b"a"
    assert cbor.decode(b"\x80") == []


@pytest.mark.parametrize(
    "value",
    [2**64, -(2**64) - 1, 1.0, {1, 2}, object(), {(1,): 2}, {True: 1}, {None: 1}, {1.5: 1},
     "\ud800", [[1, 2.5]], memoryview(bytes(8)).cast("I")],
    ids=repr,
)
def test_encode_rejects(value: object):
    with pytest.raises(cbor.EncodeError):
        cbor.encode(value)


def _nested(depth: int, inner: object) -> object:
    for _ in range(depth):
        inner = [inner]
    return inner


def test_depth_limit_is_shared_by_encode_and_decode():
    deepest = _nested(cbor._DEPTH_MAX - 1, [])
    assert cbor.decode(cbor.encode(deepest)) == deepest
    with pytest.raises(cbor.EncodeError):
        cbor.encode([deepest])
    with pytest.raises(cbor.EncodeError):
        cbor.encode({1: deepest})
    with pytest.raises(cbor.DecodeError):
        cbor.decode(b"\x81" * cbor._DEPTH_MAX + b"\x80")
    with pytest.raises(cbor.DecodeError):  # deep nesting never reaches RecursionError
        cbor.decode(b"\x81" * 100_000)


def test_empty_and_bad_offsets_rejected():
    for data in (b"", bytearray(), memoryview(b"")):
        with pytest.raises(cbor.DecodeError):
            cbor.decode(data)
    for offset in (-1, 2, 3):
        with pytest.raises(cbor.DecodeError):
            cbor.decode_prefix(b"\x01\x02", offset)
    with pytest.raises(cbor.DecodeError):
        cbor.decode(b"\x01\x02")


# Values of the supported types, as cbor2 gives them back (bytes, list, no tuples).
_LEAVES = (
    st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.integers(min_value=-300, max_value=300)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | st.booleans()
    | st.none()
)
_KEYS = st.integers(min_value=-(2**64), max_value=2**64 - 1) | st.text(max_size=8) | st.binary(
    max_size=8
)
VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_KEYS, inner, max_size=6),
    max_leaves=30,
)


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(x) for x in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(x) for x in value.values()), default=0)
    return 0


def _bytewise(value: object) -> object:
    """``value`` with every dict rebuilt in the bytewise order of its encoded keys."""
    if isinstance(value, list):
        return [_bytewise(x) for x in value]
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: cbor2.dumps(k))
        return {k: _bytewise(value[k]) for k in keys}
    return value


def _orders_agree(value: object) -> bool:
    """True when no dict in ``value`` sorts differently length-first and bytewise."""
    if isinstance(value, list):
        return all(_orders_agree(x) for x in value)
    if isinstance(value, dict):
        keys = [cbor2.dumps(k) for k in value]
        if sorted(keys) != sorted(keys, key=lambda k: (len(k), k)):
            return False
        return all(_orders_agree(x) for x in value.values())
    return True


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(VALUES)
def test_random_values_match_cbor2_and_round_trip(value: object):
    assume(_depth(value) <= cbor._DEPTH_MAX)
    data = cbor.encode(value)
    assert cbor.decode(data) == value
    assert cbor2.loads(data) == value
    # cbor2 without canonical keeps insertion order: an oracle for bytewise key order.
    assert data == cbor2.dumps(_bytewise(value))
    if _orders_agree(value):
        assert data == cbor2.dumps(value, canonical=True)


@settings(max_examples=2000)
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_decode_error(data: bytes):
    try:
        value = cbor.decode(data)
    except cbor.DecodeError:
        return
    assert cbor.encode(value) == data  # only deterministic encodings are accepted


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(VALUES, st.data())
def test_mutated_encodings_raise_only_decode_error(value: object, data: st.DataObject):
    assume(_depth(value) <= cbor._DEPTH_MAX)
    buf = bytearray(cbor.encode(value))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    for candidate in (bytes(buf), bytes(buf[:cut])):
        try:
            decoded = cbor.decode(candidate)
        except cbor.DecodeError:
            continue
        assert cbor.encode(decoded) == candidate


@given(VALUES, st.binary(max_size=8), st.binary(max_size=16))
def test_decode_prefix_end_offset(value: object, head: bytes, tail: bytes):
    assume(_depth(value) <= cbor._DEPTH_MAX)
    data = cbor.encode(value)
    assert cbor.decode_prefix(head + data + tail, len(head)) == (value, len(head) + len(data))
    assert cbor.decode_prefix(data + tail) == (value, len(data))


@given(VALUES, st.binary(max_size=8), st.binary(max_size=16))
def test_skip_and_decode_item_find_the_item_decode_prefix_finds(value: object, head: bytes,
                                                                 tail: bytes):
    """skip() reads only heads, yet lands where decode_prefix ends; decode_item gives its
    value. A page's entries are found and read with these two."""
    assume(_depth(value) <= cbor._DEPTH_MAX)
    data = head + cbor.encode(value) + tail
    assert cbor.skip(data, len(head)) == cbor.decode_prefix(data, len(head))[1]
    assert cbor.decode_item(data, len(head)) == value


@pytest.mark.parametrize("n", [0, 23, 24, 255, 256, 65535, 65536])
def test_array_head_is_cbor2s(n: int):
    """An array of n zeros is array_head(n) then n zero bytes, as cbor2 encodes it."""
    assert cbor2.dumps([0] * n) == cbor.array_head(n) + bytes(n)


_MP_CONFORMANCE = """
from edgebft.protocol import cbor
def read(path):
    out = []
    for line in open(path):
        code = line.split('#')[0].strip()
        if code:
            out.append(bytes.fromhex(code))
    return out
ok = bad = 0
for data in read({valid!r}):
    try:
        if cbor.encode(cbor.decode(data)) == data:
            ok += 1
        else:
            print('DIFF', data.hex())
    except Exception as e:
        print('FAIL', data.hex(), repr(e))
for data in read({invalid!r}):
    try:
        cbor.decode(data)
        print('ACCEPTED', data.hex())
    except cbor.DecodeError:
        bad += 1
    except Exception as e:
        print('WRONG', data.hex(), repr(e))
print('RESULT', ok, bad)
"""


def test_vectors_on_micropython(micropython: Path, mp_lib: Path):
    code = _MP_CONFORMANCE.format(valid=str(VALID), invalid=str(INVALID))
    proc = run_mp(micropython, mp_lib, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"RESULT {len(VALID_VECTORS)} {len(INVALID_VECTORS)}"]


def test_encode_errors_on_micropython(micropython: Path, mp_lib: Path):
    code = (
        "from edgebft.protocol import cbor\n"
        "n = 0\n"
        "for v in (2**64, -2**64 - 1, 1.5, {(1,): 2}, {True: 1}, set()):\n"
        "    try:\n"
        "        cbor.encode(v)\n"
        "    except cbor.EncodeError:\n"
        "        n += 1\n"
        "print(n, cbor.encode({'b': 1, 'a': (2, b'x', bytearray(b'y'), None)}).hex())\n"
    )
    proc = run_mp(micropython, mp_lib, code)
    assert proc.returncode == 0, proc.stderr
    expected = cbor.encode({"b": 1, "a": (2, b"x", bytearray(b"y"), None)}).hex()
    assert proc.stdout.split() == ["6", expected]


def test_encode_reuses_one_buffer_on_micropython(micropython: Path, mp_lib: Path):
    """On MicroPython encode() appends into one scratch that keeps its capacity: encoding a
    1 KB item allocates only the bytes it returns, where a fresh buffer grew by reallocation
    (as much again). What encode returned stays intact after the next encoding, and an item
    larger than any before still encodes whole."""
    code = (
        "import gc\n"
        "from edgebft.protocol import cbor\n"
        "page = [[i, b'v' * 40] for i in range(24)]\n"
        "first = cbor.encode(page)\n"
        "gc.collect(); gc.disable()\n"
        "a = gc.mem_alloc()\n"
        "again = cbor.encode(page)\n"
        "print(gc.mem_alloc() - a - len(again) < 256)\n"
        "other = cbor.encode(['x' * 5000])\n"
        "print(first == again, len(other), cbor.decode(first) == page)\n"
    )
    proc = run_mp(micropython, mp_lib, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", str(len(cbor.encode(["x" * 5000]))), "True"]


@given(st.lists(st.integers(0, 2**64 - 1), max_size=23), st.integers(0, 30),
       st.binary(max_size=8))
def test_decode_uints_reads_only_the_head(ints: list[int], count: int, tail: bytes):
    """decode_uints gives the first items of an array of uints as decode() does, from bytes
    or a memoryview, whatever follows them (here: the rest of the array cut off, then
    junk)."""
    data = cbor2.dumps(ints)
    head = data[:len(cbor2.dumps(ints[:count])) if count < len(ints) else len(data)]
    for given_data in (head + tail, memoryview(head + tail)):
        assert cbor.decode_uints(given_data, count) == (ints[:count], len(ints))


@given(st.binary(max_size=40), st.integers(0, 8))
def test_decode_uints_raises_only_decode_error(data: bytes, count: int):
    try:
        ints, length = cbor.decode_uints(memoryview(data), count)
    except cbor.DecodeError:
        return
    assert all(type(i) is int and i >= 0 for i in ints) and len(ints) == min(count, length)
