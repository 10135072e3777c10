"""Closed-loop clients that submit ledger operations to a cluster over MQTT and time them.

Each logical client (``edgebft.protocol.client.ClientCore``) keeps one request outstanding:
it publishes on ``ebft/<c>/req/<client>``, collects replies on ``ebft/<c>/rep/<client>`` and
accepts a result once matching authentic replies carry more than 1/3 of stake. It retransmits
after ``retransmit_s`` (doubling) and gives up at ``deadline_s``: the request is then
``timeout``. Latency runs from the first send to acceptance.

All logical clients share one paho-mqtt connection; paho's network thread runs the callbacks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho

from edgebft.keys import ClusterKeys
from edgebft.protocol.client import ClientCore
from edgebft.protocol.stake import Stake

RETRANSMIT_S = 0.5
DEADLINE_S = 2.0  # DESIGN.md section 8: availability counts requests within a 2 s deadline
ACCOUNTS = 16
GENESIS_BALANCE = 1_000_000


def genesis(accounts: int = ACCOUNTS) -> dict[str, int]:
    """The initial balances the workload's transfers draw on."""
    return {f"acct{a}": GENESIS_BALANCE for a in range(accounts)}


def operation(client: int, i: int) -> list[Any]:
    """The i-th operation of ``client``: a rotating mix of transfer, put and get."""
    kind = i % 3
    if kind == 0:
        src, dst = client % ACCOUNTS, (client + 1) % ACCOUNTS
        return ["transfer", f"acct{src}", f"acct{dst}", 1]
    key = f"k{client % 64}"
    if kind == 1:
        return ["put", key, i]
    return ["get", key]


@dataclass
class Outcome:
    """One finished request: ``ok`` or ``timeout``, with host timestamps (time.time())."""

    client: int
    timestamp: int
    op: str
    outcome: str
    start: float
    end: float
    sends: int
    view: int

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1000.0


@dataclass
class _Outstanding:
    op: list[Any]
    start_mono: float
    start_wall: float
    next_send: float
    backoff: float
    sends: int = 1


@dataclass
class Workload:
    """Drives ``clients`` closed-loop clients against cluster ``cluster`` until ``stop()``."""

    host: str
    port: int
    cluster: str
    stake: Stake
    keys: ClusterKeys
    clients: int
    retransmit_s: float = RETRANSMIT_S
    deadline_s: float = DEADLINE_S
    on_outcome: Callable[[Outcome], None] | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Timestamps start at the host's clock in microseconds, so a later workload with the
        # same client ids is never mistaken for old, already-executed requests.
        first = time.time_ns() // 1000
        self._cores = [ClientCore(c, self.stake, self.keys.client_keys(c), timestamp=first)
                       for c in range(self.clients)]
        self._outstanding: dict[int, _Outstanding] = {}
        self._issued = [0] * self.clients
        self._lock = threading.Lock()
        self._issuing = False
        self._closed = threading.Event()
        self._timer: threading.Thread | None = None
        self._mqtt = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                 client_id=f"ebft-{self.cluster}-workload")
        self._mqtt.on_message = self._on_message
        self._subscribed = threading.Event()
        self._mqtt.on_subscribe = lambda *a: self._subscribed.set()

    def _topic(self, kind: str, client: int) -> str:
        return f"ebft/{self.cluster}/{kind}/{client}"

    def start(self) -> None:
        """Connect, subscribe to replies and start issuing requests."""
        self._mqtt.connect(self.host, self.port, keepalive=30)
        self._mqtt.loop_start()
        self._mqtt.subscribe(f"ebft/{self.cluster}/rep/+", qos=0)
        if not self._subscribed.wait(10):
            raise RuntimeError("workload: broker did not acknowledge the reply subscription")
        self._issuing = True
        self._timer = threading.Thread(target=self._tick_loop, daemon=True)
        self._timer.start()
        with self._lock:
            for c in range(self.clients):
                self._issue(c)

    def stop_issuing(self) -> None:
        """Issue no new requests; outstanding ones finish or time out."""
        self._issuing = False

    def outstanding(self) -> int:
        with self._lock:
            return len(self._outstanding)

    def drain(self, timeout_s: float) -> None:
        """Stop issuing and wait until every outstanding request has an outcome."""
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

    def _issue(self, c: int) -> None:
        op = operation(c, self._issued[c])
        self._issued[c] += 1
        now = time.monotonic()
        self._outstanding[c] = _Outstanding(op, now, time.time(), now + self.retransmit_s,
                                            self.retransmit_s)
        self._mqtt.publish(self._topic("req", c), self._cores[c].request(op))

    def _finish(self, c: int, outcome: str) -> None:
        pending = self._outstanding.pop(c)
        core = self._cores[c]
        elapsed = time.monotonic() - pending.start_mono if outcome == "ok" else self.deadline_s
        done = Outcome(c, core.timestamp, pending.op[0], outcome, pending.start_wall,
                       pending.start_wall + elapsed, pending.sends, core.view)
        self.outcomes.append(done)
        if self.on_outcome:
            self.on_outcome(done)
        if self._issuing:
            self._issue(c)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            c = int(msg.topic.rsplit("/", 1)[1])
        except ValueError:
            return
        with self._lock:
            if c not in self._outstanding or c >= self.clients:
                return
            accepted, _result = self._cores[c].on_reply(msg.payload)
            if accepted:
                self._finish(c, "ok")

    def _tick_loop(self) -> None:
        while not self._closed.wait(0.01):
            now = time.monotonic()
            with self._lock:
                for c, pending in list(self._outstanding.items()):
                    if now - pending.start_mono >= self.deadline_s:
                        self._finish(c, "timeout")
                    elif now >= pending.next_send:
                        pending.backoff *= 2
                        pending.next_send = now + pending.backoff
                        pending.sends += 1
                        self._mqtt.publish(self._topic("req", c),
                                           self._cores[c].request_wire(pending.op))
