"""edgebft.lab.cluster.EmulatedCluster on a throwaway firmware (not the real runtime).

The firmware prints its node id and heap size, counts its boots in a file (its flash) and
ticks a counter file every 20 ms, so tests can see crashes, restarts and pauses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_until
from edgebft.devices.image import build_image
from edgebft.lab.cluster import ClusterError, EmulatedCluster

HEAP = "100k"
WAIT_S = 10.0  # each node is a CPython wrapper plus MicroPython: ~0.1-0.5 s to boot

FIRMWARE = """\
import gc, json, time
with open("edgebft.json") as f:
    cfg = json.load(f)
boots = 0
try:
    with open("boots") as f:
        boots = int(f.read())
except OSError:
    pass
boots += 1
with open("boots", "w") as f:
    f.write(str(boots))
gc.collect()
print("node", cfg["id"], "boot", boots, "heap", gc.mem_free() + gc.mem_alloc())
n = 0
while True:
    n += 1
    with open("ticks", "w") as f:
        f.write(str(n))
    time.sleep(0.02)
"""


def gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie waiting for an init that never reaps counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return proc_state(pid) in ("Z", "")


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def ticks(image: Path) -> int:
    try:
        return int((image / "ticks").read_text() or 0)
    except (OSError, ValueError):
        return 0


def make_images(root: Path, count: int, firmware: str = FIRMWARE) -> list[Path]:
    images = []
    for i in range(count):
        image = build_image(root / f"node{i}", {"id": i})
        (image / "main.py").write_text(firmware)
        images.append(image)
    return images


def booted(cluster: EmulatedCluster, i: int, boot: int) -> bool:
    return f"node {i} boot {boot} " in cluster.log_path(i).read_text()


def test_lifecycle(tmp_path: Path, micropython: Path) -> None:
    images = make_images(tmp_path / "images", 3)
    cluster = EmulatedCluster(images, tmp_path / "logs", HEAP, micropython=micropython)
    assert not cluster.alive(0) and cluster.returncode(0) is None
    with cluster:
        assert all(wait_until(lambda i=i: booted(cluster, i, 1)) for i in range(3))
        log0 = cluster.log_path(0).read_text()
        heap = int(log0.split(" heap ")[1].split()[0])
        assert 95_000 <= heap <= 105_000, log0  # -X heapsize=100k is 102400 bytes
        pids = [cluster.pid(i) for i in range(3)]

        cluster.kill(1)
        assert not cluster.alive(1)
        assert cluster.returncode(1) == -signal.SIGKILL
        assert gone(pids[1])
        assert cluster.alive(0) and cluster.alive(2)
        cluster.kill(1)  # already dead: no-op

        cluster.restart(1)  # from the same folder: the boot count persisted like flash
        assert cluster.alive(1) and cluster.pid(1) != pids[1]
        assert wait_until(lambda: booted(cluster, 1, 2))
        log1 = cluster.log_path(1).read_text()
        assert "node 1 boot 1 " in log1 and "node1 killed, exit code -9" in log1

        assert wait_until(lambda: ticks(images[2]) > 0)
        cluster.pause(2)
        assert wait_until(lambda: proc_state(pids[2]) == "T")
        frozen = ticks(images[2])
        time.sleep(0.3)
        assert ticks(images[2]) == frozen
        assert cluster.alive(2)
        cluster.resume(2)
        assert wait_until(lambda: ticks(images[2]) > frozen)

        cluster.pause(0)  # stop() must also end paused nodes
        pids = [cluster.pid(i) for i in range(3)]
    assert all(not cluster.alive(i) for i in range(3))
    assert all(cluster.returncode(i) == -signal.SIGTERM for i in range(3))
    assert all(gone(pid) for pid in pids if pid is not None)
    cluster.stop()  # idempotent
    assert "node0 stopped" in cluster.log_path(0).read_text()


def test_restart_running_node_crashes_it_first(tmp_path: Path, micropython: Path) -> None:
    images = make_images(tmp_path / "images", 1)
    with EmulatedCluster(images, tmp_path / "logs", HEAP, micropython=micropython) as cluster:
        assert wait_until(lambda: booted(cluster, 0, 1))
        old = cluster.pid(0)
        cluster.restart(0)
        assert old is not None and gone(old)
        assert wait_until(lambda: booted(cluster, 0, 2))


def test_misuse(tmp_path: Path, micropython: Path) -> None:
    images = make_images(tmp_path / "images", 2)
    with pytest.raises(ClusterError, match="no main.py"):
        EmulatedCluster([tmp_path], tmp_path / "logs", HEAP, micropython=micropython)
    with pytest.raises(ClusterError, match="bad heap size"):
        EmulatedCluster(images, tmp_path / "logs", "100 KB", micropython=micropython)
    with pytest.raises(ClusterError, match="at least one"):
        EmulatedCluster([], tmp_path / "logs", HEAP, micropython=micropython)
    cluster = EmulatedCluster(images, tmp_path / "logs", HEAP, micropython=micropython)
    with pytest.raises(IndexError):
        cluster.alive(2)
    with pytest.raises(ClusterError, match="not running"):
        cluster.pause(0)


def test_stop_kills_whole_group_even_if_sigterm_ignored(tmp_path: Path) -> None:
    """A node that ignores SIGTERM and has a child: stop() SIGKILLs the group after the grace."""
    fake = tmp_path / "fake-micropython"
    fake.write_text("#!/bin/bash\ntrap '' TERM\nsleep 300 &\necho $! > child.pid\nwait\n")
    fake.chmod(0o755)
    images = make_images(tmp_path / "images", 2)
    cluster = EmulatedCluster(images, tmp_path / "logs", HEAP, micropython=fake,
                              stop_grace_s=0.5)
    cluster.start()
    try:
        assert all(wait_until(lambda i=i: (images[i] / "child.pid").is_file()) for i in range(2))
        children = [int((image / "child.pid").read_text()) for image in images]
        leaders = [cluster.pid(i) for i in range(2)]
    finally:
        started = time.monotonic()
        cluster.stop()
    assert time.monotonic() - started < 3  # one grace period for all nodes, not one each
    assert all(cluster.returncode(i) == -signal.SIGKILL for i in range(2))
    assert all(wait_until(lambda pid=pid: gone(pid)) for pid in children + leaders)


HOST_SCRIPT = """
import sys, time
from pathlib import Path
from edgebft.lab.cluster import EmulatedCluster
root, how = Path(sys.argv[1]), sys.argv[2]
images = sorted(p for p in (root / "images").iterdir())
cluster = EmulatedCluster(images, root / "logs", "100k", micropython=sys.argv[3])
if how == "with":
    with cluster:
        print(*[cluster.pid(i) for i in range(len(cluster))], flush=True)
        raise RuntimeError("caller bug inside with")
cluster.start()
print(*[cluster.pid(i) for i in range(len(cluster))], flush=True)
if how == "raise":
    raise RuntimeError("caller bug, no stop()")
if how == "return":
    sys.exit(0)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["sigterm", "sigint", "sighup", "raise", "with", "return"])
def test_no_node_outlives_host(how: str, tmp_path: Path, micropython: Path) -> None:
    make_images(tmp_path / "images", 3)
    host = subprocess.Popen(
        [sys.executable, "-c", HOST_SCRIPT, str(tmp_path), how, str(micropython)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        pids = [int(pid) for pid in host.stdout.readline().split()]
        assert len(pids) == 3
        signum = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sighup": signal.SIGHUP}
        if how in signum:
            time.sleep(0.3)  # let the nodes get going
            host.send_signal(signum[how])
        host.wait(timeout=20)
    finally:
        host.kill()
    survivors = [pid for pid in pids if not wait_until(lambda pid=pid: gone(pid))]
    assert not survivors, f"nodes {survivors} survived their host ({how})"
