"""The workload's operations: the mix of kinds, the keys and the accounts they spread over."""

from __future__ import annotations

from collections import Counter

import pytest

from edgebft.lab.workload import ACCOUNTS, Mix, operation


def test_the_default_mix_takes_transfer_put_get_in_turn() -> None:
    assert [operation(5, i)[0] for i in range(6)] == ["transfer", "put", "get"] * 2
    put, get = operation(5, 4), operation(5, 5)
    assert put[:2] == ["put", get[1]], "a client's i-th get reads the key its i-th put wrote"


def test_weights_set_the_share_of_each_kind() -> None:
    mix = Mix.parse("8:1:1")
    kinds = Counter(operation(c, i, mix=mix)[0] for c in range(4) for i in range(100))
    assert kinds == {"put": 320, "get": 40, "transfer": 40}
    assert {operation(0, i, mix=Mix.parse("0:0:1"))[0] for i in range(10)} == {"transfer"}


def test_keys_and_accounts_spread_the_load() -> None:
    keys = {operation(c, i, keys=1000)[1] for c in range(16) for i in range(1, 300, 3)}
    assert len(keys) > 800 and all(int(k[1:]) < 1000 for k in keys)
    transfers = [operation(c, i, accounts=5000) for c in range(16) for i in range(0, 300, 3)]
    assert {t[1] for t in transfers} <= {f"acct{a}" for a in range(ACCOUNTS)}, "funded sources"
    destinations = {t[2] for t in transfers}
    assert len(destinations) > 1000 and all(int(d[4:]) < 5000 for d in destinations)


@pytest.mark.parametrize("text", ["1:1", "a:b:c", "-1:1:1", "0:0:0", ""])
def test_a_bad_mix_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--mix"):
        Mix.parse(text)

