"""One cluster, three targets, for the scenarios of test_scenarios.py (a pytest plugin: pyproject
loads it with ``-p hil_targets``).

    pytest hil_tests/test_scenarios.py                          # emulated, then virtual
    pytest hil_tests/test_scenarios.py --target emulated        # one of them
    pytest hil_tests/test_scenarios.py --target boards --cluster cluster.toml

- ``emulated``: ``edgebft cluster up`` (host/lab/session.py): Unix-port nodes from ROMFS images.
- ``virtual``: a mosquitto and four virtual boards (edgebft.devices.virtual_board) with empty
  flash, made a cluster by ``edgebft keys new`` and ``edgebft deploy``, as a user would with
  boards on USB.
- ``boards``: the boards of a cluster.toml, deployed by ``edgebft deploy`` (the firmware must be
  flashed already), on the site's broker. Without ``--cluster`` the scenarios are skipped.

Every target is driven the same way, through what a cluster of boards offers: the broker (an
Observer for statuses and safety, application Clients for load) and authenticated control
commands; only a broker this host started can be restarted. Each scenario leaves a record in
the cluster's run folder (``scenarios/<name>.json``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgebft.client import Client
from edgebft.devices.site import Site, load_site
from edgebft.lab import session as lab
from edgebft.lab.broker import Broker, find_mosquitto, start_broker
from edgebft.lab.broker_auth import HOST
from edgebft.lab.control import fresh_nonce, send_command
from edgebft.lab.observer import Observer

TARGETS = ("emulated", "virtual", "boards")
BOARDS = ("esp32", "esp32", "esp32c3", "esp32s3")  # what the virtual boards pretend to be


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("edgebft", "EdgeBFT hardware-in-the-loop scenarios")
    group.addoption("--target", choices=TARGETS, default=None,
                    help="where the scenarios' cluster runs (default: emulated, then virtual)")
    group.addoption("--cluster", default=None, metavar="TOML",
                    help="--target boards: the boards' cluster.toml (keys beside it)")


class HilCluster:
    """A running cluster of ``nodes`` on some target, driven through its broker."""

    def __init__(self, target: str, nodes: int, run: Path, cluster: str,
                 broker: tuple[str, int], lab_cluster: lab.LabCluster | None = None,
                 site: Site | None = None, own_broker: Broker | None = None) -> None:
        self.target = target
        self.nodes = nodes
        self.run = run
        self.cluster = cluster
        self.host, self.port = broker
        self._lab = lab_cluster
        self._site = site
        self._broker = own_broker
        self._nonce = 0
        if lab_cluster is not None:
            self.keys, self.login = lab_cluster.keys(), lab_cluster.login()
        else:
            assert site is not None
            self.keys = site.keys()
            self.login = site.login(HOST, self.keys)

    def client(self, client_id: int, timeout_s: float = 5.0) -> Client:
        if self._lab is not None:
            return Client.connect(self._lab.path, client_id, timeout_s)
        assert self._site is not None
        return Client.connect(cluster_toml=self._site.path, client_id=client_id,
                              timeout_s=timeout_s)

    def observer(self) -> Observer:
        return Observer(self.host, self.port, self.cluster, self.nodes, self.keys, self.login)

    def control(self, node: int, command: str, args: list[Any]) -> None:
        """An authenticated control command (firmware/faults.py) to ``node``."""
        if self._lab is not None:
            lab.send_control(self._lab, node, command, args)
            return
        self._nonce = fresh_nonce(self._nonce)
        send_command(self.host, self.port, self.cluster, node, self.keys.control[node],
                     self._nonce, command, args, self.login)

    def reboot(self, node: int) -> None:
        """Reset ``node``: it boots again from its flash (a board resets itself; the lab
        boots an emulated node's process again)."""
        if self._lab is not None:
            lab.inject(self._lab, "reboot", node)
        else:
            self.control(node, "reboot", [])

    def heal(self) -> None:
        """Undo every fault (the lab's heal also boots again a node that is down)."""
        if self._lab is not None:
            lab.heal(self._lab)
            return
        for node in range(self.nodes):
            self.control(node, "heal", [])

    @property
    def broker_restartable(self) -> bool:
        return self._lab is not None or self._broker is not None

    def restart_broker(self, down_s: float) -> None:
        if self._lab is not None:
            lab.inject(self._lab, "broker-restart", None, ms=round(down_s * 1000))
            return
        assert self._broker is not None, "not a broker this host started"
        self._broker.stop()
        time.sleep(down_s)
        self._broker.start_again()

    def record(self, scenario: str, result: dict[str, Any]) -> Path:
        path = self.run / "scenarios" / f"{scenario}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"target": self.target, **result}, indent=1) + "\n")
        return path


def _edgebft(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "edgebft", *args], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, f"edgebft {' '.join(args)}: {done.stderr}"


def _deploy_all(toml: Path, nodes: int) -> None:
    for i in range(nodes):
        _edgebft("deploy", "--node", str(i), "--cluster", str(toml))


def start_virtual_board(root: Path, i: int,
                        *flags: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start node i's virtual board on flash folder ``root/flash<i>`` (made if missing); the
    process and its port (also in ``root/port<i>``)."""
    (root / f"flash{i}").mkdir(parents=True, exist_ok=True)
    port_file = root / f"port{i}"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "edgebft.devices.virtual_board",
                             str(root / f"flash{i}"), "--port-file", str(port_file), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not (port_file.exists() and port_file.read_text()):
        assert time.monotonic() < deadline, "a virtual board did not start"
        time.sleep(0.05)
    return proc, port_file.read_text()


def write_site(path: Path, name: str, broker: Broker, ports: list[str]) -> Path:
    """A cluster.toml at ``path`` naming the boards on ``ports`` (as BOARDS) and ``broker``."""
    text = (f'[cluster]\nname = "{name}"\n\n[broker]\nhost = "{broker.host}"\n'
            f'port = {broker.port}\n')
    for i, (board, port) in enumerate(zip(BOARDS, ports, strict=True)):
        text += f'\n[[node]]\nid = {i}\nboard = "{board}"\nport = "{port}"\n'
    path.write_text(text)
    return path


def _virtual(root: Path) -> Iterator[HilCluster]:
    boards = []
    with start_broker("mosquitto", _mkdir(root / "broker")) as broker:
        try:
            for i in range(len(BOARDS)):
                boards.append(start_virtual_board(root, i)[0])
            toml = write_site(root / "cluster.toml", "hil", broker,
                              [(root / f"port{i}").read_text() for i in range(len(BOARDS))])
            _edgebft("keys", "new", "--cluster", str(toml))
            _deploy_all(toml, len(BOARDS))
            site = load_site(toml)
            yield HilCluster("virtual", len(BOARDS), root, site.name,
                             (broker.host, broker.port), site=site, own_broker=broker)
        finally:
            for proc in boards:
                proc.terminate()
                proc.wait(10)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every scenario once per target: the one --target names, else emulated and virtual."""
    if "hil_cluster" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--target")
        metafunc.parametrize("hil_cluster", [chosen] if chosen else ["emulated", "virtual"],
                             indirect=True, scope="module")


@pytest.fixture(scope="module")
def hil_cluster(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[HilCluster]:
    """The scenarios' cluster on its target (module scope: one cluster per target)."""
    target = request.param
    if target == "boards":
        toml = request.config.getoption("--cluster")
        if toml is None:
            pytest.skip("--target boards needs --cluster cluster.toml (no boards given)")
        site = load_site(Path(toml))
        _deploy_all(site.path, len(site.nodes))
        run = _mkdir(site.path.parent / "runs" / "hil" / time.strftime("%Y%m%d-%H%M%S"))
        yield HilCluster("boards", len(site.nodes), run, site.name,
                         (site.broker["host"], site.broker["port"]), site=site)
        return
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    root = tmp_path_factory.mktemp(f"hil-{target}")
    if target == "virtual":
        yield from _virtual(root)
        return
    up = lab.up(broker="mosquitto", out=root / "run")
    try:
        yield HilCluster("emulated", up.nodes, up.path, up.state["cluster"],
                         (up.state["broker"]["host"], up.state["broker"]["port"]),
                         lab_cluster=up)
    finally:
        lab.down(up)
