"""Proof-of-Stake epochs: stake and unstake, slashing, validator sets in force at checkpoints."""

from __future__ import annotations

import pytest
from test_replica import Net

from conftest import ledger_state, new_ledger
from edgebft.lab.workload import GENESIS_BALANCE
from edgebft.protocol import ledger as ledger_module
from edgebft.protocol import messages as m
from edgebft.protocol import replica as rp
from edgebft.protocol.replica import REPLICA_CLIENT_BASE
from edgebft.sim import simulator
from edgebft.sim.simulator import SimOptions, Simulation

ALICE, MALLORY = 7, 9


def test_bonds_change_at_once_and_the_set_only_at_the_epoch_end() -> None:
    ledger = new_ledger({"a": [100, ALICE], "b": [0, ALICE]}, [10, 10, 10, 0])
    assert ledger.execute(["stake", "a", 3, 20], ALICE) == [True, 20]
    assert ledger.balance("a") == 80
    assert ledger.bonds == [10, 10, 10, 20]
    assert ledger.validators == [10, 10, 10, 0], "not in force before the checkpoint"
    assert ledger.execute(["validators"], ALICE) == [True, [0, [10, 10, 10, 0],
                                                           [10, 10, 10, 20]]]
    assert ledger.end_epoch(8) is True
    assert (ledger.epoch, ledger.since, ledger.validators) == (1, 8, [10, 10, 10, 20])
    assert ledger.end_epoch(16) is False, "no change, no new epoch"
    assert ledger.execute(["unstake", 3, "a", 20], ALICE) == [True, 0]
    assert ledger.balance("a") == 80, "unbonding: not back yet"
    assert ledger.end_epoch(24) is True
    assert ledger.validators == [10, 10, 10, 0], "a zero bond leaves the set"
    assert ledger.balance("a") == 80, "still unbonding through one more checkpoint"
    assert ledger.end_epoch(32) is False
    assert ledger.balance("a") == 100, "released after UNBONDING_CHECKPOINTS checkpoints"


def test_bad_stake_ops_fail_and_change_nothing() -> None:
    ledger = new_ledger({"a": [5, ALICE]}, [1, 1, 1, 1])
    before = ledger_state(ledger)
    assert ledger.execute(["stake", "a", 0, 6], ALICE) == [False, "insufficient funds"]
    assert ledger.execute(["stake", "a", 4, 1], ALICE) == [False, "bad stake"]
    assert ledger.execute(["stake", "a", 0, 0], ALICE) == [False, "bad stake"]
    assert ledger.execute(["unstake", 0, "a", 1], ALICE) == [False, "insufficient stake"], \
        "genesis stake belongs to no account"
    assert ledger.execute(["unstake", 1.5, "a", 1], ALICE) == [False, "bad unstake"]
    assert ledger.execute(["accuse", [0]], ALICE) == [False, "bad op"], "clients cannot accuse"
    assert ledger_state(ledger) == before
    assert ledger.execute(["stake", "a", 1, 2], ALICE) == [True, 3]
    assert ledger.execute(["unstake", 1, "a", 3], ALICE) == [False, "insufficient stake"], \
        "only what this account delegated"
    assert ledger.execute(["unstake", 1, "a", 2], ALICE) == [True, 1]


