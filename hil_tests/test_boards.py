"""From zero to a running cluster of boards (issue 14), on virtual boards: MicroPython's Unix
port behind pseudo-terminals (edgebft.devices.virtual_board), which mpremote's real transport
drives as it drives a board's USB serial port.

cluster.toml names four boards and a broker; `edgebft keys new` makes the secrets; `edgebft
deploy` puts each node on its board over the REPL and resets it; the boards boot main.py from
their flash and the cluster commits an application's writes. A second deploy writes nothing;
secrets never reach the output; a bad cluster.toml or a dead port is one line.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import serial
from hil_targets import BOARDS, start_virtual_board, write_site
from serial.rfc2217 import PortManager

from edgebft import Client
from edgebft.client import Identity
from edgebft.devices import deploy as deploy_module
from edgebft.devices.deploy import node_files
from edgebft.devices.site import load_site
from edgebft.lab.broker import (
    BrokerError,
    Login,
    check_reachable,
    find_mosquitto,
    free_port,
    start_broker,
)
from edgebft.lab.control import fresh_nonce, send_command
from edgebft.lab.observer import Observer

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")

EDGEBFT = [sys.executable, "-m", "edgebft"]
FILES = len(node_files({}).files)  # a deploy to stock firmware: main.py, lib/**, edgebft.json


def edgebft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGEBFT, *args], capture_output=True, text=True, timeout=120)


boards: list[subprocess.Popen[bytes]] = []  # the site's virtual boards, by node


def virtual_board(root: Path, i: int, *flags: str) -> str:
    """Start node i's virtual board on flash folder ``root/flash<i>`` (kept in ``boards``);
    its port."""
    proc, port = start_virtual_board(root, i, *flags)
    boards[i:i + 1] = [proc]
    return port


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A broker, four virtual boards with empty flash, and a cluster.toml naming them."""
    root = tmp_path_factory.mktemp("site")
    with start_broker("mosquitto", root / "broker") as broker:
        try:
            ports = [virtual_board(root, i) for i in range(len(BOARDS))]
            yield write_site(root / "cluster.toml", "greenhouse", broker, ports)
        finally:
            for proc in boards:
                proc.terminate()
                proc.wait(10)
            boards.clear()


def test_keys_then_deploy_then_the_boards_commit(site: Path) -> None:
    made = edgebft("keys", "new", "--cluster", str(site))
    assert made.returncode == 0, made.stderr
    keys_path = site.with_name("cluster.keys.json")
    assert keys_path.stat().st_mode & 0o777 == 0o600
    again = edgebft("keys", "new", "--cluster", str(site))
    assert again.returncode == 2 and "exists; --force replaces it" in again.stderr
    secrets = [k for row in json.loads(keys_path.read_text()).values() for k in
               (row if isinstance(row[0], str) else sum(row, []))]
    for i in range(len(BOARDS)):
        done = edgebft("deploy", "--node", str(i), "--cluster", str(site))
        assert done.returncode == 0, done.stderr
        assert "files written, 0 unchanged; reset" in done.stdout
        assert not any(secret in done.stdout + done.stderr for secret in secrets)
        config = json.loads((site.parent / f"flash{i}" / "edgebft.json").read_text())
        assert config["node"] == i and config["client_secret"] in secrets
        assert (site.parent / f"flash{i}" / "lib/edgebft/protocol/replica.mpy").exists()
    s = load_site(site)
    identity = Identity.make(s.name, 100, s.broker["host"], s.broker["port"], None, s.stake,
                             s.keys())
    with Client(identity, timeout_s=30) as ledger:  # the boards boot, then take requests
        ledger.put("greeting", "from the boards")
        assert ledger.get("greeting", ordered=True) == "from the boards"
        assert ledger.transfer("acct100", "acct1", 5) == 999_995


def test_a_second_deploy_writes_nothing_and_the_node_comes_back(site: Path) -> None:
    done = edgebft("deploy", "--node", "2", "--cluster", str(site), "--no-reset")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("deployed node 2 of greenhouse to ")
    assert f"0 files written, {FILES} unchanged; left at the REPL" in done.stdout, done.stdout
    # mpremote's own hash of what is on the board agrees with what deploy meant to put there
    wanted = node_files({}).files["lib/edgebft/protocol/replica.mpy"]
    port = (site.parent / "port2").read_text()
    done = subprocess.run([str(Path(sys.executable).parent / "mpremote"), "connect", port,
                           "resume", "fs", "sha256sum", ":lib/edgebft/protocol/replica.mpy",
                           "soft-reset"], capture_output=True, text=True, timeout=60)
    assert hashlib.sha256(wanted).hexdigest() in done.stdout, done.stdout + done.stderr
    s = load_site(site)
    identity = Identity.make(s.name, 101, s.broker["host"], s.broker["port"], None, s.stake,
                             s.keys())
    with Client(identity, timeout_s=30) as ledger:
        ledger.put("after", "redeploy")
        assert ledger.get("after", ordered=True) == "redeploy"


