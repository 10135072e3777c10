"""``edgebft boards``, ``romfs``, ``flash``, ``keys new``, ``deploy``, ``provision`` and
``monitor``: the boards the host knows, the ROMFS image of our code, writing MicroPython and
that image to one (edgebft.boards, edgebft.devices.flasher), a site's keys
(edgebft.devices.site), putting a node on a board (edgebft.devices.deploy), every board at
once (edgebft.devices.provision), and their serial logs (edgebft.devices.monitor).

Exit status: 0 done, 1 the board or the port failed (one line on stderr, nothing written when
the chip is not the board's), 2 a usage error (an unknown board, a file that cannot be read or
does not fit).
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgebft.boards import BoardError, board, boards
from edgebft.devices import deploy, flasher
from edgebft.devices import virtual_board as virtual
from edgebft.devices.keys import generate_keys, save_keys
from edgebft.devices.micropython import MicroPythonNotFound
from edgebft.devices.monitor import monitor
from edgebft.devices.provision import provision
from edgebft.devices.site import SiteError, load_site
from edgebft.lab.bench import ACL_CLIENTS
from edgebft.lab.broker import mosquitto_config
from edgebft.lab.broker_auth import BrokerAuth
from edgebft.lab.broker_tls import BrokerTLS

EXIT_DEVICE = 1
EXIT_USAGE = 2

console = Console()


@click.command("boards")
@click.option("--json", "as_json", is_flag=True, help="Print every board's data as JSON.")
def list_boards(as_json: bool) -> None:
    """List the boards the host can flash and deploy to: chip (as esptool names it), flash
    size, where MicroPython's image goes, the romfs partition, LED, reset method, heap
    budget, and MicroPython's download for it (--json: everything, partitions included)."""
    known = boards()
    if as_json:
        click.echo(json.dumps({name: asdict(b) for name, b in known.items()}, indent=1))
        return
    table = Table(title="boards (edgebft/boards/*.json)", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("board", "chip", "flash", "image", "romfs", "LED", "reset"):
        table.add_column(column, no_wrap=True)
    for b in known.values():
        romfs = b.partition("romfs")
        led = str(b.led["pin"]) + ("" if b.led["kind"] == "gpio" else f" {b.led['kind']}")
        table.add_row(b.name, b.chip, b.flash_size, f"0x{b.firmware_offset:X}",
                      "-" if romfs is None else f"0x{romfs.offset:X} {romfs.size // 1024}K",
                      led, b.reset.removesuffix("-reset"))
    console.print(table)
    for b in known.values():
        console.print(f"{b.name}: {b.description}; heap budget {b.heap_budget_bytes // 1000} "
                      f"KB; MicroPython download {b.micropython_board}", highlight=False)


@click.command("virtual-board")
@click.argument("flash_dir", metavar="FLASH", type=click.Path(file_okay=False, exists=True,
                                                              path_type=Path))
@click.option("--port-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the board's port (a pseudo-terminal) to this file too.")
@click.option("--link", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="PATH", help="Make PATH a symbolic link to the port while the board runs "
                   "(/tmp/ttyV0, say: a name that stays the same across runs).")
@click.option("--heap", default=virtual.HEAP, show_default=True,
              help="MicroPython heap (-X heapsize): stock firmware loads our bytecode into it.")
@click.option("--romfs", is_flag=True,
              help="Firmware built with ROMFS: a 128 KiB romfs partition (romfs.img in FLASH) "
                   "behind vfs.rom_ioctl, mounted at /rom at boot; deploy writes our code "
                   "there.")
def virtual_board(flash_dir: Path, port_file: Path | None, link: Path | None, heap: str,
                  romfs: bool) -> None:
    """Run a virtual board until stopped (Ctrl-C, SIGTERM): MicroPython's Unix port behind a
    pseudo-terminal, FLASH (a folder, the root of its filesystem) standing in for its flash.
    Prints the port, which deploy, provision, monitor and mpremote open like a board's USB
    serial port; it boots main.py from FLASH, falls to the REPL when that is interrupted or
    crashes, and boots again after a reset."""
    try:
        virtual.serve(flash_dir.resolve(), port_file, heap, romfs, link)
    except MicroPythonNotFound as e:
        click.echo(f"edgebft: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    finally:
        if link is not None and link.is_symlink():
            link.unlink()


@click.command("romfs")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def romfs_image(out: Path) -> None:
    """Write OUT: the ROMFS image of the node's code (lib/edgebft/**.mpy), the one `deploy`
    puts into a board's romfs partition and `flash --romfs OUT` writes there. The same for
    every node: a node's configuration is a file of its own (edgebft.json)."""
    try:
        out.write_bytes(deploy.node_files({}).rom)
    except OSError as e:
        click.echo(f"edgebft: error: {out}: {e.strerror or e}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(f"{out}: ROMFS image, {out.stat().st_size:,} B")


@click.command("flash")
@click.option("--port", required=True,
              help="The board's serial port (/dev/ttyUSB0, COM3), or socket://HOST:PORT or "
                   "rfc2217://HOST:PORT for a board on a lab host.")
@click.option("--board", "board_name", required=True, help="The board (edgebft boards).")
@click.option("--firmware", required=True, type=click.Path(path_type=Path),
              help="MicroPython's combined image for the board (FILE.bin).")
@click.option("--romfs", type=click.Path(path_type=Path), default=None,
              help="A ROMFS image of the node's code, written to the board's romfs partition "
                   "(firmware built with MICROPY_VFS_ROM and that partition table).")
@click.option("--erase", is_flag=True, help="Erase the whole flash first (the filesystem too).")
@click.option("--baud", type=click.IntRange(min=9600), default=None,
              help="Baud rate for writing (default: the board's).")
def flash(port: str, board_name: str, firmware: Path, romfs: Path | None, erase: bool,
          baud: int | None) -> None:
    """Write MicroPython (and a ROMFS image) to a board through esptool: identify the chip
    and refuse one that is not the board's, erase when asked, write at the board's offsets,
    verify every byte against its digest, then hard-reset it."""
    try:
        job = flasher.plan(board(board_name), firmware, romfs, erase)
    except (BoardError, flasher.FlashError) as e:
        click.echo(f"edgebft: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            stage = what.split(" at ")[0].split(" from ")[0]  # "Writing at 0x..." -> "Writing"
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            done = flasher.flash(port, job, baud, progress)
        except flasher.FlashError as e:
            bar.stop()
            click.echo(f"edgebft: {e}", err=True)
            sys.exit(EXIT_DEVICE)
    writes = ", ".join(f"{what} {size:,} B at 0x{offset:X}" for what, offset, size in done.writes)
    click.echo(f"flashed {job.board.name} on {port}: {done.chip}, MAC {done.mac}; "
               f"{'erased, ' if erase else ''}{writes}; verified; reset")


CLUSTER_OPTION = click.option(
    "--cluster", "cluster_toml", required=True, type=click.Path(path_type=Path),
    help="The site's cluster.toml (see README: 'Real boards').")


@click.group()
def keys() -> None:
    """The secrets of a cluster of boards."""


@keys.command("new")
@CLUSTER_OPTION
@click.option("--force", is_flag=True, help="Replace existing keys (every board must then be "
                                            "deployed again).")
def keys_new(cluster_toml: Path, force: bool) -> None:
    """Make the cluster's keys and write them beside cluster.toml as <stem>.keys.json, mode
    0600: every pairwise key, each node's client secret and control key."""
    try:
        site = load_site(cluster_toml)
    except SiteError as e:
        click.echo(f"edgebft: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    if site.keys_path.exists() and not force:
        click.echo(f"edgebft: error: {site.keys_path} exists; --force replaces it (then deploy "
                   "every board again)", err=True)
        sys.exit(EXIT_USAGE)
    save_keys(generate_keys(len(site.nodes)), site.keys_path)
    click.echo(f"keys for {len(site.nodes)} nodes of {site.name}: {site.keys_path} (mode 0600)")


@click.command("deploy")
@click.option("--port", default=None,
              help="The board's serial port (default: the node's port in cluster.toml).")
@click.option("--node", "node_id", required=True, type=click.IntRange(min=0),
              help="The node id the board becomes.")
@CLUSTER_OPTION
@click.option("--no-reset", is_flag=True, help="Leave the board at its REPL afterwards.")
def deploy_node(port: str | None, node_id: int, cluster_toml: Path, no_reset: bool) -> None:
    """Put node ID of the cluster on a board over its REPL: our modules into its romfs
    partition as one ROMFS image when its firmware has one (the header written last), else as
    lib/*.mpy; main.py and the node's edgebft.json (its keys, broker login and WiFi; never
    printed). What already matches is skipped (a file by its SHA-256 on the board, the
    partition by the hash of its first bytes); a file is written to a new name and renamed.
    Then a soft reset boots the node."""
    try:
        site = load_site(cluster_toml)
        node = site.node(node_id)
        files = deploy.node_files(site.node_config(node_id, site.keys()))
    except SiteError as e:
        click.echo(f"edgebft: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    port = port or node.port
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} files"), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"node {node_id} -> {port}", total=len(files.files))

        def advance(path: str, wrote: bool) -> None:
            if path == "romfs":  # the image stands for lib/
                bar.update(task, total=1 + sum(not p.startswith("lib/") for p in files.files))
            bar.advance(task)

        try:
            done = deploy.deploy(port, files, not no_reset, advance)
        except deploy.DeployError as e:
            bar.stop()
            click.echo(f"edgebft: {e}", err=True)
            sys.exit(EXIT_DEVICE)
    click.echo(f"deployed node {node_id} of {site.name} to {port}: {_romfs_text(done.romfs)}"
               f"{len(done.written)} files written, {len(done.skipped)} unchanged"
               + ("; reset" if done.reset else "; left at the REPL"))


def _romfs_text(romfs: int | None) -> str:
    """What a deploy did to the romfs partition, as the start of its summary."""
    if romfs is None:
        return ""
    return "romfs unchanged; " if romfs == 0 else f"romfs {romfs:,} B written; "


@click.command("provision")
@CLUSTER_OPTION
@click.option("--firmware", type=click.Path(path_type=Path), default=None,
              help="Flash this MicroPython image first (each board's offsets); without it, "
                   "deploy only.")
@click.option("--romfs", type=click.Path(path_type=Path), default=None,
              help="With --firmware: also write this ROMFS image to each romfs partition.")
def provision_all(cluster_toml: Path, firmware: Path | None, romfs: Path | None) -> None:
    """Every board of cluster.toml in parallel: flash (with --firmware), then deploy its node;
    a progress bar per board on a terminal (a line per board and stage in a log), and a table
    at the end. One board failing does not stop the others; exit 1 when any failed."""
    try:
        site = load_site(cluster_toml)
        site.keys()
    except SiteError as e:
        click.echo(f"edgebft: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    lock = threading.Lock()
    stages: dict[int, str] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console, disable=not console.is_terminal) as bars:
        tasks = {n.id: bars.add_task(f"node {n.id} {n.port}: waiting", total=1)
                 for n in site.nodes}

        def report(node: int, what: str, done: int, total: int) -> None:
            with lock:
                bars.update(tasks[node], description=f"node {node} {site.node(node).port}: "
                            f"{what}", completed=done, total=total)
                if not console.is_terminal and stages.get(node) != what:
                    console.print(f"node {node} ({site.node(node).port}): {what}",
                                  highlight=False)  # a log: a line per stage
                stages[node] = what

        results = provision(site, firmware, romfs, report)
    table = Table(title=f"provisioned {site.name}", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("node", "board", "port", "flashed", "romfs", "written", "unchanged",
                   "result"):
        table.add_column(column)
    for r in results:
        romfs = "-" if r.romfs is None else ("same" if r.romfs == 0 else f"{r.romfs:,} B")
        table.add_row(str(r.node), r.board, r.port, r.flashed, romfs, str(r.written),
                      str(r.unchanged), "ok" if r.error is None else f"[red]{r.error}[/]")
    console.print(table)
    for r in results:
        if r.error is not None:
            click.echo(f"edgebft: node {r.node}: {r.error}", err=True)
    if any(r.error for r in results):
        sys.exit(EXIT_DEVICE)


@click.command("monitor")
@click.option("--port", "ports", multiple=True,
              help="A board's serial port (repeatable); or take them from --cluster.")
@click.option("--cluster", "cluster_toml", type=click.Path(path_type=Path), default=None,
              help="Every node's port from this cluster.toml, named node<ID>.")
@click.option("--duration", "duration_s", type=float, default=None,
              help="Stop after this many seconds (default: at Ctrl-C).")
def monitor_boards(ports: tuple[str, ...], cluster_toml: Path | None,
                   duration_s: float | None) -> None:
    """Print the serial logs of one or many boards, each line stamped with the host's clock
    and prefixed by its node (or port): '15:04:05.123 node2 | ...'."""
    named = {Path(p).name: p for p in ports}
    if cluster_toml is not None:
        try:
            named.update({f"node{n.id}": n.port for n in load_site(cluster_toml).nodes})
        except SiteError as e:
            click.echo(f"edgebft: error: {e}", err=True)
            sys.exit(EXIT_USAGE)
    if not named:
        click.echo("edgebft: error: give --port (one or more) or --cluster", err=True)
        sys.exit(EXIT_USAGE)
    stop = threading.Event()
    if duration_s is not None:
        threading.Timer(duration_s, stop.set).start()
    try:
        monitor(named, lambda line: click.echo(line), stop)
    except KeyboardInterrupt:
        stop.set()


@click.command("broker-config")
@CLUSTER_OPTION
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="A folder for the files (created; mode 0600 for the secret ones).")
@click.option("--tls", is_flag=True,
              help="Also make a CA for the cluster and a certificate for the broker, and a TLS "
                   "listener (then set ca = \"OUT/tls/ca.crt\" under [broker]).")
@click.option("--name", "names", multiple=True,
              help="With --tls: a name or address the boards reach the broker by (repeatable; "
                   "default: [broker] host).")
def broker_config(cluster_toml: Path, out: Path, tls: bool, names: tuple[str, ...]) -> None:
    """Write what a site's own mosquitto needs to enforce the cluster's identities: the
    password file (every node, the host, client ids 0-1023), the ACL, and a mosquitto.conf
    listening on [broker] port on every interface and logging to its standard output; with
    --tls a CA, the broker's certificate and key, and a TLS-only listener. mosquitto.conf names
    the files by their paths here: keep them there on the broker host (owned by the user
    mosquitto runs as: the secret ones are mode 0600), or edit it. Then set acl = true (and
    the ca) under [broker] and deploy the boards."""
    try:
        site = load_site(cluster_toml)
        cluster_keys = site.keys()
    except SiteError as e:
        click.echo(f"edgebft: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    out = out.resolve()  # mosquitto.conf names the files by absolute path
    access = BrokerAuth(site.name, cluster_keys, ACL_CLIENTS).write(out)
    made = BrokerTLS.create(out / "tls", site.name, names or (site.broker["host"],)) \
        if tls else None
    config = out / "mosquitto.conf"
    config.write_text(mosquitto_config(site.broker["port"], None, access, made, bind=None))
    click.echo(f"broker files for {site.name} in {out}: mosquitto.conf, {access[0].name}, "
               f"{access[1].name}" + (", tls/ (CA, certificate, key)" if made else "")
               + "; run mosquitto -c mosquitto.conf there, set acl = true"
               + (f' and ca = "{made.folder / "ca.crt"}"' if made else "")
               + " under [broker], then deploy")


COMMANDS = (list_boards, romfs_image, flash, keys, deploy_node, provision_all, monitor_boards,
            broker_config, virtual_board)
