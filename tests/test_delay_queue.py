"""A delay fault's queue (firmware/faults.py, run here on CPython): what it holds is
released in due order, and a message the MQTT client refuses (its batch buffer full behind a
backlog) stays held, with those after it, for the next tick instead of being lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgebft.firmware.faults import Faults
from edgebft.protocol import auth, cbor
from edgebft.protocol import messages as m

CONTROL_KEY = b"k" * 32


def delayed_by(ms: int) -> Faults:
    faults = Faults(0, CONTROL_KEY)
    body = cbor.encode([1, m.CONTROL, m.HOST, 1, "delay", [ms, 0]])
    assert faults.on_control(body + auth.Mac(CONTROL_KEY).tag(body)) == "delay"
    return faults


def test_a_refused_release_keeps_the_message_and_those_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the control nonce is saved in the working folder
    faults = delayed_by(100)
    for t, topic in enumerate([b"a", b"b", b"c", b"d"]):
        assert faults.hold(t, topic, b"wire-" + topic)
    sent: list[bytes] = []
    room = [2]  # the client takes two, then its buffer is full

    def publish(topic: bytes, wire: bytes) -> bool:
        if room[0] == 0:
            return False
        room[0] -= 1
        sent.append(topic)
        return True

    faults.release(99, publish)
    assert sent == [], "nothing is due before its delay"
    faults.release(103, publish)
    assert sent == [b"a", b"b"], "due in order until the client refuses one"
    assert [e[1] for e in faults.delayed] == [b"c", b"d"]
    room[0] = 10
    faults.release(103, publish)
    assert sent == [b"a", b"b", b"c", b"d"]
    assert faults.delayed == [] and faults.delayed_bytes == 0
    assert faults.dropped == 0
