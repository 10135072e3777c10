"""How ``edgebft sim`` shows a sweep of seeds on the terminal: the totals, then each failing
seed (worst first) with its reasons and the command that replays it."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from edgebft.check.verdict import SEVERITY, VERDICTS
from edgebft.sim.simulator import SimSummary

SIM_FAILURES_SHOWN = 10


def print_sim_summary(summary: SimSummary, console: Console) -> None:
    """Print a simulation summary (edgebft.sim.simulator.SimSummary) and each failing seed's
    replay."""
    results = summary.results
    table = Table(title="EdgeBFT deterministic simulation", show_header=False)
    rows = [
        ("seeds", f"{len(results)} in {summary.elapsed_s:.1f} s "
                  f"({summary.seeds_per_s:.1f} seeds/s)"),
        ("verdicts", "  ".join(f"{v} {summary.count(v)}" for v in VERDICTS)),
        ("faults", ",".join(summary.options.faults) or "none"),
        ("requests accepted", f"{sum(r.accepted for r in results)} / "
                              f"{sum(r.requests for r in results)}"),
        ("messages", f"{sum(r.delivered for r in results)} delivered, "
                     f"{sum(r.dropped for r in results)} dropped"),
        ("view changes", str(sum(r.view_changes for r in results))),
        ("simulated time", f"{sum(r.sim_ms for r in results) / 1000:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    failures = sorted(summary.failures, key=lambda r: (SEVERITY.index(r.verdict), r.seed))
    for result in failures[:SIM_FAILURES_SHOWN]:
        console.print(f"seed {result.seed}: {result.verdict}", style="bold red",
                      highlight=False)
        for reason in result.reasons:
            console.print(f"  {reason}", markup=False, highlight=False, soft_wrap=True)
        console.print(f"  replay: {result.replay}", markup=False, highlight=False,
                      soft_wrap=True)
    hidden = len(summary.failures) - SIM_FAILURES_SHOWN
    if hidden > 0:
        console.print(f"... and {hidden} more failing seeds", highlight=False)
