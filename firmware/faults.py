# Fault hooks and the authenticated control channel of a node (DESIGN.md section 4).
#
# Rules:
# - Commands arrive on ebft/<c>/ctl/<i> as CONTROL messages from the host, tagged with this
#   node's control key; a command is applied only if its tag verifies and its nonce is above
#   every nonce accepted before (the last one persists in flash, so a replay after a reboot
#   is refused too). Anything else is counted in `rejected` and changes nothing, as is a
#   command the node has no heap for (loading a Byzantine behaviour on a full heap).
# - reboot resets the node; oom fills its heap until an allocation fails, which the runtime
#   answers as it answers any MemoryError: it restarts the node in place from its flash.
# - Faults act on replica-to-replica traffic only, at the edge of the runtime: the protocol
#   code never knows. heal() undoes every fault.
# - Bounded: at most _DELAYED_MAX messages and _DELAYED_BYTES_MAX bytes (each message's wire plus
#   _ENTRY_BYTES of bookkeeping) wait in the delay queue; beyond it they are dropped. A loaded
#   primary delayed by a few hundred ms would otherwise fill a 100 KB heap with its backlog.
from random import getrandbits

from edgebft.firmware import store
from edgebft.protocol import auth
from edgebft.protocol import messages as m

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import bool, bytearray, getattr, int, len, list, str, tuple, type

try:
    from micropython import const
except ImportError:  # CPython
    const = int  # CPython: const(x) is x


NONCE_PATH = "nonce"
_DELAYED_MAX = const(64)
_DELAYED_BYTES_MAX = const(2048)
_ENTRY_BYTES = const(96)  # the entry list, its topic string, heap block rounding
_ID_MAX = const(0xFFFF)
_MS_MAX = const(3600000)  # delays, jitters and skews up to an hour


def _int(value, lo, hi):
    """``value`` when it is an int in lo..hi; ValueError otherwise (a command's argument is
    checked whole before it takes effect, so no hook meets a value of another type later)."""
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError("argument")
    return value


def _ids(value):
    """``value`` when it is a list of replica ids; ValueError otherwise."""
    if type(value) is not list:
        raise ValueError("ids")
    for j in value:
        _int(j, 0, _ID_MAX)
    return value


def _chance(permille):
    """True with probability permille / 1000, from 16 random bits."""
    return getrandbits(16) * 1000 < permille * 65536


