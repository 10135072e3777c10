"""edgebft.client and the ledger commands against an emulated cluster (issue 13, first part):
ordered operations from a Python program and from the shell, their errors and exit codes,
many application clients at once, and the README's example, run as written."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgebft import AsyncClient, Client, ClientError, Rejected, Timeout, UnknownKey
from edgebft.lab import session as lab
from edgebft.lab.broker import find_mosquitto
from edgebft.protocol.replica import CHECKPOINT_INTERVAL

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")

EDGEBFT = [sys.executable, "-m", "edgebft"]
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.LabCluster]:
    up = lab.up(broker="mosquitto", out=tmp_path_factory.mktemp("client") / "run")
    try:
        yield up
    finally:
        lab.down(up)


def edgebft(cluster: lab.LabCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGEBFT, *args, "--dir", str(cluster.path)], capture_output=True,
                          text=True, timeout=60)


def test_ordered_operations_from_a_program(cluster: lab.LabCluster) -> None:
    with Client.connect(cluster.path, client_id=101) as ledger:
        ledger.put("greeting", "hello")
        ledger.put("reading", [21, {"unit": "C"}])
        assert ledger.get("greeting") == "hello"
        assert ledger.get("reading") == [21, {"unit": "C"}]
        before = ledger.balance("acct1")
        assert ledger.transfer("acct101", "acct1", 5) == ledger.balance("acct101")
        assert ledger.balance("acct1") == before + 5
        assert ledger.balance("nobody") == 0
        assert ledger.validators() == {"epoch": 0, "validators": [1, 1, 1, 1],
                                       "bonds": [1, 1, 1, 1]}
        with pytest.raises(Rejected) as refused:
            ledger.transfer("acct101", "acct3", 10**12)
        assert refused.value.reason == "insufficient funds"
        with pytest.raises(Rejected) as refused:
            ledger.transfer("acct2", "acct101", 1)
        assert (refused.value.reason, refused.value.sent) == ("not owner", False)
        with pytest.raises(Rejected) as refused:
            ledger.transfer("nobody", "acct101", 1)
        assert (refused.value.reason, refused.value.sent) == ("no such account", False)
        with pytest.raises(Rejected) as refused:
            ledger.transfer("acct101", "nobody", 1)
        assert (refused.value.reason, refused.value.sent) == ("no such account", True)
        assert ledger.account("acct101") == {"balance": ledger.balance("acct101"),
                                             "owner": 101}
        assert ledger.account("nobody") is None
        with pytest.raises(UnknownKey):
            ledger.get("never written")
        with pytest.raises(KeyError):  # UnknownKey is a KeyError too
            ledger.get("never written")


def test_many_application_clients_at_once(cluster: lab.LabCluster) -> None:
    errors: list[BaseException] = []

    def app(k: int) -> None:
        try:
            with Client.connect(cluster.path, client_id=k) as ledger:
                for i in range(3):
                    ledger.put(f"app{k}", i)
                assert ledger.get(f"app{k}") == 2
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=app, args=(k,)) for k in range(100, 132)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with Client.connect(cluster.path, client_id=99) as ledger:
        assert [ledger.get(f"app{k}") for k in range(100, 132)] == [2] * 32


def test_shell_commands_print_one_line_and_say_how_it_went(cluster: lab.LabCluster) -> None:
    done = edgebft(cluster, "put", "colour", "blue")
    assert (done.returncode, done.stdout) == (0, "ok\n")
    done = edgebft(cluster, "get", "colour")
    assert (done.returncode, done.stdout) == (0, "blue\n")
    done = edgebft(cluster, "get", "colour", "--json")
    assert json.loads(done.stdout) == {"ok": True, "result": "blue"}
    done = edgebft(cluster, "get", "no such key")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "edgebft: no key 'no such key'\n"
    done = edgebft(cluster, "transfer", "acct200", "acct5", "999999999999")
    assert done.returncode == 1
    assert done.stderr == "edgebft: transfer rejected: insufficient funds\n"
    done = edgebft(cluster, "transfer", "acct4", "acct5", "3")
    assert (done.returncode, done.stderr) == (
        1, "edgebft: transfer rejected: not owner (acct4 is client 4's); nothing sent\n")
    done = edgebft(cluster, "transfer", "acct200", "acct5", "3")
    assert (done.returncode, done.stdout) == (0, "999997\n")
    assert re.fullmatch(r"\d+\n", edgebft(cluster, "balance", "acct5").stdout)
    assert edgebft(cluster, "validators").stdout.startswith("epoch 0: validators [1, 1, 1, 1]")


def test_bad_input_is_one_line_and_exit_2(cluster: lab.LabCluster, tmp_path: Path) -> None:
    done = subprocess.run([*EDGEBFT, "get", "k", "--dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"edgebft: error: no cluster in {tmp_path}: start one with 'edgebft cluster up'"]
    done = edgebft(cluster, "get", "k", "--client", "5000")
    assert done.returncode == 2 and "the broker knows ids 0..1023 only" in done.stderr
    done = edgebft(cluster, "transfer", "a", "b", "-3")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    with pytest.raises(ClientError):
        Client.connect(tmp_path)


def test_the_readme_example_runs_as_written(cluster: lab.LabCluster, tmp_path: Path) -> None:
    """The example under "Use the ledger from your application", run in a folder whose
    runs/cluster/latest is this cluster (as after `edgebft cluster up` there)."""
    text = README.read_text()
    section = text[text.index("## Use the ledger from your application"):]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example is not None
    (tmp_path / "runs" / "cluster").mkdir(parents=True)
    (tmp_path / "runs" / "cluster" / "latest").symlink_to(cluster.path)
    done = subprocess.run([sys.executable, "-c", example.group(1)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["hello", "acct100 has 999995 tokens left",
                                        "refused: not owner"]


def test_an_identity_file_is_all_an_application_needs(cluster: lab.LabCluster,
                                                       tmp_path: Path) -> None:
    """`edgebft client new` issues fresh ids and writes what one client needs (mode 0600),
    without any replica's keys; with it alone an application uses the cluster."""
    first = subprocess.run([*EDGEBFT, "client", "new", "--dir", str(cluster.path), "--out",
                            str(tmp_path / "app.json")], capture_output=True, text=True)
    second = subprocess.run([*EDGEBFT, "client", "new", "--dir", str(cluster.path)],
                            capture_output=True, text=True)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    ids = [int(re.match(r"client (\d+): ", d.stdout).group(1)) for d in (first, second)]
    assert ids[1] == ids[0] + 1 and ids[0] >= 256, ids
    path = tmp_path / "app.json"
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    keys = cluster.keys()
    assert not any(k.hex() in text for row in keys.pairwise for k in row), "no replica keys"
    assert not any(k.hex() in text for k in keys.client_secrets + keys.control)
    assert json.loads(text)["keys"] == [k.hex() for k in keys.client_keys(ids[0])]
    with Client.connect(identity=path) as ledger:
        ledger.put("from an identity", ids[0])
        assert ledger.get("from an identity") == ids[0]
    done = subprocess.run([*EDGEBFT, "get", "from an identity", "--identity", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"{ids[0]}\n")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ClientError, match="not a client identity file"):
        Client.connect(identity=tmp_path / "bad.json")


