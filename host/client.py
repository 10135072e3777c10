"""Use the ledger from an application: a blocking client of an EdgeBFT cluster.

    from edgebft import Client

    with Client.connect(client_id=100) as ledger:   # the cluster of runs/cluster/latest
        ledger.put("greeting", "hello")
        print(ledger.get("greeting"))

Every write is one ordered request: authenticated with the client's keys (one tag per replica),
published to every replica through the broker, sent again when ClientCore's retransmission
timer says (from the round trips measured, doubling per retransmission) until replies that
match carry more than 1/3 of the stake (protocol/client.py: at least one correct replica
vouches for the result). Reads (get, balance, account, delegations, validators) are
read-only requests first (PBFT's optimisation: every replica answers from its executed state,
one round trip, accepted on matching replies over 2/3 of stake); when the replies disagree (a
write in progress, a lagging or lying replica) or none is decided within READ_WAIT_S, the read
is made again, ordered (``ordered=True`` asks for that at once; ``reads`` counts both). A call
returns the result, or raises:

- Rejected: the ledger refused the operation (``reason``: "insufficient funds", "not owner",
  "no such account", "value too large", "store full", "page full", ...); an operation that
  spends from an account this client does not own (transfer, stake, unstake) is refused so
  before it is sent (``sent`` False: the owner is read first, once per account);
- UnknownKey (a KeyError): ``get`` of a key that holds no value;
- Timeout: no accepted reply within ``timeout_s`` (the cluster may be down or cut off). The
  request may still execute later; it executes at most once.

Contract: one request at a time per client (calls from several threads queue on a lock);
timestamps start at the host clock in microseconds, so a client id can be reused by a later
process, but not by two processes at once. On a broker with ACLs the client logs in as its
own identity (ids 0..ACL_CLIENTS-1) and may only publish its requests and read its replies.

Accounts are owned (protocol/ledger.py): a client spends only from accounts it opened, or that
genesis gave it (a lab cluster funds acct<c> for client c), and unbonds only its own
delegations; unbonded tokens come back after UNBONDING_CHECKPOINTS checkpoints.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from edgebft.devices.keys import ClusterKeys
from edgebft.devices.site import SiteError, load_site
from edgebft.lab.bench import ACL_CLIENTS
from edgebft.lab.broker import RECONNECT_MAX_S, RECONNECT_MIN_S, Login
from edgebft.lab.broker_auth import BrokerAuth
from edgebft.lab.broker_tls import BrokerTLS
from edgebft.lab.session import LabCluster, LabError
from edgebft.lab.session import load as load_cluster
from edgebft.protocol import cbor
from edgebft.protocol.client import ClientCore
from edgebft.protocol.ledger import NAME_BYTES_MAX, VALUE_BYTES_MAX, is_amount, is_name
from edgebft.protocol.stake import Stake

READ_WAIT_S = 0.2  # a read-only request's chance before it is asked again, ordered
TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0
OWNERS_KEPT = 1024  # accounts whose owner a client remembers (then it forgets them all)


class ClientError(RuntimeError):
    """Base of the client's errors; the message is one line for a user."""


class Rejected(ClientError):
    """The ledger refused the operation; ``reason`` says why (``why`` adds to the message).
    ``sent`` is False when the client refused it for the ledger, from the ledger's state,
    without sending it (an account this client does not own)."""

    def __init__(self, op: list[Any], reason: Any, sent: bool = True, why: str = "") -> None:
        super().__init__(f"{op[0]} rejected: {reason}{why}" + ("" if sent else "; nothing sent"))
        self.op = op
        self.reason = reason
        self.sent = sent


class UnknownKey(ClientError, KeyError):
    """``get`` of a key that holds no value."""

    def __str__(self) -> str:
        return str(self.args[0])


class Timeout(ClientError):
    """No accepted reply in time: the request may still execute (at most once)."""


