# A sensor board's client (issue 13): no replica, it writes a reading into the replicated
# ledger every period, through the cluster, as one client of it.
#
# Rules:
# - Its configuration (sensor.json) is a client identity (edgebft client new: cluster, client
#   id, broker and login, stake, the keys it shares with each replica) plus "sensor":
#   {"key": ledger key, "period_ms": ms between readings}.
# - One request at a time: ["put", key, [n, reading]] each period, sent again when its
#   retransmission timer says (protocol/client.py: from the round trips measured, doubling)
#   until replies that match carry more than 1/3 of stake;
#   one still unaccepted when the next period comes is given up (counted "late") for the next
#   reading, which the ledger takes whole.
# - Timestamps must grow across reboots, and a board has no clock at boot: the sensor reserves
#   blocks of _TIMESTAMP_BLOCK on flash (firmware/store), starting above the last reserved (or
#   at the clock in microseconds where it has one, as the host's clients start).
# - One line per write: "sensor KEY #n ok in MS ms, heap BYTES" (live heap after a collection)
#   or "sensor KEY #n late".
import gc
import json
import time

import asyncio
from binascii import unhexlify

try:
    from micropython import const
except ImportError:  # CPython
    const = int

from edgebft.firmware import board, store
from edgebft.firmware.mqtt import MQTTClient, MQTTError, login_of
from edgebft.protocol.client import ClientCore
from edgebft.protocol.stake import Stake

CONFIG_PATH = "sensor.json"
TIMESTAMP_PATH = "timestamp"
_TIMESTAMP_BLOCK = const(1000000)
_PACKET_BYTES = const(1024)  # a request out, a reply in


def reading(n):
    """The value of reading ``n``: a board reads its sensor here (machine.ADC, a bus); the Unix
    port reports its uptime in ms."""
    return time.ticks_ms()


class Sensor:
    """A client that writes a reading every period (see the rules above)."""

    def __init__(self, config):
        me = config["client"]
        # The MQTT client first, once the imports' and the configuration's garbage is gone:
        # its attribute table is one 944-byte block. Built after the client core and the
        # timestamp file, it now and then found no piece that large in a 64 KB heap
        # (demo --sensors 2 in hil_tests/test_sensor.py failed so, 4 runs of 4 in a row).
        gc.collect()
        broker = config["broker"]
        self.mqtt = MQTTClient("ebft-%s-sensor%d" % (config["cluster"], me), broker["host"],
                               broker.get("port", 1883), keepalive=30, **login_of(broker),
                               on_message=self.on_message, max_packet=_PACKET_BYTES,
                               rx_chunk=_PACKET_BYTES, tx_max=_PACKET_BYTES)
        prefix = b"ebft/%s/" % config["cluster"].encode()
        self.topic_req = b"%sreq/%d" % (prefix, me)
        self.topic_rep = b"%srep/%d" % (prefix, me)
        self.key = config["sensor"]["key"]
        self.period_ms = config["sensor"]["period_ms"]
        first = max(store.load_int(TIMESTAMP_PATH), int(time.time()) * 1000000)
        self.reserved = first + _TIMESTAMP_BLOCK
        store.save_int(self.reserved, TIMESTAMP_PATH)
        self.core = ClientCore(me, Stake(config["stake"]),
                               [unhexlify(k) for k in config["keys"]], timestamp=first)
        self.accepted = False
        self.late = 0
        self.clock = board.Clock().now

    def on_message(self, topic, payload, retain):
        ok, _result = self.core.on_reply(bytes(payload), self.clock())
        if ok:
            self.accepted = True

    def request(self, n):
        """The wire of write ``n``, reserving another block of timestamps when due."""
        if self.core.timestamp + 1 >= self.reserved:
            self.reserved += _TIMESTAMP_BLOCK
            store.save_int(self.reserved, TIMESTAMP_PATH)
        return self.core.request(["put", self.key, [n, reading(n)]])

    async def run(self):
        """The broker link and the writes, until either ends by an exception: a link task
        left alone would die by itself ("Task exception wasn't retrieved") while the writes
        went on without it."""
        link = asyncio.create_task(self.mqtt.run())
        await asyncio.sleep_ms(0)
        await asyncio.gather(link, asyncio.create_task(self.writes()))

    async def writes(self):
        """Write a reading every period_ms, each until accepted or the period is over."""
        await self.mqtt.subscribe_retrying(self.topic_rep)
        n = 0
        while True:
            n += 1
            started = self.clock()
            self.accepted = False
            wire = self.request(n)
            while not self.accepted and self.clock() - started < self.period_ms:
                now = self.clock()
                if self.core.sends == 0 or self.core.retransmit_due(now):
                    self.core.sent(now)
                    try:
                        self.mqtt.publish(self.topic_req, wire)
                    except MQTTError:
                        pass  # not connected: the next retransmission tries again
                await asyncio.sleep_ms(2)
            took = self.clock() - started
            wire = None
            gc.collect()
            if self.accepted:
                print("sensor %s #%d ok in %d ms, heap %d" % (self.key, n, took, gc.mem_alloc()))
            else:
                self.late += 1
                print("sensor %s #%d late" % (self.key, n))
            await asyncio.sleep_ms(max(0, self.period_ms - took))


def main():
    with open(CONFIG_PATH) as f:
        config = json.load(f)
    asyncio.run(Sensor(config).run())
