"""MicroPython's ``cryptolib.aes`` on CPython, for the protocol modules run there.

protocol/pagestore.py expands a page's SHA-256 digest with AES-256 (its state digest's
terms) and protocol/auth.py derives client keys with it. A board and the Unix port have
``cryptolib``; CPython does not, so the simulator, the tests and the host's tools get this
(protocol/auth.py imports it), backed by the cryptography package. Only what the
protocol uses: ECB encryption of whole blocks, into a buffer or returned.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MODE_ECB = 1  # cryptolib's


class aes:  # noqa: N801 - cryptolib's name
    """``cryptolib.aes(key, MODE_ECB)``: AES-128/192/256 by the key's length."""

    def __init__(self, key: bytes | bytearray, mode: int) -> None:
        if mode != MODE_ECB:
            raise ValueError(f"mode {mode}: only ECB ({MODE_ECB}) is provided on CPython")
        self._encryptor = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()

    def encrypt(self, data: bytes | bytearray | memoryview,
                out: bytearray | memoryview | None = None) -> bytes | bytearray | memoryview:
        """``data`` (a whole number of 16-byte blocks) encrypted: written into ``out`` and
        ``out`` returned, or returned as new bytes."""
        if len(data) % 16:
            raise ValueError("data not a multiple of the block size")
        result = self._encryptor.update(bytes(data))
        if out is None:
            return result
        out[:len(result)] = result
        return out
