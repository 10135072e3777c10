"""Clients that submit ledger operations to a cluster over MQTT and time them.

Each logical client (``edgebft.protocol.client.ClientCore``, one client id) keeps at most one
request outstanding: it publishes on ``ebft/<c>/req/<client>``, collects replies on
``ebft/<c>/rep/<client>`` and accepts a result once matching authentic replies carry more than
1/3 of stake. It sends it again when ClientCore's retransmission timer says (from the round
trips that client measured, doubling per retransmission).

Two ways to load the cluster, with one dispatcher: requests wait in a backlog, each with its
*intended* send time, and an idle client id takes the oldest one and sends it.

* Closed loop (``rate=None``): each of ``clients`` ids sends a request, and the next one the
  moment the previous one has an outcome (its intended time is that moment).
* Open loop (``rate=R``): R requests per second in total are intended on a fixed schedule
  (the k-th at ``k / R`` s after ``start()``), whether or not replies come; the ``clients`` ids
  are a pool, and when all are busy a request waits in the backlog.

Latency runs from the intended send time to acceptance, so time spent waiting for an idle id
counts (no coordinated omission). A request has ``deadline_s`` from its intended time: then it
is ``timeout``, whether it was sent or still waiting (then with ``sends`` 0 and no client), and
a quorum of replies that comes later does not make it ``ok``.

All logical clients share one paho-mqtt connection; paho's network thread runs the reply
callbacks, one timer thread the retransmissions, deadlines and the open-loop schedule.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho

from edgebft.devices.keys import ClusterKeys
from edgebft.lab.broker import PLAIN, RECONNECT_MAX_S, RECONNECT_MIN_S, Login
from edgebft.protocol.client import ClientCore
from edgebft.protocol.stake import Stake

DEADLINE_S = 2.0  # DESIGN.md section 8: availability counts requests within a 2 s deadline
ACCOUNTS = 16  # accounts the transfers go to, by default
FUNDED_ACCOUNTS = 1024  # genesis funds acct0 .. acct1023, acct<c> owned by client c
KEYS = 64  # keys the puts and gets spread over, by default
GENESIS_BALANCE = 1_000_000
TICK_S = 0.005  # the timer thread's period: retransmissions, deadlines, the open-loop schedule


def genesis() -> dict[str, list[int]]:
    """The genesis the workload's transfers draw on: a range (protocol/ledger.py) funding
    acct0 .. acct<FUNDED_ACCOUNTS - 1>, each owned by the client of its number."""
    return {"acct*": [FUNDED_ACCOUNTS, GENESIS_BALANCE]}


@dataclass(frozen=True)
class Mix:
    """Weights of the operations a workload issues: transfers, puts and gets, in turn."""

    put: int = 1
    get: int = 1
    transfer: int = 1

    @classmethod
    def parse(cls, text: str) -> Mix:
        """``PUT:GET:TRANSFER`` weights, e.g. ``8:1:1``; ValueError when not that."""
        try:
            put, get, transfer = (int(w) for w in text.split(":"))
        except ValueError:
            raise ValueError(f"--mix {text!r}: want PUT:GET:TRANSFER, e.g. 1:1:1") from None
        if min(put, get, transfer) < 0 or put + get + transfer == 0:
            raise ValueError(f"--mix {text!r}: weights must be >= 0, not all 0")
        return cls(put, get, transfer)

    def kinds(self) -> list[str]:
        return ["transfer"] * self.transfer + ["put"] * self.put + ["get"] * self.get


def operation(client: int, i: int, keys: int = KEYS, accounts: int = ACCOUNTS,
              mix: Mix = Mix()) -> list[Any]:
    """The i-th operation of ``client``: the kinds of ``mix`` in turn (default: transfer, put,
    get), the puts and gets spread over ``keys`` keys (a client's i-th put writes the key its
    i-th get reads), the transfers from the client's own account acct<client> (genesis funds
    those of clients below FUNDED_ACCOUNTS; above, the ledger answers "no such account") to
    one of acct0 .. acct<accounts - 1>."""
    kinds = mix.kinds()
    kind, turn = kinds[i % len(kinds)], i // len(kinds)
    if kind == "transfer":
        dst = (client * 7919 + turn * 104729) % accounts
        return ["transfer", f"acct{client}", f"acct{dst}", 1]
    key = f"k{(client * 7919 + turn * 104729) % keys}"
    if kind == "put":
        return ["put", key, i]
    return ["get", key]


@dataclass
class Outcome:
    """One finished request, ``ok`` or ``timeout``, with host times (time.time() seconds).

    ``start`` is the intended send time, ``sent`` the first actual send (None when it never
    left the backlog), ``end`` the acceptance (``start + deadline`` for a timeout). ``client``,
    ``timestamp`` and ``op`` are None for a request that was never sent. ``refused`` is the
    ledger's reason when it executed the op and refused it (an ``ok`` outcome: committed).
    """

    client: int | None
    timestamp: int | None
    op: str | None
    outcome: str
    start: float
    sent: float | None
    end: float
    sends: int
    view: int
    refused: str | None = None

    @property
    def latency_ms(self) -> float:
        """From the intended send time to acceptance (the deadline for a timeout)."""
        return (self.end - self.start) * 1000.0


@dataclass
class _Outstanding:
    op: list[Any]
    intended: float  # monotonic
    sent: float  # monotonic


@dataclass
class Workload:
    """Loads cluster ``cluster`` through ``clients`` client ids until ``stop_issuing()``:
    closed loop, or open loop at ``rate`` requests per second (see the module)."""

    host: str
    port: int
    cluster: str
    stake: Stake
    keys: ClusterKeys
    clients: int
    rate: float | None = None
    keyspace: int = KEYS  # keys the puts and gets spread over
    accounts: int = ACCOUNTS  # accounts the transfers spread over
    mix: Mix = Mix()
    ops: Callable[[int, int], list[Any]] | None = None  # (client, i) -> op; None: operation()
    deadline_s: float = DEADLINE_S
    login: Login = PLAIN  # the host's identity on a broker with ACLs; TLS on one with TLS
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"clients must be at least 1, got {self.clients}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if self.keyspace < 1:
            raise ValueError(f"keyspace must be at least 1, got {self.keyspace}")
        # Timestamps start at the host's clock in microseconds, so a later workload with the
        # same client ids is never mistaken for old, already-executed requests.
        first = time.time_ns() // 1000
        self._cores = [ClientCore(c, self.stake, self.keys.client_keys(c), timestamp=first)
                       for c in range(self.clients)]
        self._outstanding: dict[int, _Outstanding] = {}
        self._idle = deque(range(self.clients))
        self._backlog: deque[float] = deque()  # intended send times (monotonic), oldest first
        self._issued = [0] * self.clients
        self._scheduled = 0  # open loop: requests put on the schedule so far
        self._lock = threading.Lock()
        self._issuing = False
        self._closed = threading.Event()
        self._timer: threading.Thread | None = None
        self._mono0 = time.monotonic()
        self._wall0 = time.time()
        self._mqtt = self.login.client(f"ebft-{self.cluster}-workload")
        self._mqtt.on_message = self._on_message
        self._mqtt.on_connect = self._on_connect
        self._mqtt.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)  # type: ignore[arg-type]
        self._subscribed = threading.Event()
        self._mqtt.on_subscribe = lambda *a: self._subscribed.set()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        """Subscribe to the replies on every connection: a broker that restarted, or a
        reconnection with a clean session, has forgotten the subscription."""
        if not reason.is_failure:
            client.subscribe(f"ebft/{self.cluster}/rep/+", qos=0)

    def _topic(self, kind: str, client: int) -> str:
        return f"ebft/{self.cluster}/{kind}/{client}"

    def _wall(self, mono: float) -> float:
        return self._wall0 + (mono - self._mono0)

    def start(self) -> None:
        """Connect, subscribe to replies and start issuing requests."""
        self._mqtt.connect(self.host, self.port, keepalive=30)
        self._mqtt.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("workload: broker did not acknowledge the reply subscription")
        with self._lock:
            self._mono0, self._wall0 = time.monotonic(), time.time()
            self._issuing = True
            if self.rate is None:
                self._backlog.extend([self._mono0] * self.clients)
            self._dispatch(self._mono0)
        self._timer = threading.Thread(target=self._tick_loop, daemon=True)
        self._timer.start()

    def stop_issuing(self) -> None:
        """Intend no new requests; those intended already are still sent, and finish or time
        out."""
        with self._lock:
            self._issuing = False

    def outstanding(self) -> int:
        """Requests without an outcome yet: sent, or waiting for an idle client id."""
        with self._lock:
            return len(self._outstanding) + len(self._backlog)

    def queued(self) -> int:
        """Requests waiting for an idle client id."""
        with self._lock:
            return len(self._backlog)

    def drain(self, timeout_s: float) -> None:
        """Stop issuing and wait until every intended request has an outcome."""
        self.stop_issuing()
        end = time.monotonic() + timeout_s
        while self.outstanding() and time.monotonic() < end:
            time.sleep(0.02)

    def close(self) -> None:
        self._issuing = False
        self._closed.set()
        self._mqtt.loop_stop()
        self._mqtt.disconnect()

    # paho's network thread and the timer thread call these; self._lock serialises them.

    def _dispatch(self, now: float) -> None:
        """Expire backlog requests past their deadline, then give the oldest waiting requests
        to idle client ids and send them."""
        while self._backlog and now - self._backlog[0] >= self.deadline_s:
            intended = self._wall(self._backlog.popleft())
            self.outcomes.append(Outcome(None, None, None, "timeout", intended, None,
                                         intended + self.deadline_s, 0, 0))
        while self._backlog and self._idle:
            c = self._idle.popleft()
            op = (self.ops(c, self._issued[c]) if self.ops is not None
                  else operation(c, self._issued[c], self.keyspace, self.accounts, self.mix))
            self._issued[c] += 1
            self._outstanding[c] = _Outstanding(op, self._backlog.popleft(), now)
            core = self._cores[c]
            self._mqtt.publish(self._topic("req", c), core.request(op))
            core.sent(now * 1000.0)

    def _finish(self, c: int, outcome: str, now: float, result: Any = None) -> None:
        pending = self._outstanding.pop(c)
        core = self._cores[c]
        end = now if outcome == "ok" else pending.intended + self.deadline_s
        refused = (str(result[1]) if isinstance(result, list) and len(result) == 2
                   and result[0] is False else None)
        self.outcomes.append(Outcome(c, core.timestamp, pending.op[0], outcome,
                                     self._wall(pending.intended), self._wall(pending.sent),
                                     self._wall(end), core.sends, core.view, refused))
        self._idle.append(c)
        if self._issuing and self.rate is None:
            self._backlog.append(now)
        self._dispatch(now)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            c = int(msg.topic.rsplit("/", 1)[1])
        except ValueError:
            return
        with self._lock:
            if c not in self._outstanding:
                return
            now = time.monotonic()
            accepted, result = self._cores[c].on_reply(msg.payload, now * 1000.0)
            if accepted:
                late = now - self._outstanding[c].intended >= self.deadline_s
                self._finish(c, "timeout" if late else "ok", now, result)

    def _schedule(self, now: float) -> None:
        """Open loop: put every request whose intended time has come into the backlog."""
        assert self.rate is not None
        while self._issuing and (due := self._mono0 + self._scheduled / self.rate) <= now:
            self._backlog.append(due)
            self._scheduled += 1

    def _tick_loop(self) -> None:
        wait = TICK_S
        while not self._closed.wait(wait):
            now = time.monotonic()
            with self._lock:
                for c, pending in list(self._outstanding.items()):
                    if now - pending.intended >= self.deadline_s:
                        self._finish(c, "timeout", now)
                    elif (core := self._cores[c]).retransmit_due(now * 1000.0):
                        self._mqtt.publish(self._topic("req", c), core.request_wire(pending.op))
                        core.sent(now * 1000.0)
                if self.rate is not None:
                    self._schedule(now)
                self._dispatch(now)
                wait = TICK_S
                if self.rate is not None and self._issuing:  # wake for the next intended time
                    due = self._mono0 + self._scheduled / self.rate
                    wait = min(TICK_S, max(0.0, due - time.monotonic()))
