"""Start and stop the MQTT broker for a lab run: mosquitto, amqtt (embedded) or an external one.

``parse_broker`` turns the ``--broker`` option into a ``BrokerSpec``; ``start_broker`` turns a
spec into a running ``Broker``. Brokers that we start run as a subprocess in their own process
group (their own session, so a Ctrl-C at the terminal reaches only the host, which then stops
them), and stopping kills the whole group. Every started broker is also stopped at interpreter
exit (``atexit``) and, when the host did not install its own, SIGTERM and SIGHUP handlers turn
those signals into ``SystemExit`` so that ``with`` blocks and ``atexit`` run. Only a SIGKILL of
the host itself can leave a broker behind.

Brokers are started and stopped as every lab process is (``edgebft.lab.processes``).

amqtt 0.12.1 (the embedded broker) deviates from MQTT 3.1.1 in ways EdgeBFT can live with:

- it delivers every message at the subscription's QoS, ignoring the publisher's QoS
  (3.1.1 section 3.8.4 says the minimum of the two): QoS 0 publishes reach QoS 1 subscribers
  as QoS 1, which costs a PUBACK each;
- a client whose subscriptions overlap (``a/#`` and ``a/b``) gets one copy per matching filter;
- it is MQTT 3.1.1 only and much slower than mosquitto: fine for tests, wrong for latency.

Round trips at QoS 0/1, retained messages and the Last Will on an abrupt disconnect work
(tests/test_broker.py checks them).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt

from edgebft.lab.broker_auth import HOST, BrokerAuth
from edgebft.lab.broker_tls import BrokerTLS, client_context
from edgebft.lab.processes import kill_process_group, spawn, untrack_process

BrokerKind = Literal["mosquitto", "embedded", "external"]

MOSQUITTO_ENV_VAR = "EDGEBFT_MOSQUITTO"
MOSQUITTO_FALLBACKS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
MQTT_DEFAULT_PORT = 1883
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 10.0  # amqtt imports in ~1 s; mosquitto binds in milliseconds
REACH_TIMEOUT_S = 3.0  # external broker: TCP connect plus CONNECT/CONNACK
# The host's clients (observer, workload) retry a lost connection after RECONNECT_MIN_S,
# doubling up to RECONNECT_MAX_S: a broker that comes back is found within a second (paho's
# defaults: 1 s doubling to 120 s).
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 1.0
START_ATTEMPTS = 3  # a free port can be taken between probing it and the broker binding it
LOG_TAIL_LINES = 20
# Per-client queue bound for QoS 1 messages while a client is slow or paused (fault injection
# pauses nodes for seconds at a time); the default (1000) would drop messages that PBFT then
# has to recover by view change, which is a test of the wrong thing.
MOSQUITTO_MAX_QUEUED_MESSAGES = 100_000
# QoS 1 messages in flight per client before queueing: mosquitto's default is 20; a replica
# broadcasting prepares and commits to n-1 peers needs a few rounds' worth without stalling.
MOSQUITTO_MAX_INFLIGHT_MESSAGES = 100

SPEC_HELP = "'mosquitto', 'embedded', 'auto' or 'mqtt://HOST[:PORT]'"


class BrokerError(RuntimeError):
    """A broker cannot be parsed, started or reached; the message is one line saying why."""


@dataclass(frozen=True)
class BrokerSpec:
    """What broker to use. ``auto`` is resolved when parsed: mosquitto if found, else embedded.

    ``host``/``port`` are set only for ``external``; ``mosquitto`` is the binary's path for
    ``mosquitto``.
    """

    kind: BrokerKind
    host: str | None = None
    port: int | None = None
    mosquitto: Path | None = None


def find_mosquitto() -> Path | None:
    """Return the mosquitto binary: ``$EDGEBFT_MOSQUITTO``, PATH, /usr/sbin, /usr/local/sbin.

    Returns None when there is none.

    Raises:
        BrokerError: ``$EDGEBFT_MOSQUITTO`` is set but is not an executable file.
    """
    explicit = os.environ.get(MOSQUITTO_ENV_VAR)
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrokerError(f"${MOSQUITTO_ENV_VAR}={explicit!r} is not an executable file")
        return path
    candidates: list[str] = []
    on_path = shutil.which("mosquitto")
    if on_path:
        candidates.append(on_path)
    candidates.extend(MOSQUITTO_FALLBACKS)
    for candidate in candidates:
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def parse_broker(spec: str) -> BrokerSpec:
    """Parse a ``--broker`` value.

    Accepts ``mosquitto``, ``embedded``, ``auto`` and ``mqtt://HOST[:PORT]`` (port 1883 by
    default).

    Raises:
        BrokerError: for anything else, or ``mosquitto`` when no mosquitto binary is found.
    """
    text = spec.strip()
    if text == "auto":
        found = find_mosquitto()
        return BrokerSpec("mosquitto", mosquitto=found) if found else BrokerSpec("embedded")
    if text == "mosquitto":
        found = find_mosquitto()
        if found is None:
            raise BrokerError(
                "mosquitto not found on PATH, /usr/sbin or /usr/local/sbin; install it, set "
                f"${MOSQUITTO_ENV_VAR}, or use --broker embedded"
            )
        return BrokerSpec("mosquitto", mosquitto=found)
    if text == "embedded":
        return BrokerSpec("embedded")
    match = re.fullmatch(r"mqtt://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?/?", text)
    if match:
        host = match.group(1).strip("[]")
        port = int(match.group(2)) if match.group(2) else MQTT_DEFAULT_PORT
        if 0 < port < 65536:
            return BrokerSpec("external", host=host, port=port)
    raise BrokerError(f"bad broker {spec!r}: expected {SPEC_HELP}")


# --- brokers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    """How a host program logs in to a cluster's broker: as whom (``credentials``, (username,
    password); None: anonymous) and over what: TLS trusting only ``ca_der`` (the cluster's CA
    certificate, DER; broker_tls.py), or plain TCP when None."""

    credentials: tuple[str, str] | None = None
    ca_der: bytes | None = None

    @classmethod
    def of(cls, identity: str, auth: BrokerAuth | None, tls: BrokerTLS | None) -> Login:
        """How ``identity`` logs in to a broker that enforces ``auth`` (None: takes anyone)
        and speaks TLS with ``tls``'s certificate (None: plain TCP)."""
        return cls(None if auth is None else auth.credentials(identity),
                   None if tls is None else tls.ca_der)

    @classmethod
    def of_entry(cls, entry: dict[str, Any]) -> Login:
        """The login a device's "broker" entry holds (the inverse of device_entry)."""
        return cls((entry["user"], entry["password"]) if "user" in entry else None,
                   bytes.fromhex(entry["ca"]) if "ca" in entry else None)

    def client(self, client_id: str = "") -> mqtt.Client:
        """A paho client (MQTT 3.1.1, not yet connected) that logs in this way."""
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311)
        if self.credentials is not None:
            client.username_pw_set(*self.credentials)
        if self.ca_der is not None:
            client.tls_set_context(client_context(self.ca_der))
        return client

    def device_entry(self, host: str, port: int) -> dict[str, Any]:
        """The "broker" entry of a device's configuration (a node's edgebft.json, a sensor's
        or an application's identity): where the broker is, and the credentials and the CA
        (hex DER) this login takes."""
        entry: dict[str, Any] = {"host": host, "port": port}
        if self.credentials is not None:
            entry["user"], entry["password"] = self.credentials
        if self.ca_der is not None:
            entry["ca"] = self.ca_der.hex()
        return entry


