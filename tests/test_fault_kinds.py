"""The fault registry (host/fault_kinds.py): one vocabulary, from which the simulator, the
nemesis and ``edgebft inject`` take their kinds, and the older names as aliases."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgebft import fault_kinds
from edgebft.cli import cli
from edgebft.fault_kinds import KINDS, FaultKindError, kind, names
from edgebft.lab import nemesis
from edgebft.lab.broker import Broker
from edgebft.lab.cluster import EmulatedCluster
from edgebft.sim import simulator as sim


def test_every_kind_applies_somewhere_and_each_name_is_one_kind() -> None:
    assert all(k.inject or k.nemesis or k.sim for k in KINDS)
    every = [name for k in KINDS for name in (k.name, *k.aliases)]
    assert len(every) == len(set(every))
    assert all(k.inject in (None, "signal", "control", "broker") for k in KINDS)


def test_the_tools_take_their_kinds_from_the_registry(tmp_path: Path) -> None:
    assert sim.FAULT_KINDS == names("sim")
    assert nemesis.KINDS == names("nemesis")
    assert set(nemesis.CONTROL_KINDS) == {k for k in names("nemesis")
                                          if kind(k, "nemesis").inject == "control"}
    # Every nemesis kind has its strike and cure: a new kind fails here until it is applied.
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "main.py").write_text("")
    cluster = EmulatedCluster([tmp_path / "image"], tmp_path / "logs")  # never started
    broker = Broker("mosquitto", "127.0.0.1", 1883, argv=["mosquitto"], output=tmp_path / "o")
    table = nemesis.actions(cluster, lambda node, command, args: None, broker)
    assert set(table) == set(names("nemesis"))


def test_aliases_resolve_and_unknown_names_list_the_known_ones() -> None:
    assert kind("kill", "inject").name == "crash"
    assert kind("crash-primary", "nemesis").name == "crash"
    assert kind("loss", "sim").name == "omission"
    assert kind(" byzantine-primary ", "nemesis").name == "byzantine"
    with pytest.raises(FaultKindError, match="unknown fault 'skew': expected one of crash"):
        kind("skew", "sim")  # a lab fault, not one the simulator draws
    with pytest.raises(FaultKindError, match="unknown fault 'fire'"):
        kind("fire", "inject")


def test_help_texts_come_from_the_registry() -> None:
    runner = CliRunner()
    bench = runner.invoke(cli, ["bench", "--help"], terminal_width=400).output
    for k in KINDS:
        if k.nemesis:
            assert f"{k.name} ({k.summary})" in " ".join(bench.split())
    inject = " ".join(runner.invoke(cli, ["inject", "--help"], terminal_width=400).output.split())
    assert fault_kinds.describe("inject") in inject
