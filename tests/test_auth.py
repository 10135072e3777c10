"""HMAC-SHA256 and authenticators: CPython's hmac as the reference, then MicroPython."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from conftest import run_mp
from edgebft.protocol import auth, replica

KEYS = st.binary(max_size=200)
MSGS = st.binary(max_size=300)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


@given(KEYS, MSGS)
def test_digest_matches_hmac(key: bytes, msg: bytes):
    mac = auth.Mac(key)
    assert mac.digest(msg) == _hmac(key, msg)
    assert mac.digest(bytearray(msg)) == mac.digest(memoryview(msg)) == _hmac(key, msg)
    assert mac.tag(msg) == _hmac(key, msg)[: auth.TAG_BYTES]
    assert len(mac.tag(msg)) == auth.TAG_BYTES == 8


@given(st.lists(KEYS, min_size=1, max_size=4), MSGS)
def test_a_rekeyed_mac_is_the_mac_of_its_last_key(keys: list[bytes], msg: bytes):
    """A key shorter than the one before must leave none of the old key in the pads."""
    mac = auth.Mac(keys[0])
    for key in keys[1:]:
        mac.rekey(key)
    assert mac.digest(msg) == _hmac(keys[-1], msg)


def test_rfc4231_case_2():
    mac = auth.Mac(b"Jefe")
    assert mac.digest(b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def _client_key(secret: bytes, client: int) -> bytes:
    """protocol/SPEC.md's client key, from the cryptography package's AES."""
    blocks = b"".join(b"client\x00" + bytes([j]) + client.to_bytes(8, "big") for j in (0, 1))
    return Cipher(algorithms.AES(secret), modes.ECB()).encryptor().update(blocks)


CLIENTS = st.integers(0, 2**64 - 1)


@given(st.binary(min_size=32, max_size=32), st.lists(CLIENTS, min_size=1, max_size=5))
def test_client_keys_are_the_spec_derivation(secret: bytes, clients: list[int]):
    keys = auth.ClientKeys(secret)
    for client in clients:  # one buffer, rewritten per derivation
        assert bytes(keys.derive(client)) == _client_key(secret, client)
        assert replica.client_key(secret, client) == _client_key(secret, client)


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=7), MSGS, st.data())
def test_authenticator_round_trip_and_bit_flip(keys: list[bytes], msg: bytes, data):
    macs = [auth.Mac(k) for k in keys]
    a = auth.authenticator(macs, msg)
    assert len(a) == auth.TAG_BYTES * len(macs)
    for j, mac in enumerate(macs):
        assert a[j * auth.TAG_BYTES:(j + 1) * auth.TAG_BYTES] == mac.tag(msg)
        assert auth.check(a, j, mac, msg)
    j = data.draw(st.integers(0, len(macs) - 1))
    bit = data.draw(st.integers(0, auth.TAG_BYTES * 8 - 1))
    flipped = bytearray(a)
    flipped[j * auth.TAG_BYTES + bit // 8] ^= 1 << (bit % 8)
    assert not auth.check(bytes(flipped), j, macs[j], msg)
    if msg:
        other = bytearray(msg)
        other[data.draw(st.integers(0, len(msg) - 1))] ^= 1
        assert not auth.check(a, j, macs[j], bytes(other))


def test_check_never_raises_on_short_or_bad_slot():
    mac = auth.Mac(b"k")
    a = auth.authenticator([mac, mac], b"m")
    assert auth.check(a, 1, mac, b"m")
    assert not auth.check(a, 2, mac, b"m")
    assert not auth.check(a, -1, mac, b"m")
    assert not auth.check(a[:-1], 1, mac, b"m")
    assert not auth.check(b"", 0, mac, b"m")
    assert auth.authenticator([], b"m") == b""


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_equal(a: bytes, b: bytes):
    assert auth.equal(a, b) == (a == b)
    assert auth.equal(a, bytearray(a))
    assert auth.equal(memoryview(b), b)


# MicroPython: the bytes a call allocates (in a function: binding a new global while
# measuring could grow the module's globals and be counted)
ALLOCATED = (
    "import gc\n"
    "def allocated(call):\n"
    "    gc.collect()\n"
    "    gc.disable()\n"
    "    before = gc.mem_alloc()\n"
    "    call()\n"
    "    return gc.mem_alloc() - before\n"
)

FIXED_KEYS = [b"", b"k", bytes(range(32)), bytes(range(64)), bytes(range(65)), bytes(range(100))]
FIXED_MSG = b"pre-prepare view=3 seq=17" * 5


@pytest.mark.parametrize("key", FIXED_KEYS, ids=lambda k: f"{len(k)}-byte key")
def test_micropython_matches_cpython(micropython: Path, mp_lib: Path, key: bytes):
    code = (
        "from edgebft.protocol import auth\n"
        f"key = {key!r}\n"
        f"msg = {FIXED_MSG!r}\n"
        "mac = auth.Mac(key)\n"
        "a = auth.authenticator([mac, auth.Mac(b'x')], msg)\n"
        "print(mac.digest(msg).hex(), a.hex(),\n"
        "      auth.check(a, 0, mac, msg), auth.check(a[:12], 1, mac, msg))\n"
        + ALLOCATED +
        "other = auth.Mac(bytes(range(64)))\n"
        "print(allocated(lambda: other.rekey(key)), other.digest(msg) == mac.digest(msg))\n"
    )
    proc = run_mp(micropython, mp_lib, code)
    assert proc.returncode == 0, proc.stderr
    expected_auth = _hmac(key, FIXED_MSG)[:8] + _hmac(b"x", FIXED_MSG)[:8]
    out = proc.stdout.split()
    assert out[:4] == [
        _hmac(key, FIXED_MSG).hex(),
        expected_auth.hex(),
        "True",
        "False",
    ]
    # rekey allocates nothing for a key of at most a block (a longer one is hashed first)
    assert (out[4] == "0") == (len(key) <= 64)
    assert out[5] == "True"


def test_micropython_client_keys_equal_cpython_and_allocate_nothing(micropython: Path,
                                                                    mp_lib: Path):
    secret = bytes(range(32))
    clients = [0, 7, 1023, 2**32 + 5, 2**64 - 1]
    code = (
        "from edgebft.protocol import auth\n"
        + ALLOCATED +
        f"keys = auth.ClientKeys({secret!r})\n"
        f"for c in {clients!r}:\n"
        "    print(bytes(keys.derive(c)).hex())\n"
        "def derive_two():\n"
        "    keys.derive(8)\n"
        "    keys.derive(2**40)\n"
        "print(allocated(derive_two))\n"
    )
    proc = run_mp(micropython, mp_lib, code)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split()
    assert out[:-1] == [_client_key(secret, c).hex() for c in clients]
    assert out[-1] == "0"
