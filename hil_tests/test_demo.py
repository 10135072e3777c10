"""`edgebft demo` end to end: Unix-port nodes at the default heap, a real broker, the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgebft.lab.broker import find_mosquitto
from edgebft.protocol import log

EDGEBFT = [sys.executable, "-m", "edgebft"]
HEAP_BYTES = 160 * 1024  # HEAP_DEFAULT: README, "Memory", says why it is no longer 100 KB


def run_demo(out: Path, *args: str, timeout: float = 120) -> dict:
    done = subprocess.run([*EDGEBFT, "demo", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    summary = json.loads((out / "summary.json").read_text())
    for name in ("nodes", "f", "broker", "duration_s", "requests", "committed",
                 "throughput_rps", "latency_ms", "availability", "safety_ok",
                 "heap_peak_bytes"):
        assert name in summary, name
    assert "Traceback" not in done.stderr
    return summary


def check_healthy_run(summary: dict, nodes: int) -> None:
    assert summary["verdict"] == {"verdict": "ok", "reasons": [],
                                  "checks": {"safety": True, "convergence": True}}
    assert summary["safety_ok"] is True
    assert summary["safety"]["violations"] == []
    assert summary["safety"]["converged"] is True
    assert summary["committed"] > 0
    assert summary["committed"] == summary["requests"]
    assert summary["availability"] == 1.0
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["max"]
    assert sorted(summary["heap_peak_bytes"]) == [str(i) for i in range(nodes)]
    assert all(0 < b < HEAP_BYTES for b in summary["heap_peak_bytes"].values())
    assert all(summary["nodes_alive_at_end"])
    assert len(set(summary["last_executed"].values())) == 1
    assert summary["heap_restarts"] == {str(i): 0 for i in range(nodes)}, "none ran out of heap"
    assert sorted(summary["drops"]) == [str(i) for i in range(nodes)]
    assert all(isinstance(why, str) and k > 0
               for drops in summary["drops"].values() for why, k in drops.items())


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_demo_on_mosquitto(tmp_path: Path) -> None:
    summary = run_demo(tmp_path / "run", "--duration", "8", "--broker", "mosquitto")
    assert summary["broker"].startswith("mosquitto")
    check_healthy_run(summary, 4)
    events = [json.loads(line) for line in
              (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert len([e for e in events if e["type"] == "request"]) == summary["requests"]
    logs = sorted(p.name for p in (tmp_path / "run" / "logs").iterdir())
    assert logs == [f"node{i}.log" for i in range(4)]
    html = (tmp_path / "run" / "report.html").read_text()
    for png in ("latency-raw.png", "latency-quantiles.png", "rate.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000
        assert png in html


def test_demo_on_the_embedded_broker(tmp_path: Path) -> None:
    summary = run_demo(tmp_path / "run", "--duration", "6", "--broker", "embedded",
                       "--nodes", "5", "--clients", "2")
    assert summary["broker"].startswith("embedded amqtt")
    assert summary["nodes"] == 5
    assert summary["f"] == 1
    check_healthy_run(summary, 5)


def _fails_cleanly(args: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run([*EDGEBFT, *args], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def test_too_few_nodes_is_a_one_line_error(tmp_path: Path) -> None:
    line = _fails_cleanly(["demo", "--nodes", "2", "--out", str(tmp_path / "r")])
    assert "at least 4" in line


def test_too_many_nodes_is_a_one_line_error(tmp_path: Path) -> None:
    """The host refuses what a node's log would assert on (protocol/log.py) at boot."""
    line = _fails_cleanly(["demo", "--nodes", str(log.REPLICAS_MAX + 1),
                           "--out", str(tmp_path / "r")])
    assert f"at most {log.REPLICAS_MAX}" in line
    assert not (tmp_path / "r").exists(), "refused before anything was built"


def test_unreachable_broker_is_a_one_line_error(tmp_path: Path) -> None:
    line = _fails_cleanly(["demo", "--broker", "mqtt://127.0.0.1:9", "--out",
                           str(tmp_path / "r")])
    assert "cannot reach MQTT broker" in line
    assert not list((tmp_path / "r").glob("logs/*")), "no node was started"


def test_missing_micropython_is_a_one_line_error(tmp_path: Path) -> None:
    import os
    env = {**os.environ, "EDGEBFT_MICROPYTHON": str(tmp_path / "nope")}
    line = _fails_cleanly(["demo", "--out", str(tmp_path / "r")], env=env)
    assert "MicroPython" in line
    line = _fails_cleanly(["demo", "--micropython", "/nonexistent/mp", "--out",
                           str(tmp_path / "r")])
    assert "--micropython" in line


