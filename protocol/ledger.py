# The replicated application: owned accounts with balances, delegated stake, and a key-value
# store, on flash.
#
# Rules:
# - execute() is deterministic: the same ops in the same order give the same results and state
#   on every replica and every port (no dict-order dependence: only canonical CBOR is hashed).
# - Every op returns a result [ok, value]; a bad or unauthorized op is a failed result, never an
#   exception, and changes nothing.
# - digest is a hash chain over (sequence, batch digest, results) of every executed batch:
#   equal digests at a sequence mean equal histories, hence equal states, up to there.
# - Keys, accounts, delegations and unbondings live in a PageStore (pagestore.py) on flash, as
#   entries "k<key>", "a<account>", "d<validator>:<account>" and "u<n>": RAM holds its page
#   cache, whatever their number. The store holds at most ENTRIES_MAX of them, and a page at
#   most PAGE_ENTRIES_MAX: beyond either an op that adds one fails ("store full", "page
#   full"), the same on every replica (both depend on the state alone). Values are at most
#   VALUE_BYTES_MAX bytes of CBOR, so an entry encodes in at most ENTRY_BYTES_MAX bytes and a
#   page never outgrows pagestore.PAGE_BYTES_MAX, however its entries are rewritten: keys a
#   client grinds into one page fill that page only, and the updates of the entries already
#   there (a victim's account) still execute.
# - Ownership (issue 13): every op executes with the id of the client that sent it (its
#   authenticator proved it). An account holds [balance, owner]: the client that opened it
#   (["open", name]) or that genesis names. Only the owner spends from an account (transfer,
#   stake) or unbonds its delegations ("not owner"); a transfer goes to an existing account only
#   ("no such account"). Genesis may fund a range: {"acct*": [count, balance]} stands for
#   accounts acct0 .. acct<count-1>, acct<i> owned by client i, that take no flash (and no boot
#   time) until first written; the range is part of small_state(), so it survives restarts and
#   state transfer.
# - Stake (DESIGN.md section 3, Cosmos SDK staking): the ledger holds the validator set in force
#   (`validators`, one stake per replica id, epoch `epoch`) and the bonded stake that will be in
#   force next (`bonds`). "stake" bonds tokens of an account to a validator as a delegation
#   (validator, account); "unstake" takes a delegation's tokens out of the bond at once (they no
#   longer count from the next checkpoint) but returns them to the account only after
#   UNBONDING_CHECKPOINTS checkpoints: until then they are unbonding, and slashing the validator
#   burns them too, so misbehaving stake cannot leave before the evidence against it counts.
#   Genesis stake belongs to no account: it leaves only by slashing. "accuse" (only from a
#   replica's own client id, REPLICA_CLIENT_BASE + its id) records who accuses whom; once
#   accusers holding more than 1/3 of the validators' stake (so at least one correct replica saw
#   the offence) accuse one replica, its bond, its unbondings and the delegations to it are
#   slashed to zero (burnt; `slashes` counts them per validator, and a delegation made before a
#   slash is void). end_epoch(), called at every checkpoint, releases the unbondings due and
#   puts the bonds in force: a validator whose bond is zero leaves the set. The stake tables are
#   part of small_state(), hence of every checkpoint digest, so all correct replicas agree on
#   every epoch's validator set.
import hashlib
import struct

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import int, len, list, range, sorted, str, sum, tuple, type

try:
    from micropython import const
except ImportError:  # CPython
    const = int  # CPython: const(x) is x

from . import cbor
from .pagestore import PAGE_BYTES_MAX

_READS = ("get", "balance", "account", "delegations", "validators")

ENTRIES_MAX = 1 << 16
# The encodings of an entry's key and value: at most 195 bytes, a "k" entry's (a name is
# NAME_BYTES_MAX characters of up to 4 bytes: "k<name>" encodes in 131, its value in at
# most VALUE_BYTES_MAX); an unbonding's encodes in at most 174, a delegation's in 156.
ENTRY_BYTES_MAX = 200
PAGE_ENTRIES_MAX = (PAGE_BYTES_MAX - 3) // ENTRY_BYTES_MAX  # 3: the head of a full page
UNBONDING_CHECKPOINTS = 2  # an unbond stays slashable through the epoch it leaves and a K more
NAME_BYTES_MAX = const(32)
VALUE_BYTES_MAX = const(64)
_FUNDED_MAX = const(1 << 20)  # accounts a genesis range may fund


