"""The client core's retransmission timer (protocol/client.py; RFC 6298 with Karn's rule),
driven by the replies of real replicas: every client (the host's, the bench's workload, the
sensor firmware, the simulator's) sends again only when it says."""

from __future__ import annotations

from test_replica import Net

from edgebft.protocol.client import (
    RETRANSMIT_BACKOFF_MS,
    RETRANSMIT_MAX_MS,
    RETRANSMIT_MIN_MS,
    ClientCore,
)

CLIENT = 5


def cluster() -> tuple[Net, ClientCore]:
    net = Net()
    return net, net.client(CLIENT)


def replies_to(net: Net, wire: bytes) -> list[bytes]:
    """Run the request ``wire`` through the normal case; the replies the client gets."""
    net.submit(wire)
    net.run()
    return net.replies.pop(CLIENT, [])


def round_trip(net: Net, client: ClientCore, i: int, sends_ms: list[int],
               reply_ms: int) -> None:
    """Put number ``i``, sent at each of ``sends_ms`` and answered at ``reply_ms``."""
    wire = client.request(["put", "k", i])
    for at in sends_ms:
        assert at == sends_ms[0] or client.retransmit_due(at)
        client.sent(at)
    accepted = [client.on_reply(w, reply_ms)[0] for w in replies_to(net, wire)]
    assert accepted.count(True) == 1


def test_before_any_round_trip_it_waits_the_floor_then_backs_off_to_a_second() -> None:
    net, client = cluster()
    client.request(["put", "k", 1])
    assert not client.retransmit_due(10_000), "nothing sent yet"
    client.sent(0)
    assert not client.retransmit_due(RETRANSMIT_MIN_MS - 1)
    assert client.retransmit_due(RETRANSMIT_MIN_MS)
    waits = []
    for _ in range(4):
        at = client.next_send_ms
        client.sent(at)
        waits.append(client.next_send_ms - at)
    assert waits == [RETRANSMIT_BACKOFF_MS] * 4 == [1000] * 4, "doubled once, then capped"


def test_backing_off_goes_up_to_twice_the_round_trip_or_the_estimate() -> None:
    net, client = cluster()
    round_trip(net, client, 1, [0], 700)  # srtt 700, rttvar 350
    assert client.estimate_ms() == 700 + 4 * 350
    client.request(["put", "k", 2])
    client.sent(1000)
    client.sent(client.next_send_ms)
    assert client.rto_ms == 2100, "the estimate: above twice the round trip and 1 s"
    for i in range(3, 60):  # steady 900 ms round trips: the variation fades
        round_trip(net, client, i, [i * 5000], i * 5000 + 900)
    estimate, twice = client.estimate_ms(), 2 * client.srtt_ms
    assert 880 <= client.srtt_ms <= 900 and RETRANSMIT_BACKOFF_MS < twice < 2 * estimate
    client.request(["put", "k", 60])
    client.sent(400_000)
    client.sent(client.next_send_ms)
    assert client.rto_ms == twice, "doubled, up to twice the round trip"


def test_one_send_gives_a_sample_and_the_timeout_follows_the_round_trips() -> None:
    net, client = cluster()
    round_trip(net, client, 1, [0], 300)
    assert (client.srtt_ms, client.rttvar_ms) == (300, 150)
    assert client.estimate_ms() == 300 + 4 * 150
    client.request(["put", "k", 2])
    client.sent(1000)
    assert not client.retransmit_due(1899) and client.retransmit_due(1900)
    for i in range(3, 40):  # a queue that holds every request 1.2 s: no retransmission
        round_trip(net, client, i, [i * 2000], i * 2000 + 1200)
    assert 1200 <= client.estimate_ms() < 1400
    for i in range(40, 80):  # an idle cluster again: back to the floor
        round_trip(net, client, i, [i * 2000], i * 2000 + 5)
    assert client.estimate_ms() == RETRANSMIT_MIN_MS


def test_a_request_sent_again_gives_no_sample_karn() -> None:
    net, client = cluster()
    round_trip(net, client, 1, [0], 200)
    before = (client.srtt_ms, client.rttvar_ms)
    assert client.estimate_ms() == 600
    round_trip(net, client, 2, [1000, 1600], 1610)  # 610 ms or 10 ms: which send it answers
    assert (client.srtt_ms, client.rttvar_ms) == before
    assert client.rto_ms == 1000, "backed off"
    client.request(["put", "k", 3])
    client.sent(2000)
    assert client.next_send_ms == 2600, "the next request starts from the estimate"


def test_no_sample_without_a_time_and_none_due_once_accepted() -> None:
    net, client = cluster()
    wire = client.request(["put", "k", 1])
    client.sent(0)
    for w in replies_to(net, wire):
        client.on_reply(w)
    assert client.accepted and client.srtt_ms == 0
    assert not client.retransmit_due(60_000)


def test_a_round_trip_past_the_cap_is_capped() -> None:
    net, client = cluster()
    round_trip(net, client, 1, [0], 9000)
    assert client.estimate_ms() == RETRANSMIT_MAX_MS