def test_help_lists_every_demo_option() -> None:
    done = subprocess.run([*EDGEBFT, "demo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for option in ("--nodes", "--duration", "--clients", "--broker", "--out", "--micropython",
                   "--heap"):
        assert option in done.stdout


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_demo_rides_out_a_broker_restart(tmp_path: Path) -> None:
    """The broker stops for a third of the run and starts again on the same port: nodes, the
    workload and the observer reconnect, nobody changes view over it (a node without a link
    suspects no one), and within 2 s of the broker's return every request commits again."""
    summary = run_demo(tmp_path / "run", "--duration", "12", "--broker", "mosquitto",
                       "--nemesis", "broker-restart")
    assert summary["verdict"]["verdict"] == "ok"
    assert summary["view_changes"] == 0
    assert all(summary["nodes_alive_at_end"])
    [fault] = summary["faults"]
    assert fault["kind"] == "broker-restart" and fault["end"] - fault["start"] > 3.0
    events = [json.loads(line) for line in
              (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    requests = [e for e in events if e["type"] == "request"]
    first = min(e["end"] for e in requests if e["outcome"] == "ok" and e["end"] > fault["end"])
    assert fault["recovery_ms"] == round((first - fault["end"]) * 1000.0, 1)
    assert fault["recovery_ms"] < 2000
    late = [e for e in requests if e["start"] >= fault["end"] + 2.0]
    assert late and all(e["outcome"] == "ok" for e in late), "availability 1.0 from 2 s on"


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_demo_survives_a_primary_crash_and_the_restarted_node_catches_up(tmp_path: Path) -> None:
    summary = run_demo(tmp_path / "run", "--duration", "12", "--broker", "mosquitto",
                       "--nemesis", "crash")
    assert summary["safety_ok"] is True
    assert summary["safety"]["converged"] is True, "the restarted node caught up"
    assert summary["view_changes"] >= 1
    [fault] = summary["faults"]
    assert fault["kind"] == "crash"
    assert fault["end"] > fault["start"]
    assert summary["recovery_ms"] == [fault["recovery_ms"]]
    assert 0 < fault["recovery_ms"] < 10_000
    assert all(summary["nodes_alive_at_end"])
    assert len(set(summary["last_executed"].values())) == 1
    events = [json.loads(line) for line in
              (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["node"] for e in events if e["type"] == "fault"] == [fault["node"]]


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_demo_with_an_equivocating_primary_stays_safe_and_names_it(tmp_path: Path) -> None:
    summary = run_demo(tmp_path / "run", "--duration", "12", "--broker", "mosquitto",
                       "--stake", "30,25,25,20", "--nemesis", "byzantine")
    assert summary["safety_ok"] is True
    assert summary["safety"]["converged"] is True
    assert summary["stake"] == {"0": 30, "1": 25, "2": 25, "3": 20}
    [fault] = summary["faults"]
    assert fault["kind"] == "byzantine"
    assert summary["view_changes"] >= 1, "the equivocating primary was replaced"
    assert fault["recovery_ms"] is not None
    assert summary["byzantine_nodes"] == [fault["node"]]
    offenders = {e["offender"] for e in summary["equivocations_detected"]}
    assert offenders <= {fault["node"]}, "only the Byzantine primary is ever named"
    epochs = summary["stake_epochs"]
    assert epochs[0]["validators"] == summary["stake"]
    for later in epochs[1:]:  # a slash (accusers over 1/3 of stake) only ever hits it
        assert later["validators"][str(fault["node"])] == 0
    if offenders:
        report = (tmp_path / "run" / "report.html").read_text()
        assert "<h2>Equivocations caught</h2>" in report
    correct = [n for n in summary["last_executed"] if int(n) != fault["node"]]
    assert len({summary["last_executed"][n] for n in correct}) == 1


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_demo_slashes_an_equivocating_primary_of_five(tmp_path: Path) -> None:
    """Five equal stakes: the replicas the primary's real and null pre-prepares reached both
    hold 2/5 of stake, so they prove the equivocation together; the accusations are ordered,
    the offender's bond is slashed and the next epoch's validator set leaves it out."""
    summary = run_demo(tmp_path / "run", "--nodes", "5", "--duration", "12", "--broker",
                       "mosquitto", "--nemesis", "byzantine")
    assert summary["safety_ok"] is True
    assert summary["safety"]["converged"] is True
    [fault] = summary["faults"]
    offender = str(fault["node"])
    accusers = {e["node"] for e in summary["equivocations_detected"]
                if e["offender"] == fault["node"]}
    assert 3 * len(accusers) > 5, "over 1/3 of stake caught it"
    epochs = summary["stake_epochs"]
    assert len(epochs) >= 2, "the slash put a new validator set in force"
    assert epochs[-1]["validators"][offender] == 0
    assert all(v == 1 for n, v in epochs[-1]["validators"].items() if n != offender)
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Validator set per epoch" in report and "Equivocations caught" in report
