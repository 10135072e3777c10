"""Byzantine replicas in the simulator (DESIGN.md 6.3): safe while Byzantine stake is below
1/3, and the checker finds the split brain of colluders holding 1/3 or more."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from edgebft.cli import cli
from edgebft.protocol.byzantine import BEHAVIOURS
from edgebft.sim import SimOptions, run_many

JUST_UNDER_A_THIRD = (33, 23, 22, 22)  # replica 0 holds 33 of 100


def test_300_seeds_with_byzantine_stake_just_under_a_third_are_safe_and_live() -> None:
    """Each behaviour for 50 seeds, on top of crashes, partitions, loss, delay, reboots."""
    failures = []
    for k, behaviour in enumerate(BEHAVIOURS):
        options = SimOptions(stake=JUST_UNDER_A_THIRD, byzantine=(0,), behaviour=behaviour)
        summary = run_many(options, range(1 + 50 * k, 51 + 50 * k))
        assert len(summary.results) == 50
        failures += [(behaviour, r.seed, r.verdict, r.reasons) for r in summary.failures]
    assert failures == []


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_a_byzantine_backup_with_equal_stake_changes_nothing_for_the_rest(behaviour: str) -> None:
    summary = run_many(SimOptions(byzantine=(3,), behaviour=behaviour), range(1, 21))
    assert [(r.seed, r.reasons) for r in summary.failures] == []


def test_colluders_with_half_the_stake_break_safety_and_the_checker_says_so() -> None:
    options = SimOptions(byzantine=(0, 3), behaviour="equivocate", faults=())
    summary = run_many(options, range(1, 11))
    unsafe = [r for r in summary.results if r.verdict == "unsafe"]
    assert len(unsafe) >= 5
    reason = unsafe[0].reasons[0]
    assert "executed digests differ" in reason
    assert "replica 1" in reason and "replica 2" in reason, "the correct replicas diverged"
    assert "--byzantine 0,3 --behaviour equivocate" in unsafe[0].replay


def test_the_same_colluders_below_a_third_of_stake_cannot() -> None:
    options = SimOptions(stake=(20, 40, 30, 10), byzantine=(0, 3), behaviour="equivocate",
                         faults=())
    summary = run_many(options, range(1, 11))
    assert [(r.seed, r.reasons) for r in summary.failures] == []


def test_cli_byzantine_options() -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["sim", "--stake", "33,23,22,22", "--byzantine", "0",
                             "--behaviour", "equivocate", "--seeds", "3"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["sim", "--byzantine", "0,3", "--behaviour", "equivocate",
                              "--faults", "none", "--seeds", "3"])
    assert bad.exit_code == 1
    assert "unsafe" in bad.output
    wrong = runner.invoke(cli, ["sim", "--behaviour", "nonsense"])
    assert wrong.exit_code == 2
