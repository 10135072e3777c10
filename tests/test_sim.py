"""The deterministic simulator (DESIGN.md section 6, layer 3): its checkers, its determinism,
its fault schedules and the ``edgebft sim`` command."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from click.testing import CliRunner

from edgebft.cli import cli, main
from edgebft.sim.simulator import (
    FAULT_KINDS,
    Fault,
    SimError,
    SimOptions,
    Simulation,
    check_convergence,
    cut_off,
    fault_schedule,
    parse_behaviours,
    parse_faults,
    run_many,
    run_seed,
    seeded_keys,
    within_bound,
)

FAULT_FREE = SimOptions(faults=())
ALL_FAULTS = SimOptions()
TWINS = SimOptions(stake=(33, 23, 22, 22), byzantine=(0,), behaviour="twins")
VIEW_SKEW = SimOptions(stake=(33, 23, 22, 22), byzantine=(0,), behaviour="view-skew")


def test_fault_free_seeds_are_safe_and_live() -> None:
    summary = run_many(FAULT_FREE, range(1, 21))
    assert [r.verdict for r in summary.results] == ["ok"] * 20
    for r in summary.results:
        assert r.accepted == r.requests == 30
        assert r.dropped == 0
        assert r.sim_ms <= FAULT_FREE.fault_ms + FAULT_FREE.liveness_ms
    assert summary.seeds_per_s > 0


def test_the_checker_catches_a_planted_divergent_replica() -> None:
    result = run_seed(3, SimOptions(faults=(), plant_divergence=(2, 5)))
    assert result.verdict == "unsafe"
    safety = result.checks[0]
    assert safety.name == "safety"
    assert not safety.valid
    assert safety.reason.startswith("seq 5: ")
    assert "replica 2" in safety.reason
    assert result.reasons[0].startswith("safety: seq 5: ")
    assert "--plant-divergence 2:5" in result.replay


def test_a_planted_divergence_at_a_checkpoint_is_caught_at_that_seq() -> None:
    result = run_seed(4, SimOptions(faults=(), plant_divergence=(0, 4), checkpoint_interval=4))
    assert result.verdict == "unsafe"
    assert result.checks[0].reason.startswith("seq 4: ")


@pytest.mark.parametrize("options", [FAULT_FREE, ALL_FAULTS, TWINS, VIEW_SKEW],
                         ids=["fault-free", "faults", "twins", "view-skew"])
def test_the_same_seed_replays_the_same_history(options: SimOptions) -> None:
    first = run_seed(7, options)
    again = run_seed(7, options)
    assert first.history_digest == again.history_digest
    assert first == again
    other = run_seed(8, options)
    assert other.history_digest != first.history_digest


def test_300_seeds_with_all_faults_are_safe_and_live_after_healing() -> None:
    """DESIGN.md 6.3: crashes, partitions, up to 30% loss, delays and reboots, 300 seeds."""
    summary = run_many(ALL_FAULTS, range(1, 301))
    assert [(r.seed, r.verdict, r.reasons) for r in summary.failures] == []
    assert sum(r.dropped for r in summary.results) > 0, "faults should have dropped messages"
    assert sum(r.view_changes for r in summary.results) > 0, "some seeds changed views"
    kinds = {kind for r in summary.results for kind in r.fault_kinds}
    assert kinds == set(FAULT_KINDS)
    assert sum(r.stalls for r in summary.results) > 0, "pauses should have stalled nodes"


def test_the_node_policy_runs_in_the_simulator_a_crashed_primary_is_suspected_at_once() -> None:
    """The broker's Last Will for a crashed primary reaches the nodes' detectors, whose
    suspicion gate starts the view change long before the view-change timer would."""
    options = SimOptions(faults=(), view_timeout_ms=10_000, requests=20, liveness_ms=20_000)
    sim = Simulation(3, options, faults=[Fault("crash", 1_000, 4_000, replica=0)])
    result = sim.run()
    assert result.ok, result.reasons
    assert result.suspicions >= 1
    first_view = min(e[1] for e in sim.history if e[0] == "view" and e[3] >= 1)
    assert 1_000 < first_view < 1_000 + options.view_timeout_ms // 2


def test_a_paused_replica_stalls_and_does_not_time_its_peers_out() -> None:
    """A paused backup (SIGSTOP): the tick that resumes it finds the stall, so the pause
    counts for none of its timeouts, and it reads what came meanwhile before judging anyone:
    no view change follows."""
    options = SimOptions(faults=(), requests=20)
    sim = Simulation(5, options, faults=[Fault("pause", 1_000, 3_000, replica=2)])
    result = sim.run()
    assert result.ok, result.reasons
    assert result.stalls >= 1
    assert result.suspicions == 0
    assert not [e for e in sim.history if e[0] == "view_change"]


@pytest.mark.parametrize("seed", [59, 147, 221, 241, 249])
def test_a_replica_alone_in_a_view_change_converges_once_the_load_stops(seed: int) -> None:
    """Seeds that leave one replica in a view change the others never joined (found first
    by the convergence check, not live: one replica at 28 of 30 for good; it rebooted in it,
    a restore resuming it as installed, or the others installed a view without it). It now
    executes the others' commit certificates, and converges. The seeds change with the
    schedule: 59, 129, 188, 190 and 394 were these until stuck replicas handed on the
    requests they waited for (T1), which spared them the view changes that led there, and
    155 and 176 until a fetcher waited three ticks without a chunk before asking again, 237
    until batch bodies outlived a restart, 4, 125 and 239 until chunks were 512 bytes."""
    sim = Simulation(seed, ALL_FAULTS)
    result = sim.run()
    assert result.ok, result.reasons
    statuses = sorted(r.status for r in sim.replicas)
    assert statuses == ["normal"] * 3 + ["view change"], \
        "the seed no longer leaves one replica alone in a view change: pick another"


def test_a_restored_primary_with_a_certified_batch_converges_once_the_load_stops() -> None:
    """Seed 120 (stakes 1,1,1,97), which the convergence check found not live: a restored
    primary held the batch of 29, accepted before it could vote on it, and the commits of
    the other three, which had come before the batch. It looked for their certificate only
    once it could prepare; it could not until checkpoint 28, which it then adopted by state
    transfer, and nothing looked again. Now accepting a batch looks for the certificate, and
    a transfer releases the votes held back (tests/test_replica.py and test_viewchange.py
    test each rule alone)."""
    options = SimOptions(faults=("crash", "partition", "omission"), stake=(1, 1, 1, 97))
    result = run_seed(120, options)
    assert result.ok, result.reasons


def test_a_replica_whose_certificate_died_with_a_restart_converges_with_the_next_request() -> None:
    """Seed 980 (stakes 33,33,34,0): 29 and 30 committed at the primary and replica 2 only,
    then the primary restarted and forgot its votes. Replica 1 can get no certificate for
    them at rest (PBFT promises progress to requests, not catch-up), so the check sends one
    more request, which carries it. It did not at first: the simulator's loop dropped the
    first event past a deadline, replica 1's next tick among them, so its request timer
    never fired again. Since replicas write their P entries ahead (replica.py), the seed's
    flash operations, and so its schedule, differ: it converges without the probe now (no
    seed of 1,200 at these stakes, nor of 1,200 by default, needed one), and a probe would
    still not be counted."""
    sim = Simulation(980, SimOptions(faults=("crash", "partition", "omission"),
                                     stake=(33, 33, 34, 0)))
    result = sim.run()
    assert result.ok, result.reasons
    assert (result.accepted, result.requests) == (30, 30), "a probe is not counted"
    assert len([e for e in sim.history if e[0] == "invoke"]) <= 31, "one probe at most"


@pytest.mark.parametrize("seed", [16, 20, 28, 32, 42])
def test_restarts_that_overlap_stay_safe(seed: int) -> None:
    """With --overlap-restarts a crash, reboot or pause may start while another replica is
    still recovering from a restart. These seeds executed two batches at one sequence number
    before replicas wrote their P entries ahead (replica.py): the restarted ones sent
    VIEW-CHANGEs without what they had prepared."""
    options = SimOptions(faults=("crash", "reboot", "pause", "partition", "omission"),
                         overlap_restarts=True)
    result = Simulation(seed, options).run()
    assert result.verdict != "unsafe", result.reasons
    assert "--overlap-restarts" in result.replay


def test_the_convergence_check_names_the_replicas_left_behind() -> None:
    history = [("executed", 5, 0, 30, b""), ("executed", 5, 1, 30, b""),
               ("transferred", 6, 2, 28, b""), ("executed", 7, 2, 29, b"")]
    check = check_convergence(history, [0, 1, 2])
    assert check.valid is False and check.reason == "replica 2 at 29 of 30 once settled"
    assert check_convergence(history, [0, 1]).valid is True
    assert check_convergence([], [0, 1]).valid is None


def test_seeds_with_a_large_state_transfer_it_and_stay_safe_and_live() -> None:
    """2,000 more genesis accounts on every replica: crashes (some torn in the middle of a
    flash write), partitions and reboots make replicas fetch state, page by page."""
    summary = run_many(SimOptions(state_keys=2000), range(1, 41))
    assert [(r.seed, r.verdict, r.reasons) for r in summary.failures] == []
    assert sum(1 for r in summary.results if r.transfers) >= 20, "most seeds transfer state"


def test_seven_replicas_survive_faults() -> None:
    summary = run_many(SimOptions(nodes=7, faults=ALL_FAULTS.faults), range(1, 31))
    assert [(r.seed, r.verdict, r.reasons) for r in summary.failures] == []


def test_fault_schedules_keep_the_stake_bound_and_heal_by_the_end() -> None:
    """Down, cut-off and Byzantine replicas together hold less than 1/3 of the stake, whatever
    the stakes; with equal stakes that is at most f replicas."""
    for seed in range(300):
        rng = random.Random(seed)
        nodes = 4 + seed % 4
        stake = None if seed % 3 == 0 else tuple(rng.choice((0, 1, 5, 30, 97))
                                                 for _ in range(nodes))
        if stake is not None and sum(stake) == 0:
            continue
        byzantine = (0,) if seed % 5 == 0 and within_bound({0}, stake or [1] * nodes) else ()
        options = SimOptions(nodes=nodes, stake=stake, byzantine=byzantine)
        weights = options.weights()
        faults = fault_schedule(options, random.Random(seed))
        assert all(0 < x.start_ms <= x.end_ms <= options.fault_ms for x in faults)
        for t in sorted({x.start_ms for x in faults}):
            active = [y for y in faults if y.start_ms <= t < y.end_ms]
            out = set(byzantine).union(*(cut_off(y, weights) for y in active))
            assert 3 * sum(weights[i] for i in out) < sum(weights), (seed, active)
            if stake is None:
                down = [y for y in active if y.kind in ("crash", "reboot", "pause")]
                assert len(down) <= (nodes - 1) // 3
            for kind in ("partition", "omission"):
                assert sum(y.kind == kind for y in active) <= 1
    assert fault_schedule(FAULT_FREE, random.Random(1)) == []


@pytest.mark.parametrize("stake", [(33, 33, 34, 0), (1, 1, 1, 97)])
def test_unequal_stakes_within_the_bound_are_safe_and_live(stake: tuple[int, ...]) -> None:
    options = SimOptions(stake=stake, faults=("crash", "partition", "omission"))
    summary = run_many(options, range(1, 101))
    assert [(r.seed, r.verdict, r.reasons) for r in summary.failures] == []
    assert sum(r.faults for r in summary.results) > 100


def test_beyond_the_bound_the_checkers_say_so() -> None:
    """Two equivocating replicas of four hold half the stake: --beyond-bound lets them, and
    the checkers report the seeds unsafe or not live (never an error, never a silent fork).
    Crashes beyond the bound made forks too until
    replicas wrote their P entries ahead: the replica with 97% of the stake, a quorum alone,
    restarted and decided sequence numbers again without what it had prepared. Now those
    seeds are only not live (or ok)."""
    options = SimOptions(byzantine=(0, 1), behaviour="equivocate", beyond_bound=True,
                         liveness_ms=3_000)
    results = run_many(options, range(1, 21)).results
    assert {r.verdict for r in results} <= {"ok", "unsafe", "not-live"}
    assert "unsafe" in {r.verdict for r in results}
    assert "--beyond-bound" in results[0].replay
    crashes = SimOptions(stake=(1, 1, 1, 97), faults=("crash",), beyond_bound=True,
                         liveness_ms=3_000)
    crashed_97 = [r for r in run_many(crashes, range(1, 41)).results
                  if any(e.kind == "crash" and e.replica == 3
                         for e in Simulation(r.seed, crashes).faults)]
    assert crashed_97
    assert {r.verdict for r in crashed_97} <= {"ok", "not-live"}
    within = replace(crashes, beyond_bound=False)
    assert not [x for seed in range(1, 41) for x in Simulation(seed, within).faults
                if x.kind == "crash" and x.replica == 3]


def test_seeded_keys_are_symmetric_and_reproducible() -> None:
    keys = seeded_keys(4, random.Random(5))
    assert keys.n == 4
    assert all(keys.pairwise[i][j] == keys.pairwise[j][i] for i in range(4) for j in range(4))
    assert len({k for row in keys.pairwise for k in row}) == 10
    assert seeded_keys(4, random.Random(5)) == keys
    assert seeded_keys(4, random.Random(6)) != keys


def test_options_are_checked() -> None:
    assert parse_faults("all") == FAULT_KINDS
    assert parse_faults("none") == ()
    assert parse_faults("crash, omission") == ("crash", "omission")
    assert parse_faults("crash,loss") == ("crash", "omission")  # an earlier release's name
    with pytest.raises(SimError, match="unknown fault 'fire'"):
        parse_faults("crash,fire")
    for bad in (SimOptions(nodes=3), SimOptions(requests=0), SimOptions(loss_max=1.0),
                SimOptions(plant_divergence=(4, 1)), SimOptions(behaviour="twin")):
        with pytest.raises(SimError):
            bad.check()


# ---------------------------------------------------------------------- CLI


def test_cli_exits_0_when_every_seed_is_ok() -> None:
    result = CliRunner().invoke(cli, ["sim", "--seeds", "3", "--faults", "none"])
    assert result.exit_code == 0, result.output
    assert "ok 3" in result.output
    assert "seeds/s" in result.output


def test_cli_exits_1_on_a_violation_and_prints_the_exact_replay() -> None:
    args = ["sim", "--seed", "3", "--faults", "none", "--requests", "12",
            "--plant-divergence", "1:2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "seed 3: unsafe" in result.output
    assert "safety: seq 2: " in result.output
    replay = ("edgebft sim --seed 3 --nodes 4 --faults none --requests 12 "
              "--plant-divergence 1:2")
    assert f"replay: {replay}\n" in result.output
    again = CliRunner().invoke(cli, replay.split()[1:])
    assert again.exit_code == 1
    assert again.output.count("safety: seq 2: ") == 1


def test_cli_liveness_failures_exit_0_only_with_safety_only() -> None:
    args = ["sim", "--seed", "1", "--faults", "partition", "--fault-ms", "3000",
            "--liveness-ms", "2000"]
    result = CliRunner().invoke(cli, args + ["--safety-only"])
    assert result.exit_code == 0, result.output
    full = CliRunner().invoke(cli, args)
    verdict_ok = "ok 1 " in full.output
    assert full.exit_code == (0 if verdict_ok else 1)


@pytest.mark.parametrize("args, message", [
    (["--faults", "fire"], "unknown fault 'fire'"),
    (["--nodes", "2"], "--nodes must be 4..32"),
    (["--seed", "1", "--seeds", "2"], "--seed runs one seed"),
    (["--plant-divergence", "x"], "--plant-divergence wants REPLICA:SEQ"),
])
def test_cli_bad_options_exit_2_with_one_line(args: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sim", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("edgebft: error: ")
    assert message in err


def test_a_list_of_behaviours_takes_them_in_turn_per_seed() -> None:
    options = SimOptions(stake=(33, 23, 22, 22), byzantine=(0,), requests=5)
    summary = run_many(options, range(4), behaviours=parse_behaviours("equivocate,twins"))
    assert [r.replay.split("--behaviour ")[1] for r in summary.results] == [
        "equivocate", "twins", "equivocate", "twins"]
    assert all(r.ok for r in summary.results)
    with pytest.raises(SimError, match="unknown behaviour 'nope'"):
        parse_behaviours("equivocate,nope")
