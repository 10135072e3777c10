"""Each view-change path on a scripted fault schedule in the simulator (PBFT-NOTES section 3),
and the null-request path with replicas wired by hand."""

from __future__ import annotations

from typing import Any

from test_replica import Net

from edgebft.protocol import messages as m
from edgebft.protocol import replica as rp
from edgebft.protocol.viewchange import NULL_DIGEST
from edgebft.sim.simulator import Fault, SimOptions, Simulation


def scenario(faults: list[Fault], nodes: int = 4, requests: int = 24,
             **options: Any) -> tuple[Any, Simulation]:
    sim = Simulation(1, SimOptions(nodes=nodes, requests=requests, fault_ms=6000, **options),
                     faults=faults)
    result = sim.run()
    assert result.verdict == "ok", result.reasons
    assert result.accepted == requests
    return result, sim


def events(sim: Simulation, name: str, replica: int | None = None) -> list[tuple[Any, ...]]:
    return [e for e in sim.history if e[0] == name and (replica is None or e[2] == replica)]


def final_heads(sim: Simulation) -> set[tuple[int, bytes]]:
    """Each replica's (last executed, ledger digest) once the cluster has settled."""
    sim.settle(5000)
    return {(r.last_exec, r.ledger.digest) for r in sim.replicas}


def test_primary_crash_changes_view_and_the_restarted_primary_catches_up() -> None:
    _, sim = scenario([Fault("crash", 500, 4000, replica=0)])
    crash_at = 500
    installed = [e for e in events(sim, "view") if e[1] > crash_at]
    assert installed, "a new view was installed after the crash"
    assert all(e[3] >= 1 for e in installed)
    assert events(sim, "restored", 0), "the crashed primary restarted from its durable state"
    assert len(final_heads(sim)) == 1, "every replica, the restarted one too, caught up"


def test_primary_partitioned_away_is_replaced() -> None:
    _, sim = scenario([Fault("partition", 500, 4000, side=frozenset({0}))])
    assert any(e[3] >= 1 for e in events(sim, "view", 1))
    views = {r.view for r in sim.replicas}
    assert len(views) == 1, "after healing the old primary joined the new view"
    assert len(final_heads(sim)) == 1


def test_a_view_change_during_a_view_change_moves_on_to_the_next_view() -> None:
    # n = 7, f = 2: the primaries of views 0 and 1 are both down, so view 1 never installs.
    _, sim = scenario([Fault("crash", 500, 5000, replica=0), Fault("crash", 500, 5000, replica=1)],
                      nodes=7)
    started = {e[3] for e in events(sim, "view_change", 3)}
    assert {1, 2} <= started, "replica 3 gave up on view 1 and went on to view 2"
    first_install = min(e[3] for e in events(sim, "view") if e[1] < 5000)
    assert first_install >= 2
    assert len(final_heads(sim)) == 1


def test_state_transfer_across_checkpoints_after_a_long_partition() -> None:
    _, sim = scenario([Fault("partition", 300, 5500, side=frozenset({3}))], requests=40,
                      checkpoint_interval=2)
    heads = final_heads(sim)  # settles: the run may end before the healed replica is back
    transferred = events(sim, "transferred", 3)
    assert transferred, "the isolated replica fetched a stable checkpoint's state"
    assert transferred[0][3] % 2 == 0
    assert len(heads) == 1


def test_a_reboot_in_the_middle_of_a_view_change() -> None:
    # The primary crashes; replica 2 reboots just after it started the view change (found by
    # a first run without the reboot), then comes back from its durable state. n = 7: a crash
    # and a reboot at once are within the bound (2 of 7), which the simulator keeps.
    crash = Fault("crash", 500, 5000, replica=0)
    _, dry = scenario([crash], nodes=7)
    started = events(dry, "view_change", 2)[0][1]
    _, sim = scenario([crash, Fault("reboot", started + 2, started + 40, replica=2)], nodes=7)
    restored = events(sim, "restored", 2)
    assert restored, "replica 2 rebooted"
    assert restored[0][3] >= 1, "it had persisted the view it was changing to"
    assert len(final_heads(sim)) == 1


