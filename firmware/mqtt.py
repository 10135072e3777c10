# MQTT 3.1.1 client for MicroPython's asyncio: the transport of an EdgeBFT node.
#
# How it works and the rules it keeps:
# - One connection, three tasks while connected: a reader, a writer and a pinger. run() owns
#   them; when any of them sees the connection die it sets _down, run() cancels the others,
#   closes the socket and reconnects with exponential back-off (100 ms doubling up to 1 s,
#   jittered), re-subscribes and resends every QoS1 publish not yet acknowledged (DUP set).
# - Receive path: the reader reads as much as the socket has into one preallocated buffer of
#   rx_chunk bytes and parses every complete packet in it. on_message(topic, payload, retain)
#   gets the topic as bytes (not checked to be UTF-8: it is compared, not decoded) and the
#   payload as a memoryview into that buffer: it is valid only during the call, so a callback
#   that keeps the payload must copy it (bytes(payload)). A packet bigger than rx_chunk (rare:
#   state transfer) is read into a bytearray of its own; one bigger than max_packet, or one
#   the heap has no room for, is skipped as it streams past (counted in rx_dropped).
# - Why not one max_packet buffer: consensus messages are a few hundred bytes, so 16 KB held
#   idle is a sixth of a 100 KB heap; and a node that compiles this module from source rather
#   than loading the .mpy is left with no free block much over 12 KB. 4 KB buffers always
#   fit, and max_packet stays a bound rather than an allocation.
# - Send path: publish() never blocks and never awaits. QoS0 packets are encoded straight into
#   a preallocated batch buffer (tx_max bytes). What the callbacks of a read batch queue, the
#   reader writes right after the batch (a reply costs no task switch); what other tasks
#   queue, the writer writes once per loop turn. Either way it is one write per batch. A
#   batch that fills up within one turn is handed to the stream early, unless the socket has
#   a backlog (asyncio's Stream keeps a copy of what the socket did not take; that copy, not
#   ours, would grow). A QoS0 packet too big for the buffer gets a bytearray of its own and
#   keeps its place in the batch. A QoS0 publish is dropped and counted in tx_dropped (at most
#   once) when the client is not connected or the buffer is full behind a backlog. QoS1
#   packets are kept (at most _Q1_MAX, and max_packet bytes) until their PUBACK; they go out
#   after the QoS0 batch of the same turn, so order holds within each QoS only.
# - Everything is bounded: max_packet (receive, one outgoing packet, unacked QoS1 bytes,
#   queued big QoS0 bytes), tx_max (QoS0 batch), _Q1_MAX, _SUBS_MAX.
# - Allocation on the hot path: one bytes (topic) and one memoryview (payload) per received
#   message; per read, a memoryview and asyncio's readinto generator and I/O-queue entry; none
#   per published QoS0 message whose topic is bytes (a str topic is encoded per publish).
#   Topics are bytes, not str, because a new str is first looked for among the interned
#   strings (~1,000 with a node's code: ~1.5 us on the Unix port).
# - No asyncio.Lock: `async with` allocates ~400 B; _draining guards instead.
# - Errors: MQTTError for protocol and usage errors (args[0] is the CONNACK return code when
#   the broker refuses us); OSError from the socket. Both mean "reconnect" inside run().
#   An exception raised by on_message is not ours: run() closes the connection and re-raises.
#   Messages are at most 10 characters: longer string literals become heap objects while the
#   parser runs and are left scattered through the heap (a 16 KB buffer then fits nowhere).
# - Documentation is in comments, not docstrings: compiled from source on a 100 KB heap (the
#   Unix port needs ~85 KB to do it), a docstring costs memory and a comment costs nothing.

import asyncio
import errno
import select
import socket
import ssl
from binascii import unhexlify
from random import getrandbits
from time import ticks_diff, ticks_ms

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import (bool, bytearray, bytes, int, isinstance, len, max, memoryview, min, range,
                      str, type)

TYPE_CHECKING = False  # True only to a type checker (tools/typecheck.sh)
if TYPE_CHECKING:
    from typing import Any

try:
    from micropython import const
except ImportError:  # CPython, for tooling only
    const = int  # CPython: const(x) is x


_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_SUBSCRIBE = const(0x82)
_SUBACK = const(0x90)
_PINGRESP = const(0xD0)
_DUP = const(0x08)

