# The replicated application: accounts with balances, and a bounded key-value store.
#
# Rules:
# - execute() is deterministic: the same ops in the same order give the same results and state
#   on every replica and every port (no dict-order dependence: only canonical CBOR is hashed).
# - Every op returns a result [ok, value]; a bad op is a failed result, never an exception.
# - digest is a hash chain over (sequence, batch digest, results) of every executed batch:
#   equal digests at a sequence mean equal histories, hence equal states, up to there.
# - Memory is bounded: at most KEYS_MAX keys and _ACCOUNTS_MAX accounts, so a snapshot (what a
#   checkpoint's digest covers and state transfer ships) stays within a few KB.
# - Stake (DESIGN.md section 3): the ledger holds the validator set in force (`validators`, one
#   stake per replica id, epoch `epoch`) and the bonded stake that will be in force next
#   (`bonds`). "stake" and "unstake" move tokens between an account and a validator's bond;
#   "accuse" (only from a replica's own client id, see execute) records who accuses whom, and
#   once accusers holding more than 1/3 of the validators' stake (so at least one correct
#   replica saw the offence) accuse one replica, its bond is slashed to zero (burnt).
#   end_epoch(), called at every checkpoint, puts the bonds in force: a validator whose bond
#   is zero leaves the set. Both tables are part of state(), hence of every checkpoint digest,
#   so all correct replicas agree on every epoch's validator set.
import hashlib
import struct

try:
    from micropython import const
except ImportError:  # CPython
    const = int  # CPython: const(x) is x

from . import cbor

KEYS_MAX = 64
_ACCOUNTS_MAX = const(64)
_NAME_BYTES_MAX = const(32)
_VALUE_BYTES_MAX = const(64)


def _is_name(x):
    return type(x) is str and 0 < len(x) <= _NAME_BYTES_MAX


class Ledger:
    """Balances and key-value state, with a running digest of the executed history."""

    def __init__(self, genesis=None, stakes=(1,)):
        self.epoch = 0
        self.since = 0      # the checkpoint at which the validators came into force
        self.validators = list(stakes)
        self.bonds = list(stakes)
        self.accusers = {}  # offender -> sorted accuser ids (this epoch's accusations)
        self.balances = {}
        self.kv = {}
        for account, amount in sorted((genesis or {}).items()):
            if not _is_name(account) or type(amount) is not int or amount < 0:
                raise ValueError("bad genesis entry %r" % (account,))
            self.balances[account] = amount
        if len(self.balances) > _ACCOUNTS_MAX:
            raise ValueError("too many genesis accounts")
        self.digest = b"\x00" * 32  # the genesis digest

    def execute(self, op, replica=-1):
        """Apply one op and return its result [ok, value]. ``replica`` is the id of the replica
        whose own client id sent the op (-1 for an ordinary client): only replicas accuse."""
        if type(op) is not list or not op or type(op[0]) is not str:
            return [False, "bad op"]
        name = op[0]
        if name == "stake" and len(op) == 4:
            return self._stake(op[1], op[2], op[3])
        if name == "unstake" and len(op) == 4:
            return self._unstake(op[1], op[2], op[3])
        if name == "validators" and len(op) == 1:
            return [True, [self.epoch, self.validators, self.bonds]]
        if name == "accuse" and len(op) == 2 and replica >= 0:
            return self._accuse(replica, op[1])
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
        if dst not in self.balances and len(self.balances) >= _ACCOUNTS_MAX:
            return [False, "too many accounts"]
        self.balances[src] = have - amount
        self.balances[dst] = self.balances.get(dst, 0) + amount
        return [True, self.balances[src]]

    def _validator(self, v):
        return type(v) is int and 0 <= v < len(self.bonds)

    def _stake(self, account, validator, amount):
        if not (_is_name(account) and self._validator(validator)) or type(amount) is not int \
                or amount <= 0:
            return [False, "bad stake"]
        have = self.balances.get(account, 0)
        if have < amount:
            return [False, "insufficient funds"]
        self.balances[account] = have - amount
        self.bonds[validator] += amount
        return [True, self.bonds[validator]]

    def _unstake(self, validator, account, amount):
        if not (_is_name(account) and self._validator(validator)) or type(amount) is not int \
                or amount <= 0:
            return [False, "bad unstake"]
        if self.bonds[validator] < amount:
            return [False, "insufficient stake"]
        if sum(self.bonds) == amount:
            return [False, "last stake"]  # the set never becomes empty
        if account not in self.balances and len(self.balances) >= _ACCOUNTS_MAX:
            return [False, "too many accounts"]
        self.bonds[validator] -= amount
        self.balances[account] = self.balances.get(account, 0) + amount
        return [True, self.bonds[validator]]

    def _accuse(self, accuser, offenders):
        """Record ``accuser``'s accusation of each of ``offenders``; slash those now accused by
        more than 1/3 of the validators' stake. Returns [True, [offenders slashed now]]."""
        if type(offenders) is not list or len(offenders) > len(self.bonds):
            return [False, "bad accusation"]
        slashed = []
        for x in offenders:
            if not self._validator(x) or x == accuser or self.bonds[x] == 0:
                continue
            accusers = self.accusers.get(x, [])
            if accuser in accusers:
                continue
            accusers = sorted(accusers + [accuser])
            weight = 0
            for j in accusers:
                weight += self.validators[j]
            if 3 * weight > sum(self.validators) and sum(self.bonds) > self.bonds[x]:
                self.bonds[x] = 0
                self.accusers.pop(x, None)
                slashed.append(x)
            else:
                self.accusers[x] = accusers
        return [True, slashed]

    def end_epoch(self, seq):
        """At checkpoint ``seq``: put the bonds in force. True when the validator set changed
        (a new epoch from ``seq`` on; its accusations start afresh)."""
        if self.bonds == self.validators:
            return False
        self.validators = list(self.bonds)
        self.epoch += 1
        self.since = seq
        self.accusers = {}
        return True

    def state(self):
        """The canonical state: [digest, [[account, balance]...], [[key, value]...], [epoch,
        since, validators, bonds, [[offender, [accuser...]]...]]], sorted."""
        return [self.digest, sorted([a, b] for a, b in self.balances.items()),
                sorted([k, v] for k, v in self.kv.items()),
                [self.epoch, self.since, self.validators, self.bonds,
                 sorted([x, a] for x, a in self.accusers.items())]]

    def load(self, state):
        """Replace the state with one that state() produced (checked by the caller's digest)."""
        digest, balances, kv, stake = state
        self.epoch, self.since = stake[0], stake[1]
        self.validators = list(stake[2])
        self.bonds = list(stake[3])
        self.accusers = {}
        for x, accusers in stake[4]:
            self.accusers[x] = accusers
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