def test_reads_agree_with_ordered_reads_under_concurrent_writes(cluster: lab.LabCluster) -> None:
    """A writer counts up as fast as it can; a reader alternates read-only and ordered reads:
    neither kind ever goes back (two quorums share a correct replica, whose state only grows),
    and read-only reads that met a write in progress were asked again, ordered."""
    stop = threading.Event()
    with Client.connect(cluster.path, client_id=110) as w:
        w.put("counter", 0)

    def writer() -> None:
        with Client.connect(cluster.path, client_id=110) as w:
            i = 0
            while not stop.is_set():
                i += 1
                w.put("counter", i)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with Client.connect(cluster.path, client_id=111) as reader:
            seen = [reader.get("counter", ordered=k % 2 == 1) for k in range(200)]
    finally:
        stop.set()
        thread.join(10)
    assert seen == sorted(seen) and seen[-1] > 0, "no read went back"
    assert reader.reads["ordered"] >= 100 and reader.reads["read-only"] > 0, reader.reads


def test_a_client_opens_an_account_and_bonds_and_unbonds_its_stake(
        cluster: lab.LabCluster) -> None:
    """Ownership end to end (issue 13): an account opened by one client is spent by it alone;
    its delegation is unbonded by it alone, out of the bond at once and back after the
    unbonding period (UNBONDING_CHECKPOINTS checkpoints: the writes below pass them)."""
    with Client.connect(cluster.path, client_id=102) as owner, \
            Client.connect(cluster.path, client_id=103) as other:
        owner.open("savings102")
        with pytest.raises(Rejected) as refused:
            other.open("savings102")
        assert refused.value.reason == "account exists"
        owner.transfer("acct102", "savings102", 10)
        reads = dict(other.reads)
        with pytest.raises(Rejected) as refused:
            other.transfer("savings102", "acct103", 1)
        assert (refused.value.reason, refused.value.sent) == ("not owner", False)
        assert sum(other.reads.values()) == sum(reads.values()) + 1, "the owner, read once"
        with pytest.raises(Rejected) as refused:
            other.stake("savings102", 2, 1)
        assert (refused.value.reason, refused.value.sent) == ("not owner", False)
        assert sum(other.reads.values()) == sum(reads.values()) + 1, "the owner, kept"
        with pytest.raises(Rejected) as refused:  # sent anyway: the ledger refuses it
            other.call(["transfer", "savings102", "acct103", 1])
        assert (refused.value.reason, refused.value.sent) == ("not owner", True)
        bond = owner.validators()["bonds"][2]
        assert owner.stake("savings102", 2, 4) == bond + 4
        assert owner.delegations("savings102") == {2: 4}
        with pytest.raises(Rejected) as refused:
            other.unstake(2, "savings102", 4)
        assert (refused.value.reason, refused.value.sent) == ("not owner", False)
        with pytest.raises(Rejected) as refused:
            other.call(["unstake", 2, "savings102", 4])
        assert (refused.value.reason, refused.value.sent) == ("not owner", True)
        assert owner.unstake(2, "savings102", 4) == bond
        assert owner.balance("savings102", ordered=True) == 6, "unbonding, not back yet"
        for i in range(3 * CHECKPOINT_INTERVAL):  # past two checkpoints
            owner.put("tick102", i)
        assert owner.balance("savings102", ordered=True) == 10
    done = edgebft(cluster, "delegations", "savings102")
    assert (done.returncode, done.stdout) == (0, "none\n")