def test_only_the_owner_spends_and_unbonds() -> None:
    """The attack of issue 13: with genesis stakes 30, 25, 25, 20, Mallory (one token) tried
    to unbond validators 0-2 to herself, bond it all to 3 and take Alice's tokens."""
    ledger = new_ledger({"alice": [100, ALICE], "mallory": [1, MALLORY]}, [30, 25, 25, 20])
    before = ledger_state(ledger)
    for v in (0, 1, 2):
        assert ledger.execute(["unstake", v, "mallory", 25], MALLORY) == \
            [False, "insufficient stake"]
    assert ledger.execute(["transfer", "alice", "mallory", 100], MALLORY) == \
        [False, "not owner"]
    assert ledger.execute(["stake", "alice", 3, 100], MALLORY) == [False, "not owner"]
    assert ledger_state(ledger) == before
    assert ledger.execute(["stake", "alice", 0, 10], ALICE) == [True, 40]
    assert ledger.execute(["unstake", 0, "alice", 10], MALLORY) == [False, "not owner"]
    assert ledger.execute(["unstake", 0, "mallory", 10], MALLORY) == \
        [False, "insufficient stake"], "a delegation is its account's"
    assert ledger.bonds == [40, 25, 25, 20]
    assert ledger.execute(["transfer", "alice", "nobody", 1], ALICE) == \
        [False, "no such account"]
    assert ledger.execute(["open", "nobody"], MALLORY) == [True, None]
    assert ledger.execute(["open", "nobody"], ALICE) == [False, "account exists"]
    assert ledger.execute(["transfer", "alice", "nobody", 5], ALICE) == [True, 85]
    assert ledger.execute(["transfer", "nobody", "mallory", 5], MALLORY) == [True, 0]
    assert ledger.balance("mallory") == 6
    # What a client reads to refuse, before sending, a spend from an account not its own.
    assert ledger.read(["account", "nobody"]) == [True, [0, MALLORY]]
    assert ledger.read(["account", "alice"]) == [True, [85, ALICE]]
    assert ledger.read(["account", "nobody at all"]) == [True, None]
    assert ledger.read(["account", 7]) == [False, "bad op"]


def test_a_genesis_range_funds_accounts_owned_by_their_client() -> None:
    ledger = new_ledger({"acct*": [4, 50]})
    assert [ledger.balance(f"acct{i}") for i in range(5)] == [50, 50, 50, 50, 0]
    assert ledger.account("acct01") is None and ledger.account("acct") is None
    assert ledger.store.count == 0, "no flash until written"
    assert ledger.execute(["transfer", "acct2", "acct3", 5], 3) == [False, "not owner"]
    assert ledger.execute(["transfer", "acct2", "acct3", 5], 2) == [True, 45]
    assert (ledger.balance("acct2"), ledger.balance("acct3")) == (45, 55)
    copy = new_ledger()
    copy.load_small(ledger.small_state())
    assert copy.balance("acct1") == 50, "the range is in the checkpoint's small state"


def test_unbonding_stake_is_slashed_with_its_validator() -> None:
    """Stake that starts unbonding before the evidence against its validator counts is burnt
    with it; another validator's unbonding is released."""
    ledger = new_ledger({"a": [100, ALICE]}, [30, 25, 25, 20])
    assert ledger.execute(["stake", "a", 0, 10], ALICE) == [True, 40]
    assert ledger.execute(["stake", "a", 1, 10], ALICE) == [True, 35]
    assert ledger.end_epoch(8) is True
    assert ledger.execute(["unstake", 0, "a", 10], ALICE) == [True, 30]
    assert ledger.execute(["unstake", 1, "a", 10], ALICE) == [True, 25]
    assert ledger.end_epoch(16) is True, "the unbonded stake no longer counts"
    assert ledger.execute(["accuse", [0]], ALICE, 1) == [True, []]
    assert ledger.execute(["accuse", [0]], ALICE, 2) == [True, [0]], "50 of 100 accuse 0"
    assert ledger.end_epoch(24) is True
    assert ledger.balance("a") == 90, "validator 1's unbonding released, 0's burnt"
    assert ledger.delegation(0, "a") == 0 and ledger.bonds[0] == 0
    assert ledger.store.count == 3, "the released unbondings leave the store"


def test_a_slash_voids_the_delegations_to_the_validator() -> None:
    ledger = new_ledger({"a": [100, ALICE]}, [30, 25, 25, 20])
    assert ledger.execute(["stake", "a", 0, 10], ALICE) == [True, 40]
    ledger.end_epoch(8)
    ledger.execute(["accuse", [0]], ALICE, 1)
    assert ledger.execute(["accuse", [0]], ALICE, 3) == [True, [0]]
    assert ledger.delegation(0, "a") == 0
    assert ledger.execute(["unstake", 0, "a", 10], ALICE) == [False, "insufficient stake"]
    assert ledger.execute(["stake", "a", 0, 5], ALICE) == [True, 5], "a fresh delegation"
    assert ledger.execute(["delegations", "a"], ALICE) == [True, [[0, 5]]]


