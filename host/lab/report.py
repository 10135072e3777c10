"""The report of a run, rebuilt from its folder alone (Jepsen's and Maelstrom's model).

``build_report(run_dir)`` reads ``events.jsonl`` (and ``summary.json`` when present) and writes
into the same folder:

A request's ``start`` is its intended send time (edgebft.lab.workload: in an open-loop run a
request may wait for an idle client id), and its latency runs from there.

* ``latency-raw.png``: every request, x = its start in seconds since the first request, y = its
  latency in ms on a log scale; committed requests blue, timed-out ones red, drawn at the
  deadline.
* ``latency-quantiles.png``: p50, p95, p99 and max latency of the committed requests that started
  in each 1-second window.
* ``rate.png``: committed and failed requests per second (by start time), stacked.
* ``report.html``: one self-contained page (inline CSS, no scripts, no external assets): the
  summary table, the faults, the per-second availability table and the three PNGs by relative
  path.

Every plot shades each fault window, from its start to its end (or to the end of the run when it
never healed), labelled with the fault's kind and node.

Windows are 1 s wide and aligned on the first request's start; a request belongs to the window
its start falls in. Quantiles are nearest-rank (``edgebft.lab.metrics.percentile``). The window
functions are pure and shared by the plots, the run's summary.json (``availability_per_s``)
and the tests.

matplotlib is imported only when plots are drawn (Agg canvas, no pyplot, no global backend).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgebft.lab.metrics import QUANTILES, availability, latency_summary
from edgebft.lab.workload import DEADLINE_S

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PLOTS", "WINDOW_S", "ReportError", "availability_windows", "build_report",
           "fault_windows", "latency_windows", "load_events"]

WINDOW_S = 1.0
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
REPORT = "report.html"
PLOTS: dict[str, tuple[str, str]] = {  # file name: (heading, alt text)
    "latency-raw.png": (
        "Latency of every request",
        "Latency of every request over time, log scale: committed requests blue, timed-out "
        "requests red at the deadline; fault windows shaded"),
    "latency-quantiles.png": (
        "Latency quantiles per second",
        "p50, p95, p99 and max latency of committed requests per 1-second window, red crosses "
        "where every request timed out; fault windows shaded"),
    "rate.png": (
        "Throughput and availability per second",
        "Committed (blue) and failed (red) requests per second by start time, stacked, with "
        "availability per second; fault windows shaded"),
}
OK_COLOR = "#1f77b4"  # blue
FAIL_COLOR = "#d62728"  # red
FAULT_COLOR = "#ff7f0e"  # orange, drawn translucent
QUANTILE_COLORS = {"p50": "#2ca02c", "p95": "#9467bd", "p99": "#8c564b", "max": "#7f7f7f"}
OUTCOMES = ("ok", "timeout")


class ReportError(RuntimeError):
    """A run folder the report cannot be built from; the message is one line saying why."""


# ---------------------------------------------------------------------------------------------
# Reading the folder


def load_events(path: Path) -> list[dict[str, Any]]:
    """The events of an ``events.jsonl`` file, in file order, each checked for its fields.

    Blank lines are skipped and events of an unknown ``type`` are kept unchecked (newer writers).
    A ``request`` needs ``start`` (number) and ``outcome`` (``ok`` or ``timeout``), and either
    ``latency_ms`` or ``end``; a ``fault`` needs ``kind``, ``node``, ``start`` and ``end``.

    Raises:
        ReportError: the file is missing or unreadable, holds no request event, or a line is not
            a JSON object or lacks a field (the message names the line number).
    """
    if not path.is_file():
        raise ReportError(f"{path}: no such file (a run folder holds {EVENTS})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read: {e}") from None
    events: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: line {number} is not JSON ({e.msg})") from None
        if not isinstance(event, dict):
            raise ReportError(f"{path}: line {number} is not a JSON object")
        problem = _check_event(event)
        if problem:
            raise ReportError(f"{path}: line {number}: {problem}")
        events.append(event)
    if not events:
        raise ReportError(f"{path}: empty (no events)")
    if not any(e["type"] == "request" for e in events):
        raise ReportError(f"{path}: no request events")
    return events


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_event(event: dict[str, Any]) -> str | None:
    kind = event.get("type")
    if not isinstance(kind, str):
        return "no 'type' field"
    if kind == "request":
        if not _is_number(event.get("start")):
            return "request without a numeric 'start'"
        if event.get("outcome") not in OUTCOMES:
            return f"request outcome {event.get('outcome')!r} is not 'ok' or 'timeout'"
        if not (_is_number(event.get("latency_ms")) or _is_number(event.get("end"))):
            return "request without 'latency_ms' or 'end'"
    elif kind == "fault":
        for name in ("start", "end"):
            if not _is_number(event.get(name)):
                return f"fault without a numeric '{name}'"
        if "kind" not in event or "node" not in event:
            return "fault without 'kind' or 'node'"
    return None


def _load_summary(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(summary, dict):
        raise ReportError(f"{path}: not a JSON object")
    return summary


# ---------------------------------------------------------------------------------------------
# Pure figures


def _requests(events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in events if e.get("type") == "request"]


def _faults(events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in events if e.get("type") == "fault"]


def latency_of(request: Mapping[str, Any]) -> float:
    """A request event's latency in ms: its ``latency_ms``, else ``(end - start)`` in ms."""
    if _is_number(request.get("latency_ms")):
        return float(request["latency_ms"])
    return (float(request["end"]) - float(request["start"])) * 1000.0


