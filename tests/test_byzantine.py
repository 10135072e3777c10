"""Byzantine replicas (DESIGN.md 6.3): the behaviours of protocol/byzantine.py and twins in the
simulator are safe and live while Byzantine stake is below 1/3, and the checker finds the split
brain of colluders or twins holding 1/3 or more."""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import run_mp
from edgebft.cli import cli
from edgebft.devices.keys import generate_keys
from edgebft.firmware.faults import Faults
from edgebft.lab.control import command_wire
from edgebft.protocol import auth
from edgebft.protocol import messages as m
from edgebft.protocol import replica as rp
from edgebft.protocol.byzantine import VIEW_SKEW_AHEAD, misbehave
from edgebft.protocol.stake import Stake
from edgebft.sim.simulator import (
    SIM_BEHAVIOURS,
    TWINS,
    SimOptions,
    Simulation,
    run_many,
    twin_phases,
)

JUST_UNDER_A_THIRD = (33, 23, 22, 22)  # replica 0 holds 33 of 100
SEEDS_PER_BEHAVIOUR = 38               # x 8 behaviours: 304 seeds per CI run

@pytest.mark.parametrize("behaviour", SIM_BEHAVIOURS)
def test_byzantine_stake_just_under_a_third_is_safe_and_live(behaviour: str) -> None:
    """38 seeds per behaviour (304 per CI run), with crashes, partitions, loss, delay and
    reboots; the seeds differ between behaviours."""
    k = SIM_BEHAVIOURS.index(behaviour)
    options = SimOptions(stake=JUST_UNDER_A_THIRD, byzantine=(0,), behaviour=behaviour)
    seeds = range(1 + SEEDS_PER_BEHAVIOUR * k, 1 + SEEDS_PER_BEHAVIOUR * (k + 1))
    summary = run_many(options, seeds)
    assert len(summary.results) == SEEDS_PER_BEHAVIOUR
    assert [(r.seed, r.verdict, r.reasons) for r in summary.failures] == []


@pytest.mark.parametrize("behaviour", SIM_BEHAVIOURS)
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


# ---------------------------------------------------------------------- view-skew


def _replicas(n: int = 4) -> list[rp.Replica]:
    stake = Stake([1] * n)
    keys = generate_keys(n, random.Random(1).randbytes)
    return [rp.Replica(i, stake, keys.pairwise[i], keys.client_secrets[i], genesis={"a": [1, 0]})
            for i in range(n)]


def _wire(replica: rp.Replica, kind: int, *fields: object) -> bytes:
    return replica.authenticated(m.body(kind, replica.me, *fields))


DIGEST = hashlib.sha256(b"batch").digest()


@pytest.mark.parametrize("view, honest", [(3, 0), (3, 1), (0, 1)])
def test_view_skew_restamps_votes_with_past_and_future_views(view: int, honest: int) -> None:
    """Copies at view-1 (when there is one) and view+1..view+VIEW_SKEW_AHEAD, authentic to
    every receiver; the vote itself goes out when randbits says so."""
    replicas = _replicas()
    byzantine = replicas[1]
    prepare = _wire(byzantine, m.PREPARE, view, 5, DIGEST)
    byzantine.out[:] = [(rp.TO_ALL, prepare), (2, _wire(byzantine, m.COMMIT, view, 5, DIGEST))]
    misbehave(byzantine, "view-skew", lambda bits: honest)
    skewed = [v for v in range(view - 1, view + VIEW_SKEW_AHEAD + 1) if v >= 0 and v != view]
    for kind, dest in ((m.PREPARE, rp.TO_ALL), (m.COMMIT, 2)):
        sent = [m.decode(wire) for d, wire in byzantine.out if m.decode(wire).kind == kind]
        assert [msg.view for msg in sent] == [view] * honest + skewed
        assert all(d == dest for d, wire in byzantine.out if m.decode(wire).kind == kind)
        for msg in sent:
            assert (msg.sender, msg.seq, msg.digest) == (1, 5, DIGEST)
            for j in (0, 2, 3):
                assert auth.check(msg.auth, j, replicas[j].macs[1], msg.body)


