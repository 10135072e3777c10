"""The sensor-board client (firmware/sensor.py; issue 13) on the Unix port with a 64 KB heap,
writing through an emulated cluster: each reading lands in the ledger, in order, once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_until
from edgebft import Client
from edgebft.client import Identity
from edgebft.devices.image import build_image
from edgebft.devices.micropython import find_micropython
from edgebft.lab import session as lab
from edgebft.lab.broker import find_mosquitto
from edgebft.lab.cluster import node_argv

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")

HEAP = "64k"
PERIOD_MS = 200


def test_a_sensor_writes_its_readings_through_the_cluster(tmp_path: Path) -> None:
    cluster = lab.up(broker="mosquitto", out=tmp_path / "run")
    sensor = None
    try:
        identity = Identity.of(cluster, cluster.issue_client())
        image = build_image(tmp_path / "sensor", {**identity.to_json(), "sensor": {
            "key": "greenhouse/1", "period_ms": PERIOD_MS}}, "sensor.json")
        log = open(tmp_path / "sensor.log", "w")
        sensor = subprocess.Popen(node_argv(image, find_micropython(None), HEAP, True),
                                  cwd=image, stdout=log, stderr=subprocess.STDOUT)
        with Client.connect(cluster.path, client_id=100) as ledger:
            assert wait_until(lambda: ledger.get("greenhouse/1", ordered=True)[0] >= 10
                              if _written(ledger) else False, 20.0)
            n, _reading = ledger.get("greenhouse/1", ordered=True)
        sensor.terminate()
        sensor.wait(5)
        out = (tmp_path / "sensor.log").read_text()
        assert "Traceback" not in out and "MemoryError" not in out, out
        oks = re.findall(r"sensor greenhouse/1 #(\d+) ok in (\d+) ms, heap (\d+)", out)
        assert len(oks) >= 10
        assert [int(k) for k, _, _ in oks] == list(range(1, len(oks) + 1)), "in order, none late"
        assert n >= 10
        heap = max(int(h) for _, _, h in oks)
        print(f"\nsensor client at -X heapsize={HEAP}: {len(oks)} writes, live heap peak "
              f"{heap} B, write latency max {max(int(ms) for _, ms, _ in oks)} ms")
        assert heap < 64 * 1024
    finally:
        if sensor is not None and sensor.poll() is None:
            sensor.kill()
        lab.down(cluster)


def _written(ledger: Client) -> bool:
    try:
        ledger.get("greenhouse/1", ordered=True)
        return True
    except KeyError:
        time.sleep(0.1)
        return False


def test_demo_with_sensors_reports_their_writes(tmp_path: Path) -> None:
    """`demo --sensors 2`: two sensor clients write beside the workload; the summary (and the
    report, which shows every summary field) gives their writes, latency and heap."""
    done = subprocess.run([sys.executable, "-m", "edgebft", "demo", "--duration", "5",
                           "--sensors", "2", "--broker", "mosquitto", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    sensors = summary["sensors"]
    assert sensors["count"] == 2 and sensors["late"] == 0
    assert sensors["writes"] >= 2 * 5 * 1000 // 500 - 2  # a write every 0.5 s, each
    assert 0 < sensors["heap_peak_bytes"] < 64 * 1024
    assert sensors["latency_ms"]["max"] < 2000
    assert "sensors.writes" in (tmp_path / "run" / "report.html").read_text()
