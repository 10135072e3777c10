# The replicated application: accounts with balances, and a bounded key-value store.
#
# Rules:
# - execute() is deterministic: the same ops in the same order give the same results and state
#   on every replica and every port (no dict-order dependence: only canonical CBOR is hashed).
# - Every op returns a result [ok, value]; a bad op is a failed result, never an exception.
# - digest is a hash chain over (sequence, batch digest, results) of every executed batch:
#   equal digests at a sequence mean equal histories, hence equal states, up to there.
# - Memory is bounded: at most KEYS_MAX keys and ACCOUNTS_MAX accounts, so a snapshot (what a
#   checkpoint's digest covers and state transfer ships) stays within a few KB.
import hashlib
import struct

from . import cbor

KEYS_MAX = 64
ACCOUNTS_MAX = 64
_NAME_BYTES_MAX = 32
_VALUE_BYTES_MAX = 64
_GENESIS_DIGEST = b"\x00" * 32


def _is_name(x):
    return type(x) is str and 0 < len(x) <= _NAME_BYTES_MAX


class Ledger:
    """Balances and key-value state, with a running digest of the executed history."""

    def __init__(self, genesis=None):
        self.balances = {}
        self.kv = {}
        for account, amount in sorted((genesis or {}).items()):
            if not _is_name(account) or type(amount) is not int or amount < 0:
                raise ValueError("bad genesis entry %r" % (account,))
            self.balances[account] = amount
        if len(self.balances) > ACCOUNTS_MAX:
            raise ValueError("too many genesis accounts")
        self.digest = _GENESIS_DIGEST

    def execute(self, op):
        """Apply one op and return its result [ok, value]."""
        if type(op) is not list or not op or type(op[0]) is not str:
            return [False, "bad op"]
        name = op[0]
        if name == "get" and len(op) == 2 and _is_name(op[1]):
            return [True, self.kv.get(op[1])]
        if name == "put" and len(op) == 3 and _is_name(op[1]):
            return self._put(op[1], op[2])
        if name == "balance" and len(op) == 2 and _is_name(op[1]):
            return [True, self.balances.get(op[1], 0)]
        if name == "transfer" and len(op) == 4:
            return self._transfer(op[1], op[2], op[3])
        return [False, "bad op"]

    def _put(self, key, value):
        if len(cbor.encode(value)) > _VALUE_BYTES_MAX:
            return [False, "value too large"]
        if key not in self.kv and len(self.kv) >= KEYS_MAX:
            return [False, "store full"]
        self.kv[key] = value
        return [True, None]

    def _transfer(self, src, dst, amount):
        if not (_is_name(src) and _is_name(dst)) or type(amount) is not int or amount <= 0:
            return [False, "bad transfer"]
        have = self.balances.get(src, 0)
        if have < amount:
            return [False, "insufficient funds"]
        if dst not in self.balances and len(self.balances) >= ACCOUNTS_MAX:
            return [False, "too many accounts"]
        self.balances[src] = have - amount
        self.balances[dst] = self.balances.get(dst, 0) + amount
        return [True, self.balances[src]]

    def state(self):
        """The canonical state: [digest, [[account, balance]...], [[key, value]...]], sorted."""
        return [self.digest, sorted([a, b] for a, b in self.balances.items()),
                sorted([k, v] for k, v in self.kv.items())]

    def load(self, state):
        """Replace the state with one that state() produced (checked by the caller's digest)."""
        digest, balances, kv = state
        self.digest = digest
        self.balances = {}
        for account, amount in balances:
            self.balances[account] = amount
        self.kv = {}
        for key, value in kv:
            self.kv[key] = value

    def commit_batch(self, seq, batch_digest, results):
        """Fold one executed batch into the history digest; return the new digest."""
        h = hashlib.sha256(self.digest)
        h.update(struct.pack(">Q", seq))
        h.update(batch_digest)
        h.update(hashlib.sha256(cbor.encode(results)).digest())
        self.digest = h.digest()
        return self.digest