def test_view_skew_leaves_messages_without_a_view_and_client_replies_alone() -> None:
    byzantine = _replicas()[1]
    checkpoint = _wire(byzantine, m.CHECKPOINT, 4, DIGEST)
    reply = (rp.TO_ALL, b"not even a message")
    to_client = (rp.to_client(7), _wire(byzantine, m.REPLY, 3, 7, 1, [True, 0]))
    byzantine.out[:] = [(rp.TO_ALL, checkpoint), reply, to_client]
    misbehave(byzantine, "view-skew", lambda bits: 0)
    assert byzantine.out == [(rp.TO_ALL, checkpoint), reply, to_client]


def test_view_skew_restamps_a_view_change_whole() -> None:
    replicas = _replicas()
    byzantine = replicas[1]
    for peer in (0, 2, 3):  # it hears a quorum, so a suspicion starts a view change
        byzantine.receive(_wire(replicas[peer], m.STATUS, 0, False, 0, 0, []), 0)
    byzantine.suspect(0)  # VIEW-CHANGE for view 1
    [(dest, wire)] = [(d, w) for d, w in byzantine.out if m.decode(w).kind == m.VIEW_CHANGE]
    byzantine.out[:] = [(dest, wire)]
    honest = m.decode(wire)
    misbehave(byzantine, "view-skew", lambda bits: 0)
    copies = [m.decode(w) for _, w in byzantine.out]
    assert [c.view for c in copies] == [0, 2, 3]
    assert all((c.h, c.c, c.p, c.q) == (honest.h, honest.c, honest.p, honest.q) for c in copies)


def test_a_correct_replica_counts_no_vote_of_another_view() -> None:
    replicas = _replicas()
    byzantine, correct = replicas[1], replicas[2]
    byzantine.out[:] = [(rp.TO_ALL, _wire(byzantine, kind, 0, 1, DIGEST))
                        for kind in (m.PREPARE, m.COMMIT)]
    misbehave(byzantine, "view-skew", lambda bits: 0)
    for _, wire in byzantine.out:
        correct.receive(wire, 0)
    assert correct.drops == {"wrong view": 2 * VIEW_SKEW_AHEAD}
    assert correct.live_slots() == []


def test_view_skew_is_the_same_on_micropython(micropython: Path, mp_lib: Path) -> None:
    """The firmware's fault hooks run this menu: MicroPython must rewrite byte for byte alike."""
    code = (
        "from edgebft.protocol import auth, replica as rp, messages as m\n"
        "from edgebft.protocol.byzantine import misbehave\n"
        "from edgebft.protocol.stake import Stake\n"
        "r = rp.Replica(1, Stake([1, 1, 1, 1]), [bytes([i + 1]) * 16 for i in range(4)],\n"
        "               b'c' * 16, genesis={'a': [1, 0]})\n"
        "body = m.body(m.COMMIT, 1, 3, 5, b'd' * 32)\n"
        "r.out.append((rp.TO_ALL, body + auth.authenticator(r.macs, body)))\n"
        "misbehave(r, 'view-skew', lambda bits: 1)\n"
        "for d, w in r.out:\n"
        "    print(d, w.hex())\n")
    on_mp = run_mp(micropython, mp_lib, code)
    on_cpython = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=60)
    assert on_mp.returncode == on_cpython.returncode == 0, on_mp.stderr + on_cpython.stderr
    assert on_mp.stdout == on_cpython.stdout
    assert on_mp.stdout.count("\n") == 1 + 1 + VIEW_SKEW_AHEAD


