# The replicated application: accounts with balances, and a key-value store, on flash.
#
# Rules:
# - execute() is deterministic: the same ops in the same order give the same results and state
#   on every replica and every port (no dict-order dependence: only canonical CBOR is hashed).
# - Every op returns a result [ok, value]; a bad op is a failed result, never an exception.
# - digest is a hash chain over (sequence, batch digest, results) of every executed batch:
#   equal digests at a sequence mean equal histories, hence equal states, up to there.
# - Keys and accounts live in a PageStore (pagestore.py) on flash, as entries "k<key>" and
#   "a<account>": RAM holds its page cache, whatever their number. The store holds at most
#   ENTRIES_MAX of them: beyond it a put or a transfer to a new account fails ("store full"),
#   the same on every replica. Values are at most _VALUE_BYTES_MAX bytes of CBOR.
# - Stake (DESIGN.md section 3): the ledger holds the validator set in force (`validators`, one
#   stake per replica id, epoch `epoch`) and the bonded stake that will be in force next
#   (`bonds`). "stake" and "unstake" move tokens between an account and a validator's bond;
#   "accuse" (only from a replica's own client id, see execute) records who accuses whom, and
#   once accusers holding more than 1/3 of the validators' stake (so at least one correct
#   replica saw the offence) accuse one replica, its bond is slashed to zero (burnt).
#   end_epoch(), called at every checkpoint, puts the bonds in force: a validator whose bond
#   is zero leaves the set. Both tables are part of small_state(), hence of every checkpoint
#   digest, so all correct replicas agree on every epoch's validator set.
import hashlib
import struct

try:
    from micropython import const
except ImportError:  # CPython
    const = int  # CPython: const(x) is x

from . import cbor

ENTRIES_MAX = 1 << 16
_NAME_BYTES_MAX = const(32)
_VALUE_BYTES_MAX = const(64)


def _is_name(x):
    return type(x) is str and 0 < len(x) <= _NAME_BYTES_MAX


class Ledger:
    """Balances and key-value state in ``store``, with a running digest of the executed
    history. ``genesis`` (account -> balance) is written to the store: give it only to a new,
    empty one."""

    def __init__(self, store, genesis=None, stakes=(1,)):
        self.store = store
        self.epoch = 0
        self.since = 0      # the checkpoint at which the validators came into force
        self.validators = list(stakes)
        self.bonds = list(stakes)
        self.accusers = {}  # offender -> sorted accuser ids (this epoch's accusations)
        for account, amount in sorted((genesis or {}).items()):
            if not _is_name(account) or type(amount) is not int or amount < 0:
                raise ValueError("bad genesis entry %r" % (account,))
            store.put("a" + account, amount)
        if store.count > ENTRIES_MAX:
            raise ValueError("too many genesis accounts")
        self.digest = b"\x00" * 32  # the genesis digest

    def read(self, op):
        """The result of the read-only ``op`` (get, balance, validators) on the executed state,
        which it leaves as it is; [False, "not a read"] for any other op."""
        if type(op) is not list or not op or not (op[0] == "get" or op[0] == "balance"
                                                  or op[0] == "validators"):
            return [False, "not a read"]
        return self.execute(op)

    def get(self, key):
        """The value stored under ``key``, or None."""
        return self.store.get("k" + key)

    def balance(self, account):
        return self.store.get("a" + account) or 0

    def _has_room(self, entry):
        return self.store.count < ENTRIES_MAX or self.store.get(entry) is not None

    def _credit(self, account, amount):
        self.store.put("a" + account, self.balance(account) + amount)

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
            return [True, self.get(op[1])]
        if name == "put" and len(op) == 3 and _is_name(op[1]):
            return self._put(op[1], op[2])
        if name == "balance" and len(op) == 2 and _is_name(op[1]):
            return [True, self.balance(op[1])]
        if name == "transfer" and len(op) == 4:
            return self._transfer(op[1], op[2], op[3])
        return [False, "bad op"]

    def _put(self, key, value):
        if len(cbor.encode(value)) > _VALUE_BYTES_MAX:
            return [False, "value too large"]
        if not self._has_room("k" + key):
            return [False, "store full"]
        self.store.put("k" + key, value)
        return [True, None]

    def _transfer(self, src, dst, amount):
        if not (_is_name(src) and _is_name(dst)) or type(amount) is not int or amount <= 0:
            return [False, "bad transfer"]
        have = self.balance(src)
        if have < amount:
            return [False, "insufficient funds"]
        if not self._has_room("a" + dst):
            return [False, "store full"]
        self.store.put("a" + src, have - amount)
        self._credit(dst, amount)
        return [True, self.balance(src)]

    def _validator(self, v):
        return type(v) is int and 0 <= v < len(self.bonds)

    def _stake(self, account, validator, amount):
        if not (_is_name(account) and self._validator(validator)) or type(amount) is not int \
                or amount <= 0:
            return [False, "bad stake"]
        have = self.balance(account)
        if have < amount:
            return [False, "insufficient funds"]
        self.store.put("a" + account, have - amount)
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
        if not self._has_room("a" + account):
            return [False, "store full"]
        self.bonds[validator] -= amount
        self._credit(account, amount)
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

    def small_state(self):
        """What the checkpoint record holds besides the store: [digest, epoch, since,
        validators, bonds, [[offender, [accuser...]]...] sorted]."""
        return [self.digest, self.epoch, self.since, self.validators, self.bonds,
                sorted([x, a] for x, a in self.accusers.items())]

    def load_small(self, small):
        """Adopt a small_state() (checked by the caller's digest); the store is the caller's."""
        self.digest, self.epoch, self.since = small[0], small[1], small[2]
        self.validators = list(small[3])
        self.bonds = list(small[4])
        self.accusers = {}
        for x, accusers in small[5]:
            self.accusers[x] = accusers

    def commit_batch(self, seq, batch_digest, results):
        """Fold one executed batch into the history digest; return the new digest."""
        h = hashlib.sha256(self.digest)
        h.update(struct.pack(">Q", seq))
        h.update(batch_digest)
        h.update(hashlib.sha256(cbor.encode(results)).digest())
        self.digest = h.digest()
        return self.digest