class Faults:
    """The faults in force on one node, and its control-command checker."""

    def __init__(self, me, control_key):
        self.me = me
        self.mac = auth.Mac(control_key)
        self.nonce = store.load_int(NONCE_PATH)
        self.rejected = 0
        self.dropped = 0
        self.delayed = []  # [due_ms, topic, wire], due order
        self.delayed_bytes = 0
        self.heal()

    def heal(self):
        self.drop_permille = 0  # integers only: our CBOR has no floats
        self.drop_peers = None    # None: every peer
        self.delay_ms = 0
        self.jitter_ms = 0
        self.dup_permille = 0
        self.reachable = None     # None: no partition; else the replica ids we can talk to
        self.skew_ms = 0
        self.byzantine = None     # a behaviour of edgebft.protocol.byzantine, or None
        self.colluders = ()
        self.sent = []            # what "replay" replays

    def injected(self):
        """Whether any fault is in force."""
        return bool(self.drop_permille or self.delay_ms or self.dup_permille
                    or self.reachable is not None or self.skew_ms or self.byzantine)

    def describe(self):
        return {"drop_permille": self.drop_permille, "drop_peers": self.drop_peers,
                "delay_ms": self.delay_ms, "dup_permille": self.dup_permille,
                "jitter_ms": self.jitter_ms, "reachable": self.reachable,
                "skew_ms": self.skew_ms, "byzantine": self.byzantine}

    # ---- the control channel

    def on_control(self, wire):
        """Apply an authentic, fresh command; return its name, or None if rejected."""
        try:
            msg = m.decode(wire)
        except m.MessageError:
            msg = None
        if (msg is None or msg.kind != m.CONTROL or msg.sender != m.HOST
                or not auth.check(msg.auth, 0, self.mac, msg.body) or msg.nonce <= self.nonce):
            self.rejected += 1
            return None
        try:
            self._apply(msg.command, msg.args)
        except (ValueError, TypeError, IndexError, MemoryError):
            self.rejected += 1  # MemoryError: no heap to load a behaviour; the node goes on
            return None
        self.nonce = msg.nonce
        store.save_int(msg.nonce, NONCE_PATH)
        if msg.command == "reboot":
            _reset()  # after the nonce is in flash: a replay after the reset is refused
        if msg.command == "oom":
            _exhaust()
        return msg.command

    def _apply(self, command, args):
        if command == "heal":
            self.heal()
        elif command == "omission":  # [permille, [peers...] or null]
            permille = _int(args[0], 0, 1000)
            peers = _ids(args[1]) if len(args) > 1 and args[1] is not None else None
            self.drop_permille, self.drop_peers = permille, peers
        elif command == "delay":  # [ms, jitter ms]
            ms = _int(args[0], 0, _MS_MAX)
            jitter = _int(args[1], 0, _MS_MAX) if len(args) > 1 else 0
            self.delay_ms, self.jitter_ms = ms, jitter
        elif command == "duplicate":  # [permille]
            self.dup_permille = _int(args[0], 0, 1000)
        elif command == "partition":  # [[ids in our group...]]
            self.reachable = _ids(args[0])
        elif command == "skew":  # [ms]
            self.skew_ms = _int(args[0], -_MS_MAX, _MS_MAX)
        elif command == "byzantine":  # [behaviour, [colluders...]]
            from edgebft.protocol.byzantine import BEHAVIOURS  # only when asked: heap
            if type(args[0]) is not str or args[0] not in BEHAVIOURS:
                raise ValueError("behaviour")
            self.colluders = tuple(_ids(args[1])) if len(args) > 1 else ()
            self.byzantine = args[0]
        elif command in ("reboot", "oom"):
            pass  # on_control acts once the nonce is saved
        else:
            raise ValueError("unknown command")

    # ---- hooks

    def drop(self, peer):
        """Should a message to or from replica ``peer`` be lost now?"""
        if self.reachable is not None and peer not in self.reachable:
            self.dropped += 1
            return True
        if self.drop_permille and (self.drop_peers is None or peer in self.drop_peers):
            if _chance(self.drop_permille):
                self.dropped += 1
                return True
        return False

    def copies(self):
        """How many times to publish an outbound message now: 2 with a duplicate fault's
        chance, else 1."""
        return 2 if self.dup_permille and _chance(self.dup_permille) else 1

    def hold(self, now_ms, topic, wire):
        """Queue an outbound message when a delay is in force; True if it was taken. (Runs per
        message sent: the rest is in _hold, and this frame stays within 11 slots.)"""
        if not self.delay_ms and not self.jitter_ms:
            return False
        return self._hold(now_ms, topic, wire)

    def _hold(self, now_ms, topic, wire):
        cost = len(wire) + _ENTRY_BYTES
        if len(self.delayed) >= _DELAYED_MAX or self.delayed_bytes + cost > _DELAYED_BYTES_MAX:
            self.dropped += 1
            return True
        extra = getrandbits(16) % (self.jitter_ms + 1) if self.jitter_ms else 0
        due = now_ms + self.delay_ms + extra
        i = len(self.delayed)
        while i and self.delayed[i - 1][0] > due:
            i -= 1
        self.delayed.insert(i, [due, topic, wire])
        self.delayed_bytes += cost
        return True

    def misbehave(self, replica):
        """Rewrite the replica's outbox when a Byzantine behaviour is in force."""
        if self.byzantine is not None:
            from edgebft.protocol.byzantine import misbehave
            misbehave(replica, self.byzantine, getrandbits, self.colluders, self.sent)

    def release(self, now_ms, publish):
        """Hand the delayed messages that are due to ``publish(topic, wire)``, in due order,
        while it takes them (True). One it refuses (the MQTT client's batch buffer full
        behind a backlog, or the link down; the client counts it in tx_dropped) stays held,
        with those after it, for the next call: a delay fault delays what it held, and the
        burst a delay releases at once is not lost to a full buffer."""
        delayed = self.delayed
        while delayed and delayed[0][0] <= now_ms:
            entry = delayed[0]
            if not publish(entry[1], entry[2]):
                return
            delayed.pop(0)
            self.delayed_bytes -= len(entry[2]) + _ENTRY_BYTES


def _exhaust():
    """Fill the heap until an allocation fails: the MemoryError a leak or a fragmented heap
    ends in, raised to the runtime, which restarts the node in place (runtime.run_lives)."""
    hog = []
    while True:
        hog.append(bytearray(1024))


def _reset():
    """Reset the board (machine.reset). The Unix port has no reset: soft_reset raises
    SystemExit, the process ends, and the host boots the node again from its image."""
    import machine
    getattr(machine, "reset", machine.soft_reset)()