class PtySerial(serial.Serial):
    """A virtual board's pseudo-terminal as pyserial's Serial: a pty has no modem lines, so
    they read as off and setting them does nothing (RFC 2217's server asks for them)."""

    cts = dsr = ri = cd = property(lambda self: False)

    def _update_rts_state(self) -> None:
        pass

    def _update_dtr_state(self) -> None:
        pass


def relay(port: str, rfc2217: bool = False) -> tuple[str, threading.Event]:
    """A TCP server on 127.0.0.1 that relays its one connection to serial ``port``: a board
    on a lab host, as ser2net gives it (raw bytes: ``socket://``) or with RFC 2217's telnet
    options (``rfc2217://``, pyserial's PortManager on this side); its URL and the event
    that stops it."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as ser2net sets it
        board = PtySerial(port, timeout=0)
        # the manager answers telnet options through a write() of the connection
        manager = PortManager(board, SimpleNamespace(write=conn.sendall)) if rfc2217 else None
        try:
            while not stop.is_set():
                ready, _, _ = select.select([conn, board.fileno()], [], [], 0.05)
                if conn in ready:
                    data = conn.recv(4096)
                    if not data:
                        break
                    board.write(b"".join(manager.filter(data)) if manager else data)
                if board.fileno() in ready:
                    data = board.read(4096)
                    conn.sendall(b"".join(manager.escape(data)) if manager else data)
        finally:
            board.close()
            conn.close()
            server.close()

    threading.Thread(target=serve, daemon=True).start()
    scheme = "rfc2217" if rfc2217 else "socket"
    return f"{scheme}://127.0.0.1:{server.getsockname()[1]}", stop


@pytest.mark.parametrize("rfc2217", [False, True], ids=["socket", "rfc2217"])
def test_deploy_reaches_a_board_on_a_lab_host(site: Path, tmp_path: Path,
                                              rfc2217: bool) -> None:
    """A board of its own (not one of the site's running nodes), behind a TCP relay: deploy
    writes everything to an empty one, then nothing."""
    (tmp_path / "flash1").mkdir()
    board = subprocess.Popen([*EDGEBFT, "virtual-board", str(tmp_path / "flash1")],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert board.stdout is not None
        port = board.stdout.readline().strip()
        for written, unchanged in ((FILES, 0), (0, FILES)):
            url, stop = relay(port, rfc2217)
            try:
                done = edgebft("deploy", "--node", "1", "--cluster", str(site), "--port", url,
                               "--no-reset")
            finally:
                stop.set()
            assert done.returncode == 0, done.stderr
            assert done.stdout == (f"deployed node 1 of greenhouse to {url}: {written} files "
                                   f"written, {unchanged} unchanged; left at the REPL\n")
    finally:
        board.terminate()
        board.wait(10)


def test_applications_reach_the_boards_by_cluster_toml_or_an_identity(site: Path) -> None:
    done = edgebft("put", "site-key", "42", "--cluster", str(site), "--client", "7")
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
    made = edgebft("client", "new", "--cluster", str(site))
    assert made.returncode == 0, made.stderr
    number, path = re.fullmatch(r"client (\d+): (.*)\n", made.stdout).groups()
    assert int(number) >= 256 and Path(path).stat().st_mode & 0o777 == 0o600
    assert edgebft("client", "new", "--cluster", str(site)).stdout.startswith(
        f"client {int(number) + 1}: ")
    done = edgebft("get", "site-key", "--identity", path)
    assert (done.returncode, done.stdout) == (0, "42\n"), done.stderr
    with Client.connect(cluster_toml=site, client_id=8) as ledger:
        assert ledger.transfer("acct8", "acct9", 2) == 999_998


def test_bad_input_is_one_line(site: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cluster.toml"
    bad.write_text(site.read_text().replace('board = "esp32c3"', 'board = "esp99"'))
    done = edgebft("deploy", "--node", "0", "--cluster", str(bad))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"edgebft: error: {bad}: node 2: unknown board 'esp99'; known: esp32, esp32c3, "
        "esp32c6, esp32s3"]
    bad.write_text(site.read_text())
    done = edgebft("deploy", "--node", "0", "--cluster", str(bad))
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"edgebft: error: no keys for {bad}: make them with 'edgebft keys new --cluster "
        f"{bad}'"]
    done = edgebft("deploy", "--node", "9", "--cluster", str(site))
    assert done.returncode == 2 and "no node 9" in done.stderr
    done = edgebft("deploy", "--node", "0", "--cluster", str(site), "--port",
                   str(tmp_path / "ttyNONE"))
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_provision_does_every_board_and_monitor_shows_them_boot(site: Path,
                                                              tmp_path: Path) -> None:
    """Node 3's port is dead: provision does the other three, reports it, exits 1; monitor
    then shows each rebooted node's first lines, stamped and named, and node 3's port as
    unopenable."""
    dead = tmp_path / "ttyDEAD"
    toml = site.read_text().rsplit("port = ", 1)[0] + f'port = "{dead}"\n'
    broken = site.with_name("broken.toml")
    broken.write_text(toml)
    site.with_name("broken.keys.json").write_bytes(site.with_name("cluster.keys.json")
                                                   .read_bytes())
    done = edgebft("provision", "--cluster", str(broken))
    assert done.returncode == 1
    rows = {line.split()[0]: line for line in done.stdout.splitlines()
            if line.strip()[:1].isdigit()}
    assert all(str(FILES) in rows[str(i)] and rows[str(i)].rstrip().endswith("ok")
               for i in range(3))
    assert rows["3"].split()[1:6] == ["esp32s3", rows["3"].split()[2], "-", "-", "0"]
    assert done.stderr.splitlines() == [f"edgebft: node 3: {dead}: failed to access {dead}"]
    watch = subprocess.Popen([*EDGEBFT, "monitor", "--cluster", str(broken), "--duration", "6"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # monitor has the ports open: reboot nodes 0-2 over MQTT, watch them boot
    s = load_site(site)
    keys = s.keys()
    for i in range(3):
        send_command(s.broker["host"], s.broker["port"], s.name, i, keys.control[i],
                     fresh_nonce(0), "reboot", [])
    out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    lines = out.splitlines()
    for i in range(3):
        assert any(re.fullmatch(rf"\d\d:\d\d:\d\d\.\d{{3}} node{i} \| edgebft node {i} up: "
                                r"4 replicas, broker .*", line) for line in lines), lines
    assert any(line.split(" | ")[0].endswith("node3") and "cannot open" in line
               for line in lines)


def test_broker_config_makes_a_site_broker_that_enforces_identities_over_tls(
        site: Path, tmp_path: Path) -> None:
    """`edgebft broker-config --tls` for a site's own mosquitto: the host logs in over TLS
    with its password; without credentials, or without TLS, nobody gets a session."""
    toml = re.sub(r"port = \d+\n", f"port = {free_port()}\nacl = true\n"
                  f'ca = "{tmp_path / "broker" / "tls" / "ca.crt"}"\n', site.read_text(), count=1)
    own = tmp_path / "cluster.toml"
    own.write_text(toml)
    own.with_name("cluster.keys.json").write_bytes(site.with_name("cluster.keys.json")
                                                    .read_bytes())
    done = edgebft("broker-config", "--cluster", str(own), "--out", str(tmp_path / "broker"),
                   "--tls", "--name", "127.0.0.1")
    assert done.returncode == 0, done.stderr
    config = tmp_path / "broker" / "mosquitto.conf"
    assert (tmp_path / "broker" / "passwords").stat().st_mode & 0o777 == 0o600
    if os.geteuid() == 0:  # as root mosquitto would run as user mosquitto, who cannot read them
        config.write_text(config.read_text() + "user root\n")
    s = load_site(own)
    broker = subprocess.Popen([str(find_mosquitto()), "-c", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        login = s.login("host", s.keys())
        assert login.ca_der is not None and login.credentials is not None
        deadline = time.monotonic() + 10
        while True:
            try:
                check_reachable("127.0.0.1", s.broker["port"], login, 2.0)
                break
            except BrokerError:
                assert time.monotonic() < deadline, "the site's broker did not take the host"
                time.sleep(0.2)
        for stranger in (Login(None, login.ca_der), Login(login.credentials)):
            with pytest.raises(BrokerError):
                check_reachable("127.0.0.1", s.broker["port"], stranger, 2.0)
    finally:
        broker.terminate()
        broker.wait(10)


def test_a_board_with_romfs_gets_our_code_in_its_partition(site: Path) -> None:
    """Node 3's board flashed with firmware built with ROMFS (a virtual board with --romfs on
    the same flash): deploy writes our code as one image into its romfs partition, not lib/;
    mpremote's own `romfs query` finds the image; the node boots from /rom, so its heap holds
    no bytecode, and commits with the rest; a second deploy writes nothing."""
    root = site.parent
    boards[3].terminate()
    boards[3].wait(10)
    shutil.rmtree(root / "flash3" / "lib")  # what the partition replaces
    port = virtual_board(root, 3, "--romfs")
    done = edgebft("deploy", "--node", "3", "--cluster", str(site), "--port", port)
    assert done.returncode == 0, done.stderr
    rom = node_files({}).rom
    assert f"romfs {len(rom):,} B written; 0 files written, 2 unchanged; reset" in done.stdout
    assert (root / "flash3" / "romfs.img").read_bytes()[:len(rom)] == rom
    assert not (root / "flash3" / "lib").exists()
    s = load_site(site)
    observer = Observer(s.broker["host"], s.broker["port"], s.name, len(BOARDS), s.keys(),
                        s.login("host", s.keys()))
    try:
        with Client.connect(cluster_toml=site, client_id=9, timeout_s=30) as ledger:
            ledger.put("romfs", "node 3 from its partition")
            for i in range(20):
                ledger.put("tick", i)
        assert observer.wait_converged(30), "node 3 executes with the rest"
        heap = {n: s["heap_used"] for n, s in observer.snapshot().items()}
    finally:
        observer.close()
    print(f"\nheap used, lib/ (nodes 0-2) vs ROMFS (node 3): {heap}")
    assert heap[3] + 32 * 1024 < min(heap[n] for n in range(3)), "no bytecode in the heap"
    again = edgebft("deploy", "--node", "3", "--cluster", str(site), "--port", port,
                    "--no-reset")
    assert "romfs unchanged; 0 files written, 2 unchanged; left at the REPL" in again.stdout
    query = subprocess.run([str(Path(sys.executable).parent / "mpremote"), "connect", port,
                            "resume", "romfs", "query"], capture_output=True, text=True,
                           timeout=60)
    found = re.search(r"ROMFS image size: (\d+)", query.stdout)
    assert found is not None, query.stdout
    size = int(found.group(1))  # after a header of magic (3 bytes) and size (7 bits a byte),
    header = 3 + (size.bit_length() + 6) // 7  # the size padded by a byte to an even total
    assert header + (header + size) % 2 + size == len(rom)



def test_a_virtual_board_is_confined_to_its_flash_folder(tmp_path: Path) -> None:
    """`edgebft virtual-board FLASH --link PATH`: the port under a stable name while it runs;
    a program on it writes into FLASH whatever path it names, and reads nothing outside."""
    flash, link = tmp_path / "flash", tmp_path / "ttyV0"
    flash.mkdir()
    board = subprocess.Popen([*EDGEBFT, "virtual-board", str(flash), "--link", str(link)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert board.stdout is not None
        port = board.stdout.readline().strip()
        assert link.is_symlink() and os.readlink(link) == port
        code = ("open('/made.txt', 'w').write('inside')\n"
                "for path in ('/etc/hostname', '../../etc/hostname', '/lib/../../etc/hostname'):\n"
                "    try:\n"
                "        open(path)\n"
                "        print('escaped', path)\n"
                "    except OSError:\n"
                "        print('confined')\n")
        done = subprocess.run([str(Path(sys.executable).parent / "mpremote"), "connect",
                               str(link), "resume", "exec", code], capture_output=True,
                              text=True, timeout=60)
        assert done.stdout.split() == ["confined"] * 3, done.stdout + done.stderr
        assert (flash / "made.txt").read_text() == "inside"
    finally:
        board.terminate()
        board.wait(10)
    assert not link.exists() and not link.is_symlink(), "the link goes with the board"


def test_a_virtual_board_never_waits_for_a_reader_of_its_console(tmp_path: Path) -> None:
    """A program that prints ~450 KB with nothing on the port runs on to its end, as on a
    board (a UART sends whether anyone listens); a reader that comes later gets what the
    pseudo-terminal held (the oldest) and the relay's backlog (the newest), the rest lost.
    The relay used to block on the full pseudo-terminal, and the interpreter with it at its
    next print."""
    flash = tmp_path / "flash0"
    flash.mkdir()
    (flash / "main.py").write_text(
        "for i in range(8000):\n"
        "    print('line %d of the console, long enough to fill a buffer' % i)\n"
        "open('done.txt', 'w').write('done')\n"
        "import time\n"
        "while True:\n"
        "    time.sleep(1)\n")
    board, port = start_virtual_board(tmp_path, 0)
    try:
        deadline = time.monotonic() + 30
        while not (flash / "done.txt").exists():
            assert time.monotonic() < deadline, "the board stood still for lack of a reader"
            time.sleep(0.1)
        fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
        try:
            shown = b""
            while select.select([fd], [], [], 0.5)[0]:
                shown += os.read(fd, 65536)
        finally:
            os.close(fd)
        assert shown.endswith(b"line 7999 of the console, long enough to fill a buffer\n")
        assert b"line 4000 " not in shown, "what neither the port nor the backlog held is lost"
    finally:
        board.terminate()
        board.wait(10)


def test_a_virtual_board_whose_main_py_ends_sits_at_its_repl(tmp_path: Path) -> None:
    """main.py that returns (a node in safe mode) leaves the board at its REPL, as a board
    does, where it used to be taken for a reset and booted again, over and over."""
    flash = tmp_path / "flash0"
    flash.mkdir()
    (flash / "main.py").write_text("print('main ran')\n")
    board, port = start_virtual_board(tmp_path, 0)
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
    try:
        time.sleep(1)  # time for many boots, were it booting again
        os.write(fd, b"print(6 * 7)\r")
        shown = b""
        deadline = time.monotonic() + 5  # a board booting over and over never goes quiet
        while time.monotonic() < deadline and select.select([fd], [], [], 1)[0]:
            shown += os.read(fd, 4096)
        assert shown.count(b"main ran") <= 1 and b"soft reboot" not in shown, shown
        assert b"42" in shown, shown
    finally:
        os.close(fd)
        board.terminate()
        board.wait(10)


def _processes_in(folder: Path) -> list[int]:
    """The pids of the processes whose working folder is ``folder`` (a board's interpreter)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cwd").resolve() == folder.resolve():
                found.append(int(pid))
        except OSError:  # gone, or not ours to read
            pass
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["term", "int"])
def test_a_virtual_board_stops_at_a_signal_whatever_it_is_doing(tmp_path: Path,
                                                                 signum: int) -> None:
    """A board soft-reset over and over from its port (a new interpreter every few ms) and
    signalled at moments spread over a second: it ends with status 0 each time, its
    interpreter with it. (A handler that raised could land inside Popen.poll() with its lock
    held: the board then never ended.)"""
    for n in range(6):
        board, port = start_virtual_board(tmp_path, n)
        flash = tmp_path / f"flash{n}"
        fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
        try:
            assert _processes_in(flash), "its interpreter runs in its flash folder"
            deadline = time.monotonic() + 0.2 * n
            shown = b""
            while time.monotonic() < deadline:
                os.write(fd, b"\x04")  # Ctrl-D at the REPL: a soft reset, a new interpreter
                while select.select([fd], [], [], 0.005)[0]:
                    shown += os.read(fd, 4096)
            assert n == 0 or b"soft reboot" in shown
            board.send_signal(signum)
            assert board.wait(10) == 0
        finally:
            os.close(fd)
            if board.poll() is None:
                board.kill()
        assert _processes_in(flash) == []