def is_name(x):
    """A key or an account name: text of 1 .. NAME_BYTES_MAX characters."""
    return type(x) is str and 0 < len(x) <= NAME_BYTES_MAX


def _is_pair(x):
    """[a, b] of two non-negative ints (a genesis account's [balance, owner], a range's
    [count, balance])."""
    return type(x) in (list, tuple) and len(x) == 2 and type(x[0]) is int and x[0] >= 0 \
        and type(x[1]) is int and x[1] >= 0


def is_amount(x):
    """An amount of tokens: a positive int below 2**63."""
    return type(x) is int and 0 < x < 1 << 63


class Ledger:
    """Owned accounts, delegated stake and key-value state in ``store``, with a running digest
    of the executed history. ``genesis`` (account -> [balance, owner], and at most one range
    "prefix*" -> [count, balance]) is written to the store: give it only to a new, empty one."""

    def __init__(self, store, genesis=None, stakes=(1,)):
        self.store = store
        self.epoch = 0
        self.since = 0      # the checkpoint at which the validators came into force
        self.validators = list(stakes)
        self.bonds = list(stakes)
        self.accusers = {}  # offender -> sorted accuser ids (this epoch's accusations)
        self.slashes = [0] * len(stakes)  # per validator: times slashed (voids older delegations)
        self.checkpoints = 0  # end_epoch() calls: the unbonding clock
        self.unbond_head = 0  # unbondings "u<head>" .. "u<tail - 1>" wait, oldest first
        self.unbond_tail = 0
        self.funded = None    # the genesis range [prefix, count, balance], or None
        for name, entry in sorted((genesis or {}).items()):
            if not (is_name(name) and _is_pair(entry)):
                raise ValueError("bad genesis entry %r" % (name,))
            if name[-1] != "*":
                store.put("a" + name, [entry[0], entry[1]])
            elif len(name) > 1 and self.funded is None and 0 < entry[0] <= _FUNDED_MAX:
                self.funded = [name[:-1], entry[0], entry[1]]
            else:
                raise ValueError("bad genesis entry %r" % (name,))
        if store.count > ENTRIES_MAX:
            raise ValueError("too many genesis accounts")
        self.digest = b"\x00" * 32  # the genesis digest

    def read(self, op):
        """The result of the read-only ``op`` (get, balance, account, delegations, validators)
        on the executed state, which it leaves as it is; [False, "not a read"] for any other
        op."""
        if type(op) is not list or not op or op[0] not in _READS:
            return [False, "not a read"]
        return self.execute(op, -1)

    def get(self, key):
        """The value stored under ``key``, or None."""
        return self.store.get("k" + key)

    def account(self, name):
        """[balance, owner] of account ``name``, or None when it does not exist."""
        entry = self.store.get("a" + name)
        if entry is not None:
            return entry
        funded = self.funded
        if funded and name.startswith(funded[0]):
            i = name[len(funded[0]):]
            if i.isdigit() and str(int(i)) == i and int(i) < funded[1]:
                return [funded[2], int(i)]
        return None

    def balance(self, name):
        """The balance of account ``name`` (0 when it does not exist)."""
        entry = self.account(name)
        return 0 if entry is None else entry[0]

    def delegation(self, validator, name):
        """The tokens account ``name`` has bonded to ``validator`` and not unbonded (0 once a
        slash voided them)."""
        entry = self.store.get("d%d:%s" % (validator, name))
        if entry is None or entry[1] != self.slashes[validator]:
            return 0
        return entry[0]

    def _room(self, *entries):
        """None when writing ``entries`` keeps the store within ENTRIES_MAX and each new one's
        page within PAGE_ENTRIES_MAX (an account of the genesis range becomes an entry when
        first written); else the failed result, "page full" or "store full"."""
        new = 0
        for entry in entries:
            if self.store.get(entry) is None:
                # counting every entry of the op in this page: two may share it
                if self.store.entries_in_page(entry) + len(entries) > PAGE_ENTRIES_MAX:
                    return [False, "page full"]
                new += 1
        if self.store.count + new > ENTRIES_MAX:
            return [False, "store full"]
        return None

    def _owned(self, name, client):
        """The [balance, owner] of ``name`` when ``client`` owns it, else a failed result
        (whose first item is False, never a balance)."""
        entry = self.account(name) if is_name(name) else None
        if entry is None:
            return [False, "no such account"]
        if entry[1] != client:
            return [False, "not owner"]
        return entry

    def _set_balance(self, name, entry, balance):
        self.store.put("a" + name, [balance, entry[1]])

    def execute(self, op, client, replica=-1):
        """Apply one op sent by ``client`` and return its result [ok, value]. ``replica`` is
        the id of the replica whose own client id sent the op (-1 for an ordinary client):
        only replicas accuse."""
        if type(op) is not list or not op or type(op[0]) is not str:
            return [False, "bad op"]
        name = op[0]
        if name == "get" and len(op) == 2 and is_name(op[1]):
            return [True, self.get(op[1])]
        if name == "put" and len(op) == 3 and is_name(op[1]):
            return self._put(op[1], op[2])
        if name == "balance" and len(op) == 2 and is_name(op[1]):
            return [True, self.balance(op[1])]
        if name == "account" and len(op) == 2 and is_name(op[1]):
            return [True, self.account(op[1])]
        if len(op) == 4:  # in a helper: here the three operands would take this frame, run
            return self._execute3(name, client, op)  # per request, over 11 slots (cbor.py)
        if name == "open" and len(op) == 2:
            return self._open(client, op[1])
        if name == "delegations" and len(op) == 2 and is_name(op[1]):
            return [True, self._delegations(op[1])]
        if name == "validators" and len(op) == 1:
            return [True, [self.epoch, self.validators, self.bonds]]
        if name == "accuse" and len(op) == 2 and replica >= 0:
            return self._accuse(replica, op[1])
        return [False, "bad op"]

    def _execute3(self, name, client, op):
        """execute() of an op with three operands."""
        if name == "transfer":
            return self._transfer(client, op[1], op[2], op[3])
        if name == "stake":
            return self._stake(client, op[1], op[2], op[3])
        if name == "unstake":
            return self._unstake(client, op[1], op[2], op[3])
        return [False, "bad op"]

    def _delegations(self, name):
        """[validator, amount] of each non-zero delegation of account ``name``."""
        held = [[v, self.delegation(v, name)] for v in range(len(self.bonds))]
        return [d for d in held if d[1]]

    def _put(self, key, value):
        if len(cbor.encode(value)) > VALUE_BYTES_MAX:
            return [False, "value too large"]
        refused = self._room("k" + key)
        if refused:
            return refused
        self.store.put("k" + key, value)
        return [True, None]

    def _open(self, client, name):
        if not is_name(name):
            return [False, "bad open"]
        if self.account(name) is not None:
            return [False, "account exists"]
        refused = self._room("a" + name)
        if refused:
            return refused
        self.store.put("a" + name, [0, client])
        return [True, None]

    def _transfer(self, client, src, dst, amount):
        if not (is_name(src) and is_name(dst)) or not is_amount(amount):
            return [False, "bad transfer"]
        entry = self._owned(src, client)
        if entry[0] is False:
            return entry
        if entry[0] < amount:
            return [False, "insufficient funds"]
        target = self.account(dst)
        if target is None:
            return [False, "no such account"]
        if src == dst:
            return [True, entry[0]]
        refused = self._room("a" + src, "a" + dst)
        if refused:
            return refused
        self._set_balance(src, entry, entry[0] - amount)
        self._set_balance(dst, target, target[0] + amount)
        return [True, entry[0] - amount]

    def _validator(self, v):
        return type(v) is int and 0 <= v < len(self.bonds)

    def _stake(self, client, name, validator, amount):
        if not (is_name(name) and self._validator(validator)) or not is_amount(amount):
            return [False, "bad stake"]
        entry = self._owned(name, client)
        if entry[0] is False:
            return entry
        if entry[0] < amount:
            return [False, "insufficient funds"]
        key = "d%d:%s" % (validator, name)
        refused = self._room(key, "a" + name)
        if refused:
            return refused
        self._set_balance(name, entry, entry[0] - amount)
        self.store.put(key, [self.delegation(validator, name) + amount,
                             self.slashes[validator]])
        self.bonds[validator] += amount
        return [True, self.bonds[validator]]

    def _unstake(self, client, validator, name, amount):
        if not (is_name(name) and self._validator(validator)) or not is_amount(amount):
            return [False, "bad unstake"]
        entry = self._owned(name, client)
        if entry[0] is False:
            return entry
        delegated = self.delegation(validator, name)
        if delegated < amount:
            return [False, "insufficient stake"]
        if sum(self.bonds) == amount:
            return [False, "last stake"]  # the set never becomes empty
        key = "u%d" % self.unbond_tail
        refused = self._room(key)
        if refused:
            return refused
        self.store.put("d%d:%s" % (validator, name),
                       [delegated - amount, self.slashes[validator]])
        self.bonds[validator] -= amount
        self.store.put(key, [validator, name, amount,
                             self.checkpoints + UNBONDING_CHECKPOINTS])
        self.unbond_tail += 1
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
                self._slash(x)
                slashed.append(x)
            else:
                self.accusers[x] = accusers
        return [True, slashed]

    def _slash(self, x):
        """Burn validator ``x``'s bond, its delegations (void from now: slashes[x] moves on)
        and the tokens unbonding from it."""
        self.bonds[x] = 0
        self.slashes[x] += 1
        self.accusers.pop(x, None)
        for n in range(self.unbond_head, self.unbond_tail):
            u = self.store.get("u%d" % n)
            if u[0] == x and u[2]:
                self.store.put("u%d" % n, [u[0], u[1], 0, u[3]])

    def end_epoch(self, seq):
        """At checkpoint ``seq``: return the unbondings due to their accounts, then put the
        bonds in force. True when the validator set changed (a new epoch from ``seq`` on; its
        accusations start afresh)."""
        self.checkpoints += 1
        while self.unbond_head < self.unbond_tail:
            key = "u%d" % self.unbond_head
            u = self.store.get(key)
            if u[3] > self.checkpoints:
                break  # the queue is in release order
            if u[2]:
                entry = self.account(u[1])
                assert entry is not None  # it was its delegator's, and accounts stay
                self._set_balance(u[1], entry, entry[0] + u[2])
            self.store.delete(key)
            self.unbond_head += 1
        if self.bonds == self.validators:
            return False
        self.validators = list(self.bonds)
        self.epoch += 1
        self.since = seq
        self.accusers = {}
        return True

    def small_state(self):
        """What the checkpoint record holds besides the store: [digest, epoch, since,
        validators, bonds, [[offender, [accuser...]]...] sorted, slashes, checkpoints,
        unbond_head, unbond_tail, funded]."""
        return [self.digest, self.epoch, self.since, self.validators, self.bonds,
                sorted([x, a] for x, a in self.accusers.items()), self.slashes,
                self.checkpoints, self.unbond_head, self.unbond_tail, self.funded]

    def load_small(self, small):
        """Adopt a small_state() (checked by the caller's digest); the store is the caller's."""
        self.digest, self.epoch, self.since = small[0], small[1], small[2]
        self.validators = list(small[3])
        self.bonds = list(small[4])
        self.accusers = {}
        for x, accusers in small[5]:
            self.accusers[x] = accusers
        self.slashes = list(small[6])
        self.checkpoints, self.unbond_head, self.unbond_tail = small[7], small[8], small[9]
        self.funded = small[10]

    def commit_batch(self, seq, batch_digest, results):
        """Fold one executed batch into the history digest; return the new digest."""
        h = hashlib.sha256(self.digest)
        h.update(struct.pack(">Q", seq))
        h.update(batch_digest)
        h.update(hashlib.sha256(cbor.encode(results)).digest())
        self.digest = h.digest()
        return self.digest
