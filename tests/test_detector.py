"""The phi-accrual failure detector (protocol/detector.py), in fixed point, against Akka's
formula by hand; its transitions; its memory on MicroPython."""

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
from edgebft.protocol.detector import Detector, phi_e4


def akka_phi(time_diff: float, mean: float, std: float) -> float:
    """PhiAccrualFailureDetector.phi(timeDiff, mean, stdDeviation), transcribed."""
    y = (time_diff - mean) / std
    e = math.exp(-y * (1.5976 + 0.070566 * y * y))
    if time_diff > mean:
        return -math.log10(e / (1.0 + e))
    return -math.log10(1.0 - 1.0 / (1.0 + e))


def akka_y(y: float) -> float:
    """Akka's phi at y = (t - mean) / std, in a form that does not reach log10(0)."""
    x = y * (1.5976 + 0.070566 * y * y)
    return max(x, 0.0) / math.log(10) + math.log10(1 + math.exp(-abs(x)))


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


def intervals(det: Detector, peer: int) -> list[int]:
    """Peer ``peer``'s recorded intervals, oldest first (read from the ring)."""
    w = det.window
    k = det.state[7 + 4 * peer] & 0xFF        # the fill
    ring = det.buf[peer * w:(peer + 1) * w]
    return list(ring[:k]) if k < w else list(ring[k - w:]) + list(ring[:k - w])


def yk(det: Detector) -> int:
    """The least y (in 1/256) at which phi reaches the detector's threshold."""
    return det.state[3]


def regular(det: Detector, peer: int, interval: int, beats: int, start: int = 0) -> int:
    """Heartbeat ``peer`` every ``interval`` ms, ``beats`` times from ``start``; the last time."""
    t = start
    for i in range(beats):
        t = start + i * interval
        det.heartbeat(peer, t)
    return t


def drain(det: Detector) -> list[tuple]:
    events = list(det.events)
    del det.events[:]
    return events


def first_suspect_ms(det: Detector, peer: int, since: int, limit: int = 10_000) -> int:
    """Check every ms from ``since``; the first ms at which ``peer`` is reported suspected."""
    for t in range(since, since + limit):
        det.check(t)
        for event in drain(det):
            if event[0] == "suspect" and event[1] == peer:
                return t
    raise AssertionError("never suspected")


# --- phi in fixed point ------------------------------------------------------------------


def test_phi_e4_tracks_akkas_formula_and_never_decreases():
    values = [phi_e4(y) for y in range(-4096, 4097)]
    assert values == sorted(values)
    for y, got in zip(range(-4096, 4097), values, strict=True):
        want = 1e4 * akka_y(y / 256)
        if want <= 1e5:
            assert abs(got - want) <= 30, y
        else:
            assert abs(got - want) <= 3e-4 * want, y
    assert phi_e4(10**9) == phi_e4(4096) and phi_e4(-(10**9)) == phi_e4(-4096) == 0


@given(st.integers(min_value=-4096, max_value=4096), st.integers(min_value=-4096, max_value=4096))
def test_phi_e4_is_monotone(a: int, b: int):
    lo, hi = min(a, b), max(a, b)
    assert phi_e4(lo) <= phi_e4(hi)


# --- phi by hand -------------------------------------------------------------------------


def test_phi_regular_100ms_matches_formula_by_hand():
    det = Detector(2, 0, window=10, min_std_ms=50, first_ms=100)
    last = regular(det, 1, 100, 30)       # 29 intervals: the two seeds are pushed out
    assert intervals(det, 1) == [100] * 10  # mean 100, std 0 -> min_std 50
    # y = (dt - 100) / 50 = -2, 0, 2, 4: phi = 0.0100, log10(2) = 0.3010, 1.6428, 4.7367.
    for dt in (0, 100, 200, 300):
        y = (dt - 100) / 50
        e = math.exp(-y * (1.5976 + 0.070566 * y * y))
        assert akka_phi(dt, 100, 50) == pytest.approx(
            -math.log10(e / (1 + e)) if dt > 100 else -math.log10(1 - 1 / (1 + e)))
    assert [det.phi(1, last + dt) for dt in (0, 100, 200, 300)] == [1, 30, 164, 474]
    assert det.state[8:11].tolist() == [1600, 800, 362]  # mean, std in 1/16 ms; the delay, ms


def test_phi_with_seeds_and_pause_matches_formula_by_hand():
    # First heartbeat seeds 400 -/+ 100; then three 100 ms intervals: [300, 500, 100, 100, 100].
    det = Detector(2, 0, window=10, min_std_ms=50, pause_ms=100, first_ms=400)
    assert det.phi(1, 0) == 0              # before the first heartbeat: not monitored
    last = regular(det, 1, 100, 4)
    samples = [300, 500, 100, 100, 100]
    assert intervals(det, 1) == samples
    assert (statistics.fmean(samples), statistics.pstdev(samples)) == (220.0, 160.0)
    for dt in (0, 150, 320, 500, 900, 1500):
        want = 100 * akka_phi(dt, 220 + 100, 160)
        assert abs(det.phi(1, last + dt) - want) <= 1, dt
    assert det.state[8:10].tolist() == [320 * 16, 160 * 16]


