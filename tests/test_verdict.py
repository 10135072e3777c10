"""edgebft.check.verdict: one verdict for sim seeds and lab runs, the worst of its checks."""

import pytest

from edgebft.check.verdict import (
    ERROR,
    NOT_LIVE,
    OK,
    SEVERITY,
    UNKNOWN,
    UNSAFE,
    VERDICTS,
    Check,
    Verdict,
)

SAFE = Check("safety", True)
UNSAFE_CHECK = Check("safety", False, "seq 4: two digests")
LIVE = Check("liveness", True)
STUCK = Check("liveness", False, "3/30 requests accepted")
UNJUDGED = Check("safety", None, "no sequence number was reported by two nodes")


@pytest.mark.parametrize(("checks", "error", "name"), [
    ((SAFE, LIVE), None, OK),
    ((SAFE, STUCK), None, NOT_LIVE),
    ((UNSAFE_CHECK, LIVE), None, UNSAFE),
    ((UNSAFE_CHECK, STUCK), "AssertionError", UNSAFE),  # unsafe outranks an error
    ((SAFE, STUCK), "AssertionError", ERROR),           # an error outranks liveness
    ((UNJUDGED, LIVE), None, UNKNOWN),
    ((UNJUDGED, STUCK), None, NOT_LIVE),
    ((Check("client-safety", False, "two results"), LIVE), None, UNSAFE),
    ((), None, OK),
])
def test_the_worst_check_decides(checks, error, name):
    verdict = Verdict(checks, error)
    assert verdict.name == name
    assert verdict.ok == (name == OK)
    assert set(SEVERITY) == set(VERDICTS) and name in VERDICTS


def test_reasons_name_each_finding_and_drop_liveness_after_an_error():
    assert Verdict((UNSAFE_CHECK, STUCK)).reasons == [
        "safety: seq 4: two digests", "liveness: 3/30 requests accepted"]
    stopped = Verdict((UNSAFE_CHECK, STUCK), "AssertionError: h <= last_exec")
    assert stopped.reasons == ["safety: seq 4: two digests",
                               "error: AssertionError: h <= last_exec"]
    assert Verdict((UNJUDGED,)).reasons == [
        "safety: no sequence number was reported by two nodes"]


def test_json_and_lookup():
    verdict = Verdict((SAFE, STUCK))
    assert verdict.to_json() == {"verdict": NOT_LIVE,
                                 "reasons": ["liveness: 3/30 requests accepted"],
                                 "checks": {"safety": True, "liveness": False}}
    assert verdict.check("liveness") is STUCK
    with pytest.raises(KeyError):
        verdict.check("convergence")


def test_a_finding_other_than_valid_needs_a_reason():
    with pytest.raises(ValueError):
        Check("safety", False)
    with pytest.raises(ValueError):
        Check("safety", None)