def origin_of(events: Iterable[Mapping[str, Any]]) -> float:
    """Time zero of a run's plots and windows: the earliest request start (host seconds).

    Falls back to the earliest fault start when there are no requests, and 0.0 when empty.
    """
    events = list(events)
    starts = [float(e["start"]) for e in _requests(events)]
    if not starts:
        starts = [float(e["start"]) for e in _faults(events)]
    return min(starts, default=0.0)


def run_end_of(events: Iterable[Mapping[str, Any]], origin: float) -> float:
    """Seconds from ``origin`` to the last thing the run recorded (a request end, a fault start
    or a healed fault's end); this is where a never-healed fault's shading stops."""
    times = [origin]
    for e in events:
        if e.get("type") == "request":
            times.append(float(e["start"]) + latency_of(e) / 1000.0)
        elif e.get("type") == "fault":
            times.append(float(e["start"]))
            if float(e["end"]) > 0.0:
                times.append(float(e["end"]))
    return max(times) - origin


def _window_index(start: float, origin: float, window_s: float) -> int:
    return max(0, math.floor((start - origin) / window_s))


def _window_count(requests: Sequence[Mapping[str, Any]], origin: float, window_s: float) -> int:
    return 1 + max((_window_index(float(r["start"]), origin, window_s) for r in requests),
                   default=-1)


def availability_windows(events: Iterable[Mapping[str, Any]], window_s: float = WINDOW_S,
                         origin: float | None = None) -> list[dict[str, Any]]:
    """Requests per ``window_s`` window, by start time.

    Windows run from ``origin`` (default: the first request's start) to the window holding the
    last request's start, with no gaps: an idle window is reported with zero counts. Each is
    ``{"t": seconds since origin, "ok": n, "failed": n, "availability": ok / (ok + failed)}``,
    availability rounded to 6 places and None when no request started in the window. Events that
    are not requests are ignored.
    """
    events = list(events)
    requests = _requests(events)
    if origin is None:
        origin = origin_of(events)
    count = _window_count(requests, origin, window_s)
    ok = [0] * count
    failed = [0] * count
    for r in requests:
        i = _window_index(float(r["start"]), origin, window_s)
        if r["outcome"] == "ok":
            ok[i] += 1
        else:
            failed[i] += 1
    return [{"t": round(i * window_s, 6), "ok": ok[i], "failed": failed[i],
             "availability": availability(ok[i], ok[i] + failed[i])} for i in range(count)]