def test_accusations_slash_once_over_a_third_of_stake_accuses() -> None:
    ledger = new_ledger({}, [30, 25, 25, 20])
    assert ledger.execute(["accuse", [0]], ALICE, 1) == [True, []], "25 of 100: not enough"
    assert ledger.execute(["accuse", [0]], ALICE, 1) == [True, []], "counted once"
    assert ledger.execute(["accuse", [1]], ALICE, 0) == [True, []]
    assert ledger.execute(["accuse", [0]], ALICE, 3) == [True, [0]], "45 of 100 accuse 0"
    assert ledger.bonds == [0, 25, 25, 20]
    assert ledger.validators == [30, 25, 25, 20], "slashed at the next epoch"
    assert ledger.execute(["accuse", [2]], ALICE, 2) == [True, []], "no self-accusation"
    copy = new_ledger()
    copy.load_small(ledger.small_state())
    assert copy.small_state() == ledger.small_state()


def _epoch_events(net: Net) -> set[tuple[object, ...]]:
    return {tuple(e[1:3]) + (tuple(e[3]),) for r in net.replicas for e in r.events
            if e[0] == "epoch"}


def test_a_validator_joins_with_stake_and_leaves_with_zero() -> None:
    net = Net(n=5, k=4, weights=[1, 1, 1, 1, 0])
    alice = net.client(7)
    assert net.call(alice, ["stake", "a", 4, 3]) == [True, 3]
    for _ in range(3):
        net.call(alice, ["balance", "a"])
    # Sequence 4 is the checkpoint: every replica puts [1, 1, 1, 1, 3] in force there.
    assert {tuple(r.stake.weights) for r in net.replicas} == {(1, 1, 1, 1, 3)}
    assert _epoch_events(net) == {(1, 4, (1, 1, 1, 1, 3))}
    assert {r.view for r in net.replicas} == {1}, "the old view was frozen and changed"
    # Replica 4's stake now counts: with two others down, the primary, the third and 4 hold
    # 5 of 7 (> 2/3); under the old set the three left would hold 2 of 4.
    primary = net.replicas[0].primary()
    assert primary != 4
    gone = {j for j in range(4) if j != primary}
    gone.pop()
    net.down |= gone
    assert net.call(alice, ["transfer", "a", "b", 1]) == [True, 96]
    net.down -= gone
    assert net.call(alice, ["unstake", 4, "a", 3]) == [True, 0]
    while net.replicas[primary].last_exec % 4:
        net.call(alice, ["balance", "a"])
    net.run()
    live = [r for i, r in enumerate(net.replicas) if i not in gone]
    assert {tuple(r.stake.weights) for r in live} == {(1, 1, 1, 1, 0)}
    assert all(r.primary(v) != 4 for r in live for v in range(20)), "out of the set"


def test_the_replica_that_alone_executed_an_epochs_first_checkpoint_stays_until_stable() -> None:
    """Replica 3 is down, so the other three are all needed. A stake at sequence 1 makes
    checkpoint 4 the first of a new epoch; the commits of 4 reach replica 2 only. Replica 2
    executes 4 and the new set [2, 1, 1, 1] is in force for it, but replicas 0 and 1 need its
    commit to execute 4: it stays in the frozen view 0, voting under the old set, until
    checkpoint 4 is stable. (Leaving at once, it installed every later view decided from
    below 4 and left it again: nothing executed any more, `sim --seed 2043 --churn`.)"""
    net = Net(n=4, k=4)
    net.down.add(3)
    alice = net.client(7)
    assert net.call(alice, ["stake", "a", 0, 1]) == [True, 2], "its new bond"
    for _ in range(2):
        net.call(alice, ["balance", "a"])
    net.submit(alice.request(["balance", "b"]))
    net.run(dropped=lambda to, msg: msg.kind == m.COMMIT and msg.seq == 4 and to in (0, 1))
    zero, one, two = net.replicas[:3]
    assert [r.last_exec for r in (zero, one, two)] == [3, 3, 4]
    assert two.stake.weights == [2, 1, 1, 1], "the new set is in force after 4"
    assert (two.view, two.status, two.h) == (0, "normal", 0), "frozen while 4 is unstable"
    for now in (100, 200):  # 0 and 1, stuck, ask with STATUS (RT1); 2 answers (RT2)
        net.tick(now)
        net.run()
    assert {r.h for r in (zero, one, two)} == {4}, "checkpoint 4 stable under the old set"
    assert {(r.view, r.status, r.view_low) for r in (zero, one, two)} == {(1, "normal", 4)}
    assert all(r.vstake.weights == [2, 1, 1, 1] for r in (zero, one, two)), "view 1: new set"
    names = [e[:2] for e in two.events if e[0] in ("stable", "view_change")]
    assert names.index(("stable", 4)) < names.index(("view_change", 1)), "left once stable"
    assert net.call(alice, ["transfer", "a", "b", 1]) == [True, 98]


