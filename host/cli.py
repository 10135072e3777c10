"""The ``edgebft`` command line: a thin shell over the library (esptool's model).

Each command parses options, calls one library function and prints its result. User mistakes
and environment problems end in one line on stderr and exit code 2; a run whose checks fail
exits 1; success exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgebft.broker import BrokerError
from edgebft.cluster import ClusterError
from edgebft.demo import DemoError, DemoOptions, run_demo
from edgebft.micropython import ENV_VAR, HEAP_DEFAULT, MicroPythonNotFound

USER_ERRORS = (DemoError, BrokerError, ClusterError, MicroPythonNotFound)
EXIT_CHECKS_FAILED = 1
EXIT_USER_ERROR = 2

console = Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgebft")
def cli() -> None:
    """EdgeBFT: PBFT with Proof-of-Stake on MicroPython nodes over MQTT, and a lab to break it."""


@cli.command()
@click.option("--nodes", default=4, show_default=True, help="Replicas to run (at least 4).")
@click.option("--duration", "duration_s", default=10.0, show_default=True, type=float,
              help="Seconds of client load.")
@click.option("--clients", default=4, show_default=True, help="Closed-loop clients.")
@click.option("--broker", default="auto", show_default=True, metavar="URL|mosquitto|embedded",
              help="mosquitto (started on a free loopback port), embedded (amqtt, started by the "
                   "host), mqtt://host:port (external), or auto: mosquitto if installed, "
                   "else embedded.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run folder (default: a fresh folder under ./runs/demo/).")
@click.option("--micropython", default=None, metavar="PATH",
              help=f"MicroPython Unix-port binary (default: ${ENV_VAR}, the venv's, PATH).")
@click.option("--heap", default=HEAP_DEFAULT, show_default=True,
              help="MicroPython heap per node (-X heapsize).")
def demo(nodes: int, duration_s: float, clients: int, broker: str, out: Path | None,
         micropython: str | None, heap: str) -> None:
    """Run an emulated cluster under client load; print and save a summary.

    Writes config.json, summary.json, events.jsonl and per-node logs to the run folder.
    Exits 0 when the run was safe and every request committed, 1 otherwise.
    """
    options = DemoOptions(nodes=nodes, duration_s=duration_s, clients=clients, broker=broker,
                          out=out, micropython=micropython, heap=heap)
    options.check()
    with Progress(TextColumn("[bold]demo"), BarColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[ok]} ok, {task.fields[failed]} failed"),
                  console=console, transient=True) as bar:
        task = bar.add_task("load", total=duration_s, ok=0, failed=0)
        summary = run_demo(options, lambda t, ok, failed: bar.update(
            task, completed=t, ok=ok, failed=failed))
    print_summary(summary)
    if not summary["safety_ok"] or summary["availability"] != 1.0:
        sys.exit(EXIT_CHECKS_FAILED)


def print_summary(summary: dict[str, Any]) -> None:
    """Print a run summary as a table."""
    table = Table(title=f"EdgeBFT demo: {summary['out']}", show_header=False)
    lat = summary["latency_ms"]
    rows = [
        ("nodes (f)", f"{summary['nodes']} (f={summary['f']})"),
        ("broker", summary["broker"]),
        ("requests", f"{summary['committed']} committed / {summary['requests']} issued"),
        ("throughput", f"{summary['throughput_rps']} req/s"),
        ("latency ms", "p50 {p50}  p95 {p95}  p99 {p99}  max {max}".format(**lat)),
        ("availability", str(summary["availability"])),
        ("safety", "ok" if summary["safety_ok"] else "VIOLATED or unknown: see summary.json"),
        ("heap peak (bytes)", " ".join(f"{n}:{b}" for n, b in
                                       summary["heap_peak_bytes"].items())),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="edgebft", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        console.print("aborted", style="red", highlight=False)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        print(f"edgebft: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
