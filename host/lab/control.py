"""Authenticated control commands to nodes (``ebft/<c>/ctl/<i>``; firmware/faults.py)."""

from __future__ import annotations

import time
from typing import Any

from edgebft.lab.broker import PLAIN, Login
from edgebft.protocol import auth
from edgebft.protocol import messages as m


def fresh_nonce(last: int) -> int:
    """A nonce above ``last`` and above any issued before now (the host clock in us)."""
    return max(last + 1, time.time_ns() // 1000)


def command_wire(key: bytes, nonce: int, command: str, args: list[Any]) -> bytes:
    """A CONTROL message from the host, tagged with the node's control ``key``."""
    body = m.body(m.CONTROL, m.HOST, nonce, command, args)
    return body + auth.Mac(key).tag(body)


def send_command(host: str, port: int, cluster: str, node: int, key: bytes, nonce: int,
                 command: str, args: list[Any], login: Login = PLAIN) -> None:
    """Publish one command to ``node`` with QoS 1 and wait until the broker has it (logged in
    as ``login`` says: the host's identity on a broker with ACLs, TLS on one with TLS)."""
    client = login.client()
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        info = client.publish(f"ebft/{cluster}/ctl/{node}",
                              command_wire(key, nonce, command, args), qos=1)
        info.wait_for_publish(5.0)
    finally:
        client.disconnect()  # before loop_stop, which otherwise waits out the loop's 1 s select
        client.loop_stop()


def partition_reach(nodes: int, members: list[int]) -> dict[int, list[int]]:
    """For a partition of ``members`` from the other replicas of ``nodes``: each replica's
    "partition" argument, the replicas on its own side (every node must get one, since a
    node's broadcasts are not filtered by its own partition)."""
    side = sorted(set(members))
    rest = [j for j in range(nodes) if j not in side]
    return {j: side if j in side else rest for j in range(nodes)}