def test_a_view_change_before_the_epochs_first_checkpoint_is_stable_runs_under_the_old_set(
        ) -> None:
    """Checkpoint 4 starts the epoch of [1, 1, 1, 3]. Replicas 0 and 2 execute 4; the commits
    and checkpoints of 4 never reach 1 and 3, and then 0 crashes. 1 and 3 time out and change
    view; replica 2 joins. View 1 starts from checkpoint 0 (only 2 lists 4), so it runs under
    the old set, whose primary of view 1 is replica 1: replica 2, for which the new set is in
    force (primary of view 1: the crashed 0), judges the NEW-VIEW by the set in force at its
    checkpoint, installs it, and votes there until 4 is stable. Then view 2 runs the new set."""
    net = Net(n=4, k=4)
    alice = net.client(7)
    assert net.call(alice, ["stake", "a", 3, 2]) == [True, 3]
    for _ in range(2):
        net.call(alice, ["balance", "a"])
    net.submit(alice.request(["balance", "b"]))
    hidden = (m.COMMIT, m.CHECKPOINT)
    net.run(dropped=lambda to, msg: msg.kind in hidden and msg.seq == 4 and to in (1, 3))
    one, two, three = net.replicas[1:]
    assert [r.last_exec for r in net.replicas] == [4, 3, 4, 3]
    assert two.stake.primary(1) == 0 and two.vstake.primary(1) == 1
    net.down.add(0)
    for now in range(100, 2100, 100):  # 2 answers 1's and 3's STATUS: lose its commits
        net.tick(now)
        net.run(dropped=lambda to, msg: msg.kind == m.COMMIT and msg.view == 0)
    assert {r.h for r in (one, two, three)} == {4}
    assert ("view", 1) in two.events, "2 installed the old set's view 1"
    assert {(r.view, r.status, r.view_low) for r in (one, two, three)} == {(2, "normal", 4)}
    assert all(r.vstake.weights == [1, 1, 1, 3] for r in (one, two, three))
    assert net.call(alice, ["transfer", "a", "b", 1]) == [True, 97]


def test_no_replica_votes_past_a_checkpoint_it_has_not_executed() -> None:
    """That checkpoint may start an epoch, and in a view of the old set nothing past it may
    prepare: so no certificate of the old set ever names a sequence number of the new one.
    The pre-prepare is logged; the prepare goes out once the checkpoint is executed."""
    net = Net(n=4, k=4)
    alice = net.client(7)
    for _ in range(3):
        net.call(alice, ["balance", "a"])
    backup = net.replicas[1]
    primary = net.replicas[0]
    batch = [alice.request(["balance", "b"])]
    digest = rp.batch_digest(batch)
    early = primary.authenticated(m.body(m.PRE_PREPARE, 0, 0, 5, digest, batch))
    backup.receive(early, net.now)  # sequence 5 while 4 is not executed
    assert backup.log.accepted(backup.log.find(5))
    assert not [w for _, w in backup.out if m.decode(w).kind == m.PREPARE], "no vote past 4"
    backup.out.clear()
    net.call(alice, ["balance", "a"])  # sequence 4 executes everywhere
    assert backup.last_exec == 4
    peer = net.replicas[2]
    assert peer.log.voted(peer.log.prepares, peer.log.find(5), 1), "its PREPARE of 5 came"