PLAIN = Login()  # anonymous, plain TCP


class Broker:
    """A running (or reachable) MQTT broker. Use as a context manager or call ``stop()``.

    Attributes:
        kind: "mosquitto", "embedded" or "external".
        host, port: where clients connect.
        url: ``mqtt://host:port``.
        version: the broker's version string, or "" when unknown (external).
    """

    def __init__(self, kind: BrokerKind, host: str, port: int, version: str = "",
                 proc: subprocess.Popen[bytes] | None = None, log: Path | None = None,
                 auth: BrokerAuth | None = None, argv: list[str] | None = None,
                 output: Path | None = None, tls: BrokerTLS | None = None) -> None:
        self.kind: BrokerKind = kind
        self.host = host
        self.port = port
        self.version = version
        self.log = log
        self.auth = auth  # identities and ACL it enforces (None: anyone may say anything)
        self.tls = tls    # its CA and certificate (None: plain TCP)
        self._proc = proc
        self._argv = argv      # how it was started (its configuration names its port) ...
        self._output = output  # ... and where its output goes

    def login(self, identity: str) -> Login:
        """How ``identity`` logs in here: its credentials on a broker with ACLs, and TLS
        trusting the cluster's CA on one that speaks TLS."""
        return Login.of(identity, self.auth, self.tls)

    @property
    def url(self) -> str:
        """``mqtt://host:port`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    @property
    def argv(self) -> list[str] | None:
        """The command that started it (None: external); start_again() runs it again."""
        return self._argv

    @property
    def pid(self) -> int | None:
        """The broker process's pid (also its process group id), or None if not ours."""
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        """True while a broker we started is alive; for external brokers always True."""
        return self._proc is None or self._proc.poll() is None

    def describe(self) -> str:
        """One line for humans, e.g. ``mosquitto 2.0.11 on 127.0.0.1:41883``."""
        name = f"{self.kind} {self.version}".strip() if self.kind != "external" else "external"
        extras = [x for x, on in (("ACL", self.auth), ("TLS", self.tls)) if on]
        return f"{name} on {self.host}:{self.port}" + (
            " with " + " and ".join(extras) if extras else "")

    def detach(self) -> None:
        """Leave the broker running after this process exits (``edgebft cluster up``)."""
        if self._proc is not None:
            untrack_process(self._proc)
            self._proc = None

    def stop(self) -> None:
        """Stop the broker process group if we started it. Idempotent; external: no-op."""
        if self._proc is not None:
            kill_process_group(self._proc)

    def start_again(self) -> None:
        """Start a broker we started and stopped again, on the same port with the same
        configuration (the broker-restart fault); it forgets sessions and retained messages.
        BrokerError for an external broker, or one that does not listen within
        START_TIMEOUT_S (its port taken meanwhile, say)."""
        if self._argv is None or self._output is None:
            raise BrokerError(f"{self.describe()}: not a broker this host started")
        if self._proc is not None and self._proc.poll() is None:
            return  # still running
        self._proc = spawn(self._argv, self._output)
        if not _wait_listening(self._proc, self.host, self.port, START_TIMEOUT_S):
            kill_process_group(self._proc)
            raise BrokerError(f"{self.describe()} did not listen again within "
                              f"{START_TIMEOUT_S:g} s; log tail: {_tail(self._output)}")

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Broker {self.describe()}>"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"


