"""Primary of each view: CometBFT's weighted round-robin proposer selection (protocol/stake.py).

Golden vectors (protocol/vectors/proposer.txt) are worked by hand from the CometBFT spec
(spec/consensus/proposer-selection.md) plus two sequences from CometBFT's Go tests; the rest are
properties: round robin for equal stakes, fairness, zero stake, incremental == from scratch, and
MicroPython == CPython.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_mp
from edgebft.protocol.stake import Stake, new_validator_priority, proposer_step

VECTORS = Path(str(resources.files("edgebft.protocol"))) / "vectors" / "proposer.txt"


def _ints(text: str) -> list[int | None]:
    return [None if x.strip() == "x" else int(x) for x in text.split(",")]


def _fields(text: str) -> dict[str, str]:
    """'a: 1,2 b: 3' -> {'a': '1,2', 'b': '3'}."""
    out, key = {}, None
    for token in text.split():
        if token.endswith(":"):
            key = token[:-1]
            out[key] = ""
        else:
            assert key is not None, text
            out[key] += token
    return out


def _read() -> list[tuple[str, dict[str, list[int | None]]]]:
    cases = []
    for line in VECTORS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        left, arrow, right = line.partition("->")
        assert arrow, line
        fields = {k: _ints(v) for k, v in {**_fields(left), **_fields(right)}.items()}
        assert set(fields) <= {"powers", "priorities", "sequence", "final"}, line
        cases.append((line[:60], fields))
    return cases


CASES = _read()


def test_vector_file_covers_the_spec_examples() -> None:
    powers = [tuple(case["powers"]) for _, case in CASES]
    for example in [(1, 3), (4, 3), (1, 0, 3), (1, 2, 3), (1, 3, 8), (80000, 10)]:
        assert example in powers
    assert len(CASES) >= 12


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_golden_vectors(case: dict[str, list[int | None]]) -> None:
    priorities = case.get("priorities")
    stake = Stake(case["powers"], [p or 0 for p in priorities] if priorities else None)
    seq = case["sequence"]
    assert [stake.primary(v) for v in range(len(seq))] == seq
    if "final" in case:
        assert stake.priorities(len(seq) - 1) == case["final"]
    # The same through a fresh set asked in reverse order (no cache to lean on).
    fresh = Stake(case["powers"], [p or 0 for p in priorities] if priorities else None)
    assert [fresh.primary(v) for v in reversed(range(len(seq)))] == seq[::-1]


def test_new_validator_priority_is_minus_one_and_an_eighth_of_total() -> None:
    # Spec "New Validator": A(p3) = -1.125 * (1 + 3 + 8) ~ -13; "-1.125 * 80k = -90k"; with
    # integer arithmetic there is no extra penalty below a total of 8 (-(P + P >> 3)).
    assert new_validator_priority(12) == -13
    assert new_validator_priority(80000) == -90000
    assert new_validator_priority(80010) == -90011
    assert new_validator_priority(7) == -7
    assert new_validator_priority(8) == -9


def test_go_proposer_selection2_cases() -> None:
    """CometBFT types/validator_set_test.go TestProposerSelection2 (address i = replica i)."""
    assert [Stake([100, 100, 100]).primary(v) for v in range(15)] == [0, 1, 2] * 5
    assert [Stake([100, 100, 400]).primary(v) for v in range(2)] == [2, 0]
    assert [Stake([100, 100, 401]).primary(v) for v in range(3)] == [2, 2, 0]
    stake = Stake([4, 5, 3])
    counts = [0, 0, 0]
    for v in range(120):
        counts[stake.primary(v)] += 1
    assert counts == [40, 50, 30]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10])
def test_equal_stakes_give_round_robin(n: int) -> None:
    for w in (1, 3, 1000):
        stake = Stake([w] * n)
        assert [stake.primary(v) for v in range(5 * n)] == [v % n for v in range(5 * n)]


def test_fairness_30_25_25_20() -> None:
    """Spec R2: over P elections each validator is proposer (about) VP times."""
    weights = [30, 25, 25, 20]
    stake = Stake(weights)
    for start in (0, 100, 1000, 12345):
        counts = [0] * 4
        for v in range(start, start + 100):
            counts[stake.primary(v)] += 1
        for i in range(4):
            assert abs(counts[i] - weights[i]) <= 1, (start, counts)


@given(st.lists(st.integers(0, 20), min_size=1, max_size=8).filter(lambda w: sum(w) > 0),
       st.integers(0, 500))
@settings(max_examples=150, deadline=None)
def test_zero_stake_is_never_primary_and_shares_follow_stake(weights: list[int],
                                                            start: int) -> None:
    stake = Stake(weights)
    total = sum(weights)
    counts = [0] * len(weights)
    for v in range(start, start + 2 * total):
        counts[stake.primary(v)] += 1
    for i, w in enumerate(weights):
        if w == 0:
            assert counts[i] == 0
        else:
            # Spec R2 ("at least VP(v) times out of k*P runs, k=2"), in a window of 2P.
            assert counts[i] >= w, (weights, counts)


def test_zero_stake_never_primary_examples() -> None:
    for weights in ([0, 1], [5, 0, 0, 1], [0, 0, 7, 0], [30, 0, 25, 25, 0, 20]):
        stake = Stake(weights)
        chosen = {stake.primary(v) for v in range(300)}
        assert chosen == {i for i, w in enumerate(weights) if w > 0}


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=7).filter(lambda w: sum(w) > 0),
       st.lists(st.integers(0, 300), min_size=1, max_size=25))
@settings(max_examples=100, deadline=None)
def test_incremental_equals_from_scratch(weights: list[int], views: list[int]) -> None:
    cached = Stake(weights)
    for v in views:  # any order: growing, repeated, going back beyond the recent window
        assert cached.primary(v) == Stake(weights).primary(v)
    scratch_prio = [0] * sum(1 for w in weights if w > 0)
    ids = [i for i, w in enumerate(weights) if w > 0]
    powers = [weights[i] for i in ids]
    seq = [ids[proposer_step(powers, scratch_prio, sum(weights))] for _ in range(301)]
    assert [cached.primary(v) for v in range(301)] == seq


def test_priorities_stay_centred_and_in_range() -> None:
    """Spec: centring keeps the sum in (-n, n) ([0, n) with floor); scaling bounds the range."""
    for weights in ([1, 2, 3], [30, 25, 25, 20], [1000, 1, 1, 1], [7, 0, 13, 2, 99]):
        stake = Stake(weights)
        total, n = sum(weights), sum(1 for w in weights if w > 0)
        for v in range(400):
            stake.primary(v)
            prio = [p for p in stake.priorities(v) if p is not None]
            assert 0 <= sum(prio) < n, (weights, v, prio)  # floor centring
            assert max(prio) - min(prio) <= 3 * total, (weights, v, prio)


def test_large_views_are_cheap_and_bad_input_rejected() -> None:
    stake = Stake([30, 25, 25, 20])
    stake.primary(100_000)
    assert stake.primary(100_001) == Stake([30, 25, 25, 20]).primary(100_001)
    assert stake.primary(99_990) == Stake([30, 25, 25, 20]).primary(99_990)  # recent window
    with pytest.raises(ValueError):
        stake.primary(-1)
    with pytest.raises(ValueError):
        Stake([1, 2], [0])


_MP_SEQUENCES = """
from edgebft.protocol.stake import Stake
for w in ({sets}):
    s = Stake(w)
    print(','.join([str(s.primary(v)) for v in range(300)]))