def test_one_heartbeat_then_silence_is_suspected_from_the_seeds():
    det = Detector(2, 0)                   # first_ms 500: seeds 375, 625; mean 500, std 125
    det.heartbeat(1, 1000)
    at = first_suspect_ms(det, 1, 1000)
    assert at - 1000 == math.ceil(500 + yk(det) / 256 * 125)
    assert abs(at - 1000 - (500 + akka_k() * 125)) <= 1
    assert det.suspect[1] == 1


def test_threshold_crossing_y_matches_akka():
    for threshold in (100, 300, 800, 1200):
        det = Detector(2, 0, threshold=threshold)
        assert phi_e4(yk(det)) >= threshold * 100 > phi_e4(yk(det) - 1)
        assert abs(yk(det) / 256 - akka_k(threshold / 100)) < 2 / 256


# --- threshold crossing ------------------------------------------------------------------


@pytest.mark.parametrize("interval", [100, 200, 500])
def test_regular_stream_is_suspected_at_mean_plus_k_min_std(interval: int):
    det = Detector(2, 0, min_std_ms=50)
    t = 0
    for i in range(40):                    # > window: the seeds are gone, std 0 -> 50
        t = i * interval
        det.heartbeat(1, t)
        det.check(t)
        assert drain(det) == []
    at = first_suspect_ms(det, 1, t)
    assert abs(at - t - (interval + akka_k() * 50)) <= 1
    if interval == 200:                    # 462 ms: within 3 heartbeat intervals
        assert at - t == 462


def test_jitter_raises_the_crossing_time():
    k = akka_k()
    for seed in (1, 2, 3):
        rng = random.Random(seed)
        det = Detector(2, 0, min_std_ms=50)
        t = 0
        for _ in range(100):
            t += max(20, round(rng.gauss(200, 80.0)))
            det.heartbeat(1, t)
            det.check(t)
            assert drain(det) == []
        samples = intervals(det, 1)
        mean, std = statistics.fmean(samples), statistics.pstdev(samples)
        assert std > 50                    # above min_std: the jitter widens the normal
        assert abs(first_suspect_ms(det, 1, t) - t - (mean + k * std)) <= 2


# --- bounded memory ----------------------------------------------------------------------


def test_window_bounds_the_ring():
    window = 16
    det = Detector(3, 0, window=window, min_std_ms=10)
    rng = random.Random(5)
    t, gaps = 0, []
    det.heartbeat(2, t)
    for _ in range(10 * window + 3):
        gap = rng.randint(150, 250)
        t += gap
        gaps.append(gap)
        det.heartbeat(2, t)
    assert len(det.buf) == 3 * window
    assert intervals(det, 2) == gaps[-window:]
    assert intervals(det, 1) == []
    det.phi(2, t)                          # brings the stats up to date
    assert det.state[12] == (sum(gaps[-window:]) << 4) // window
    assert abs(det.state[13] / 16 - statistics.pstdev(gaps[-window:])) < 1 / 16


def test_interval_while_suspected_is_not_recorded():
    det = Detector(2, 0, window=10)
    last = regular(det, 1, 200, 20)
    before = intervals(det, 1)
    det.check(last + 5000)
    assert drain(det) == [("suspect", 1, det.phi(1, last + 5000))]
    det.heartbeat(1, last + 5000)
    assert intervals(det, 1) == before     # the outage does not skew the statistics
    det.heartbeat(1, last + 5200)
    assert intervals(det, 1) == before[1:] + [200]


def test_an_interval_past_the_crossing_is_not_recorded_even_unchecked():
    det = Detector(2, 0, window=10)
    last = regular(det, 1, 200, 20)
    before = intervals(det, 1)
    det.heartbeat(1, last + 5000)          # no check() ran: phi had crossed all the same
    assert intervals(det, 1) == before and drain(det) == []


# --- transitions: offline, suspect, trust ------------------------------------------------


def test_offline_suspects_at_once_and_next_heartbeat_trusts():
    det = Detector(4, 0)
    for t in range(0, 2001, 200):
        for peer in (1, 2, 3):
            det.heartbeat(peer, t)
        det.check(t)
    assert drain(det) == []
    samples = intervals(det, 2)
    det.offline(2, 2010)
    assert list(det.suspect) == [0, 0, 1, 0]
    assert drain(det) == [("suspect", 2, det.phi(2, 2010))]
    det.offline(2, 2020)                   # a repeated Last Will: no second report
    for t in (2020, 2100, 5000):
        for peer in (1, 3):
            det.heartbeat(peer, t)
        det.check(t)
    assert drain(det) == []
    det.heartbeat(2, 5050)
    assert drain(det) == [("trust", 2)] and not det.suspect[2]
    det.check(5060)
    assert drain(det) == []
    assert intervals(det, 2) == samples    # the outage gap is not a sample
    det.heartbeat(2, 5250)
    assert intervals(det, 2) == samples + [200]