def test_a_gap_in_the_log_is_filled_with_a_null_request() -> None:
    net = Net()
    alice, bob = net.client(1), net.client(2)
    first = alice.request(["put", "a", 1])
    second = bob.request(["put", "b", 2])
    primary = net.replicas[0]
    primary.receive(first, 0)   # seq 1
    primary.receive(second, 0)  # seq 2
    pre_prepares = [(d, w) for d, w in primary.out if m.decode(w).kind == m.PRE_PREPARE]
    assert [m.decode(w).seq for _, w in pre_prepares] == [1, 2]
    del primary.out[:]
    # seq 1's pre-prepare reaches replica 1 only; seq 2's reaches everybody. Then the primary
    # dies: seq 1 cannot have prepared anywhere, seq 2 prepared at the three backups.
    net.queue.append((1, pre_prepares[0][1]))
    net.queue.extend((j, pre_prepares[1][1]) for j in (1, 2, 3))
    net.down.add(0)
    net.run()
    assert {r.log.prepared(r.log.find(2)) for r in net.replicas[1:]} == {True}
    for r in net.replicas[1:]:
        r.suspect(10)
        net._collect(r.me)
    net.run()
    new_primary = net.replicas[1]
    assert new_primary.view == 1 and new_primary.status == "normal"
    for r in net.replicas[1:]:
        assert r.log.digests[r.log.find(1)] == NULL_DIGEST, "seq 1: a null request"
        assert r.log.digests[r.log.find(2)] == rp.batch_digest([second])
        assert r.last_exec == 2
    assert {r.ledger.get("b") for r in net.replicas[1:]} == {2}
    assert {r.ledger.get("a") for r in net.replicas[1:]} == {None}, "alice must retransmit"


def lone_backup_waiting(at_ms: int) -> tuple[Net, rp.Replica]:
    """Four replicas that all heard each other at 0 ms, and backup 3, the only one a
    client's request reached at ``at_ms``: its request timer (T1) runs."""
    net = Net()
    alice = net.client(7)
    net.call(alice, ["balance", "a"])
    lone = net.replicas[3]
    lone.receive(alice.request(["balance", "b"]), at_ms)
    assert lone.vc_deadline is not None
    return net, lone


def hear_the_others(net: Net, lone: rp.Replica, at_ms: int) -> None:
    """``lone`` reads a STATUS of view 0 from each other replica at ``at_ms``."""
    for j in (0, 1, 2):
        peer = net.replicas[j]
        lone.receive(peer.authenticated(m.body(m.STATUS, j, 0, False, 0, 1, [])), at_ms)


def test_a_replica_cut_off_from_a_quorum_does_not_change_view_alone() -> None:
    """Its request timer expires, but it has heard no other replica for longer than a
    view-change timeout: starting a view change alone would leave it above the others' view
    once the cut heals. It waits, and changes view when it hears a quorum again."""
    net, lone = lone_backup_waiting(5000)
    lone.tick(9000)
    assert (lone.view, lone.status) == (0, "normal"), "nothing heard since 0 ms"
    hear_the_others(net, lone, 9500)
    lone.tick(10_000)
    assert (lone.view, lone.status) == (1, "view change"), "a quorum is in reach again"


def test_time_a_replica_stood_still_counts_for_no_view_change_timeout() -> None:
    """A frozen node (SIGSTOP, a long flash write) reads what its peers sent meanwhile and
    then ticks: the view-change timer must not have run while it stood still, or it leaves
    the others alone for a higher view. The timer moves on by the stalled time, no more."""
    net, lone = lone_backup_waiting(100)
    deadline = lone.vc_deadline
    lone.stalled(3000)  # we did not run for 3 s: all of it before the deadline
    hear_the_others(net, lone, deadline + 2900)  # their messages, queued meanwhile, now read
    lone.tick(deadline + 2900)
    assert (lone.view, lone.status) == (0, "normal"), "the timer did not count the 3 s"
    lone.tick(deadline + 3000)
    assert (lone.view, lone.status) == (1, "view change"), "it runs on afterwards"


