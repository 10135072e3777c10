# Message authentication without public-key crypto: HMAC-SHA256 (RFC 2104) and PBFT
# authenticators (Castro and Liskov, TOCS 2002, section 5.2).
#
# Rules:
# - Portable: MicroPython and CPython, imports hashlib, struct and AES (cryptolib on a board
#   and the Unix port; edgebft.cipher, over the cryptography package, on CPython). MicroPython
#   has no hmac module and its sha256 objects have no copy(), so a Mac keeps the two padded key
#   blocks and hashes them again for every message (4 compression blocks for a short
#   message). A Mac's pads are bytearrays that rekey() rewrites: a new key allocates nothing.
# - Client keys are derived from a replica's client secret with AES-256 (ClientKeys), into
#   one buffer: nothing allocated per derivation.
# - A tag is the HMAC truncated to TAG_BYTES. An authenticator holds one tag per receiver at
#   fixed offsets: slot j = auth[j * TAG_BYTES:(j + 1) * TAG_BYTES], made with K_ij.
# - Checking peer input never raises: a short or malformed authenticator is a failed check.
#   Tags are compared in constant time.
# - Frames: authenticator() and check() run for every message; they stay within the 11 slots
#   of a frame MicroPython keeps on the C stack (cbor.py's header; tests/test_hot_paths.py).

import hashlib
import struct

try:
    from cryptolib import aes  # MicroPython: the Unix and ESP32 ports have it
except ImportError:  # CPython
    from edgebft.cipher import aes  # pyright: ignore[reportMissingImports]  # host only

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import bytearray, bytes, int, len, range, str, type

try:
    from micropython import const
except ImportError:
    const = int  # CPython: const(x) is x

# 64 bits: a forger gets one online guess per message, as in PBFT's 10-byte UMAC tags
# (TOCS 2002, section 8.1); an n=4 authenticator costs 32 bytes.
TAG_BYTES = const(8)
DIGEST_BYTES = const(32)
_BLOCK_BYTES = const(64)  # SHA-256 block size, the B of RFC 2104
AES_ECB = const(1)  # cryptolib.MODE_ECB
_IPAD = b"\x36" * _BLOCK_BYTES
_OPAD = b"\x5c" * _BLOCK_BYTES


class Mac:
    """HMAC-SHA256 with one key, which rekey() replaces in place."""

    __slots__ = ("_ipad", "_opad")

    def __init__(self, key):
        """Args: key: bytes of any length (see rekey)."""
        self._ipad = bytearray(_IPAD)
        self._opad = bytearray(_OPAD)
        self.rekey(key)

    def rekey(self, key):
        """Make ``key`` the Mac's key: bytes of any length, hashed when longer than a block
        (RFC 2104). The two pads are rewritten in place, so a key of at most a block
        allocates nothing: a replica rekeys one Mac with each client's key as it needs it.
        A byte loop, 3.9 us for a 32-byte key on the Unix port, where XORing the key as a
        512-bit int took 1.7 us but allocated 672 bytes a Mac: at 64 clients, two Macs a
        request, 1.3 of the 19.5 KB a node allocated per request."""
        if len(key) > _BLOCK_BYTES:
            key = hashlib.sha256(key).digest()
        ipad = self._ipad
        opad = self._opad
        ipad[:] = _IPAD
        opad[:] = _OPAD
        i = 0
        while i < len(key):  # by index: a for loop's iterator would be allocated
            b = key[i]
            ipad[i] = b ^ 0x36
            opad[i] = b ^ 0x5C
            i += 1

    def digest(self, msg):
        """Return HMAC-SHA256(key, msg), DIGEST_BYTES bytes; ``msg`` is any bytes-like."""
        inner = hashlib.sha256(self._ipad)
        inner.update(msg)
        outer = hashlib.sha256(self._opad)
        outer.update(inner.digest())
        return outer.digest()

    def tag(self, msg):
        """Return the truncated HMAC: the first TAG_BYTES bytes of digest(msg)."""
        return self.digest(msg)[:TAG_BYTES]


def authenticator(macs, msg):
    """Return one tag per receiver: slot j is macs[j].tag(msg), TAG_BYTES * len(macs) bytes.
    Each digest is copied whole into its slot and the next slot overwrites its tail: no
    slice is allocated per receiver."""
    out = bytearray(TAG_BYTES * (len(macs) - 1) + DIGEST_BYTES)
    j = 0
    while j < len(macs):  # by index: a for loop's iterator would put the frame on the heap
        out[TAG_BYTES * j:TAG_BYTES * j + DIGEST_BYTES] = macs[j].digest(msg)
        j += 1
    out[TAG_BYTES * j:] = b""
    return bytes(out)


def check(auth, j, mac, msg):
    """Return True when slot ``j`` of ``auth`` is mac.tag(msg).

    Never raises for a short authenticator or a negative slot: that is a failed check.
    """
    if j < 0 or len(auth) < TAG_BYTES * (j + 1):
        return False
    d = mac.digest(msg)
    acc = 0
    i = 0
    while i < TAG_BYTES:
        acc |= auth[TAG_BYTES * j + i] ^ d[i]
        i += 1
    return acc == 0


def equal(a, b):
    """Compare two byte strings in time that depends only on their lengths."""
    if len(a) != len(b):
        return False
    acc = 0
    for i in range(len(a)):
        acc |= a[i] ^ b[i]
    return acc == 0


class ClientKeys:
    """The keys a replica shares with its clients, derived from its 32-byte client secret S:
    client c's is AES-256-ECB with key S of the two blocks b"client" 0x00 j uint64_be(c), j =
    0 and 1 (32 bytes; protocol/SPEC.md). Per request a replica derives the key of its client
    twice (its request, its reply): with HMAC-SHA256 that was two hash objects and their
    digests each, ~900 bytes a request; here one cipher object for good and nothing per
    derivation."""

    __slots__ = ("_aes", "_blocks", "_key")

    def __init__(self, secret):
        self._aes = aes(secret, AES_ECB)
        self._blocks = bytearray(b"client\x00\x00" + bytes(8) + b"client\x00\x01" + bytes(8))
        self._key = bytearray(DIGEST_BYTES)

    def derive(self, client):
        """Client ``client``'s key (an int below 2**64), in a buffer the next derive()
        rewrites: use it at once (Mac.rekey copies it)."""
        struct.pack_into(">Q", self._blocks, 8, client)
        struct.pack_into(">Q", self._blocks, 24, client)
        return self._aes.encrypt(self._blocks, self._key)