def test_digests_cover_the_validator_set_and_the_delegations() -> None:
    a, b = (new_ledger({"a": [10, ALICE]}, [1, 1, 1, 1]) for _ in range(2))
    a.execute(["stake", "a", 0, 1], ALICE)
    b.execute(["stake", "a", 1, 1], ALICE)
    assert a.small_state() != b.small_state(), "the bonds"
    a.store.flush()
    b.store.flush()
    assert a.store.total != b.store.total, "the delegation entries"


@pytest.mark.parametrize("seed", range(10))
def test_an_equivocating_primary_is_slashed_and_the_cluster_stays_safe(seed: int) -> None:
    """Five equal stakes, the primary equivocates (real pre-prepare to replicas 2 and 4, null
    to 1 and 3): each correct replica sees its pre-prepare contradicted by prepares carrying
    2/5 of stake, accuses the primary and changes view; the accusations are ordered like
    requests and slash the offender's bond, in force from the next checkpoint. (With four
    replicas the lone replica that got the real pre-prepare holds too little stake to prove
    anything: see README.)"""
    options = SimOptions(nodes=5, stake=(20,) * 5, byzantine=(0,), behaviour="equivocate",
                         faults=())
    sim = Simulation(seed, options)
    result = sim.run()
    assert result.verdict == "ok", result.reasons
    correct = sim.replicas[1:]
    assert {tuple(r.stake.weights) for r in correct} == {(0, 20, 20, 20, 20)}
    assert all(r.view > 0 and r.primary() != 0 for r in correct)
    # The accusations were ordered and executed like requests, from the replicas' client ids,
    # and more than 1/3 of stake accused.
    executed = {j for j in range(1, 5)
                if correct[0].clients.get(REPLICA_CLIENT_BASE + j) is not None}
    assert 3 * 20 * len(executed) > 100


def test_epoch_changes_under_load_and_faults_stay_safe_and_live() -> None:
    """Stake churn (a new validator set at nearly every checkpoint) on top of crashes,
    partitions, loss, delay and reboots: every seed safe and live, with epochs in each."""
    options = SimOptions(stake=(100, 100, 100, 100), churn=True)
    for seed in range(100):
        sim = Simulation(seed, options)
        result = sim.run()
        assert result.verdict == "ok", (result.reasons, result.replay)
        epochs = {e[3] for e in sim.history if e[0] == "epoch"}
        assert epochs, f"seed {seed}: no epoch change"
        finals = {tuple(r.stake.weights) for r in sim.replicas
                  if r.last_exec == max(x.last_exec for x in sim.replicas)}
        assert len(finals) == 1, f"seed {seed}: up-to-date replicas disagree on the set"


@pytest.mark.parametrize("seed", [2010, 2027, 2043, 2050])
def test_churn_seeds_that_deadlocked_at_an_epoch_start_are_live(seed: int) -> None:
    """Stakes of 1 token each, so one token moved shifts a third of the stake: in these seeds
    one replica executed an epoch's first checkpoint that the others could not commit without
    it, and it left the frozen view at once (`edgebft sim --seed 2043 --churn`)."""
    result = Simulation(seed, SimOptions(churn=True)).run()
    assert result.verdict == "ok", (result.reasons, result.replay)


def test_a_replica_restores_its_stable_state_from_its_flash() -> None:
    """A restart opens the flash (the stable checkpoint, verified) and the durable record
    (view, h, view_low); what executed after the stable checkpoint is gone from both."""
    net = Net(n=4, k=4)
    alice = net.client(7)
    for _ in range(5):
        net.call(alice, ["transfer", "a", "b", 1])
    r = net.replicas[1]
    assert (r.h, r.last_exec) == (4, 5)
    restored = type(r).restore(r.durable(), 1, net.stake, net.keys.pairwise[1],
                               net.keys.client_secrets[1], genesis={"a": [100, 7], "b": [0, 8]},
                               checkpoint_interval=4, flash=r.state.flash)
    assert (restored.h, restored.last_exec, restored.view_low) == (4, 4, 0)
    assert restored.state.error is None
    assert restored.own_checkpoints[4] == r.own_checkpoints[4]
    assert restored.ledger.balance("b") == 4, "the fifth transfer executed after h"
    assert restored.clients.get(7)[0] == 4, "alice's fourth request is the last it knows"


