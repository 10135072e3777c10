"""The phi-accrual failure detector (protocol/detector.py) against Akka's formula, by hand."""

from __future__ import annotations

import ast
import math
import random
import statistics
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import run_mp
from edgebft.protocol.detector import (
    PHI_REPORT_MAX,
    Detector,
    PhiAccrual,
    crossing_y,
    phi_of,
)


def akka_phi(time_diff: float, mean: float, std: float) -> float:
    """PhiAccrualFailureDetector.phi(timeDiff, mean, stdDeviation), transcribed."""
    y = (time_diff - mean) / std
    e = math.exp(-y * (1.5976 + 0.070566 * y * y))
    if time_diff > mean:
        return -math.log10(e / (1.0 + e))
    return -math.log10(1.0 - 1.0 / (1.0 + e))


def akka_k(threshold: float = 8.0) -> float:
    """The y at which akka_phi(y, 0, 1) reaches ``threshold``, by bisection."""
    lo, hi = 0.0, 20.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if akka_phi(mid, 0.0, 1.0) < threshold:
            lo = mid
        else:
            hi = mid
    return hi


def regular(pa: PhiAccrual, interval: int, beats: int, start: int = 0) -> int:
    """Heartbeat ``pa`` every ``interval`` ms, ``beats`` times from ``start``; the last time."""
    t = start
    for i in range(beats):
        t = start + i * interval
        pa.heartbeat(t)
    return t


def first_suspect_ms(det: Detector, peer: int, since: int, limit: int = 10_000) -> int:
    """Check every ms from ``since``; the first ms at which ``peer`` is reported suspected."""
    for t in range(since, since + limit):
        for kind, who, _phi in det.check(t):
            if kind == "suspect" and who == peer:
                return t
    raise AssertionError("never suspected")


# --- phi by hand -------------------------------------------------------------------------


def test_phi_regular_100ms_matches_formula_by_hand():
    pa = PhiAccrual(window=10, min_std_ms=50, first_interval_ms=100)
    last = regular(pa, 100, 30)            # 29 intervals: the two seeds are pushed out
    assert pa.intervals() == [100] * 10
    assert pa.mean() == 100.0 and pa.std() == 0.0   # std floored to min_std: 50
    expected = {}
    for dt in (0, 100, 200, 300):
        y = (dt - 100) / 50
        e = math.exp(-y * (1.5976 + 0.070566 * y * y))
        expected[dt] = -math.log10(e / (1 + e)) if dt > 100 else -math.log10(1 - 1 / (1 + e))
    for dt, want in expected.items():
        assert pa.phi(last + dt) == pytest.approx(want, abs=1e-6)
    # The numbers, for the record: y = -2, 0, 2, 4.
    assert expected[100] == pytest.approx(math.log10(2), abs=1e-12)
    assert [round(expected[dt], 4) for dt in (0, 100, 200, 300)] == [
        0.01, 0.301, 1.6428, 4.7367]


def test_phi_with_seeds_and_pause_matches_formula_by_hand():
    # First heartbeat seeds 400 -/+ 100; then three 100 ms intervals: [300, 500, 100, 100, 100].
    pa = PhiAccrual(window=10, min_std_ms=50, acceptable_pause_ms=100, first_interval_ms=400)
    assert pa.phi(0) == 0.0                # before the first heartbeat: not monitored
    last = regular(pa, 100, 4)
    samples = [300, 500, 100, 100, 100]
    assert pa.intervals() == samples
    mean = sum(samples) / 5                # 220
    std = statistics.pstdev(samples)       # 160
    assert (mean, std) == (220.0, 160.0)
    for dt in (0, 150, 320, 500, 900, 1500):
        assert pa.phi(last + dt) == pytest.approx(akka_phi(dt, mean + 100, std), abs=1e-6)


