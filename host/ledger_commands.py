"""``edgebft put|get|open|transfer|balance|stake|unstake|delegations|validators``: the ledger
from a shell (edgebft.client);
``edgebft client new``: an identity file for an application.

One line of output per command (``--json``: one JSON object, ``{"ok": ..., "result": ...}``
or ``{"ok": false, "error": ...}``). Exit status: 0 accepted, 1 rejected by the ledger (or no
such key), 2 a usage or environment error (one line on stderr), 3 timed out (the request may
still execute, at most once).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgebft.client import Client, ClientError, Identity, Rejected, Timeout, UnknownKey
from edgebft.lab.bench import ACL_CLIENTS, ISSUED_CLIENTS_FIRST
from edgebft.lab.session import LabError
from edgebft.lab.session import load as load_cluster

EXIT_REJECTED = 1
EXIT_USER_ERROR = 2
EXIT_TIMEOUT = 3
CLIENT_DEFAULT = 200  # clear of the workload's ids (0..clients-1) and within ACL identities


def _common(command: Callable[..., None]) -> Callable[..., None]:
    for option in reversed([
        click.option("--dir", "run_dir", type=click.Path(path_type=Path), default=None,
                     help="The cluster's run folder (default: runs/cluster/latest)."),
        click.option("--cluster", "cluster_toml", type=click.Path(path_type=Path),
                     default=None, help="A cluster of boards: its cluster.toml (instead of "
                                        "--dir)."),
        click.option("--client", "client_id", type=click.IntRange(min=0),
                     default=CLIENT_DEFAULT, show_default=True,
                     help="The client id to speak as (one process at a time per id)."),
        click.option("--identity", type=click.Path(path_type=Path), default=None,
                     help="Speak as the identity in this file (edgebft client new) instead "
                          "of --dir and --client."),
        click.option("--timeout", "timeout_s", type=float, default=5.0, show_default=True,
                     help="Seconds to wait for an accepted reply."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
    ]):
        command = option(command)
    return command


def _run(options: dict[str, Any], call: Callable[[Client], Any],
         show: Callable[[Any], str]) -> None:
    """Connect, make ``call``, print its result (``show`` it) or the error, and exit."""
    as_json = options["as_json"]
    try:
        with Client.connect(options["run_dir"], options["client_id"], options["timeout_s"],
                            options["identity"], options["cluster_toml"]) as client:
            result = call(client)
    except (Rejected, UnknownKey, Timeout) as e:
        code = EXIT_TIMEOUT if isinstance(e, Timeout) else EXIT_REJECTED
        reason = e.reason if isinstance(e, Rejected) else str(e)
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(reason),
                                   "timeout": isinstance(e, Timeout)}))
        else:
            click.echo(f"edgebft: {e}", err=True)
        sys.exit(code)
    except ClientError as e:
        click.echo(f"edgebft: error: {e}", err=True)
        sys.exit(EXIT_USER_ERROR)
    if as_json:
        click.echo(json.dumps({"ok": True, "result": result}, default=_jsonable))
    else:
        click.echo(show(result))


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=_jsonable)


@click.command()
@click.argument("key")
@click.argument("value")
@_common
def put(key: str, value: str, **options: Any) -> None:
    """Set KEY to VALUE (a string) in the replicated ledger."""
    _run(options, lambda c: c.put(key, value), lambda _: "ok")


@click.command()
@click.argument("key")
@_common
def get(key: str, **options: Any) -> None:
    """Print KEY's value (an ordered read); exit 1 when it holds none."""
    _run(options, lambda c: c.get(key), _text)


@click.command("open")
@click.argument("account")
@_common
def open_account(account: str, **options: Any) -> None:
    """Create ACCOUNT, empty, owned by the client speaking."""
    _run(options, lambda c: c.open(account), lambda _: "ok")


@click.command()
@click.argument("source")
@click.argument("dest")
@click.argument("amount", type=click.IntRange(min=1))
@_common
def transfer(source: str, dest: str, amount: int, **options: Any) -> None:
    """Move AMOUNT tokens from account SOURCE (the client's own: a lab cluster funds
    acct<ID> for client ID) to the existing account DEST; print what SOURCE holds after."""
    _run(options, lambda c: c.transfer(source, dest, amount), str)