_REFUSALS = (None, "unacceptable protocol version", "client id rejected", "server unavailable",
             "bad user name or password", "not authorized")
_RESUBSCRIBE_MS = const(200)
_BACKOFF_MIN_MS = const(100)
_BACKOFF_MAX_MS = const(1000)  # a broker that comes back is found within a second
_STABLE_MS = const(2000)  # a connection that lived this long resets the back-off
_CONNECT_TIMEOUT_MS = const(5000)  # TCP connect plus CONNACK; WiFi hops are ~10 ms
_ACK_TIMEOUT_MS = const(10000)  # SUBACK
_CTL_RESERVE = const(64)  # tx buffer bytes kept free of QoS0 data for PUBACK and PINGREQ
_Q1_MAX = const(32)  # QoS1 publishes awaiting PUBACK
_SUBS_MAX = const(36)  # each of a node's (at most 31) peers' broadcasts, and 4 more topics

try:
    _IPPROTO_TCP = socket.IPPROTO_TCP
    _TCP_NODELAY = socket.TCP_NODELAY
except AttributeError:  # Unix port and some builds lack the names; Linux and lwIP agree
    _IPPROTO_TCP = const(6)
    _TCP_NODELAY = const(1)


class MQTTError(Exception):
    pass


def _varint_len(n):
    return 1 if n < 0x80 else 2 if n < 0x4000 else 3 if n < 0x200000 else 4


def _put_varint(buf, i, n):
    while n > 0x7F:
        buf[i] = (n & 0x7F) | 0x80
        n >>= 7
        i += 1
    buf[i] = n
    return i + 1


def _put_str(buf, i, b):
    n = len(b)
    buf[i] = n >> 8
    buf[i + 1] = n & 0xFF
    return _put_bytes(buf, i + 2, b)


def _put_bytes(buf, i, b):
    n = len(b)
    buf[i:i + n] = b
    return i + n


def _packet_size(t, payload, pid_bytes):
    """The bytes of a PUBLISH of topic ``t`` and ``payload``, ``pid_bytes`` of packet id."""
    rl = 2 + len(t) + pid_bytes + len(payload)
    return 1 + _varint_len(rl) + rl


def _put_publish(buf, i, b0, t, payload):
    """Write a PUBLISH without packet id (QoS0) at buf[i]; the offset past it."""
    buf[i] = b0
    i = _put_varint(buf, i + 1, len(t) + len(payload) + 2)
    i = _put_str(buf, i, t)
    return _put_bytes(buf, i, payload)


def _as_bytes(x):
    return x.encode() if isinstance(x, str) else x


def login_of(broker):
    """MQTTClient's user, password and tls arguments from a device's "broker" entry (the host
    writes it: edgebft.lab.broker.Login.device_entry): TLS when it names a CA (hex DER), which
    alone is trusted, the broker's name checked against its certificate."""
    tls = None
    if broker.get("ca"):
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.verify_mode = ssl.CERT_REQUIRED
        tls.load_verify_locations(cadata=unhexlify(broker["ca"]))
    return {"user": broker.get("user"), "password": broker.get("password"), "tls": tls}