def test_one_heartbeat_then_silence_is_suspected_from_the_seeds():
    pa = PhiAccrual()                      # first_interval 500: seeds 375, 625; std 125
    pa.heartbeat(1000)
    k = akka_k()
    bound = 500 + k * 125
    assert pa.available(1000 + math.floor(bound))
    assert not pa.available(1000 + math.floor(bound) + 1)


@given(st.floats(min_value=-8.0, max_value=8.0), st.floats(min_value=1.0, max_value=500.0))
def test_phi_of_equals_akkas_form(y: float, std: float):
    mean = 200.0
    assert phi_of(mean + y * std, mean, std) == pytest.approx(
        akka_phi(mean + y * std, mean, std), rel=1e-9, abs=1e-12)


def test_phi_of_is_finite_and_monotone_far_out():
    # Akka's form takes log10(0) from y ~ 21.6 in doubles; ours keeps growing like y^3.
    values = [phi_of(t, 200.0, 50.0) for t in range(0, 200_000, 997)]
    assert all(math.isfinite(v) for v in values)
    assert values == sorted(values)
    assert phi_of(-1e9, 200.0, 50.0) == 0.0
    with pytest.raises(ValueError):       # math domain error: log10(0)
        akka_phi(200.0 + 22 * 50.0, 200.0, 50.0)
    assert phi_of(200.0 + 22 * 50.0, 200.0, 50.0) == pytest.approx(341.587, abs=1e-3)


def test_crossing_y_matches_bisection_on_akkas_formula():
    assert crossing_y(8.0) == pytest.approx(akka_k(8.0), abs=1e-9)
    assert 5.2 < akka_k(8.0) < 5.25


# --- threshold crossing ------------------------------------------------------------------


@pytest.mark.parametrize("interval", [100, 200, 500])
def test_regular_stream_is_suspected_at_mean_plus_k_min_std(interval: int):
    det = Detector(2, me=0)                # defaults: threshold 8, min_std 50, pause 0
    t = 0
    for i in range(150):                   # > window: the seeds are gone, std 0 -> 50
        t = i * interval
        det.heartbeat(1, t)
        assert det.check(t) == []
    k = akka_k()
    bound = interval + k * 50              # phi >= 8 once timeDiff >= mean + k * min_std
    at = first_suspect_ms(det, 1, t)
    assert math.floor(bound) < at - t <= math.floor(bound) + 1
    if interval == 200:                    # our target: within 3 heartbeat intervals
        assert at - t == 462 and at - t <= 3 * interval


def _jittered_crossing(seed: int, sigma: float) -> tuple[int, float, float]:
    rng = random.Random(seed)
    det = Detector(2, me=0)
    t = 0
    for _ in range(300):
        t += max(20, round(rng.gauss(200, sigma)))
        det.heartbeat(1, t)
        assert det.check(t) == []
    pa = det.peers[1]
    samples = pa.intervals()
    return first_suspect_ms(det, 1, t) - t, statistics.fmean(samples), statistics.pstdev(samples)


def test_jitter_raises_the_crossing_time():
    det = Detector(2, me=0)
    for i in range(300):
        det.heartbeat(1, i * 200)
    steady = first_suspect_ms(det, 1, 299 * 200) - 299 * 200
    k = akka_k()
    for seed in (1, 2, 3):
        crossing, mean, std = _jittered_crossing(seed, 80.0)
        assert std > 60                    # above min_std: the jitter widens the normal
        assert crossing > steady + 50
        assert math.floor(mean + k * std) < crossing <= math.floor(mean + k * std) + 1


# --- bounded memory ----------------------------------------------------------------------


def test_window_bounds_the_ring():
    window = 16
    pa = PhiAccrual(window=window)
    rng = random.Random(5)
    t, gaps = 0, []
    pa.heartbeat(t)
    for _ in range(10 * window):
        gap = rng.randint(150, 250)
        t += gap
        gaps.append(gap)
        pa.heartbeat(t)
    assert len(pa.ring) == window and pa.count == window
    assert pa.intervals() == gaps[-window:]
    assert pa.total == sum(gaps[-window:])
    assert pa.total_sq == sum(g * g for g in gaps[-window:])
    assert pa.std() == pytest.approx(statistics.pstdev(gaps[-window:]), abs=1e-9)


