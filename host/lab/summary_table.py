"""How ``edgebft bench`` and ``edgebft demo`` show a run's summary on the terminal."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def summary_table(summary: dict[str, Any]) -> Table:
    """A run's summary (edgebft.lab.bench.summarize, as summary.json holds it) as a table."""
    table = Table(title=f"EdgeBFT {summary['command']}: {summary['out']}", show_header=False)
    lat = summary["latency_ms"]
    load = (f"open loop at {summary['rate_rps']:g} req/s over {summary['clients']} client ids"
            if summary["mode"] == "open" else f"closed loop, {summary['clients']} clients")
    windows = summary["availability_per_s"]
    short = [w for w in windows if w["availability"] is not None and w["availability"] < 1.0]
    worst = min((w["availability"] for w in short), default=1.0)
    rows = [
        ("nodes (f)", f"{summary['nodes']} (f={summary['f']})"),
        ("broker", summary["broker"]),
        ("load", load),
        ("requests", f"{summary['committed']} committed / {summary['requests']} issued "
                     f"({summary['never_sent']} never sent)"),
        ("throughput", f"{summary['throughput_rps']} req/s committed, "
                       f"{summary['offered_rps']} req/s offered"),
        ("latency ms", "p50 {p50}  p90 {p90}  p99 {p99}  p99.9 {p999}  max {max}  "
                       "mean {mean}".format(**lat)),
        ("availability", f"{summary['availability']}; {len(short)} of {len(windows)} "
                         f"1-s windows below 1 (worst {worst:g})"),
        ("verdict", "; ".join([summary["verdict"]["verdict"], *summary["verdict"]["reasons"]])),
        ("safety", ("ok" if summary["safety_ok"] else "VIOLATED or unknown: see summary.json")
         + ("; converged" if summary["safety"]["converged"] else "; NOT converged")
         + "".join(f"; node {i} down at the end" for i, up in
                   enumerate(summary["nodes_alive_at_end"]) if not up)),
        ("faults", f"nemesis {summary['nemesis']}: {len(summary['faults'])} fault(s); "
                   f"detection ms {summary['detection_ms']}; "
                   f"recovery ms {summary['recovery_ms']}"),
        ("views", f"{summary['view_changes']} view change(s)"),
        ("messages", f"{summary['messages_sent']} sent by replicas, "
                     f"{summary['msgs_per_commit']} per commit"),
        ("heap peak (bytes)", " ".join(f"{n}:{b}" for n, b in
                                       summary["heap_peak_bytes"].items())),
        ("cpu ms per commit", cpu_row(summary)),
        ("state", " ".join(f"{n}:{s['state_keys']} entries, "
                           f"{s['flash_bytes_written']} B written, hit rate "
                           f"{s['cache_hit_rate']};" for n, s in summary["state"].items())),
        ("drops", "; ".join(f"{n}: " + (", ".join(f"{why} {k}" for why, k in d.items()) or "-")
                            for n, d in summary["drops"].items())),
        ("heap restarts", " ".join(f"{n}:{k}" for n, k in summary["heap_restarts"].items())),
        ("report", summary.get("report", "-")),
    ]
    sensors = summary.get("sensors")
    if sensors:
        lat = sensors["latency_ms"] or {}
        rows.insert(-1, ("sensors", f"{sensors['count']} at {sensors['heap']} heap: "
                                    f"{sensors['writes']} writes, {sensors['late']} late, "
                                    f"p50 {lat.get('p50')} p99 {lat.get('p99')} ms, live heap "
                                    f"peak {sensors['heap_peak_bytes']} B"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def cpu_row(summary: dict[str, Any]) -> str:
    """Each node's CPU ms per commit, with the part spent in the host's kernel."""
    system = summary.get("cpu_sys_ms_per_commit", {})
    return " ".join(f"{n}:{v}" + (f" (sys {system[n]})" if system.get(n) is not None else "")
                    for n, v in summary.get("cpu_ms_per_commit", {}).items())