def test_stake_unbonding_from_an_equivocator_is_slashed_with_it(tmp_path: Path) -> None:
    """Five equal replicas (the two the primary's real and null pre-prepares reach prove
    the equivocation with over 1/3 of stake). A client bonds 5 tokens to validator 0, the
    primary, and unbonds them at once; then 0 equivocates. The accusations are ordered
    within the unbonding period (UNBONDING_CHECKPOINTS checkpoints), so the slash burns the
    unbonding tokens: well past the period, the account has not seen them again."""
    cluster = lab.up(nodes=5, broker="mosquitto", out=tmp_path / "run")
    try:
        with Client.connect(cluster.path, client_id=100, timeout_s=10) as ledger:
            before = ledger.balance("acct100", ordered=True)
            assert ledger.stake("acct100", 0, 5) == 6
            assert ledger.unstake(0, "acct100", 5) == 1
            assert ledger.balance("acct100", ordered=True) == before - 5, "unbonding"
            print(lab.inject(cluster, "byzantine", 0, mode="equivocate"))
            i = 0
            while ledger.validators(ordered=True)["bonds"][0] != 0:
                assert i < 40, "validator 0 slashed after its equivocation"
                ledger.put("after", i)
                i += 1
            for j in range(3 * CHECKPOINT_INTERVAL):  # past the unbonding period
                ledger.put("later", j)
            assert ledger.balance("acct100", ordered=True) == before - 5, "burnt"
            assert ledger.delegations("acct100", ordered=True) == {}
    finally:
        lab.down(cluster)


def test_many_async_clients_on_one_event_loop(cluster: lab.LabCluster) -> None:
    async def app(k: int) -> object:
        async with await AsyncClient.connect(cluster.path, client_id=k) as ledger:
            await ledger.put(f"async{k}", k)
            value = await ledger.get(f"async{k}", ordered=True)
            with pytest.raises(Rejected):
                await ledger.transfer(f"acct{k}", "acct1", 10**12)
            return value

    async def main() -> list[object]:
        return list(await asyncio.gather(*(app(k) for k in range(140, 156))))

    assert asyncio.run(main()) == list(range(140, 156))


def test_what_the_ledger_would_refuse_for_its_shape_is_never_sent(
        cluster: lab.LabCluster) -> None:
    with Client.connect(cluster.path, client_id=104) as ledger:
        before = ledger._core.timestamp
        for call, message in (
                (lambda: ledger.put("k" * 33, 1), "is not a key or account name"),
                (lambda: ledger.put("k", "v" * 100), "more than 64"),
                (lambda: ledger.get(""), "is not a key or account name"),
                (lambda: ledger.transfer("acct104", "acct1", 0), "not a positive integer"),
                (lambda: ledger.stake("acct104", 9, 1), "validator 9 is not a replica")):
            with pytest.raises(ClientError, match=message):
                call()
        assert ledger._core.timestamp == before, "no request was made"
    done = edgebft(cluster, "put", "k" * 33, "v")
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"edgebft: error: put: {'k' * 33!r} is not a key or account name (text of 1 to 32 "
        "characters); nothing sent"]


def test_a_stopped_cluster_times_out(cluster: lab.LabCluster) -> None:
    """Last in the module: every node is killed, the broker stays up."""
    for i in range(cluster.nodes):
        lab.inject(cluster, "crash", i)
    with Client.connect(cluster.path, client_id=101, timeout_s=1.0) as ledger:
        with pytest.raises(Timeout):
            ledger.put("k", 1)
    done = edgebft(cluster, "get", "k", "--timeout", "1")
    assert done.returncode == 3
    assert "no accepted reply within 1 s" in done.stderr