def test_interval_while_suspected_is_not_recorded():
    pa = PhiAccrual(window=10)
    last = regular(pa, 200, 20)
    before = pa.intervals()
    assert not pa.available(last + 5000)
    pa.heartbeat(last + 5000)
    assert pa.intervals() == before        # the outage does not skew the statistics
    pa.heartbeat(last + 5200)
    assert pa.intervals() == before[1:] + [200]


# --- Detector: offline, suspect, recover -------------------------------------------------


def test_offline_suspects_at_once_and_next_heartbeat_recovers():
    det = Detector(4, me=0)
    for t in range(0, 2001, 200):
        for peer in (1, 2, 3):
            det.heartbeat(peer, t)
        assert det.check(t) == []
    intervals = det.peers[2].intervals()
    det.offline(2, 2010)
    assert det.suspected(2) and not det.suspected(1)
    events = det.check(2010)
    assert [(k, p) for k, p, _ in events] == [("suspect", 2)]
    assert events[0][2] == pytest.approx(det.peers[2].phi(2010))
    det.offline(2, 2020)                   # repeated Last Will: no second report
    for t in (2020, 2100, 5000):
        for peer in (1, 3):
            det.heartbeat(peer, t)
        assert det.check(t) == []
    det.heartbeat(2, 5050)
    assert not det.suspected(2)
    events = det.check(5050)
    assert [(k, p) for k, p, _ in events] == [("recover", 2)]
    assert events[0][2] > 8.0              # phi just before the heartbeat: 3 s of silence
    assert det.check(5060) == []
    assert det.peers[2].intervals() == intervals   # the outage gap is not a sample


def test_phi_crossing_reported_once_and_recovery_once():
    det = Detector(3, me=1)
    for t in range(0, 3001, 200):
        det.heartbeat(0, t)
        det.heartbeat(2, t)
    # 16 heartbeats: the seeds (375, 625) are still in the window and widen the normal.
    samples = det.peers[2].intervals()
    assert samples == [375, 625] + [200] * 15
    bound = statistics.fmean(samples) + akka_k() * statistics.pstdev(samples)
    at = first_suspect_ms(det, 2, 3000)    # peer 0 keeps going
    assert det.suspected(2)
    assert math.floor(bound) < at - 3000 <= math.floor(bound) + 1   # 788 ms
    for t in range(at + 1, at + 2000):
        assert det.check(t) == []
    det.heartbeat(2, at + 2000)
    assert [(k, p) for k, p, _ in det.check(at + 2000)] == [("recover", 2)]
    assert not det.suspected(2) and det.check(at + 2001) == []


def test_offline_before_check_then_heartbeat_reports_both_in_order():
    det = Detector(3, me=0)
    det.heartbeat(1, 0)
    det.offline(1, 10)
    det.heartbeat(1, 20)
    assert [(k, p) for k, p, _ in det.check(20)] == [("suspect", 1), ("recover", 1)]


def test_flapping_reports_stay_bounded():
    det = Detector(3, me=0)
    for i in range(50):
        det.offline(1, 10 * i)
        det.heartbeat(1, 10 * i + 5)
    events = det.check(600)
    assert [(k, p) for k, p, _ in events] == [("suspect", 1), ("recover", 1)]
    det.offline(2, 700)
    det.heartbeat(2, 710)
    det.offline(2, 720)
    assert [(k, p) for k, p, _ in det.check(720)] == [("suspect", 2)]
    assert det.suspected(2)