def test_a_replica_the_others_run_ahead_of_does_not_change_view_alone() -> None:
    """Its request waits because it lags (the primary's messages to it are lost, say), not
    because the primary fails: replicas with over 1/3 of stake agree on a checkpoint it has
    not executed. One replica's word (1/4 of stake) would not be enough."""
    net, lone = lone_backup_waiting(100)
    deadline = lone.vc_deadline
    seq, digest = (lone.last_exec // lone.K + 1) * lone.K, bytes(32)  # the next checkpoint
    hear_the_others(net, lone, deadline)
    checkpoint = [net.replicas[j].authenticated(m.body(m.CHECKPOINT, j, seq, digest))
                  for j in (0, 1)]
    lone.receive(checkpoint[0], deadline)
    assert lone._behind() is False, "1/4 of stake proves nothing"
    lone.receive(checkpoint[1], deadline)  # 2 of 4 equal stakes: over 1/3
    lone.tick(deadline)
    assert (lone.view, lone.status) == (0, "normal"), "the others are ahead in this view"
    lone.suspect(deadline)
    assert (lone.view, lone.status) == (0, "normal"), "nor on the detector's word"


def test_a_state_transfer_stops_the_request_timer_of_the_requests_it_drops() -> None:
    """A replica that was cut off holds a client's request and its request timer (T1) runs.
    It catches up by state transfer, which drops what waits (the client retransmits): the
    timer stops with it. Left running, it fired moments after the transfer, before the
    replica had heard how far the others were, and took it to a view of its own."""
    net = Net(n=4, k=4)
    net.down.add(3)
    alice = net.client(7)
    for _ in range(12):
        net.call(alice, ["balance", "a"])
    lone = net.replicas[3]
    lone.receive(net.client(8).request(["balance", "b"]), 0)
    assert lone.vc_deadline is not None
    net.down.clear()
    for now in (100, 200, 300):  # STATUS (RT1), checkpoints beyond its window, FETCH, CHUNK
        net.tick(now)
        net.run()
    assert ("transferred", 12) in [e[:2] for e in lone.events]
    assert (lone.h, lone.waiting, lone.vc_deadline) == (12, {}, None)


def alone_in_view_1() -> tuple[Net, rp.Replica]:
    """Backup 3 went to view 1 alone (its request timer ran out while the others heard
    nothing of its client's request); the others stay in view 0."""
    net, lone = lone_backup_waiting(100)
    deadline = lone.vc_deadline
    hear_the_others(net, lone, deadline)
    lone.tick(deadline)
    assert (lone.view, lone.status, lone.left) == (1, "view change", 0)
    net.now = deadline
    return net, lone


def test_a_replica_alone_in_a_view_change_executes_what_the_view_it_left_commits() -> None:
    """The others go on committing in view 0 and the load stops between two checkpoints. The
    lone replica's STATUS (RT1) is answered with the others' commits and batches, and it
    executes on those certificates, voting on nothing: it converges, where it used to stay at
    the last checkpoint for good. It stays in its view change, which still counts when the
    others change view: all four install view 1 and execute the next request."""
    net, lone = alone_in_view_1()
    alice = net.client(9)
    for n in range(6):
        net.call(alice, ["put", "k", n])
    others = net.replicas[:3]
    assert {r.last_exec for r in others} == {7}
    assert lone.last_exec < 7
    from_lone: list[int] = []

    def note(to: int, msg: m.Message) -> bool:
        if msg.sender == lone.me:
            from_lone.append(msg.kind)
        return False

    for now in range(net.now + 100, net.now + 1000, 100):
        net.tick(now)
        net.run(dropped=note)
    assert lone.last_exec == 7
    assert lone.ledger.digest == others[0].ledger.digest
    assert lone.ledger.get("k") == 5
    assert (lone.view, lone.status) == (1, "view change")
    assert m.STATUS in from_lone
    assert not {m.PREPARE, m.COMMIT} & set(from_lone), "it voted on nothing"
    for r in others[1:]:
        r.suspect(net.now)
        net._collect(r.me)
    net.run()
    assert {(r.view, r.status) for r in net.replicas} == {(1, "normal")}
    net.call(alice, ["put", "k", "after"])
    assert {r.ledger.get("k") for r in net.replicas} == {"after"}
    assert len({r.last_exec for r in net.replicas}) == 1


def test_a_replica_alone_in_a_view_change_counts_commits_of_one_view_only() -> None:
    """Commits of different views for one digest prove nothing together (the digest may have
    prepared in neither view at a quorum): those of a view below the one it left are not
    counted. Here replica 3 left view 1, and commits of view 0 arrive with view 1's."""
    net = Net()
    alice = net.client(7)
    net.call(alice, ["balance", "a"])
    for r in net.replicas[1:]:
        r.suspect(10)
        net._collect(r.me)
    net.run()
    assert {(r.view, r.status) for r in net.replicas} == {(1, "normal")}
    lone = net.replicas[3]
    lone.suspect(20)  # heard everyone lately: goes to view 2 alone
    del lone.out[:]
    assert (lone.view, lone.status, lone.left) == (2, "view change", 1)
    batch = [alice.request(["put", "x", 1])]
    seq, digest = lone.last_exec + 1, rp.batch_digest(batch)

    def commit(j: int, view: int) -> bytes:
        return net.replicas[j].authenticated(m.body(m.COMMIT, j, view, seq, digest))

    for j, view in ((0, 0), (1, 0), (2, 1)):
        lone.receive(commit(j, view), 30)
    lone.receive(net.replicas[0].authenticated(m.body(m.BATCH, 0, seq, digest, batch)), 30)
    assert lone.last_exec == seq - 1, "one commit of view 1: no certificate"
    for j in (0, 1):
        lone.receive(commit(j, 1), 30)
    lone.receive(net.replicas[0].authenticated(m.body(m.BATCH, 0, seq, digest, batch)), 30)
    assert lone.last_exec == seq, "three commits of view 1 and the batch"
    assert lone.ledger.get("x") == 1


def test_a_state_transfer_releases_the_votes_the_checkpoint_held_back() -> None:
    """A backup that accepted a pre-prepare past the next checkpoint may not vote on it
    (_may_vote) until it has that checkpoint. Executing the checkpoint releases the vote;
    adopting it by state transfer must too, or the backup's prepare and commit never come
    (seed 200 of the Byzantine twins sweep: the others' commits, a twin's among them, fell one
    short of a certificate without its own, and it stayed behind until the next request)."""
    net = Net(n=4, k=4)
    alice = net.client(7)
    for _ in range(4):
        net.call(alice, ["balance", "a"])
    net.down.add(3)
    for _ in range(4):
        net.call(alice, ["balance", "a"])
    lone = net.replicas[3]
    assert (lone.last_exec, net.replicas[0].h) == (4, 8)
    net.down.clear()
    net.submit(alice.request(["put", "x", 9]))
    net.run(dropped=lambda to, msg: to == 3 and msg.kind != m.PRE_PREPARE)
    i = lone.log.find(9)
    assert i >= 0 and lone.log.accepted(i) and not lone.log.voted(lone.log.prepares, i, 3)
    prepared: list[int] = []

    def note(to: int, msg: m.Message) -> bool:
        if msg.sender == 3 and msg.kind == m.PREPARE:
            prepared.append(msg.seq)
        return False

    for now in (100, 200, 300):  # STATUS, checkpoint 8 beyond its window, FETCH, CHUNK
        net.tick(now)
        net.run(dropped=note)
    assert ("transferred", 8) in [e[:2] for e in lone.events]
    assert 9 in prepared, "its vote on 9, held back until it had checkpoint 8"
    assert lone.last_exec == 9