def test_required_modules_are_every_builtin_the_node_imports() -> None:
    """deploy.REQUIRED_MODULES against the imports of firmware/ and protocol/ (ours and the
    lazy ones a configuration asks for aside), so the check before a deploy stays true."""
    root = Path(deploy_module.__file__).resolve().parents[2]
    lazy = {"network", "neopixel", "uctypes", "vfs", "typing"}  # wifi, WS2812, ROMFS, checker
    found = set()
    for path in [*(root / "firmware").glob("*.py"), *(root / "protocol").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    assert found - {"edgebft"} - lazy == set(deploy_module.REQUIRED_MODULES)


def test_a_firmware_without_a_module_we_need_is_refused_and_nothing_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A board whose firmware lacks a module the node imports (here: one no firmware has,
    standing for ssl on a build without it): one line, and the flash untouched."""
    board, port = start_virtual_board(tmp_path, 0)  # not one of the site's
    try:
        monkeypatch.setattr(deploy_module, "REQUIRED_MODULES",
                            (*deploy_module.REQUIRED_MODULES, "no_such_module"))
        with pytest.raises(deploy_module.DeployError) as refused:
            deploy_module.deploy(port, node_files({}))
        assert str(refused.value) == (
            f"{port}: the board's firmware lacks no_such_module, which the node needs: flash a "
            "MicroPython build that has it; nothing written")
        assert os.listdir(tmp_path / "flash0") == []
    finally:
        board.terminate()
        board.wait(10)