def latency_windows(events: Iterable[Mapping[str, Any]], window_s: float = WINDOW_S,
                    origin: float | None = None) -> list[dict[str, Any]]:
    """Latency quantiles of the committed (``ok``) requests per ``window_s`` window, by start.

    Same windows as ``availability_windows``. Each is ``{"t": seconds since origin,
    "count": committed requests, "failed": timed-out requests, "p50", "p95", "p99", "max"}``,
    the latencies in ms (nearest-rank, rounded to 3 places) and None when no committed request
    started in the window. Timed-out requests are only counted: their latency is the deadline,
    not a measurement.
    """
    events = list(events)
    requests = _requests(events)
    if origin is None:
        origin = origin_of(events)
    count = _window_count(requests, origin, window_s)
    latencies: list[list[float]] = [[] for _ in range(count)]
    failed = [0] * count
    for r in requests:
        i = _window_index(float(r["start"]), origin, window_s)
        if r["outcome"] == "ok":
            latencies[i].append(latency_of(r))
        else:
            failed[i] += 1
    return [{"t": round(i * window_s, 6), "count": len(values), "failed": failed[i],
             **latency_summary(values)} for i, values in enumerate(latencies)]


def fault_windows(events: Iterable[Mapping[str, Any]],
                  origin: float | None = None) -> list[dict[str, Any]]:
    """The fault events relative to ``origin``: ``{"kind", "node", "view", "start", "end",
    "healed"}``, start and end in seconds; an unhealed fault (``end`` 0.0) ends at the run's end.
    """
    events = list(events)
    if origin is None:
        origin = origin_of(events)
    run_end = run_end_of(events, origin)
    out = []
    for f in _faults(events):
        healed = float(f["end"]) > 0.0
        out.append({"kind": str(f["kind"]), "node": f["node"], "view": f.get("view"),
                    "start": float(f["start"]) - origin,
                    "end": (float(f["end"]) - origin) if healed else run_end,
                    "healed": healed})
    return out


# ---------------------------------------------------------------------------------------------
# Plots


def _figure() -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _shade_faults(ax: Axes, faults: Sequence[Mapping[str, Any]], xmax: float) -> None:
    """Shade each fault's window and label it at the top of the plot; labels of faults that
    start in the right half of the plot end at the fault's end so they stay inside."""
    transform = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for i, f in enumerate(faults):
        ax.axvspan(f["start"], f["end"], color=FAULT_COLOR, alpha=0.18, lw=0,
                   label="fault" if i == 0 else None, zorder=0)
        label = f"{f['kind']} node {f['node']}" + ("" if f["healed"] else " (never healed)")
        right = f["start"] > 0.5 * xmax
        ax.text(f["end"] if right else f["start"], 0.975 - 0.045 * (i % 4),
                f"{label} " if right else f" {label}", transform=transform,
                ha="right" if right else "left", va="top", fontsize=8, color="#6b4226",
                clip_on=True)


def _finish(fig: Figure, ax: Axes, path: Path, title: str, ylabel: str, xmax: float) -> None:
    ax.set_title(title)
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel(ylabel)
    xmax = max(xmax, WINDOW_S)
    ax.set_xlim(-0.01 * xmax, xmax * 1.01)  # room for the markers at either end
    ax.grid(True, which="major", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8,
               frameon=False)
    fig.savefig(path)


