"""``edgebft.lab.report``: the plots and page rebuilt from a run folder, the per-second windows
recomputed by hand, and the errors for a folder the report cannot be built from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from edgebft.lab.report import (
    PLOTS,
    ReportError,
    availability_windows,
    build_report,
    fault_windows,
    latency_windows,
)

T0 = 1000.0  # host time of the first request; offsets below are exact binary fractions
DEADLINE_MS = 2000.0


def request(offset: float, outcome: str, latency_ms: float, client: int = 0) -> dict[str, Any]:
    """A request event as ``edgebft demo`` writes it (timeouts last the whole deadline)."""
    latency = DEADLINE_MS if outcome == "timeout" else latency_ms
    return {"type": "request", "client": client, "timestamp": 1, "op": "put",
            "outcome": outcome, "start": T0 + offset, "end": T0 + offset + latency / 1000.0,
            "sends": 1 if outcome == "ok" else 3, "view": 0, "latency_ms": latency}


# Window 0: four ok; window 1: two ok, two timeouts; window 2: idle; window 3: three timeouts;
# window 4: five ok. A crash from 1.5 s to 4.0 s and a partition from 4.25 s never healed.
REQUESTS = [
    request(0.0, "ok", 10.0), request(0.25, "ok", 20.0), request(0.5, "ok", 30.0),
    request(0.75, "ok", 40.0),
    request(1.25, "ok", 5.0), request(1.5, "ok", 50.0), request(1.75, "timeout", 0),
    request(1.875, "timeout", 0),
    request(3.0, "timeout", 0), request(3.25, "timeout", 0), request(3.5, "timeout", 0),
    request(4.0, "ok", 1.0), request(4.125, "ok", 2.0), request(4.25, "ok", 3.0),
    request(4.375, "ok", 4.0), request(4.5, "ok", 100.0),
]
FAULTS = [
    {"type": "fault", "kind": "crash", "node": 0, "start": T0 + 1.5, "view": 0,
     "end": T0 + 4.0},
    {"type": "fault", "kind": "partition", "node": 2, "start": T0 + 4.25, "view": 1, "end": 0.0},
]
RUN_END_S = 3.5 + DEADLINE_MS / 1000.0  # the last timeout's end
SUMMARY = {
    "nodes": 4, "f": 1, "broker": "mosquitto 2.0.11 on 127.0.0.1:1883", "duration_s": 5.0,
    "clients": 4, "requests": 16, "committed": 11, "timed_out": 5, "throughput_rps": 2.2,
    "latency_ms": {"p50": 10.0, "p95": 100.0, "p99": 100.0, "max": 100.0},
    "availability": 0.6875, "safety_ok": True,
    "safety": {"violations": [], "converged": True, "sequences_compared": 11},
    "view": 1, "view_changes": 1, "nemesis": "crash",
    "faults": [{"kind": "crash", "node": 0, "start": T0 + 1.5, "end": T0 + 4.0,
                "view": 0, "recovery_ms": 2777.25},
               {"kind": "partition", "node": 2, "start": T0 + 4.25, "end": 0.0, "view": 1,
                "recovery_ms": None}],
    "recovery_ms": [2777.25, None],
    "recovery": {"p50": 2777.25, "max": 2777.25, "unrecovered": 1},
}


def write_run(folder: Path, events: list[dict[str, Any]],
              summary: dict[str, Any] | None = SUMMARY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return folder


@pytest.fixture
def run(tmp_path: Path) -> Path:
    # demo writes the faults first, then the requests in completion order
    return write_run(tmp_path / "run", FAULTS + REQUESTS)


def rgb(path: Path) -> np.ndarray:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    return image[:, :, :3]


def count(image: np.ndarray, color: str) -> int:
    """Pixels of one of the report's colours, by hue: markers are drawn translucent over white
    or over the fault shading, so exact values vary."""
    r, g, b = image[:, :, 0], image[:, :, 1], image[:, :, 2]
    masks = {
        "red": (r - np.maximum(g, b) > 0.35),  # #d62728, timeouts
        "blue": (b - r > 0.3) & (b > g),  # #1f77b4, ok
        "shade": (r > 0.97) & (g > 0.88) & (g < 0.96) & (b > 0.76) & (b < 0.9),  # fault span
    }
    return int(masks[color].sum())


# ---------------------------------------------------------------------------------------------
# Windows, by hand


def test_availability_windows_by_hand() -> None:
    assert availability_windows(FAULTS + REQUESTS) == [
        {"t": 0.0, "ok": 4, "failed": 0, "availability": 1.0},
        {"t": 1.0, "ok": 2, "failed": 2, "availability": 0.5},
        {"t": 2.0, "ok": 0, "failed": 0, "availability": None},
        {"t": 3.0, "ok": 0, "failed": 3, "availability": 0.0},
        {"t": 4.0, "ok": 5, "failed": 0, "availability": 1.0},
    ]


def test_latency_windows_by_hand_nearest_rank() -> None:
    none = {"p50": None, "p95": None, "p99": None, "max": None}
    assert latency_windows(REQUESTS) == [
        # [10, 20, 30, 40]: p50 is rank ceil(0.5 * 4) = 2, p95 rank ceil(3.8) = 4
        {"t": 0.0, "count": 4, "failed": 0, "p50": 20.0, "p95": 40.0, "p99": 40.0,
         "max": 40.0},
        # [5, 50]: rank 1 and rank 2; timeouts counted, not measured
        {"t": 1.0, "count": 2, "failed": 2, "p50": 5.0, "p95": 50.0, "p99": 50.0,
         "max": 50.0},
        {"t": 2.0, "count": 0, "failed": 0, **none},
        {"t": 3.0, "count": 0, "failed": 3, **none},
        # [1, 2, 3, 4, 100]: p50 rank ceil(2.5) = 3, p95 rank ceil(4.75) = 5
        {"t": 4.0, "count": 5, "failed": 0, "p50": 3.0, "p95": 100.0, "p99": 100.0,
         "max": 100.0},
    ]


def test_windows_do_not_depend_on_event_order_and_ignore_faults() -> None:
    shuffled = list(reversed(REQUESTS)) + FAULTS
    assert availability_windows(shuffled) == availability_windows(REQUESTS)
    assert latency_windows(shuffled) == latency_windows(REQUESTS)
    assert availability_windows([]) == [] and latency_windows([]) == []


def test_windows_of_another_width_and_origin() -> None:
    windows = availability_windows(REQUESTS, window_s=2.0, origin=T0 - 1.0)
    assert [(w["t"], w["ok"], w["failed"]) for w in windows] == [
        (0.0, 4, 0), (2.0, 2, 2), (4.0, 5, 3)]


def test_fault_windows_end_at_the_run_end_when_never_healed() -> None:
    assert fault_windows(FAULTS + REQUESTS) == [
        {"kind": "crash", "node": 0, "view": 0, "start": 1.5, "end": 4.0,
         "healed": True},
        {"kind": "partition", "node": 2, "view": 1, "start": 4.25, "end": RUN_END_S,
         "healed": False},
    ]


# ---------------------------------------------------------------------------------------------
# Plots and page


def test_build_report_writes_readable_plots(run: Path) -> None:
    page = build_report(run)
    assert page == run / "report.html"
    for name in PLOTS:
        image = rgb(run / name)
        assert image.var() > 0.0, f"{name} is blank"
        assert count(image, "shade") > 1000, f"{name}: no fault shading"
    raw = rgb(run / "latency-raw.png")
    assert count(raw, "red") > 20 and count(raw, "blue") > 20
    rate = rgb(run / "rate.png")
    assert count(rate, "red") > 200 and count(rate, "blue") > 200
    assert count(rgb(run / "latency-quantiles.png"), "red") > 10  # the only-timeouts crosses


def test_no_red_without_timeouts(tmp_path: Path) -> None:
    ok_only = [r for r in REQUESTS if r["outcome"] == "ok"]
    folder = write_run(tmp_path / "ok", ok_only, summary=None)
    build_report(folder)
    for name in PLOTS:
        image = rgb(folder / name)
        assert count(image, "red") == 0, name
        assert count(image, "shade") == 0, name
    assert count(rgb(folder / "latency-raw.png"), "blue") > 20


def test_report_html_is_self_contained_and_complete(run: Path) -> None:
    text = build_report(run).read_text()
    for name, (_, alt) in PLOTS.items():
        assert f'src="{name}"' in text
        assert f'alt="{alt}"' in text
    for forbidden in ("http://", "https://", "<script", "<link", "src=\"/"):
        assert forbidden not in text
    for value in ("mosquitto 2.0.11 on 127.0.0.1:1883", "0.6875", "2.2", "crash",
                  "partition", "never healed", "2777.25", "unrecovered",
                  "<td>latency_ms.p95</td><td>100</td>",
                  "<td>safety.sequences_compared</td><td>11</td>",
                  "<td>safety_ok</td><td>true</td>"):
        assert value in text, value
    # the availability table: one row per window, the failing ones marked
    assert '<tr class="bad"><td>1</td><td>2</td><td>2</td><td>0.5</td></tr>' in text
    assert '<tr class=""><td>2</td><td>0</td><td>0</td><td>-</td></tr>' in text
    assert '<tr class="bad"><td>3</td><td>0</td><td>3</td><td>0</td></tr>' in text


def test_report_names_the_equivocator_and_shows_each_epochs_stake(tmp_path: Path) -> None:
    summary = {**SUMMARY,
               "equivocations_detected": [
                   {"node": 2, "offender": 0, "view": 0, "seq": 17, "slots": 3}],
               "stake_epochs": [
                   {"epoch": 0, "since": 0, "validators": {"0": 30, "1": 25, "2": 25}},
                   {"epoch": 1, "since": 24, "validators": {"0": 0, "1": 25, "2": 25}}]}
    text = build_report(write_run(tmp_path / "run", REQUESTS + FAULTS, summary)).read_text()
    assert ("<h2>Equivocations caught</h2>" in text and
            "<tr><td>0</td><td>2</td><td>0</td><td>17</td><td>3</td></tr>" in text)
    assert "<tr><td>1</td><td>24</td><td>0</td><td>25</td><td>25</td></tr>" in text
    assert "<td>equivocations_detected</td>" not in text, "a table of its own, not a cell"


def test_without_summary_json_the_page_is_derived_from_events(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "bare", FAULTS + REQUESTS, summary=None)
    text = build_report(folder).read_text()
    assert "summary.json absent" in text
    for value in ("<td>requests</td><td>16</td>", "<td>committed</td><td>11</td>",
                  "<td>timed_out</td><td>5</td>", "<td>availability</td><td>0.6875</td>",
                  "<td>latency_ms.p50</td><td>10</td>"):
        assert value in text, value


def test_rebuilding_replaces_the_report(run: Path) -> None:
    build_report(run)
    before = (run / "report.html").read_text()
    build_report(run)
    assert (run / "report.html").read_text() == before


# ---------------------------------------------------------------------------------------------
# Errors


def error_of(folder: Path) -> str:
    with pytest.raises(ReportError) as e:
        build_report(folder)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path: Path) -> None:
    assert "no such run folder" in error_of(tmp_path / "nowhere")


def test_missing_events(tmp_path: Path) -> None:
    assert "events.jsonl: no such file" in error_of(tmp_path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_events(tmp_path: Path, text: str) -> None:
    (tmp_path / "events.jsonl").write_text(text)
    assert "empty" in error_of(tmp_path)


def test_events_without_requests(tmp_path: Path) -> None:
    write_run(tmp_path, FAULTS)
    assert "no request events" in error_of(tmp_path)


@pytest.mark.parametrize(("bad", "expected"), [
    ('{"type": "request", "start": 1', "is not JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"start": 1.0}', "no 'type' field"),
    ('{"type": "request", "outcome": "ok", "latency_ms": 1}', "numeric 'start'"),
    ('{"type": "request", "start": 1.0, "outcome": "lost", "latency_ms": 1}', "'lost'"),
    ('{"type": "request", "start": 1.0, "outcome": "ok"}', "'latency_ms' or 'end'"),
    ('{"type": "fault", "kind": "crash", "node": 0, "start": 1.0}', "numeric 'end'"),
])
def test_corrupt_line_is_named(tmp_path: Path, bad: str, expected: str) -> None:
    lines = [json.dumps(REQUESTS[0]), json.dumps(REQUESTS[1]), bad, json.dumps(REQUESTS[2])]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    message = error_of(tmp_path)
    assert "line 3" in message and expected in message


def test_corrupt_summary(tmp_path: Path) -> None:
    write_run(tmp_path, REQUESTS, summary=None)
    (tmp_path / "summary.json").write_text("{not json")
    assert "summary.json" in error_of(tmp_path)


# ---------------------------------------------------------------------------------------------
# A real run (optional)


@pytest.mark.skipif(not os.environ.get("EDGEBFT_REPORT_RUN"),
                    reason="set EDGEBFT_REPORT_RUN to a run folder to report on a real run")
def test_report_of_a_real_run(tmp_path: Path) -> None:
    """Built on a copy of the run's events.jsonl and summary.json (all the report reads), so
    the test leaves the run folder as it was."""
    source = Path(os.environ["EDGEBFT_REPORT_RUN"])
    assert (source / "events.jsonl").is_file(), f"{source} is not a run folder"
    copy = tmp_path / source.resolve().name
    copy.mkdir()
    for name in ("events.jsonl", "summary.json"):
        if (source / name).exists():
            shutil.copy(source / name, copy / name)
    text = build_report(copy).read_text()
    for name in PLOTS:
        assert rgb(copy / name).var() > 0.0
        assert f'src="{name}"' in text