@click.command()
@click.argument("account")
@_common
def balance(account: str, **options: Any) -> None:
    """Print ACCOUNT's balance."""
    _run(options, lambda c: c.balance(account), str)


@click.command()
@click.argument("account")
@click.argument("validator", type=click.IntRange(min=0))
@click.argument("amount", type=click.IntRange(min=1))
@_common
def stake(account: str, validator: int, amount: int, **options: Any) -> None:
    """Bond AMOUNT tokens of the client's ACCOUNT to replica VALIDATOR (in force from the next
    checkpoint); print the validator's new bond."""
    _run(options, lambda c: c.stake(account, validator, amount), str)


@click.command()
@click.argument("validator", type=click.IntRange(min=0))
@click.argument("account")
@click.argument("amount", type=click.IntRange(min=1))
@_common
def unstake(validator: int, account: str, amount: int, **options: Any) -> None:
    """Unbond AMOUNT of what ACCOUNT delegated to VALIDATOR: out of the bond at once, back in
    ACCOUNT after the unbonding period (burnt if VALIDATOR is slashed meanwhile); print the
    validator's new bond."""
    _run(options, lambda c: c.unstake(validator, account, amount), str)


@click.command()
@click.argument("account")
@_common
def delegations(account: str, **options: Any) -> None:
    """Print what ACCOUNT has bonded, per validator."""
    _run(options, lambda c: c.delegations(account),
         lambda d: ", ".join(f"validator {v}: {n}" for v, n in sorted(d.items())) or "none")


@click.command()
@_common
def validators(**options: Any) -> None:
    """Print the epoch, the stake in force per replica and the bonds for the next epoch."""
    _run(options, lambda c: c.validators(),
         lambda v: f"epoch {v['epoch']}: validators {v['validators']}, bonds {v['bonds']}")


@click.group()
def client() -> None:
    """Client identities of a lab cluster or of a cluster of boards."""


@client.command("new")
@click.option("--dir", "run_dir", type=click.Path(path_type=Path), default=None,
              help="The cluster's run folder (default: runs/cluster/latest).")
@click.option("--cluster", "cluster_toml", type=click.Path(path_type=Path), default=None,
              help="A cluster of boards: its cluster.toml (instead of --dir).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write it (default: RUN/clients/client<ID>.json, or "
                   "clients/client<ID>.json beside cluster.toml).")
def client_new(run_dir: Path | None, cluster_toml: Path | None, out: Path | None) -> None:
    """Issue a client id never used in the cluster (from 256 on) and write its identity file
    (mode 0600): the cluster, the broker and the client's login there (and its CA with TLS),
    the stake, and the keys it shares with each replica; no replica's keys. Give it to an
    application (Client.connect(identity=FILE), or --identity FILE on the commands above)."""
    try:
        if cluster_toml is not None:
            number, folder = issue_site_client(cluster_toml), cluster_toml.parent
            identity = Identity.of_site(cluster_toml, number)
        else:
            cluster = load_cluster(run_dir)
            number, folder = cluster.issue_client(), cluster.path
            identity = Identity.of(cluster, number)
    except (LabError, ClientError) as e:
        click.echo(f"edgebft: error: {e}", err=True)
        sys.exit(EXIT_USER_ERROR)
    path = out or folder / "clients" / f"client{number}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    identity.save(path)
    click.echo(f"client {number}: {path}")


def issue_site_client(cluster_toml: Path) -> int:
    """The next client id of a cluster of boards (from ISSUED_CLIENTS_FIRST on), counted in
    <stem>.issued beside its cluster.toml; ClientError once the broker's identities run out."""
    counter = cluster_toml.with_name(cluster_toml.stem + ".issued")
    try:
        number = int(counter.read_text()) if counter.exists() else ISSUED_CLIENTS_FIRST
    except ValueError:
        raise ClientError(f"{counter}: not a client count") from None
    if number >= ACL_CLIENTS:
        raise ClientError(f"all {ACL_CLIENTS - ISSUED_CLIENTS_FIRST} client identities of "
                          f"{cluster_toml} are issued")
    counter.write_text(f"{number + 1}\n")
    return number


COMMANDS = (put, get, open_account, transfer, balance, stake, unstake, delegations, validators,
            client)