def _owner_ops(client: int, i: int) -> list[object]:
    """Client 0 bonds 5 tokens of acct0 to validator 1, then writes; client 1 tries, again
    and again, to spend acct0, unbond its delegation and bond its tokens elsewhere."""
    if client == 0:
        return ["stake", "acct0", 1, 5] if i == 0 else ["put", f"k{i}", i]
    if client == 1:
        return [["transfer", "acct0", "acct1", 1], ["unstake", 1, "acct0", 5],
                ["stake", "acct0", 2, 1], ["put", "k", i]][i % 4]
    return ["put", f"k{client}", i]


@pytest.mark.parametrize("seed", range(10))
def test_in_the_simulator_no_client_moves_another_owners_tokens_or_stake(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the simulator's faults (crashes, partitions, loss, delay, reboots), every theft
    of client 1 is refused ("not owner") and acct0 keeps what its owner left it."""
    monkeypatch.setattr(simulator, "operation", _owner_ops)
    sim = Simulation(seed, SimOptions(requests=40))
    result = sim.run()
    assert result.verdict == "ok", (result.reasons, result.replay)
    thefts = [e for e in sim.history if e[0] == "ok" and e[2] == 1 and e[4][1] != "no op"]
    refusals = [e[4] for e in thefts if e[4] != [True, None]]
    assert refusals and all(r == [False, "not owner"] for r in refusals), refusals
    top = max(r.last_exec for r in sim.replicas)
    for r in sim.replicas:
        if r.last_exec == top:
            assert r.ledger.balance("acct0") == GENESIS_BALANCE - 5
            assert r.ledger.delegation(1, "acct0") == 5
            assert r.ledger.balance("acct1") == GENESIS_BALANCE


def _escape_ops(client: int, i: int) -> list[object]:
    """Client 0 bonds 5 tokens of acct0 to validator 0, then asks to unbond them."""
    if client == 0 and i < 2:
        return [["stake", "acct0", 0, 5], ["unstake", 0, "acct0", 5]][i]
    return ["put", f"k{client}", i]


def test_in_the_simulator_stake_bonded_to_an_equivocator_is_slashed_with_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Five equal stakes, primary 0 equivocates; client 0 bonds 5 tokens to it, then asks for
    them back. Where the bond executed before the slash (the stake op's result is 0's bond
    with them, 25), the slash burns them and the unbond gets nothing: acct0 never sees them
    again. (Where it executed after, it bonded a validator already slashed, and unbonding
    that is fair.) The ledger-level case of an unbond executed between the offence and the
    slash: test_unbonding_stake_is_slashed_with_its_validator."""
    monkeypatch.setattr(simulator, "operation", _escape_ops)
    options = SimOptions(nodes=5, stake=(20,) * 5, byzantine=(0,), behaviour="equivocate",
                         checkpoint_interval=16, faults=())
    before_the_slash = 0
    for seed in range(8):
        sim = Simulation(seed, options)
        result = sim.run()
        assert result.verdict == "ok", result.reasons
        staked, unstaked = [e[4] for e in sim.history if e[0] == "ok" and e[2] == 0][:2]
        for r in sim.replicas[1:]:
            assert r.stake.weights[0] == 0, "slashed"
        if staked == [True, 25]:
            before_the_slash += 1
            assert unstaked == [False, "insufficient stake"], "the slash voided it"
            for r in sim.replicas[1:]:
                assert r.ledger.balance("acct0") == GENESIS_BALANCE - 5, "burnt"
    assert before_the_slash >= 2, "seeds 1 and 2 bond before the slash"


def test_a_transfer_to_oneself_changes_nothing_and_genesis_accounts_count_once_written(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = new_ledger({"acct*": [4, 10]})
    assert ledger.execute(["transfer", "acct1", "acct1", 3], 1) == [True, 10]
    assert ledger.store.count == 0
    monkeypatch.setattr(ledger_module, "ENTRIES_MAX", 1)
    assert ledger.execute(["transfer", "acct1", "acct2", 3], 1) == [False, "store full"], \
        "two genesis accounts would become two entries"
    assert ledger.execute(["put", "k", 1], 1) == [True, None]
    assert ledger.execute(["stake", "acct1", 0, 1], 1) == [False, "store full"]