def test_time_we_stood_still_is_no_peers_silence():
    """stalled(gap, now) moves each last arrival on by the gap, never past now: a peer is
    suspected exactly gap ms later than it would have been, and an unmonitored one stays so."""
    plain, frozen = Detector(4, 0), Detector(4, 0)
    last = regular(plain, 1, 200, 20)
    regular(frozen, 1, 200, 20)
    expected = first_suspect_ms(plain, 1, last)
    frozen.stalled(3000, last + 3100)
    assert frozen.since[1] == last + 3000
    assert first_suspect_ms(frozen, 1, last + 3100) == expected + 3000
    frozen.heartbeat(2, 50_000)  # read after we ran again: the gap was before it
    frozen.stalled(5000, 50_010)
    assert frozen.since[2] == 50_010 and frozen.since[3] is None and frozen.since[0] is None


def test_phi_crossing_reported_once_and_trust_once():
    det = Detector(3, 1, min_std_ms=50)
    for t in range(0, 2801, 200):
        det.heartbeat(0, t)
        det.heartbeat(2, t)
    # 15 heartbeats: the seeds (375, 625) are still in the window and widen the normal.
    samples = intervals(det, 2)
    assert samples == [375, 625] + [200] * 14
    bound = statistics.fmean(samples) + akka_k() * statistics.pstdev(samples)
    at = first_suspect_ms(det, 2, 2800)    # peer 0 is suspected too, at the same time
    assert abs(at - 2800 - bound) <= 1
    for t in range(at + 1, at + 2000, 7):
        det.check(t)
        assert drain(det) == []
    det.heartbeat(2, at + 2000)
    assert drain(det) == [("trust", 2)]
    assert not det.suspect[2] and det.suspect[0]


def test_ignores_self_and_unknown_ids():
    det = Detector(3, 0)
    for bad in (0, -1, 3, "1", None):
        det.heartbeat(bad, 0)
        det.offline(bad, 0)
    det.check(10_000)
    assert drain(det) == [] and list(det.suspect) == [0, 0, 0]
    assert det.phi(0, 10_000) == 0


def test_bad_config_is_refused():
    for kwargs in ({"window": 1}, {"window": 128}, {"min_std_ms": 0}, {"first_ms": 0},
                   {"pause_ms": -1}, {"threshold": 0}, {"threshold": 100_000}):
        with pytest.raises(ValueError):
            Detector(4, 0, **kwargs)


# --- MicroPython -------------------------------------------------------------------------

_SCENARIO = """
det = Detector(4, 0, window=8, min_std_ms=20, pause_ms=30, first_ms=300)
out = []
t = 0
for gap in GAPS:
    t += gap
    det.heartbeat(1, t)
    det.heartbeat(2, t + gap // 3)
    det.check(t)
    out.append([det.phi(j, t + 40) for j in range(4)])
det.offline(2, t + 50)
det.check(t + 5000)
det.heartbeat(1, t + 5100)
out.append([list(e) for e in det.events])
out.append(list(det.state))
out.append([phi_e4(y) for y in range(-4096, 4097, 61)])
"""

_GAPS = [200, 180, 230, 210, 190, 260, 150, 205, 199, 240, 175, 220]


def _scenario_cpython() -> list:
    scope: dict = {"Detector": Detector, "phi_e4": phi_e4}
    exec(_SCENARIO.replace("GAPS", repr(_GAPS)), scope)
    return scope["out"]


def test_micropython_matches_cpython(micropython: Path, mp_lib: Path):
    code = ("from edgebft.protocol.detector import Detector, phi_e4\n"
            + _SCENARIO.replace("GAPS", repr(_GAPS)) + "print(repr(out))\n")
    proc = run_mp(micropython, mp_lib, code)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    got = ast.literal_eval(proc.stdout.strip())
    want = _scenario_cpython()
    assert got == want
    assert [e[:2] for e in want[-3]] == [["suspect", 2], ["suspect", 1], ["trust", 1]]


_ALLOC = """
import gc
from edgebft.protocol.detector import Detector
gc.collect()
base = gc.mem_alloc()
det = Detector(4, 0)
gc.collect()
built = gc.mem_alloc() - base
t = 0
for i in range(40):
    t = i * 500
    det.heartbeat(1, t)
    det.heartbeat(2, t + 7)
    det.heartbeat(3, t + 13)
    det.check(t + 20)
gc.collect()
gc.disable()
before = gc.mem_alloc()
for i in range(500):
    t += 500
    det.heartbeat(1, t)
    det.heartbeat(2, t + 7)
    det.heartbeat(3, t + 13)
    det.check(t + 20)
    det.phi(1, t + 40)
after = gc.mem_alloc()
gc.enable()
print(built, after - before, len(det.events))
"""


def test_micropython_detector_is_small_and_inputs_do_not_allocate(micropython: Path,
                                                                   mp_lib: Path):
    proc = run_mp(micropython, mp_lib, _ALLOC)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    built, grown, events = (int(v) for v in proc.stdout.split())
    assert built <= 1000                   # 4 replicas, window 16: measured 768 bytes
    assert grown <= 64 and events == 0     # 2000 heartbeats: no per-input allocation