def plot_latency_raw(path: Path, events: Sequence[Mapping[str, Any]], origin: float,
                     faults: Sequence[Mapping[str, Any]], xmax: float,
                     deadline_ms: float = DEADLINE_S * 1000.0) -> None:
    """``latency-raw.png``: one dot per request; timeouts red at ``deadline_ms``."""
    fig, ax = _figure()
    requests = _requests(events)
    for outcome, color, name in (("ok", OK_COLOR, "ok"), ("timeout", FAIL_COLOR, "timeout")):
        chosen = [r for r in requests if r["outcome"] == outcome]
        xs = [float(r["start"]) - origin for r in chosen]
        ys = [max(latency_of(r), 1e-3) if outcome == "ok" else deadline_ms for r in chosen]
        ax.scatter(xs, ys, s=7 if outcome == "ok" else 14, color=color, alpha=0.7, lw=0,
                   label=f"{name} ({len(chosen)})" if chosen else None,
                   zorder=2 if outcome == "ok" else 3)
    ax.axhline(deadline_ms, color="#555555", ls="--", lw=0.8,
               label=f"deadline {deadline_ms / 1000.0:g} s", zorder=1)
    ax.set_yscale("log")
    ax.set_ylim(top=deadline_ms * 6.0)  # headroom above the deadline for the fault labels
    _shade_faults(ax, faults, xmax)
    _finish(fig, ax, path, "Request latency", "latency (ms, log scale)", xmax)


def plot_latency_quantiles(path: Path, windows: Sequence[Mapping[str, Any]],
                           faults: Sequence[Mapping[str, Any]], xmax: float) -> None:
    """``latency-quantiles.png``: per-window quantile lines, gaps where nothing committed, and a
    red cross on the time axis for each window whose requests all timed out."""
    fig, ax = _figure()
    xs = [w["t"] + WINDOW_S / 2 for w in windows]
    values = [w[name] for w in windows for name in (*QUANTILES, "max") if w[name] is not None]
    for name in (*QUANTILES, "max"):
        ys = [math.nan if w[name] is None else max(w[name], 1e-3) for w in windows]
        ax.plot(xs, ys, marker="o", ms=3, lw=1.4, color=QUANTILE_COLORS[name], label=name)
    if values and max(values) / max(min(values), 1e-3) > 20.0:
        ax.set_yscale("log")
        ax.set_ylim(top=max(values) * 3.0)
        ylabel = "latency (ms, log scale)"
    else:
        ax.set_ylim(0.0, max(values, default=1.0) * 1.3)
        ylabel = "latency (ms)"
    dead = [x for x, w in zip(xs, windows, strict=True) if w["count"] == 0 and w["failed"]]
    if dead:
        ax.plot(dead, [0.02] * len(dead), ls="none", marker="x", ms=7, mew=2, color=FAIL_COLOR,
                transform=ax.get_xaxis_transform(), clip_on=False,
                label="only timeouts")
    _shade_faults(ax, faults, xmax)
    _finish(fig, ax, path, f"Latency quantiles of committed requests per {WINDOW_S:g} s window",
            ylabel, xmax)


def plot_rate(path: Path, windows: Sequence[Mapping[str, Any]],
              faults: Sequence[Mapping[str, Any]], xmax: float) -> None:
    """``rate.png``: stacked bars of committed (blue) and failed (red) requests per second, and
    the window's availability as a black line on a right-hand 0-100 % axis."""
    fig, ax = _figure()
    xs = [w["t"] + WINDOW_S / 2 for w in windows]
    ok = [w["ok"] / WINDOW_S for w in windows]
    failed = [w["failed"] / WINDOW_S for w in windows]
    ax.bar(xs, ok, width=WINDOW_S * 0.9, color=OK_COLOR, label="ok", zorder=2)
    ax.bar(xs, failed, width=WINDOW_S * 0.9, bottom=ok, color=FAIL_COLOR,
           label="timeout" if any(failed) else None, zorder=2)
    ax.set_ylim(0.0, max([a + b for a, b in zip(ok, failed, strict=True)] + [1.0]) * 1.25)
    right = ax.twinx()
    style: dict[str, Any] = {"color": "black", "marker": "o", "ms": 3, "lw": 1.2}
    right.plot(xs, [math.nan if w["availability"] is None else 100.0 * w["availability"]
                    for w in windows], **style)
    ax.plot([], [], label="availability (right axis)", **style)  # its legend entry
    right.set_ylim(0.0, 125.0)
    right.set_yticks([0, 25, 50, 75, 100])
    right.set_ylabel("availability (%)")
    _shade_faults(ax, faults, xmax)
    _finish(fig, ax, path, "Throughput and availability (requests by start time)",
            "requests per second", xmax)


