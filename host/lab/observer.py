"""Watch a cluster's status topics and check safety from what the nodes report.

Nodes publish a retained CBOR status map on ``ebft/<c>/status/<i>`` (see firmware/runtime.py)
with their last executed sequence and its ledger digest, and the digests of their newest
checkpoints. The ledger digest is a hash chain over executed batches, so two nodes that report
the same digest at a sequence executed the same batches in the same order up to it; a different
digest at one sequence is a safety violation. The observer records every (sequence, digest)
any node reports and flags a sequence with two digests.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import cbor2
import paho.mqtt.client as paho

from edgebft.check.verdict import Check
from edgebft.devices.keys import ClusterKeys
from edgebft.lab.broker import PLAIN, RECONNECT_MAX_S, RECONNECT_MIN_S, Login
from edgebft.protocol import auth
from edgebft.protocol import messages as m
from edgebft.protocol.node import fresh_stamp


def status_macs(keys: ClusterKeys) -> list[auth.Mac]:
    """Per node, the Mac its next replica checks its statuses with (the host's copy of their
    pairwise key): what verified_status() takes."""
    return [auth.Mac(keys.pairwise[i][(i + 1) % keys.n]) for i in range(keys.n)]


def verified_status(payload: bytes, node: int, macs: list[auth.Mac]) -> m.Message | None:
    """Node ``node``'s HEARTBEAT or OFFLINE in ``payload`` when authentic (checked as its
    next replica checks it, ``macs`` from status_macs()), else None."""
    try:
        msg = m.decode(payload)
    except m.MessageError:
        return None
    if msg.sender != node or msg.kind not in (m.HEARTBEAT, m.OFFLINE):
        return None
    if not auth.check(msg.auth, (node + 1) % len(macs), macs[node], msg.body):
        return None
    return msg


class Observer:
    """Collects node statuses of cluster ``cluster`` from the broker at ``host:port``: only
    authentic and fresh ones (the nodes' own rule, protocol/node.py); ``rejected`` counts
    the others (forgeries, replays, garbage)."""

    def __init__(self, host: str, port: int, cluster: str, nodes: int,
                 keys: ClusterKeys, login: Login = PLAIN) -> None:
        self.cluster = cluster
        self.nodes = nodes
        self._macs = status_macs(keys)
        self.stamps: dict[int, tuple[int, int, int]] = {}
        self.rejected = 0
        self.latest: dict[int, dict[str, Any]] = {}
        self.online: dict[int, bool] = {}
        self.digests: dict[int, dict[int, bytes]] = {}  # seq -> node -> digest
        self.heap_peak: dict[int, int] = {}
        self.events: list[tuple[float, int, list[Any]]] = []
        self._lock = threading.Lock()
        self._mqtt = login.client(f"ebft-{cluster}-observer-{os.urandom(3).hex()}")
        self._mqtt.on_message = self._on_message
        self._mqtt.on_connect = self._on_connect
        self._mqtt.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)  # type: ignore[arg-type]
        self._mqtt.connect(host, port, keepalive=30)
        self._mqtt.loop_start()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        """Subscribe on every connection: a broker that restarted has forgotten us."""
        if not reason.is_failure:
            client.subscribe([(f"ebft/{self.cluster}/status/+", 0),
                              (f"ebft/{self.cluster}/event/+", 0)])

    def close(self) -> None:
        self._mqtt.loop_stop()
        self._mqtt.disconnect()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        try:
            node = int(parts[3])
        except (IndexError, ValueError):
            return
        if parts[2] == "event":
            try:
                self.events.append((time.time(), node, cbor2.loads(msg.payload)))
            except (ValueError, cbor2.CBORDecodeError):
                pass
            return
        status = (verified_status(msg.payload, node, self._macs) if 0 <= node < self.nodes
                  else None)
        with self._lock:
            stamp = None if status is None else fresh_stamp(self.stamps.get(node), status)
            if stamp is None or (status.kind == m.HEARTBEAT
                                 and not isinstance(status.status, dict)):
                self.rejected += 1
                return
            self.stamps[node] = stamp
            if status.kind == m.OFFLINE:
                self.online[node] = False
            else:
                self._record(node, status.status)

    def _record(self, node: int, status: dict[str, Any]) -> None:
        status["received"] = time.time()
        self.latest[node] = status
        self.online[node] = True
        self.heap_peak[node] = max(self.heap_peak.get(node, 0), int(status.get("heap_peak", 0)))
        seen = [(status.get("last_exec", 0), status.get("digest"))]
        seen += [tuple(pair) for pair in status.get("checkpoints", [])]
        for seq, digest in seen:
            if seq and isinstance(digest, bytes):
                self.digests.setdefault(int(seq), {})[node] = digest

    def snapshot(self) -> dict[int, dict[str, Any]]:
        """The newest status of each node that has reported."""
        with self._lock:
            return {n: dict(s) for n, s in self.latest.items()}

    def wait_booted(self, boots: dict[int, int | None], timeout_s: float) -> list[int]:
        """Wait until each node in ``boots`` (node -> its boot count before a restart, None
        if unknown) reports online with another boot count; return those that did not
        within ``timeout_s`` (empty: all did)."""
        end = time.monotonic() + timeout_s
        while True:
            snap = self.snapshot()
            late = [n for n, before in boots.items()
                    if not (self.online.get(n) and n in snap
                            and snap[n].get("boots") != before)]
            if not late or time.monotonic() >= end:
                return late
            time.sleep(0.05)

    def wait_all_online(self, timeout_s: float, since: float = 0.0) -> bool:
        """Wait until every node has published a status after ``since`` (time.time())."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            snap = self.snapshot()
            if len(snap) == self.nodes and all(
                    s["received"] >= since and self.online.get(n) for n, s in snap.items()):
                return True
            time.sleep(0.05)
        return False

    def wait_converged(self, timeout_s: float, exclude: Iterable[int] = ()) -> bool:
        """Wait until every node but ``exclude`` (Byzantine ones: nothing is promised of
        them) reports the same last executed sequence and digest."""
        judged = set(range(self.nodes)) - set(exclude)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            snap = self.snapshot()
            heads = {(snap[n].get("last_exec"), snap[n].get("digest")) for n in judged
                     if n in snap}
            if judged <= set(snap) and len(heads) == 1:
                return True
            time.sleep(0.05)
        return False

    def violations(self) -> list[dict[str, Any]]:
        """Sequences at which two nodes reported different ledger digests."""
        with self._lock:
            bad = []
            for seq, by_node in sorted(self.digests.items()):
                if len(set(by_node.values())) > 1:
                    bad.append({"seq": seq, "digests": {n: d.hex() for n, d in by_node.items()}})
            return bad

    def safety_check(self) -> Check:
        """Safety as the digests the nodes reported show it: invalid at the first sequence
        number with two digests, unknown when no sequence was reported by two nodes."""
        bad = self.violations()
        if bad:
            first = bad[0]
            return Check("safety", False, f"seq {first['seq']}: nodes reported "
                                          f"{len(set(first['digests'].values()))} digests "
                                          f"({len(bad)} sequence(s) in all)")
        if self.sequences_compared() == 0:
            return Check("safety", None, "no sequence number was reported by two nodes")
        return Check("safety", True)

    def sequences_compared(self) -> int:
        """How many sequences at least two nodes reported (what the safety check rests on)."""
        with self._lock:
            return sum(1 for by_node in self.digests.values() if len(by_node) > 1)
