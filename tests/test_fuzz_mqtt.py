"""Fuzzing the receive path of the node's MQTT client (firmware/mqtt.py) on real MicroPython
(issue 12): every byte from the broker is hostile input. A stream of packets, valid ones
mutated and garbage, arrives in chunks of any size; the parser must only ever raise the
errors that mean "drop this connection and reconnect" (MQTTError, EOFError), never anything
that would leave the node's loop, and it must hand on_message only what it parsed whole.

CASES streams per run, drawn from a seed on the device (MicroPython's random), so a failure
prints the seed that replays it; EDGEBFT_FUZZ_EXAMPLES runs more.
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import run_mp

CASES = int(os.environ.get("EDGEBFT_FUZZ_EXAMPLES", "2000"))

HARNESS = r'''
import random
from edgebft.firmware.mqtt import MQTTClient, MQTTError

CASES = %d
got = [0]

def on_message(topic, payload, retain):
    assert type(topic) is bytes
    bytes(payload)  # the whole payload is there to read
    got[0] += 1

def packet(r):
    """A PUBLISH, PUBACK, SUBACK, PINGRESP or CONNACK, maybe mutated, or garbage."""
    kind = r.getrandbits(3)
    if kind < 3:
        topic = bytes(r.getrandbits(8) for _ in range(r.getrandbits(4)))
        payload = bytes(r.getrandbits(8) for _ in range(r.getrandbits(6)))
        qos = r.getrandbits(1)
        var = bytes([len(topic) >> 8, len(topic) & 255]) + topic
        var += (b"\x00\x07" if qos else b"") + payload
        head = bytes([0x30 | qos << 1 | r.getrandbits(1)])
    elif kind == 3:
        head, var = b"\x40", bytes([0, r.getrandbits(8)])
    elif kind == 4:
        head, var = b"\x90", bytes([0, r.getrandbits(8), r.getrandbits(8)])
    elif kind == 5:
        head, var = b"\xd0", b""
    elif kind == 6:
        head, var = b"\x20", bytes([0, r.getrandbits(3)])
    else:
        return bytes(r.getrandbits(8) for _ in range(1 + r.getrandbits(5)))
    n = len(var)
    length = bytearray()
    while True:
        b = n & 127
        n >>= 7
        length.append(b | (128 if n else 0))
        if not n:
            break
    data = bytearray(head + length + var)
    for _ in range(r.getrandbits(2) if r.getrandbits(2) == 0 else 0):  # now and then a flip
        data[r.getrandbits(16) %% len(data)] ^= 1 << r.getrandbits(3)
    return bytes(data)

bad = 0
for case in range(CASES):
    r = random
    random.seed(case)
    c = MQTTClient("fuzz", "127.0.0.1", on_message=on_message, max_packet=2048, rx_chunk=256,
                   tx_max=512)
    stream = b"".join(packet(r) for _ in range(1 + r.getrandbits(3)))
    i = 0
    try:
        while i < len(stream):
            target = c._rx_target()
            k = min(len(target), 1 + r.getrandbits(7), len(stream) - i)
            target[0:k] = stream[i:i + k]
            c._rx(k)
            i += k
    except (MQTTError, EOFError):
        pass
    except Exception as e:
        bad += 1
        print("FAIL seed %%d: %%r on %%r" %% (case, e, stream[:64]))
print("cases %%d, failures %%d, messages %%d" %% (CASES, bad, got[0]))
'''


def test_the_receive_path_only_raises_reconnect_errors(micropython: Path, mp_lib: Path) -> None:
    done = run_mp(micropython, mp_lib, HARNESS % CASES, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"cases {CASES}, failures 0,"), done.stdout[-3000:]
    assert int(last.rsplit(" ", 1)[1]) > CASES // 10, "published messages got through"


def test_found_a_topic_that_is_no_utf8_is_handed_on_as_bytes(micropython: Path,
                                                             mp_lib: Path) -> None:
    """Found by the harness above: a PUBLISH whose topic is not UTF-8 raised UnicodeError out
    of the reader, which hands anything but a connection error to the node's loop (a node
    crash). Topics are now handed on as bytes, never decoded: such a topic arrives as it was
    sent (it matches none of a node's topics), the QoS 1 one is acknowledged, nothing
    raises."""
    code = r'''
from edgebft.firmware.mqtt import MQTTClient
got = []
c = MQTTClient("t", "127.0.0.1", on_message=lambda t, p, r: got.append(t), rx_chunk=256)
for packet in (b"\x30\x05\x00\x02\xff\xfeX", b"\x32\x07\x00\x02\xc3\x28\x00\x07X",
               b"\x30\x05\x00\x02okX"):
    c._rx_target()[0:len(packet)] = packet
    c._rx(len(packet))
print(got, c.rx_dropped, c.rx_msgs, bytes(c._tbuf[:c._tlen]))
'''
    done = run_mp(micropython, mp_lib, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[b'\\xff\\xfe',", "b'\\xc3(',", "b'ok']", "0", "3",
                                   "b'@\\x02\\x00\\x07'"], "the PUBACK of packet 7 queued"