# ---------------------------------------------------------------------------------------------
# The page


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


# Summary lists the page shows as tables of their own.
OWN_TABLES = ("faults", "availability_per_s", "equivocations_detected", "stake_epochs")


def _flatten(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, object]]:
    """Scalar fields of the summary, nested objects flattened with dotted names. Lists of
    scalars and other lists of objects are kept whole; OWN_TABLES have their own table."""
    rows: list[tuple[str, object]] = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, name + "."))
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            if key not in OWN_TABLES:
                rows.append((name, value))
        else:
            rows.append((name, value))
    return rows


def _derived_summary(events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    requests = _requests(events)
    ok = [r for r in requests if r["outcome"] == "ok"]
    return {"requests": len(requests), "committed": len(ok),
            "timed_out": len(requests) - len(ok),
            "availability": availability(len(ok), len(requests)),
            "latency_ms": latency_summary([latency_of(r) for r in ok])}


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>"
                     for row in rows)
    return (f'<table class="{cls}"><thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}\n</tbody></table>")


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1060px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #f2f2f2; } td { font-variant-numeric: tabular-nums; }
tr.bad td { background: #fde2e2; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.4em 0; }
.note { color: #666; font-size: 0.85em; }
"""


def _byzantine_tables(summary: Mapping[str, Any]) -> list[str]:
    """Who caught whom equivocating, and the validator set of each epoch (stake slashed or
    moved), when the summary has them."""
    parts: list[str] = []
    caught = [e for e in summary.get("equivocations_detected") or [] if isinstance(e, dict)]
    if caught:
        rows = [[e.get("offender"), e.get("node"), e.get("view"), e.get("seq"), e.get("slots")]
                for e in caught]
        parts += ["<h2>Equivocations caught</h2>",
                  _table(["offender", "caught by node", "view", "first seq", "slots"], rows,
                         "equivocations")]
    epochs = [e for e in summary.get("stake_epochs") or [] if isinstance(e, dict)]
    if len(epochs) > 1:
        nodes = sorted({n for e in epochs for n in e.get("validators", {})}, key=int)
        rows = [[e.get("epoch"), e.get("since")] + [e.get("validators", {}).get(n) for n in nodes]
                for e in epochs]
        parts += ["<h2>Validator set per epoch (stake)</h2>",
                  _table(["epoch", "from seq"] + [f"node {n}" for n in nodes], rows, "epochs")]
    return parts


def render_html(run_dir: Path, events: Sequence[Mapping[str, Any]],
                summary: Mapping[str, Any] | None) -> str:
    """The text of ``report.html`` for a run (pure: reads nothing, writes nothing)."""
    origin = origin_of(events)
    derived = _derived_summary(events)
    source = SUMMARY if summary is not None else f"{EVENTS} ({SUMMARY} absent)"
    summary_rows = _flatten(summary if summary is not None else derived)
    latency = (summary or {}).get("latency_ms") or derived["latency_ms"]
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>EdgeBFT run {html.escape(run_dir.name)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>EdgeBFT run <code>{html.escape(str(run_dir))}</code></h1>",
             f"<p class=\"note\">Rebuilt from {EVENTS} and {SUMMARY} by edgebft.lab.report. "
             f"Time 0 is the first request's start (host time {origin:.3f}).</p>",
             f"<h2>Summary</h2><p class=\"note\">From {html.escape(source)}.</p>",
             _table(["field", "value"], summary_rows, "summary"),
             "<h2>Latency of committed requests (ms)</h2>",
             _table(list(latency), [list(latency.values())], "latency")]
    faults = fault_windows(events, origin)
    if faults:
        per_fault: list[Any] = []
        if summary is not None and isinstance(summary.get("faults"), list):
            per_fault = [f if isinstance(f, dict) else {} for f in summary["faults"]]
        per_fault += [{}] * (len(faults) - len(per_fault))
        rows = [[f["kind"], f["node"], f["view"], round(f["start"], 3),
                 round(f["end"], 3) if f["healed"] else "never healed",
                 per_fault[i].get("detection_ms"), per_fault[i].get("recovery_ms")]
                for i, f in enumerate(faults)]
        parts += ["<h2>Faults</h2>",
                  _table(["kind", "node", "view", "start (s)", "end (s)", "detection (ms)",
                          "recovery (ms)"], rows, "faults")]
        for name, missing in (("detection", "undetected"), ("recovery", "unrecovered")):
            times = (summary or {}).get(name)
            if isinstance(times, dict):
                parts.append(_table([f"{name} p50 (ms)", f"{name} max (ms)", missing],
                                    [[times.get("p50"), times.get("max"), times.get(missing)]],
                                    name))
    parts += _byzantine_tables(summary or {})
    for name, (heading, alt) in PLOTS.items():
        parts.append(f"<h2>{html.escape(heading)}</h2>"
                     f"<img src=\"{name}\" alt=\"{html.escape(alt)}\">")
    windows = availability_windows(events, origin=origin)
    rows_html = []
    for w in windows:
        bad = w["failed"] > 0
        cells = "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in
                        (w["t"], w["ok"], w["failed"], w["availability"]))
        rows_html.append(f"<tr class=\"{'bad' if bad else ''}\">{cells}</tr>")
    parts += [f"<h2>Availability per {WINDOW_S:g} s window</h2>",
              "<p class=\"note\">ok / (ok + timeout) of the requests that started in the window; "
              "- when none started.</p>",
              "<table class=\"availability\"><thead><tr><th>window start (s)</th><th>ok</th>"
              "<th>failed</th><th>availability</th></tr></thead>\n<tbody>\n"
              + "\n".join(rows_html) + "\n</tbody></table>",
              "</body></html>\n"]
    return "\n".join(parts)


def build_report(run_dir: Path) -> Path:
    """Write the plots and ``report.html`` of the run in ``run_dir``; return the page's path.

    Reads only ``run_dir/events.jsonl`` and, when present, ``run_dir/summary.json``; writes
    ``latency-raw.png``, ``latency-quantiles.png``, ``rate.png`` and ``report.html`` into
    ``run_dir``, replacing earlier ones. Rebuilding is deterministic up to PNG metadata.

    Raises:
        ReportError: ``run_dir`` is not a folder, ``events.jsonl`` is missing, empty, corrupt
            (names the line) or has no requests, or ``summary.json`` is not a JSON object.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    events = load_events(run_dir / EVENTS)
    summary = _load_summary(run_dir / SUMMARY)
    origin = origin_of(events)
    xmax = run_end_of(events, origin)
    faults = fault_windows(events, origin)
    latency = latency_windows(events, origin=origin)
    rate = availability_windows(events, origin=origin)
    xmax = max(xmax, len(rate) * WINDOW_S)
    try:
        plot_latency_raw(run_dir / "latency-raw.png", events, origin, faults, xmax)
        plot_latency_quantiles(run_dir / "latency-quantiles.png", latency, faults, xmax)
        plot_rate(run_dir / "rate.png", rate, faults, xmax)
        page = run_dir / REPORT
        page.write_text(render_html(run_dir, events, summary), encoding="utf-8")
    except OSError as e:
        raise ReportError(f"{run_dir}: cannot write the report: {e}") from None
    return page

