"""The nemesis's parsing and schedule: kinds in turn, each cured before the next, all healed at
the end (hil_tests/test_faults.py and the demo show the faults themselves on live nodes)."""

from __future__ import annotations

from typing import Any

import pytest

from edgebft.lab.nemesis import (
    KINDS,
    Action,
    NemesisError,
    PrimaryNemesis,
    parse_nemesis,
    schedule,
)


def test_parse_nemesis_takes_none_one_kind_or_a_comma_list() -> None:
    assert parse_nemesis("none") == []
    assert parse_nemesis("crash") == ["crash"]
    assert parse_nemesis("crash, partition,delay,pause,byzantine") == [
        "crash", "partition", "delay", "pause", "byzantine"]
    # The names of earlier releases still parse, to the one vocabulary.
    assert parse_nemesis("crash-primary,byzantine-primary") == ["crash", "byzantine"]
    assert set(KINDS) >= {"crash", "partition", "delay", "pause", "omission", "byzantine"}
    for bad in ("fire", "crash,fire", "crash,", "none,pause", "", "skew", "reboot"):
        with pytest.raises(NemesisError, match="--nemesis"):
            parse_nemesis(bad)


def test_schedule_spreads_one_strike_per_kind_or_strikes_every_interval() -> None:
    assert schedule(30.0, None, 1) == ([10.0], 10.0)  # a third in, healed two thirds in
    assert schedule(50.0, None, 2) == ([10.0, 30.0], 10.0)
    assert schedule(40.0, 8.0, 3) == ([8.0, 16.0, 24.0, 32.0], 4.0)


class Primaries:
    """An Observer's view of a cluster whose primary is ``view % 4``, for current_primary."""

    def __init__(self) -> None:
        self.view = 0
        self.online = {n: True for n in range(4)}

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return {n: {"view": self.view, "primary": self.view % 4} for n in range(4)}


def test_kinds_strike_the_primary_in_turn_and_heal_closes_every_fault() -> None:
    log: list[tuple[str, str, int]] = []
    actions = {kind: Action(lambda node, k=kind: log.append(("strike", k, node)),
                            lambda node, k=kind: log.append(("cure", k, node)))
               for kind in KINDS}
    observer = Primaries()
    nemesis = PrimaryNemesis(["partition", "pause"], actions, observer,  # type: ignore[arg-type]
                             [1.0, 3.0, 5.0], 1.0)
    for tenth in range(56):
        struck = len(nemesis.faults)
        nemesis.step(tenth / 10)
        observer.view += len(nemesis.faults) - struck  # a struck primary is replaced
    nemesis.heal()
    assert log == [("strike", "partition", 0), ("cure", "partition", 0),
                   ("strike", "pause", 1), ("cure", "pause", 1),
                   ("strike", "partition", 2), ("cure", "partition", 2)]
    assert [(f.kind, f.node, f.view) for f in nemesis.faults] == [
        ("partition", 0, 0), ("pause", 1, 1), ("partition", 2, 2)]
    assert all(f.end >= f.start > 0 for f in nemesis.faults)
    nemesis.heal()
    assert len(log) == 6, "heal is idempotent"