def test_the_firmware_fault_hooks_take_view_skew_from_the_control_channel(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the node's flash: its last control nonce
    key = b"k" * 16
    hooks = Faults(1, key)
    assert hooks.on_control(command_wire(key, 1, "byzantine", ["view-skew"])) == "byzantine"
    assert hooks.describe()["byzantine"] == "view-skew"
    byzantine = _replicas()[1]
    byzantine.out[:] = [(rp.TO_ALL, _wire(byzantine, m.PREPARE, 2, 5, DIGEST))]
    hooks.misbehave(byzantine)
    views = {m.decode(wire).view for _, wire in byzantine.out}
    assert {1, 3, 4} <= views <= {1, 2, 3, 4}
    assert hooks.on_control(command_wire(key, 2, "byzantine", ["nonsense"])) is None


# ---------------------------------------------------------------------- twins


def test_twin_phases_split_the_correct_replicas_back_to_back_until_the_heal_point() -> None:
    options = SimOptions(nodes=7, byzantine=(2, 5), behaviour=TWINS)
    cut = sides = 0
    for seed in range(50):
        phases = twin_phases(options, random.Random(seed))
        assert phases[0].start_ms == 0 and phases[-1].end_ms == options.fault_ms
        assert all(a.end_ms == b.start_ms for a, b in zip(phases, phases[1:], strict=False))
        assert all(p.side <= {0, 1, 3, 4, 6} for p in phases)
        cut += sum(p.cut for p in phases)
        sides += len({p.side for p in phases})
    assert 0 < cut < sides
    assert twin_phases(SimOptions(byzantine=(0,), behaviour="silent"), random.Random(1)) == []
    assert twin_phases(SimOptions(byzantine=(0,), behaviour=TWINS, fault_ms=0),
                       random.Random(1)) == []


def test_twins_are_two_working_instances_of_one_replica_until_the_heal_point() -> None:
    sim = Simulation(1, SimOptions(stake=JUST_UNDER_A_THIRD, byzantine=(0,), behaviour=TWINS))
    assert sim.node == [0, 1, 2, 3, 0]
    first, second = sim.replicas[0], sim.replicas[4]
    assert first.me == second.me
    assert auth.authenticator(first.macs, b"x") == auth.authenticator(second.macs, b"x")
    result = sim.run()
    assert result.ok, result.reasons
    assert "twins" in result.fault_kinds
    assert second.last_exec > 0, "the second twin took part"
    assert sim.up == [True, True, True, True, False], "silenced at the heal point"
    assert all(e[2] != 0 for e in sim.history if e[0] in ("executed", "checkpoint"))


@pytest.mark.parametrize("stake, byzantine", [(None, (0, 1)), ((40, 30, 15, 15), (0,))],
                         ids=["two-twinned-of-four", "twinned-stake-40"])
def test_twins_with_a_third_or_more_of_stake_break_safety_and_the_checker_says_so(
        stake: tuple[int, ...] | None, byzantine: tuple[int, ...]) -> None:
    options = SimOptions(stake=stake, byzantine=byzantine, behaviour=TWINS, faults=())
    summary = run_many(options, range(1, 21))
    unsafe = [r for r in summary.results if r.verdict == "unsafe"]
    assert unsafe
    for r in unsafe:
        assert "executed digests differ" in r.reasons[0]
        named = {int(j) for j in re.findall(r"replica (\d+)", r.reasons[0])}
        assert len(named) == 2 and not named & set(byzantine), "correct replicas diverged"
    assert "--behaviour twins" in unsafe[0].replay


# ---------------------------------------------------------------------- CLI


def test_cli_byzantine_options() -> None:
    runner = CliRunner()
    for behaviour in ("equivocate", TWINS):
        ok = runner.invoke(cli, ["sim", "--stake", "33,23,22,22", "--byzantine", "0",
                                 "--behaviour", behaviour, "--seeds", "3"])
        assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["sim", "--byzantine", "0,3", "--behaviour", "equivocate",
                              "--faults", "none", "--seeds", "3"])
    assert bad.exit_code == 1
    assert "unsafe" in bad.output
    wrong = runner.invoke(cli, ["sim", "--behaviour", "nonsense"])
    assert wrong.exit_code == 2
    usage = runner.invoke(cli, ["sim", "--help"])
    for behaviour in SIM_BEHAVIOURS:
        assert behaviour in usage.output
