"""One verdict for every run: a seed of the simulator, a bench or demo on an emulated cluster.

A run is judged by checks (safety, client safety, convergence, liveness ...), each valid,
invalid with a reason naming the evidence, or unknown (the run gave the checker nothing to
judge, e.g. no sequence number reported by two nodes). The verdict is the worst of them, in
this order of severity:

- ``unsafe``: a safety check failed (replicas or clients saw different histories);
- ``error``: the run stopped on an error of ours (a replica raised: an invariant failed);
- ``not-live``: safe, but a liveness check failed (requests not accepted in time, nodes that
  did not converge);
- ``unknown``: nothing failed, but some check could not judge;
- ``ok``: every check valid.

Checks named in SAFETY_CHECKS decide ``unsafe``; every other failing check means ``not-live``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OK = "ok"
UNSAFE = "unsafe"
ERROR = "error"
NOT_LIVE = "not-live"
UNKNOWN = "unknown"
VERDICTS = (OK, UNSAFE, NOT_LIVE, ERROR, UNKNOWN)  # every name a Verdict may have
SEVERITY = (UNSAFE, ERROR, NOT_LIVE, UNKNOWN, OK)  # worst first

SAFETY_CHECKS = ("safety", "client-safety")


@dataclass(frozen=True)
class Check:
    """One checker's finding on a run: ``valid`` True, False, or None when it could not
    judge; ``reason`` names the evidence whenever it is not True."""

    name: str
    valid: bool | None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.valid is not True and not self.reason:
            raise ValueError(f"check {self.name}: a finding other than valid needs a reason")


@dataclass(frozen=True)
class Verdict:
    """The checks of one run and the error that stopped it early, if any.

    When ``error`` is set the run ended before its end, so liveness checks say nothing and
    are left out of ``reasons`` (a safety violation found up to the error still counts)."""

    checks: tuple[Check, ...]
    error: str | None = None
    _name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_name", self._judge())

    def _judge(self) -> str:
        if any(c.valid is False and c.name in SAFETY_CHECKS for c in self.checks):
            return UNSAFE
        if self.error is not None:
            return ERROR
        if any(c.valid is False for c in self.checks):
            return NOT_LIVE
        if any(c.valid is None for c in self.checks):
            return UNKNOWN
        return OK

    @property
    def name(self) -> str:
        """One of VERDICTS."""
        return self._name

    @property
    def ok(self) -> bool:
        return self._name == OK

    def check(self, name: str) -> Check:
        """The check called ``name``; KeyError if the run had none."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def reasons(self) -> list[str]:
        """"name: reason" for each check that is not valid, then the error."""
        reasons = [f"{c.name}: {c.reason}" for c in self.checks if c.valid is not True
                   and not (self.error is not None and c.name not in SAFETY_CHECKS)]
        if self.error is not None:
            reasons.append(f"error: {self.error}")
        return reasons

    def to_json(self) -> dict[str, Any]:
        """The verdict as summary.json carries it."""
        return {"verdict": self._name, "reasons": self.reasons,
                "checks": {c.name: c.valid for c in self.checks}}