def test_ignores_self_and_unknown_ids():
    det = Detector(3, me=0)
    for bad in (0, -1, 3, "1", None):
        det.heartbeat(bad, 0)
        det.offline(bad, 0)
        assert not det.suspected(bad)
    assert det.check(10_000) == []
    assert det.peers[0] is None


def test_phis_are_rounded_ints_for_status():
    det = Detector(3, me=0, min_std_ms=50, first_interval_ms=100, window=10)
    for t in range(0, 3001, 100):
        det.heartbeat(1, t)
        det.heartbeat(2, t)
    assert det.phis(3000) == [0, 0, 0]      # phi(+0) = 0.0100
    assert det.phis(3200) == [0, 16, 16]    # phi(+200) = 1.6428
    assert det.phis(3300) == [0, 47, 47]    # phi(+300) = 4.7367
    assert det.phis(3300, scale=1) == [0, 5, 5]
    assert det.phis(100_000) == [0, PHI_REPORT_MAX, PHI_REPORT_MAX]
    assert all(type(v) is int for v in det.phis(3250))


# --- MicroPython ---------------------------------------------------------------------------

_MP_CODE = """
from edgebft.protocol.detector import PhiAccrual, Detector, phi_of, crossing_y
pa = PhiAccrual(window=8, min_std_ms=20, acceptable_pause_ms=30, first_interval_ms=300)
t = 0
for gap in GAPS:
    t += gap
    pa.heartbeat(t)
out = [pa.phi(t + d) for d in (0, 50, 150, 250, 400, 800, 3000)]
out.append(pa.mean())
out.append(pa.std())
det = Detector(3, me=0)
for i in range(40):
    det.heartbeat(1, i * 200)
    det.heartbeat(2, i * 200 + (i * 37) % 90)
    det.check(i * 200)
det.offline(2, 8000)
ev = det.check(8000) + det.check(8500)
out.extend(e[2] for e in ev)
out.extend(det.phis(8500))
out.append(phi_of(123456, 200.0, 50.0))
out.append(crossing_y(8.0))
print(repr([float(x) for x in out]))
print(repr([(e[0], e[1]) for e in ev]))
print(repr(pa.intervals()))
"""

_GAPS = [200, 180, 230, 210, 190, 260, 150, 205, 199, 240, 175, 220]


def _run_cpython() -> tuple[list[float], list[tuple[str, int]], list[int]]:
    from edgebft.protocol.detector import Detector, PhiAccrual, crossing_y, phi_of

    pa = PhiAccrual(window=8, min_std_ms=20, acceptable_pause_ms=30, first_interval_ms=300)
    t = 0
    for gap in _GAPS:
        t += gap
        pa.heartbeat(t)
    out: list[float] = [pa.phi(t + d) for d in (0, 50, 150, 250, 400, 800, 3000)]
    out += [pa.mean(), pa.std()]
    det = Detector(3, me=0)
    for i in range(40):
        det.heartbeat(1, i * 200)
        det.heartbeat(2, i * 200 + (i * 37) % 90)
        det.check(i * 200)
    det.offline(2, 8000)
    ev = det.check(8000) + det.check(8500)
    out += [e[2] for e in ev]
    out += det.phis(8500)
    out += [phi_of(123456, 200.0, 50.0), crossing_y(8.0)]
    return [float(x) for x in out], [(e[0], e[1]) for e in ev], pa.intervals()


def test_micropython_matches_cpython(micropython: Path, mp_lib: Path):
    code = _MP_CODE.replace("GAPS", repr(_GAPS))
    proc = run_mp(micropython, mp_lib, code)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lines = proc.stdout.strip().splitlines()
    mp_values, mp_events, mp_intervals = (ast.literal_eval(line) for line in lines)
    values, events, intervals = _run_cpython()
    assert mp_events == events == [("suspect", 2), ("suspect", 1)]
    assert mp_intervals == intervals
    assert len(mp_values) == len(values)
    for got, want in zip(mp_values, values, strict=True):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