class MQTTClient:
    def __init__(self, client_id, host, port=1883, keepalive=30, will=None, on_message=None,
                 max_packet=16384, rx_chunk=4096, tx_max=4096, user=None, password=None,
                 tls=None):
        # A client; nothing happens on the network until connect() or run().
        #
        # Args:
        #     client_id: str, unique per broker (a second connection takes the first one over).
        #     will: (topic, payload, retain, qos) that the broker publishes if we vanish, or
        #         a function returning one, called at each connection attempt.
        #     on_message: on_message(topic: bytes, payload: memoryview, retain: bool).
        #     max_packet: the largest packet accepted either way (larger incoming ones are
        #         skipped); it is a bound, not an allocation.
        #     rx_chunk: read buffer bytes (preallocated). A packet larger than this, up to
        #         max_packet, is read into a bytearray of its own while it lasts.
        #     tx_max: transmit batch buffer bytes. Bigger packets (up to max_packet) are
        #         allocated one by one; max_packet also bounds those queued and unacked QoS1.
        #     tls: an ssl.SSLContext that verifies the broker (its CA loaded, CERT_REQUIRED),
        #         or None for plain TCP. The broker's name checked is ``host``. A handshake
        #         that fails (an untrusted certificate) is a connection error, "TLS: ...".
        assert keepalive >= 0
        assert max_packet >= 64
        assert rx_chunk >= 64
        assert tx_max >= 4 * _CTL_RESERVE
        self.client_id = client_id
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.will = will
        self.on_message = on_message
        self.user = user
        self.password = password
        self.tls = tls
        self._rbuf = bytearray(min(rx_chunk, max_packet))
        self._rmv = memoryview(self._rbuf)
        self._qmax = max_packet  # byte bound of big QoS0 packets queued, and of unacked QoS1
        self._tmax = tx_max
        self._big = []  # (offset in _tbuf, packet): QoS0 packets too big for _tbuf, in order
        self._big_bytes = 0
        self._tbuf = bytearray(self._tmax)
        self._tmv = memoryview(self._tbuf)
        self._q1 = []  # [pid, packet] in publish order
        self._q1_bytes = 0
        self._subs = []  # [topic, qos, state]; state: 0 waiting, 1 granted, 0x80 refused
        self._sub_pids = {}  # SUBSCRIBE pid -> its entry in _subs
        self._pid = 0
        self._sock = None
        # asyncio's Stream: readinto and out_buf are MicroPython's, not in the stubs
        self._stream = None  # type: Any
        self._tx_ev = asyncio.Event()
        self._ack_ev = asyncio.Event()
        self._down = asyncio.Event()
        self._clean = True
        self._running = False
        self._closed = False
        self._ever = False  # connected at least once: later connections count as reconnects
        self._err = None
        self._reset_link()
        self.connected = False
        self.last_error = None
        self.rx_msgs = 0
        self.tx_msgs = 0
        self.reconnects = 0
        self.rx_dropped = 0
        self.tx_dropped = 0

    # ---- public API

    async def connect(self, clean_session=True):
        # Open the TCP connection and complete CONNECT/CONNACK (TCP_NODELAY where possible).
        #
        # Raises:
        #     MQTTError: the broker refused us (args[0] is the return code) or did not answer.
        #     OSError: the TCP connection failed.
        self._clean = clean_session
        self._closed = False
        await self._open()

    async def subscribe(self, topic, qos=0):
        # Subscribe and wait for the SUBACK; run() re-subscribes after every reconnect.
        #
        # Raises:
        #     MQTTError: refused by the broker, no SUBACK in time, or not connected.
        if qos not in (0, 1):
            raise MQTTError("qos")
        e = None
        for s in self._subs:
            if s[0] == topic:
                e = s
        if e is None:
            if len(self._subs) >= _SUBS_MAX:
                raise MQTTError("subs full")
            e = [topic, qos, 0]
            self._subs.append(e)
        e[1] = qos
        e[2] = 0
        if not self.connected and not self._running:
            raise MQTTError("offline")
        if self.connected:
            await self._send_subscribe(e)
        await self._wait_acked(not self._running)
        if e[2] == 0x80:
            raise MQTTError("refused", topic)

    async def subscribe_retrying(self, topic):
        # subscribe(), again every _RESUBSCRIBE_MS until the broker grants it (the link may be
        # down, the broker slow to start or refusing us); why it failed is printed once per
        # reason, not every retry.
        said = None
        while True:
            try:
                return await self.subscribe(topic)
            except MQTTError as ex:
                why = self.why(ex)
                if why != said:
                    print("subscribe %s: %s; retrying" % (topic, why))
                    said = why
                await asyncio.sleep_ms(_RESUBSCRIBE_MS)

    def why(self, ex=None):
        # One line for the link's last error (else ``ex``): a CONNACK refusal by its code
        # (MQTT 3.1.1, 3.2.2.3), our own reasons ("TLS: ...", "no CONNACK") as they are.
        error = self.last_error or ex
        if isinstance(error, MQTTError) and error.args and type(error.args[0]) is int:
            code = error.args[0]
            return "the broker refused the connection: %s (CONNACK %d)" % (
                _REFUSALS[code] if 0 < code < len(_REFUSALS) else "unknown reason", code)
        if isinstance(error, MQTTError) and error.args and type(error.args[0]) is str:
            return error.args[0]
        return repr(error)

    def publish(self, topic, payload, retain=False, qos=0):
        # Queue a PUBLISH without blocking; the writer sends it within this loop turn.
        #
        # Returns:
        #     True if queued; False if a QoS0 message was dropped (not connected, or the
        #     batch buffer is full while the socket still has a backlog; in tx_dropped).
        # Raises:
        #     MQTTError: bad qos, a packet larger than max_packet, too many unacked QoS1.
        # Runs per message sent: this, _queue0 and _put_publish keep their frames within 11
        # slots (protocol/cbor.py's header), off the heap; QoS1 and a full buffer go aside.
        if qos:
            return self._publish1(topic, payload, retain, qos)
        if not self._queue0(_PUBLISH | 1 if retain else _PUBLISH, _as_bytes(topic),
                            _as_bytes(payload)):
            self.tx_dropped += 1
            return False
        if not self._in_rx:  # else the reader writes at the end of its batch
            self._tx_ev.set()
        return True

    def _publish1(self, topic, payload, retain, qos):
        if qos != 1:
            raise MQTTError("qos")
        t = _as_bytes(topic)
        payload = _as_bytes(payload)
        size = _packet_size(t, payload, 2)
        if size > self._qmax:
            raise MQTTError("too big")
        if len(self._q1) >= _Q1_MAX or self._q1_bytes + size > self._qmax:
            raise MQTTError("qos1 full")
        pid = self._next_pid()
        self._q1.append([pid, self._packet(_PUBLISH | 2 | (1 if retain else 0), t, payload, pid)])
        self._q1_bytes += size
        if not self._in_rx:
            self._tx_ev.set()
        return True

    async def flush(self):
        # Write everything queued (one write) and wait until the socket has taken it.
        if self.connected:
            await self._write_now(None)

    async def run(self):
        # Serve the connection forever: read, dispatch, write, ping, and reconnect.
        #
        # Returns when close() is called. Raises whatever on_message raises.
        self._running = True
        self._closed = False
        backoff = _BACKOFF_MIN_MS
        try:
            while not self._closed:
                if not self.connected:
                    if self._ever or self.last_error is not None:
                        d = backoff - (getrandbits(16) % (backoff // 4 + 1))
                        backoff = min(backoff * 2, _BACKOFF_MAX_MS)
                        await asyncio.sleep_ms(d)
                    if self._closed:
                        break
                    try:
                        await self._open()
                        await self._resubscribe()
                    except (OSError, EOFError, MQTTError, asyncio.TimeoutError) as ex:
                        self.last_error = ex
                        self._drop()
                        continue
                t0 = ticks_ms()
                await self._serve()
                if ticks_diff(ticks_ms(), t0) >= _STABLE_MS:
                    backoff = _BACKOFF_MIN_MS
        finally:
            self._running = False
            self._drop()

    def close(self):
        # Send DISCONNECT (best effort: the broker then does not publish the will), close.
        self._closed = True
        if self._sock is not None and self._stream is not None and not self._stream.out_buf:
            try:  # not after a partly written packet: the broker would see garbage
                self._sock.write(b"\xe0\x00")
            except OSError:
                pass
        self._down.set()
        if not self._running:
            self._drop()  # else run() drops it once its tasks are cancelled

    # ---- connection

    async def _open(self):
        try:
            await self._open_link()
        except asyncio.TimeoutError:
            self._drop()
            raise MQTTError("no CONNACK")
        except Exception:
            self._drop()
            raise
        if self._ever:
            self.reconnects += 1
        self._ever = True

    async def _open_link(self):
        self._drop()
        ai = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0]
        s = socket.socket(ai[0], ai[1], ai[2])
        self._sock = s
        s.setblocking(False)
        try:
            s.connect(ai[-1])
        except OSError as ex:
            if ex.errno != errno.EINPROGRESS:
                raise
        try:
            s.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        await self._wait_writable(s)
        if self.tls is not None:  # the handshake runs in the first writes and reads below
            s = self.tls.wrap_socket(s, server_hostname=self.host,
                                     do_handshake_on_connect=False)
            s.setblocking(False)
            self._sock = s
        self._stream = asyncio.StreamWriter(s, {})
        self._reset_link()
        try:
            self._stream.write(self._connect_packet())
            await self._stream.drain()
            await asyncio.wait_for_ms(self._until_connack(), _CONNECT_TIMEOUT_MS)
        except ValueError as ex:  # mbedTLS refused the broker's certificate
            if self.tls is None:
                raise
            raise MQTTError("TLS: " + " ".join(str(ex).split()))
        except OSError as ex:  # before CONNACK over TLS: most likely no TLS handshake at all
            if self.tls is None:
                raise
            raise MQTTError("TLS: no handshake with the broker (%r): does it speak TLS on "
                            "this port?" % (ex,))
        if self._connack:
            raise MQTTError(self._connack)
        self.connected = True
        self._q1_sent = 0
        self._last_rx = self._last_tx = ticks_ms()
        if self._q1:
            self._tx_ev.set()

    async def _wait_writable(self, s):
        # Poll the connecting socket: unlike asyncio.open_connection this can time out
        # without leaking the socket (lwIP has few). Connecting is rare; 5 ms steps are fine.
        p = select.poll()
        p.register(s, select.POLLOUT)
        t0 = ticks_ms()
        while True:
            ev = p.poll(0)
            if ev:
                if ev[0][1] & (select.POLLERR | select.POLLHUP):
                    raise OSError(errno.ECONNREFUSED)
                return
            if ticks_diff(ticks_ms(), t0) > _CONNECT_TIMEOUT_MS:
                raise OSError(errno.ETIMEDOUT)
            await asyncio.sleep_ms(5)

    def _connect_packet(self):
        cid = _as_bytes(self.client_id)
        flags = 0x02 if self._clean else 0
        n = 10 + 2 + len(cid)
        will = self.will  # type: Any
        if callable(will):
            will = will()
        wt = wp = b""
        if will:
            wt, wp = _as_bytes(will[0]), _as_bytes(will[1])
            flags |= 0x04 | (will[3] & 3) << 3 | (0x20 if will[2] else 0)
            n += 4 + len(wt) + len(wp)
        if self.user is not None:
            flags |= 0x80
            n += 2 + len(_as_bytes(self.user))
            if self.password is not None:
                flags |= 0x40
                n += 2 + len(_as_bytes(self.password))
        pkt = bytearray(1 + _varint_len(n) + n)
        pkt[0] = _CONNECT
        i = _put_varint(pkt, 1, n)
        i = _put_str(pkt, i, b"MQTT")
        pkt[i] = 4  # protocol level: 3.1.1
        pkt[i + 1] = flags
        pkt[i + 2] = self.keepalive >> 8
        pkt[i + 3] = self.keepalive & 0xFF
        i = _put_str(pkt, i + 4, cid)
        if will:
            i = _put_str(pkt, i, wt)
            i = _put_str(pkt, i, wp)
        if self.user is not None:
            i = _put_str(pkt, i, _as_bytes(self.user))
            if self.password is not None:
                i = _put_str(pkt, i, _as_bytes(self.password))
        assert i == len(pkt)
        return pkt

    async def _until_connack(self):
        while self._connack < 0:
            await self._read_some()

    async def _resubscribe(self):
        for e in self._subs:
            e[2] = 0
            await self._send_subscribe(e)
        await self._wait_acked(True)

    async def _send_subscribe(self, e):
        t = _as_bytes(e[0])
        pid = self._next_pid()
        rl = 2 + 2 + len(t) + 1
        pkt = bytearray(1 + _varint_len(rl) + rl)
        pkt[0] = _SUBSCRIBE
        i = _put_varint(pkt, 1, rl)
        pkt[i] = pid >> 8
        pkt[i + 1] = pid & 0xFF
        i = _put_str(pkt, i + 2, t)
        pkt[i] = e[1]
        assert i + 1 == len(pkt)
        self._sub_pids[pid] = e
        await self._write_now(pkt)

    async def _wait_acked(self, read):
        # Until every subscription is answered. With read, we read the socket ourselves
        # (connect, subscribe, then run; or run's own re-subscribe); otherwise run() reads
        # and its dispatch sets _ack_ev. Never two readers on one socket.
        t0 = ticks_ms()
        while True:
            if not [s for s in self._subs if s[2] == 0]:
                return
            left = _ACK_TIMEOUT_MS - ticks_diff(ticks_ms(), t0)
            if left <= 0:
                raise MQTTError("no SUBACK")
            if not read:
                self._ack_ev.clear()
                try:
                    await asyncio.wait_for_ms(self._ack_ev.wait(), left)
                except asyncio.TimeoutError:
                    pass
            elif self.connected:
                await asyncio.wait_for_ms(self._read_some(), left)
            else:
                raise MQTTError("offline")

    def _reset_link(self):
        # Per-connection state: nothing received or queued belongs to the next connection.
        self._rlen = 0
        self._skip = 0
        self._big_rx = None
        self._big_n = 0
        self._big_s = 0
        self._tlen = 0
        self._tq = 0
        self._big = []
        self._big_bytes = 0
        self._q1_sent = 0
        self._connack = -1
        self._in_rx = False
        self._draining = False
        self._ping_ms = -1
        self._last_rx = self._last_tx = ticks_ms()
        self._sub_pids = {}

    def _drop(self):
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._stream = None
        self.connected = False
        self.tx_dropped += self._tq
        self._reset_link()
        self._ack_ev.set()  # wake subscribe() waiters to re-check

    # ---- the three tasks of a live connection

    async def _serve(self):
        self._down.clear()
        self._err = None
        tasks = (asyncio.create_task(self._reader()), asyncio.create_task(self._writer()),
                 asyncio.create_task(self._pinger()))
        await self._down.wait()
        for t in tasks:
            t.cancel()
        self._drop()
        await asyncio.sleep_ms(0)  # let the cancelled tasks unwind
        err = self._err
        if err is not None:
            raise err

    def _lost(self, ex):
        # Called by a task that saw the connection end. Connection errors mean reconnect;
        # anything else (a bug, an on_message exception) is handed to run()'s caller.
        self.last_error = ex
        if not isinstance(ex, (OSError, MQTTError, EOFError, asyncio.TimeoutError)):
            self._err = ex
        self._down.set()

    async def _reader(self):
        # Read, dispatch, then write what the callbacks queued in the same turn: a reply
        # costs no task switch. Only while the writer drains a backlog is it left to it.
        w = self._stream
        try:
            while True:
                n = await w.readinto(self._rx_target())
                self._in_rx = True
                self._rx(n)
                self._in_rx = False
                if self._tx_pending():
                    if self._draining:
                        self._tx_ev.set()
                    else:
                        self._write_batch(w)
                        if w.out_buf:  # the socket is full: the writer drains the rest
                            self._tx_ev.set()
        except Exception as ex:
            self._lost(ex)

    async def _writer(self):
        # Wakes at most once per loop turn, so all the publishes of a turn go in one write.
        ev = self._tx_ev
        w = self._stream
        try:
            while True:
                await ev.wait()
                ev.clear()
                if self._draining:
                    continue  # _write_now is draining; it sets ev again when done
                self._write_batch(w)
                if w.out_buf:  # Stream's pending bytes: drain only when there are some
                    self._draining = True
                    await w.drain()
                    self._draining = False
        except Exception as ex:
            self._lost(ex)

    async def _pinger(self):
        # PINGREQ when either direction has been idle for keepalive/2; the broker is dead
        # when a ping has gone unanswered, with nothing else received, for keepalive/2.
        ka = self.keepalive * 1000
        if not ka:
            return
        half = ka // 2
        while True:
            await asyncio.sleep_ms(max(ka // 4, 50))
            now = ticks_ms()
            if self._ping_ms >= 0:  # pyright: ignore[reportOperatorIssue] (-1, or ticks: an int)
                silent_ms = min(ticks_diff(now, self._ping_ms), ticks_diff(now, self._last_rx))
                if silent_ms >= half:
                    self._lost(MQTTError("no pingrsp"))
                    return
            elif ticks_diff(now, self._last_tx) >= half or ticks_diff(now, self._last_rx) >= half:
                self._ping_ms = now
                self._ctl(0xC0, -1)

    # ---- send path

    def _next_pid(self):
        while True:
            self._pid = self._pid % 0xFFFF + 1
            if self._pid not in self._sub_pids and not [e for e in self._q1 if e[0] == self._pid]:
                return self._pid

    def _queue0(self, b0, t, payload):
        # A QoS0 packet into the batch buffer; False when it is dropped.
        if not self._fits0(_packet_size(t, payload, 0)):
            return self._queue0_aside(b0, t, payload)
        self._tlen = _put_publish(self._tbuf, self._tlen, b0, t, payload)
        self._tq += 1
        return True

    def _fits0(self, size):
        # Does a QoS0 packet of ``size`` bytes go into the batch buffer as it is?
        if size > self._qmax:
            raise MQTTError("too big")
        return self.connected and self._tlen + size <= self._tmax - _CTL_RESERVE

    def _queue0_aside(self, b0, t, payload):
        # The batch buffer lacks room: spill it to the stream first, or, for a packet that
        # is big for it, a bytearray of its own (rare: state transfer); big ones keep their
        # place via the offset.
        if not self.connected:
            return False
        size = _packet_size(t, payload, 0)
        if self._spill() and self._fits0(size):
            self._tlen = _put_publish(self._tbuf, 0, b0, t, payload)
        elif size > self._tmax // 4 and self._big_bytes + size <= self._qmax:
            try:
                self._big.append((self._tlen, self._packet(b0, t, payload, 0)))
            except MemoryError:
                return False
            self._big_bytes += size
        else:
            return False
        self._tq += 1
        return True

    def _spill(self):
        # The batch buffer is full within one turn: hand it to the stream now, unless the
        # socket has a backlog (Stream then holds a copy: that, not _tbuf, would grow).
        w = self._stream
        if w is None or self._draining or w.out_buf or not self._tlen:
            return False
        try:
            self._write_batch(w)
        except OSError as ex:
            self._lost(ex)
            return False
        if w.out_buf:
            self._tx_ev.set()
        return True

    def _packet(self, b0, t, payload, pid):
        # A PUBLISH (with packet id ``pid`` unless 0) in a bytearray of its own.
        size = _packet_size(t, payload, 2 if pid else 0)
        try:
            pkt = bytearray(size)
        except MemoryError:
            if not pid:
                raise
            raise MQTTError("no memory")
        if not pid:
            _put_publish(pkt, 0, b0, t, payload)
            return pkt
        pkt[0] = b0
        i = _put_str(pkt, _put_varint(pkt, 1, len(t) + len(payload) + 4), t)
        pkt[i] = pid >> 8
        pkt[i + 1] = pid & 0xFF
        _put_bytes(pkt, i + 2, payload)
        return pkt

    def _ctl(self, b0, pid):
        # A 2- or 4-byte control packet (PINGREQ, PUBACK) into the reserved tail of the buffer.
        i = self._tlen
        if i + 4 > self._tmax and self._spill():
            i = 0
        if i + 4 > self._tmax:
            return
        self._tbuf[i] = b0
        if pid < 0:
            self._tbuf[i + 1] = 0
            self._tlen = i + 2
        else:
            self._tbuf[i + 1] = 2
            self._tbuf[i + 2] = pid >> 8
            self._tbuf[i + 3] = pid & 0xFF
            self._tlen = i + 4
        if not self._in_rx:
            self._tx_ev.set()

    def _tx_pending(self):
        return self._tlen or self._q1_sent < len(self._q1)

    def _write_batch(self, w):
        # Hand everything queued to the stream (never while it drains: Stream.drain drops
        # bytes written meanwhile). Stream.write copies whatever the socket did not take.
        assert not self._draining
        pos = 0
        for off, pkt in self._big:
            if off > pos:
                w.write(self._tmv[pos:off])
                pos = off
            w.write(pkt)
        if self._tlen > pos:
            w.write(self._tmv[pos:self._tlen])
        self.tx_msgs += self._tq
        self._tlen = 0
        self._tq = 0
        if self._big:
            self._big = []
            self._big_bytes = 0
        q = self._q1
        i = self._q1_sent
        while i < len(q):
            pkt = q[i][1]
            w.write(pkt)
            if not pkt[0] & _DUP:
                self.tx_msgs += 1
                pkt[0] |= _DUP  # any later copy of it is a resend
            i += 1
        self._q1_sent = i
        self._last_tx = ticks_ms()

    async def _write_now(self, pkt):
        # Write the queue (then pkt) and drain: flush(), SUBSCRIBE.
        while self._draining:
            await asyncio.sleep_ms(1)
        w = self._stream
        if w is None:
            raise MQTTError("offline")
        self._write_batch(w)
        if pkt is not None:
            w.write(pkt)
        self._draining = True
        try:
            await w.drain()
        finally:
            self._draining = False
            if self._tx_pending():
                self._tx_ev.set()

    # ---- receive path

    def _rx_target(self):
        # Where the next read goes: the read buffer, or the rest of one big packet.
        big = self._big_rx
        if big is not None:
            return memoryview(big)[self._big_n:]
        return self._rmv[self._rlen:]

    async def _read_some(self):
        self._rx(await self._stream.readinto(self._rx_target()))

    def _rx(self, n):
        if n is None:
            return
        if not n:
            raise EOFError
        self._last_rx = ticks_ms()
        big = self._big_rx
        if big is not None:
            self._big_n += n
            if self._big_n == len(big):
                self._big_rx = None
                self._dispatch(big[0], memoryview(big)[self._big_s:])
            return
        i = 0
        end = self._rlen + n
        if self._skip:  # the tail of an oversized packet: _rlen is 0 here
            i = min(self._skip, n)
            self._skip -= i
        self._rlen = self._parse(i, end)

    def _parse(self, i, end):
        # Dispatch every complete packet in _rbuf[i:end]; keep a partial one at the front.
        buf = self._rbuf
        mv = self._rmv
        while end - i >= 2:
            j = i + 1
            rl = 0
            sh = 0
            b = 0x80  # no length byte read: incomplete
            while True:
                if j >= end:
                    break
                b = buf[j]
                j += 1
                rl |= (b & 0x7F) << sh
                if not b & 0x80:
                    break
                sh += 7
                if sh > 21:
                    raise MQTTError("bad length")
            if b & 0x80:
                break  # the length itself is incomplete
            total = j - i + rl
            if total > len(buf):
                self._begin_big(i, j, end, total)
                return 0
            if end - i < total:
                break
            self._dispatch(buf[i], mv[j:i + total])
            i += total
        if i >= end:
            return 0
        buf[0:end - i] = mv[i:end]  # memmove: the partial packet to the front
        return end - i

    def _begin_big(self, i, j, end, total):
        # A packet larger than the read buffer: up to max_packet it gets a buffer of its own
        # (rare, e.g. state transfer); beyond that, or when the heap has no room for it, it
        # is skipped as it streams past. Either way nothing else is buffered meanwhile.
        assert end - i < total
        big = None
        if total <= self._qmax:
            try:
                big = bytearray(total)
            except MemoryError:
                pass
        if big is None:
            self.rx_dropped += 1
            self._skip = total - (end - i)
            return
        big[0:end - i] = self._rmv[i:end]
        self._big_rx = big
        self._big_n = end - i
        self._big_s = j - i

    def _dispatch(self, b0, v):
        # One packet: b0 its first byte, v (a memoryview) its variable part. Runs per message
        # received: this and _on_publish keep their frames within 11 slots (protocol/cbor.py's
        # header), off the heap; the other packet types in _on_control.
        if b0 & 0xF0 == _PUBLISH:
            self._on_publish(b0, v)
        else:
            self._on_control(b0, v)

    def _on_publish(self, b0, v):
        # QoS is b0's bits 1-2: 0 or 1 here (b0 & 2 is the packet id's bytes)
        if len(v) < 2 or b0 & 4:
            raise MQTTError("bad pub")
        p = 2 + (v[0] << 8 | v[1])  # where the topic ends
        if p + (b0 & 2) > len(v):
            raise MQTTError("bad pub")
        if b0 & 2:
            self._ctl(_PUBACK, v[p] << 8 | v[p + 1])
        self.rx_msgs += 1
        if self.on_message is not None:
            self.on_message(bytes(v[2:p]), v[p + (b0 & 2):], bool(b0 & 1))

    def _on_control(self, b0, v):
        t = b0 & 0xF0
        if t == _PUBACK and len(v) >= 2:
            pid = v[0] << 8 | v[1]
            q = self._q1
            for k in range(len(q)):
                if q[k][0] == pid:
                    self._q1_bytes -= len(q[k][1])
                    q.pop(k)
                    if k < self._q1_sent:
                        self._q1_sent -= 1
                    break
        elif t == _SUBACK and len(v) >= 3:
            sub = self._sub_pids.pop(v[0] << 8 | v[1], None)
            if sub is not None:
                sub[2] = 0x80 if v[2] & 0x80 else 1
                self._ack_ev.set()
        elif t == _PINGRESP:
            self._ping_ms = -1
        elif t == _CONNACK and len(v) >= 2 and self._connack < 0:
            self._connack = v[1]
        else:
            raise MQTTError("bad packet", b0)
