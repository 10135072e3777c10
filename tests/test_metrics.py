"""A run's figures: HDR-style latency percentiles against exact ones, availability per second
by intended send time, messages per commit across restarts, detection, recovery and state
transfer times."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from edgebft.lab.bench import (
    TxMeter,
    detection_ms,
    equivocations,
    recovery_ms,
    request_event,
    stake_epochs,
    transfer_ms,
)
from edgebft.lab.metrics import PERCENTILES, latency_percentiles
from edgebft.lab.nemesis import Fault
from edgebft.lab.report import availability_windows
from edgebft.lab.workload import Outcome

RELATIVE_ERROR = 2.0 ** -10  # 3 significant digits in HdrHistogram


def exact_at_hdr_rank(values: list[float], p: float) -> float:
    """The exact value at HdrHistogram's rank, floor(p/100 * n + 0.5), at least 1."""
    ordered = sorted(values)
    rank = max(1, math.floor(p / 100.0 * len(ordered) + 0.5))
    return ordered[rank - 1]


def samples(seed: int, n: int) -> list[float]:
    rng = random.Random(seed)
    shape = seed % 3
    if shape == 0:  # exponential around 20 ms
        return [rng.expovariate(1 / 20.0) + 0.2 for _ in range(n)]
    if shape == 1:  # bimodal: fast commits and view-change stalls
        return [rng.gauss(8.0, 1.5) if rng.random() < 0.97 else rng.uniform(900, 1900)
                for _ in range(n)]
    return [math.exp(rng.uniform(0.0, 11.0)) for _ in range(n)]  # 1 ms .. 60 s, log-uniform


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001, 20_000])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_are_within_the_histogram_error_of_the_exact_ones(seed: int, n: int) -> None:
    values = [max(v, 0.001) for v in samples(seed, n)]
    got = latency_percentiles(values)
    for name, p in PERCENTILES.items():
        exact = exact_at_hdr_rank(values, p)
        value = got[name]
        assert isinstance(value, float)
        assert round(exact, 3) - 0.0005 <= value <= exact * (1 + RELATIVE_ERROR) + 0.001, name
    assert got["max"] == round(max(values), 3)
    assert got["mean"] == pytest.approx(sum(values) / n, abs=0.0005)
    assert got["count"] == n
    ordered = [got[name] for name in PERCENTILES]
    assert ordered == sorted(ordered) and ordered[-1] <= got["max"]  # type: ignore[operator]


def test_percentiles_of_nothing_are_none() -> None:
    got = latency_percentiles([])
    assert got["count"] == 0
    assert all(got[name] is None for name in (*PERCENTILES, "mean", "max"))


def test_the_p999_of_a_thousand_sees_the_one_outlier() -> None:
    got = latency_percentiles([10.0] * 999 + [1500.0])
    assert got["p99"] == pytest.approx(10.0, rel=RELATIVE_ERROR)
    assert got["p999"] == pytest.approx(10.0, rel=RELATIVE_ERROR)  # rank 999: still 10 ms
    got = latency_percentiles([10.0] * 998 + [1500.0] * 2)
    assert got["p999"] == pytest.approx(1500.0, rel=RELATIVE_ERROR)


T0 = 5000.0


def outcome(intended: float, sent: float | None, outcome: str, latency_s: float,
            view: int = 0) -> Outcome:
    client = None if sent is None else 1
    return Outcome(client, None if sent is None else 7, None if sent is None else "put",
                   outcome, T0 + intended, None if sent is None else T0 + sent,
                   T0 + intended + latency_s, 0 if sent is None else 1, view)


def test_availability_per_second_counts_requests_by_intended_send_time() -> None:
    outcomes = [
        outcome(0.0, 0.0, "ok", 0.01),
        outcome(0.9, 1.4, "ok", 0.6),  # waited for an idle client id: still window 0
        outcome(0.95, None, "timeout", 2.0),  # never left the backlog
        outcome(1.2, 1.2, "timeout", 2.0),
        outcome(3.5, 3.5, "ok", 0.02),
    ]
    events = [request_event(o) for o in outcomes]
    assert availability_windows(events) == [
        {"t": 0.0, "ok": 2, "failed": 1, "availability": 0.666667},
        {"t": 1.0, "ok": 0, "failed": 1, "availability": 0.0},
        {"t": 2.0, "ok": 0, "failed": 0, "availability": None},
        {"t": 3.0, "ok": 1, "failed": 0, "availability": 1.0},
    ]
    assert [e["latency_ms"] for e in events] == [10.0, 600.0, 2000.0, 2000.0, 20.0]
    assert events[2]["sent"] is None and events[2]["sends"] == 0