@dataclass(frozen=True)
class Identity:
    """All a client needs, and no more: its cluster and id, the broker and its login there
    (None without ACLs), the validators' stake, and the key it shares with each replica. No
    replica's keys: an identity file (``edgebft client new``) can go to an application's
    machine without giving it the cluster."""

    cluster: str
    client: int
    broker: dict[str, Any]  # host, port, and user and password on a broker with ACLs
    stake: list[int]
    keys: list[bytes]

    @classmethod
    def make(cls, cluster: str, client_id: int, host: str, port: int, acl: BrokerAuth | None,
             stake: list[int], keys: ClusterKeys, tls: BrokerTLS | None = None) -> Identity:
        """Client ``client_id``'s identity in cluster ``cluster`` of keys ``keys``, on the
        broker at host:port (which enforces ``acl``, or takes anyone; and speaks TLS with
        ``tls``'s certificate, or plain TCP)."""
        if type(client_id) is not int or client_id < 0:
            raise ClientError(f"client id {client_id!r}: expected a non-negative integer")
        if acl is not None and client_id >= acl.clients:
            raise ClientError(f"client id {client_id}: the broker knows ids 0.."
                              f"{acl.clients - 1} only")
        return cls(cluster, client_id, Login.of(str(client_id), acl, tls).device_entry(host, port),
                   list(stake), keys.client_keys(client_id))

    @classmethod
    def of(cls, cluster: LabCluster, client_id: int) -> Identity:
        """Client ``client_id``'s identity in the lab cluster ``cluster``."""
        b = cluster.state["broker"]
        return cls.make(cluster.state["cluster"], client_id, b["host"], b["port"],
                        cluster.broker_auth(), cluster.state["stake"], cluster.keys(),
                        cluster.broker_tls())

    @classmethod
    def of_site(cls, cluster_toml: Path, client_id: int) -> Identity:
        """Client ``client_id``'s identity in the cluster of boards ``cluster_toml``."""
        try:
            site = load_site(cluster_toml)
            keys = site.keys()
        except SiteError as e:
            raise ClientError(str(e)) from None
        if type(client_id) is not int or not 0 <= client_id < ACL_CLIENTS:
            raise ClientError(f"client id {client_id!r}: expected 0..{ACL_CLIENTS - 1}")
        return cls(site.name, client_id, site.login(str(client_id), keys).device_entry(
            site.broker["host"], site.broker["port"]), list(site.stake),
            keys.client_keys(client_id))

    def to_json(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "client": self.client, "broker": self.broker,
                "stake": self.stake, "keys": [k.hex() for k in self.keys]}

    @classmethod
    def load(cls, path: Path) -> Identity:
        """The identity in file ``path``; ClientError for a missing or malformed file."""
        try:
            raw = json.loads(Path(path).read_text())
            return cls(str(raw["cluster"]), int(raw["client"]), dict(raw["broker"]),
                       [int(w) for w in raw["stake"]], [bytes.fromhex(k) for k in raw["keys"]])
        except OSError as e:
            raise ClientError(f"{path}: {e.strerror or e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ClientError(f"{path}: not a client identity file ({e})") from None

    def save(self, path: Path) -> None:
        """Write the identity to ``path`` (mode 0600: it holds the client's keys)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        path.chmod(0o600)


class Client:
    """A connected client of a cluster, as ``identity`` (see the module docstring)."""

    def __init__(self, identity: Identity, timeout_s: float = TIMEOUT_S) -> None:
        client_id = identity.client
        broker = identity.broker
        login = Login.of_entry(broker)
        self.client_id = client_id
        self.timeout_s = timeout_s
        if len(identity.keys) != len(identity.stake):
            raise ClientError(f"client {client_id}: {len(identity.keys)} keys for "
                              f"{len(identity.stake)} replicas")
        self._core = ClientCore(client_id, Stake(identity.stake), identity.keys,
                                timestamp=time.time_ns() // 1000)
        prefix = f"ebft/{identity.cluster}/"
        self._req, self._rep = f"{prefix}req/{client_id}", f"{prefix}rep/{client_id}"
        self._lock = threading.Lock()         # one request at a time
        self._core_lock = threading.Lock()    # the core, between a call and paho's thread
        self._done = threading.Event()  # the outstanding request is accepted, or undecided
        self._result: Any = None
        self.reads = {"read-only": 0, "ordered": 0}  # how reads were answered
        self._owners: dict[str, int] = {}  # account -> owner (never changes once opened)
        self._subscribed = threading.Event()
        self._refused: list[str] = []
        self._mqtt = login.client(f"ebft-{identity.cluster}-app{client_id}-"
                                  f"{os.urandom(3).hex()}")
        self._mqtt.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)  # type: ignore[arg-type]
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_message = self._on_message
        self._mqtt.on_subscribe = lambda *args: self._subscribed.set()
        try:
            self._mqtt.connect(broker["host"], broker["port"], keepalive=30)
        except ssl.SSLCertVerificationError as e:
            raise ClientError(f"the broker at {broker['host']}:{broker['port']} is not the "
                              f"one this identity's CA vouches for ({e.verify_message}); is "
                              "this identity of that cluster?") from None
        except OSError as e:
            hint = ("does the broker speak TLS on this port?" if login.ca_der is not None
                    else "is the cluster up?")
            raise ClientError(f"cannot reach the cluster's broker at {broker['host']}:"
                              f"{broker['port']} ({e.strerror or e}); {hint}") from None
        self._mqtt.loop_start()
        if not self._subscribed.wait(CONNECT_TIMEOUT_S):
            self.close()
            why = self._refused[0] if self._refused else "no answer"
            raise ClientError(f"the broker at {broker['host']}:{broker['port']} did not take "
                              f"client {client_id} ({why})")

    @classmethod
    def connect(cls, run_dir: str | Path | None = None, client_id: int = 0,
                timeout_s: float = TIMEOUT_S, identity: str | Path | None = None,
                cluster_toml: str | Path | None = None) -> Client:
        """A client of the emulated cluster in ``run_dir`` (default: runs/cluster/latest, the
        last ``edgebft cluster up``) as ``client_id``; or of the boards of ``cluster_toml``
        (its keys beside it, edgebft.devices.site) as ``client_id``; or, given an ``identity``
        file (``edgebft client new``), as that identity, with no access to the cluster's
        folder. ClientError for a folder with no cluster, a bad cluster.toml or a bad identity
        file."""
        if identity is not None:
            return cls(Identity.load(Path(identity)), timeout_s)
        if cluster_toml is not None:
            return cls(Identity.of_site(Path(cluster_toml), client_id), timeout_s)
        try:
            cluster = load_cluster(Path(run_dir) if run_dir is not None else None)
        except LabError as e:
            raise ClientError(str(e)) from None
        return cls(Identity.of(cluster, client_id), timeout_s)

    def close(self) -> None:
        self._mqtt.disconnect()
        self._mqtt.loop_stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the ledger's operations

    def put(self, key: str, value: Any) -> None:
        """Set ``key`` to ``value`` (any CBOR value: str, int, bytes, lists, maps)."""
        self._call(["put", key, value])

    def get(self, key: str, ordered: bool = False) -> Any:
        """The value of ``key``; UnknownKey when it holds none."""
        value = self._read(["get", key], ordered)
        if value is None:
            raise UnknownKey(f"no key {key!r}")
        return value

    def open(self, account: str) -> None:
        """Create ``account``, empty, owned by this client (Rejected: "account exists")."""
        self._call(["open", account])

    def transfer(self, source: str, dest: str, amount: int) -> int:
        """Move ``amount`` tokens from this client's account ``source`` to the existing
        account ``dest``; returns what ``source`` holds after."""
        return int(self._spend(["transfer", source, dest, amount], source))

    def balance(self, account: str, ordered: bool = False) -> int:
        """The balance of ``account`` (0 for one that does not exist)."""
        return int(self._read(["balance", account], ordered) or 0)

    def account(self, name: str, ordered: bool = False) -> dict[str, int] | None:
        """{"balance", "owner"} of account ``name``, or None when it does not exist."""
        entry = self._read(["account", name], ordered)
        return None if entry is None else {"balance": entry[0], "owner": entry[1]}

    def stake(self, account: str, validator: int, amount: int) -> int:
        """Bond ``amount`` tokens of this client's ``account`` to replica ``validator`` (in
        force from the next checkpoint); returns the validator's new bond."""
        return int(self._spend(["stake", account, validator, amount], account))

    def unstake(self, validator: int, account: str, amount: int) -> int:
        """Unbond ``amount`` of what ``account`` delegated to ``validator``: out of the bond at
        once, back in the account after the unbonding period (burnt if the validator is
        slashed meanwhile); returns the validator's new bond."""
        return int(self._spend(["unstake", validator, account, amount], account))

    def delegations(self, account: str, ordered: bool = False) -> dict[int, int]:
        """{validator: tokens} that ``account`` has bonded and not unbonded."""
        return {v: amount for v, amount in self._read(["delegations", account], ordered)}

    def validators(self, ordered: bool = False) -> dict[str, Any]:
        """{"epoch", "validators" (stake in force per replica), "bonds" (stake per replica
        from the next epoch on)}."""
        epoch, validators, bonds = self._read(["validators"], ordered)
        return {"epoch": epoch, "validators": validators, "bonds": bonds}

    def call(self, op: list[Any]) -> Any:
        """Any ledger operation (protocol/ledger.py): its result, or Rejected or Timeout."""
        return self._call(op)

    def _check(self, op: list[Any]) -> None:
        """Refuse, before anything is sent, an op the ledger would refuse for its shape: a key
        or account that is not 1..NAME_BYTES_MAX characters, a value over VALUE_BYTES_MAX
        bytes of CBOR, an amount that is not a positive integer, a validator that is not a
        replica. ClientError, one line."""
        arity = {"put": 3, "get": 2, "balance": 2, "account": 2, "open": 2, "delegations": 2,
                 "transfer": 4, "stake": 4, "unstake": 4}
        if not isinstance(op, list) or not op or arity.get(op[0]) != len(op):
            return  # call() with another op: the ledger judges it
        name = op[0]
        names = {"put": op[1:2], "get": op[1:2], "balance": op[1:2], "account": op[1:2],
                 "open": op[1:2], "delegations": op[1:2], "transfer": op[1:3],
                 "stake": op[1:2], "unstake": op[2:3]}.get(name, [])
        for text in names:
            if not is_name(text):
                raise ClientError(f"{name}: {text!r} is not a key or account name (text of 1 "
                                  f"to {NAME_BYTES_MAX} characters); nothing sent")
        if name == "put" and len(cbor.encode(op[2])) > VALUE_BYTES_MAX:
            raise ClientError(f"put: the value takes {len(cbor.encode(op[2]))} bytes of CBOR, "
                              f"more than {VALUE_BYTES_MAX}; nothing sent")
        if name in ("transfer", "stake", "unstake") and not is_amount(op[3]):
            raise ClientError(f"{name}: amount {op[3]!r} is not a positive integer below 2**63;"
                              " nothing sent")
        validator = {"stake": op[2:3], "unstake": op[1:2]}.get(name, [])
        for v in validator:
            if type(v) is not int or not 0 <= v < self._core.stake.n:
                raise ClientError(f"{name}: validator {v!r} is not a replica (0 to "
                                  f"{self._core.stake.n - 1}); nothing sent")

    def _spend(self, op: list[Any], account: str) -> Any:
        """``op``, which spends from ``account``: refused before anything is sent unless this
        client owns the account (Rejected, ``sent`` False, with the ledger's reason: "no such
        account" or "not owner"). The owner is read once per account (read-only) and kept:
        an account's owner never changes once it exists. ``op`` itself is checked first."""
        self._check(op)
        owner = self._owners.get(account)
        if owner is None:
            entry = self.account(account)
            if entry is None:
                raise Rejected(op, "no such account", sent=False)
            if len(self._owners) >= OWNERS_KEPT:
                self._owners.clear()
            owner = self._owners[account] = entry["owner"]
        if owner != self.client_id:
            raise Rejected(op, "not owner", sent=False, why=f" ({account} is client {owner}'s)")
        return self._call(op)

    # ---- one request

    def _read(self, op: list[Any], ordered: bool) -> Any:
        """A read: read-only first unless ``ordered``, then ordered if that did not decide."""
        self._check(op)
        if not ordered:
            with self._lock:
                self._done.clear()
                with self._core_lock:
                    wire = self._core.read(op)
                self._mqtt.publish(self._req, wire)
                self._done.wait(READ_WAIT_S)
                with self._core_lock:
                    decided = self._core.accepted and self._done.is_set()
                    self._core.accepted = True  # replies still to come are ignored
                if decided:
                    ok, value = self._result
                    if ok:
                        self.reads["read-only"] += 1
                        return value
        self.reads["ordered"] += 1
        return self._call(op)

    def _call(self, op: list[Any]) -> Any:
        self._check(op)
        with self._lock:
            self._done.clear()
            with self._core_lock:
                wire = self._core.request(op)
            deadline = time.monotonic() + self.timeout_s
            while True:
                with self._core_lock:
                    now_ms = time.monotonic() * 1000.0
                    self._core.sent(now_ms)
                    wait_s = (self._core.next_send_ms - now_ms) / 1000.0
                self._mqtt.publish(self._req, wire)
                left = deadline - time.monotonic()
                if self._done.wait(max(0.0, min(wait_s, left))):
                    break
                if time.monotonic() >= deadline:
                    with self._core_lock:
                        self._core.accepted = True  # late replies to it are ignored
                    raise Timeout(f"{op[0]}: no accepted reply within {self.timeout_s:g} s "
                                  "(is the cluster up?); it may still execute, at most once")
            ok, value = self._result
        if not ok:
            raise Rejected(op, value)
        return value

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self._refused.append(str(reason))
            return
        client.subscribe(self._rep, qos=0)  # on every connection: a restarted broker forgot

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._core_lock:
            accepted, result = self._core.on_reply(msg.payload, time.monotonic() * 1000.0)
            undecided = self._core.read_only and self._core.undecided()
        if accepted:
            self._result = result if isinstance(result, list) and len(result) == 2 else (
                False, f"malformed result {result!r}")
            self._done.set()
        elif undecided:
            self._done.set()  # a read-only request whose replies disagree: ask again, ordered


class AsyncClient:
    """The asyncio face of Client: ``await AsyncClient.connect(...)`` (Client.connect's
    arguments), then the same operations as coroutines (put, get, open, transfer, balance,
    stake, unstake, delegations, validators, call), with the same results and exceptions. Each
    call runs the blocking one in a worker thread (asyncio.to_thread), so one event loop serves
    many application clients at once, each with its own id; one request at a time per client,
    as for Client."""

    OPERATIONS = frozenset({"put", "get", "open", "transfer", "balance", "account", "stake",
                            "unstake", "delegations", "validators", "call"})

    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    async def connect(cls, *args: Any, **kwargs: Any) -> AsyncClient:
        return cls(await asyncio.to_thread(Client.connect, *args, **kwargs))

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        if name not in self.OPERATIONS:
            raise AttributeError(name)
        method = getattr(self.client, name)

        async def operation(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        operation.__doc__ = method.__doc__
        return operation