s = Stake([80000, 10, 10], [44996, -44995, -90022])
print(s.primary(0), s.priorities(0))
s = Stake([1, 1], [7, -7])
print(s.primary(0), s.priorities(0))
s = Stake([300, 330, 1000])
s.primary(5000)
print(s.primary(100), s.priorities(5000))
"""

_MP_SETS = [[1, 3], [1, 2, 3], [30, 25, 25, 20], [1, 0, 1, 1], [300, 330, 1000],
            [1000, 1, 1, 1], [5, 0, 17, 3, 3, 40, 1]]


def test_micropython_gives_the_same_sequences(micropython: Path, mp_lib: Path) -> None:
    code = _MP_SEQUENCES.format(sets=", ".join(repr(w) for w in _MP_SETS))
    proc = run_mp(micropython, mp_lib, code)
    assert proc.returncode == 0, proc.stderr
    expected = [",".join(str(Stake(w).primary(v)) for v in range(300)) for w in _MP_SETS]
    s = Stake([80000, 10, 10], [44996, -44995, -90022])
    expected.append(f"{s.primary(0)} {s.priorities(0)}")
    s = Stake([1, 1], [7, -7])
    expected.append(f"{s.primary(0)} {s.priorities(0)}")
    s = Stake([300, 330, 1000])
    s.primary(5000)
    expected.append(f"{s.primary(100)} {s.priorities(5000)}")
    assert proc.stdout.splitlines() == expected