def _port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _wait_listening(proc: subprocess.Popen[bytes], host: str, port: int,
                    timeout_s: float) -> bool:
    """True once ``host:port`` accepts; False if ``proc`` exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _port_open(host, port):
            return proc.poll() is None  # not someone else's listener on a recycled port
        time.sleep(0.02)
    return False


def mosquitto_version(binary: Path) -> str:
    """Return mosquitto's version (``2.0.11``) from ``mosquitto -h``, or "" if unknown."""
    try:
        out = subprocess.run([str(binary), "-h"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = re.search(r"mosquitto version (\S+)", out.stdout + out.stderr)
    return match.group(1) if match else ""


def mosquitto_config(port: int, log: Path | None, access: tuple[Path, Path] | None = None,
                     tls: BrokerTLS | None = None, bind: str | None = LOOPBACK) -> str:
    """Return a mosquitto.conf for one listener on ``port`` (on ``bind``; None: every
    interface, a site's broker) logging to ``log`` (None: its standard output): anonymous, or
    with ``access`` = (password file, ACL file) only for the identities those files name
    (edgebft.lab.broker_auth); TLS only with ``tls`` (edgebft.lab.broker_tls).

    Running as root, mosquitto would drop to user ``mosquitto``, which may not be able to write
    ``log``; so a loopback broker started as root stays root.
    """
    lines = [
        f"listener {port}" + ("" if bind is None else f" {bind}"),
        *([] if tls is None else tls.mosquitto_lines()),
        *(["allow_anonymous true"] if access is None else
          ["allow_anonymous false", f"password_file {access[0]}", f"acl_file {access[1]}"]),
        "persistence false",
        "log_dest stdout" if log is None else f"log_dest file {log}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"max_queued_messages {MOSQUITTO_MAX_QUEUED_MESSAGES}",
        f"max_inflight_messages {MOSQUITTO_MAX_INFLIGHT_MESSAGES}",
        "set_tcp_nodelay true",  # small messages, latency measured: no Nagle delay
    ]
    if os.geteuid() == 0 and bind == LOOPBACK:
        lines.append("user root")
    return "\n".join(lines) + "\n"


def _start_mosquitto(binary: Path, workdir: Path, auth: BrokerAuth | None,
                     tls: BrokerTLS | None) -> Broker:
    version = mosquitto_version(binary)
    log = workdir / "mosquitto.log"
    conf = workdir / "mosquitto.conf"
    access = None if auth is None else auth.write(workdir)
    for _attempt in range(START_ATTEMPTS):
        port = free_port()
        conf.write_text(mosquitto_config(port, log, access, tls))
        argv = [str(binary), "-c", str(conf)]
        proc = spawn(argv, workdir / "mosquitto.out")
        if _wait_listening(proc, LOOPBACK, port, START_TIMEOUT_S):
            return Broker("mosquitto", LOOPBACK, port, version, proc, log, auth, argv,
                          workdir / "mosquitto.out", tls)
        kill_process_group(proc)
        if "in use" not in _tail(log) + _tail(workdir / "mosquitto.out"):
            break
    raise BrokerError(
        f"mosquitto did not start listening on {LOOPBACK}:{port} within {START_TIMEOUT_S:g} s "
        f"(exit code {proc.returncode}); log tail: {_tail(log)} {_tail(workdir / 'mosquitto.out')}"
    )


def _start_embedded(workdir: Path) -> Broker:
    try:
        from amqtt import __version__ as version
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs amqtt: pip install 'edgebft[embedded-broker]', "
            "or use --broker mosquitto"
        ) from exc
    log = workdir / "embedded-broker.log"
    for _attempt in range(START_ATTEMPTS):
        port = free_port()
        argv = [sys.executable, "-m", "edgebft.lab.embedded_broker", "--host", LOOPBACK,
                "--port", str(port)]
        proc = spawn(argv, log)
        if _wait_listening(proc, LOOPBACK, port, START_TIMEOUT_S):
            return Broker("embedded", LOOPBACK, port, f"amqtt {version}", proc, log,
                          argv=argv, output=log)
        kill_process_group(proc)
        if "in use" not in _tail(log):
            break
    raise BrokerError(
        f"embedded broker (amqtt) did not start listening on {LOOPBACK}:{port} within "
        f"{START_TIMEOUT_S:g} s (exit code {proc.returncode}); log tail: {_tail(log)}"
    )


def check_reachable(host: str, port: int, login: Login = PLAIN,
                    timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Connect to ``host:port`` (logging in as ``login`` says) and complete an MQTT
    CONNECT/CONNACK within ``timeout_s``.

    Raises:
        BrokerError: "cannot reach MQTT broker at mqtt://h:p: <reason>; start one or use ...".
    """
    url = f"mqtt://{host}:{port}"
    connected = threading.Event()
    reason: list[str] = []

    def on_connect(client: mqtt.Client, userdata: object, flags: object, rc: object,
                   props: object = None) -> None:
        if getattr(rc, "is_failure", False):
            reason.append(f"CONNACK refused: {rc}")
        connected.set()

    client = login.client()
    client.on_connect = on_connect
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
        client.connect(host, port, keepalive=10)
        client.loop_start()
        if not connected.wait(timeout_s):
            reason.append(f"no CONNACK within {timeout_s:g} s")
    except OSError as exc:
        reason.append(exc.strerror or str(exc) or type(exc).__name__)
    finally:
        client.disconnect()
        client.loop_stop()
    if reason:
        raise BrokerError(f"cannot reach MQTT broker at {url}: {reason[0]}; start one or use "
                          "--broker mosquitto|embedded")


def start_broker(spec: BrokerSpec | str, workdir: Path, auth: BrokerAuth | None = None,
                 tls: BrokerTLS | None = None) -> Broker:
    """Start (or, for ``external``, check) the broker ``spec`` describes; return it running.

    Args:
        spec: a ``BrokerSpec`` or a string ``parse_broker`` accepts.
        workdir: an existing folder for the broker's config and log (``mosquitto.conf``,
            ``mosquitto.log``, ``embedded-broker.log``).
        auth: the identities and ACL the broker enforces (mosquitto: written into workdir;
            external: installed there by its owner, and the reachability check logs in as the
            host); the embedded broker (amqtt) takes none: BrokerError.
        tls: the CA and certificate the broker speaks TLS with (mosquitto only: BrokerError
            for the others, whose listeners the host does not configure).

    Raises:
        BrokerError: the spec is bad, the broker does not come up (the message includes the
            log tail), or the external broker is unreachable.
    """
    if isinstance(spec, str):
        spec = parse_broker(spec)
    if tls is not None and spec.kind != "mosquitto":
        raise BrokerError(f"--tls: the host sets TLS up only on the mosquitto it starts, not "
                          f"on the {spec.kind} broker; use --broker mosquitto or --no-tls")
    if spec.kind == "external":
        assert spec.host is not None
        assert spec.port is not None
        check_reachable(spec.host, spec.port,
                        Login(None if auth is None else auth.credentials(HOST)))
        return Broker("external", spec.host, spec.port, auth=auth)
    workdir.mkdir(parents=True, exist_ok=True)
    if spec.kind == "mosquitto":
        binary = spec.mosquitto or find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto not found; install it or use --broker embedded")
        return _start_mosquitto(binary, workdir, auth, tls)
    assert spec.kind == "embedded"
    if auth is not None:
        raise BrokerError("the embedded broker (amqtt) enforces no ACL: use --broker "
                          "mosquitto, or --no-acl for a development run")
    return _start_embedded(workdir)
