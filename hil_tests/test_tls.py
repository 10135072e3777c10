"""A cluster whose broker speaks TLS only (issue 12; edgebft.lab.broker_tls).

The nodes (MicroPython's ssl, mbedTLS), the host's tools and applications (paho over Python's
ssl) trust the cluster's own CA alone. Plain TCP gets no MQTT session; a party holding another
CA refuses the broker and says so in one line; a broker restart is ridden out as over TCP.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import wait_until
from edgebft import Client, ClientError
from edgebft.lab import session as lab
from edgebft.lab.broker import PLAIN, BrokerError, Login, check_reachable, find_mosquitto
from edgebft.lab.broker_tls import BrokerTLS

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")

EDGEBFT = [sys.executable, "-m", "edgebft"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.LabCluster]:
    up = lab.up(broker="mosquitto", out=tmp_path_factory.mktemp("tls") / "run", tls=True)
    try:
        yield up
    finally:
        lab.down(up)


def test_nodes_tools_and_applications_speak_tls(cluster: lab.LabCluster) -> None:
    assert "with ACL and TLS" in cluster.state["broker"]["describe"]
    for i in range(cluster.nodes):
        log = (cluster.path / "logs" / f"node{i}.log").read_text()
        assert "over TLS" in log, log
    with Client.connect(cluster.path, client_id=100) as ledger:
        ledger.put("secret", "over TLS")
        assert ledger.get("secret") == "over TLS"
    status = lab.status(cluster)
    assert sorted(status) == list(range(cluster.nodes))
    assert all(s.get("online") for s in status.values())


def test_plain_tcp_gets_no_session(cluster: lab.LabCluster) -> None:
    b = cluster.state["broker"]
    with pytest.raises(BrokerError):
        check_reachable(b["host"], b["port"], Login(cluster.login().credentials), 2.0)
    with pytest.raises(BrokerError):
        check_reachable(b["host"], b["port"], PLAIN, 2.0)
    check_reachable(b["host"], b["port"], cluster.login(), 5.0)


def test_an_application_with_another_ca_refuses_the_broker(cluster: lab.LabCluster,
                                                           tmp_path: Path) -> None:
    made = subprocess.run([*EDGEBFT, "client", "new", "--dir", str(cluster.path), "--out",
                           str(tmp_path / "app.json")], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    identity = json.loads((tmp_path / "app.json").read_text())
    assert identity["broker"]["ca"] == cluster.broker_tls().ca_der.hex()
    identity["broker"]["ca"] = BrokerTLS.create(tmp_path / "other", "other").ca_der.hex()
    (tmp_path / "other.json").write_text(json.dumps(identity))
    done = subprocess.run([*EDGEBFT, "get", "secret", "--identity", str(tmp_path / "other.json")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"edgebft: error: the broker at {identity['broker']['host']}:"
        f"{identity['broker']['port']} is not the one this identity's CA vouches for "
        "(self-signed certificate in certificate chain); is this identity of that cluster?"]
    with pytest.raises(ClientError):
        Client.connect(identity=tmp_path / "other.json")


def test_a_node_with_another_ca_refuses_the_broker_and_says_why(cluster: lab.LabCluster,
                                                                tmp_path: Path) -> None:
    """Node 3 given another CA: its restart never reports in, its log names the TLS refusal
    once; given its own back, it rejoins."""
    config_path = Path(cluster.node(3)["image"]) / "edgebft.json"
    config = json.loads(config_path.read_text())
    own = config["broker"]["ca"]
    config["broker"]["ca"] = BrokerTLS.create(tmp_path / "other", "other").ca_der.hex()
    config_path.write_text(json.dumps(config))
    try:
        done = subprocess.run([*EDGEBFT, "inject", "restart", "3", "--dir", str(cluster.path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "did not report in" in done.stderr
        log = (cluster.path / "logs" / "node3.log").read_text().split("node3 start:")[-1]
        refusals = [line for line in log.splitlines() if "TLS:" in line]
        assert len(refusals) == 1, log
        assert "The certificate is not correctly signed by the trusted CA" in refusals[0]
    finally:
        config["broker"]["ca"] = own
        config_path.write_text(json.dumps(config))
    done = subprocess.run([*EDGEBFT, "inject", "restart", "3", "--dir", str(cluster.path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_broker_restart_is_ridden_out_over_tls(cluster: lab.LabCluster) -> None:
    done = subprocess.run([*EDGEBFT, "inject", "broker-restart", "--ms", "500", "--dir",
                           str(cluster.path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with Client.connect(cluster.path, client_id=101, timeout_s=10) as ledger:
        ledger.put("after", "restart")
        assert ledger.get("after") == "restart"
    assert wait_until(lambda: all(s.get("online") for s in lab.status(cluster).values()), 10)


def test_tls_asked_of_a_plain_broker_is_refused_never_plaintext(tmp_path: Path) -> None:
    """A node and an application holding a CA, against a broker without TLS: each says so in
    one line and neither falls back to plain TCP."""
    plain = lab.up(broker="mosquitto", out=tmp_path / "run")
    try:
        config_path = Path(plain.node(2)["image"]) / "edgebft.json"
        config = json.loads(config_path.read_text())
        ca = BrokerTLS.create(tmp_path / "ca", "ca").ca_der.hex()
        config["broker"]["ca"] = ca
        config_path.write_text(json.dumps(config))
        done = subprocess.run([*EDGEBFT, "inject", "restart", "2", "--dir", str(plain.path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "did not report in" in done.stderr
        log = (plain.path / "logs" / "node2.log").read_text().split("node2 start:")[-1]
        said = [line for line in log.splitlines() if "TLS:" in line]
        assert len(said) == 1 and "does it speak TLS on this port?" in said[0], log
        made = subprocess.run([*EDGEBFT, "client", "new", "--dir", str(plain.path), "--out",
                               str(tmp_path / "app.json")], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        identity = json.loads((tmp_path / "app.json").read_text())
        identity["broker"]["ca"] = ca
        (tmp_path / "app.json").write_text(json.dumps(identity))
        done = subprocess.run([*EDGEBFT, "get", "k", "--identity", str(tmp_path / "app.json")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].endswith("does the broker speak TLS on this port?")
    finally:
        lab.down(plain)