def status(tx: int, boots: int) -> dict[str, Any]:
    return {"tx": tx, "boots": boots}


def test_tx_meter_adds_growth_and_counts_a_restarted_node_from_zero() -> None:
    meter = TxMeter()
    meter.update({0: status(100, 1), 1: status(80, 1)})  # baselines
    assert meter.sent == 0
    meter.update({0: status(130, 1), 1: status(95, 1)})
    assert meter.sent == 45
    meter.update({0: status(140, 2), 1: status(95, 1)})  # node 0 restarted, sent 140 since
    assert meter.sent == 185
    meter.update({0: status(150, 2)})
    assert meter.sent == 195
    meter.update({2: status(40, 1)})  # first seen: a baseline only
    assert meter.sent == 195


def test_detection_is_the_first_suspicion_of_the_faulted_node_by_another_node() -> None:
    fault = Fault("crash", 0, T0 + 2.0, 0, T0 + 4.0)
    events: list[tuple[float, int, list[Any]]] = [
        (T0 + 1.0, 1, ["suspect", 0, 9.0]),  # before the fault
        (T0 + 2.3, 0, ["suspect", 0, 9.0]),  # the faulted node itself
        (T0 + 2.4, 1, ["suspect", 2, 9.0]),  # another node suspected
        (T0 + 2.6, 1, ["view_change", 1]),
        (T0 + 2.75, 3, ["suspect", 0, 8.5]),
        (T0 + 2.9, 2, ["suspect", 0, 9.5]),
    ]
    assert detection_ms(fault, events) == 750.0
    assert detection_ms(fault, events[:4]) is None
    caught = [*events[:4], (T0 + 2.5, 2, ["equivocation", 0, 0, 17])]
    assert detection_ms(fault, caught) == 500.0, "an equivocation names its offender too"


def test_stake_epochs_and_equivocations_come_from_node_events() -> None:
    events: list[tuple[float, int, list[Any]]] = [
        (T0, 1, ["equivocation", 0, 0, 5]), (T0, 1, ["equivocation", 0, 0, 6]),
        (T0, 2, ["equivocation", 0, 0, 5]),
        (T0 + 1, 1, ["epoch", 1, 16, [0, 25, 25, 20]]),
        (T0 + 1, 2, ["epoch", 1, 16, [0, 25, 25, 20]]),
        (T0 + 2, 2, ["epoch", 2, 40, [0, 30, 25, 20]]),
    ]
    assert stake_epochs([30, 25, 25, 20], events) == [
        {"epoch": 0, "since": 0, "validators": {"0": 30, "1": 25, "2": 25, "3": 20}},
        {"epoch": 1, "since": 16, "validators": {"0": 0, "1": 25, "2": 25, "3": 20}},
        {"epoch": 2, "since": 40, "validators": {"0": 0, "1": 30, "2": 25, "3": 20}}]
    assert equivocations(events) == [
        {"node": 1, "offender": 0, "view": 0, "seq": 5, "slots": 2},
        {"node": 2, "offender": 0, "view": 0, "seq": 5, "slots": 1}]


def test_recovery_is_the_first_commit_from_a_later_view_after_the_fault() -> None:
    fault = Fault("crash", 0, T0 + 2.0, 0, T0 + 4.0)
    outcomes = [outcome(1.0, 1.0, "ok", 0.5, view=1),  # ends before the fault
                outcome(2.1, 2.1, "ok", 0.5, view=0),  # old view
                outcome(2.2, 2.2, "timeout", 2.0, view=1),
                outcome(2.5, 2.5, "ok", 0.8, view=1),
                outcome(2.6, 2.6, "ok", 0.3, view=1)]
    assert recovery_ms(fault, outcomes) == 900.0
    assert recovery_ms(fault, outcomes[:3]) is None
    # The next fault started at +2.95 s: the new view came first (+2.9 s), so it counts ...
    assert recovery_ms(fault, outcomes, before=T0 + 2.95) == 900.0
    # ... but a view change after the next fault started is that fault's, not this one's.
    assert recovery_ms(fault, outcomes, before=T0 + 2.85) is None


def test_transfer_times_run_from_the_first_fetch_to_the_transfer() -> None:
    events = [(10.0, 3, ["fetch", 8, b""]), (10.2, 3, ["fetch", 16, b""]),
              (10.5, 3, ["transferred", 16, b""]), (11.0, 2, ["fetch", 24, b""]),
              (12.0, 2, ["restored", 0, 0]), (13.0, 2, ["transferred", 24, b""]),
              (20.0, 3, ["fetch", 40, b""]), (20.25, 3, ["transferred", 40, b""])]
    assert transfer_ms(events) == {"3": [500.0, 250.0]}, "a reboot forgets a fetch under way"
