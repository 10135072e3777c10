"""Live metrics of a lab cluster in the Prometheus text exposition format.

``edgebft cluster up --metrics-port PORT`` runs this module detached (``python -m
edgebft.lab.prometheus --dir RUN --port PORT``, recorded in the run's ``cluster.json`` and stopped
by ``cluster down``). It serves ``GET /metrics`` on 127.0.0.1:PORT. Each scrape reads every
node's newest status map (retained on the broker; ``edgebft.lab.session.status``) and exposes it as
gauges labelled ``node``:

- ``edgebft_online`` (1 or 0) for every node; the other gauges only for nodes online;
- one gauge per entry of ``GAUGES`` (view, sequence numbers, checkpoint, heap, traffic,
  executed requests, bytes fetched by state transfer, the node's errors, stalls and
  suspicions: protocol/node.py) and of ``STORE_GAUGES`` (the state on
  flash: entries, clients, page cache hits and misses, flash writes and bytes written: a
  board's flash wears out);
- ``edgebft_drops{node,reason}``: messages the replica refused, per reason;
- ``edgebft_phi{node,peer}``: the node's phi-accrual suspicion of each other replica, from
  its status's ``phi`` list (phi x 100 per replica id, firmware/runtime.py).

Counts are since the node booted (a restart resets them), hence gauges rather than counters.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from edgebft.lab import session as lab

# (status map key, metric name, help)
GAUGES = (
    ("view", "edgebft_view", "The node's current view."),
    ("seq", "edgebft_seq", "The last sequence number the node assigned or accepted."),
    ("last_exec", "edgebft_last_executed", "The last sequence number the node executed."),
    ("stable", "edgebft_stable_checkpoint", "The node's last stable checkpoint (h)."),
    ("heap_used", "edgebft_heap_used_bytes", "MicroPython heap in use after a collection."),
    ("heap_free", "edgebft_heap_free_bytes", "MicroPython heap free after a collection."),
    ("heap_peak", "edgebft_heap_peak_bytes", "The highest heap_used since boot."),
    ("gc_threshold", "edgebft_gc_threshold_bytes",
     "Bytes the node allocates between garbage collections (set when it starts)."),
    ("rx", "edgebft_rx_messages", "Protocol messages received since boot."),
    ("tx", "edgebft_tx_messages", "Protocol messages sent since boot."),
    ("executed_requests", "edgebft_executed_requests", "Client requests executed since boot."),
    ("boots", "edgebft_boots", "Boots the node counted in its flash, this one included."),
    ("restarts", "edgebft_restarts", "In-place restarts from flash this boot (heap exhausted)."),
    ("transfer_bytes", "edgebft_transfer_bytes", "Bytes fetched by state transfer since boot."),
    ("errors", "edgebft_message_errors", "Messages dropped because handling them raised."),
    ("stalls", "edgebft_stalls", "Ticks that found the node had stood still (not counted)."),
    ("suspicions", "edgebft_suspicions", "View changes the failure detector started."),
    ("status_rejected", "edgebft_status_rejected",
     "Peer statuses and Last Wills refused: forged, replayed, stale or malformed."),
)
# (key of the status's "store" map, metric name, help)
STORE_GAUGES = (
    ("keys", "edgebft_state_entries", "Entries (keys and accounts) in the ledger on flash."),
    ("clients", "edgebft_state_clients", "Clients in the client table on flash."),
    ("hits", "edgebft_cache_hits", "Page cache hits since boot."),
    ("misses", "edgebft_cache_misses", "Page cache misses since boot."),
    ("writes", "edgebft_flash_writes", "Flash writes since boot."),
    ("bytes", "edgebft_flash_bytes_written", "Bytes written to flash since boot."),
)


class ClusterCollector(Collector):
    """Gauges from the status maps of the cluster recorded in ``run_dir``, read per scrape."""

    def __init__(self, run_dir: Path) -> None:
        self.cluster = lab.load(run_dir)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return iter(families(lab.status(self.cluster)))


def families(snap: dict[int, dict[str, Any]]) -> list[GaugeMetricFamily]:
    """The metric families for a ``lab.status`` snapshot (node -> status map)."""
    online = GaugeMetricFamily("edgebft_online", "1 if the node is connected and reporting.",
                               labels=["node"])
    gauges = {key: GaugeMetricFamily(name, text, labels=["node"]) for key, name, text in GAUGES}
    store_gauges = {key: GaugeMetricFamily(name, text, labels=["node"])
                    for key, name, text in STORE_GAUGES}
    drops = GaugeMetricFamily("edgebft_drops", "Messages the replica refused since boot, per "
                              "reason.", labels=["node", "reason"])
    phi = GaugeMetricFamily("edgebft_phi", "The node's phi-accrual suspicion of a peer.",
                            labels=["node", "peer"])
    for n, status in sorted(snap.items()):
        node = str(n)
        online.add_metric([node], 1.0 if status.get("online") else 0.0)
        if not status.get("online"):
            continue
        for table, source in ((gauges, status), (store_gauges, status.get("store") or {})):
            for key, gauge in table.items():
                if isinstance(source.get(key), (int, float)):
                    gauge.add_metric([node], float(source[key]))
        for reason, count in sorted((status.get("drops") or {}).items()):
            drops.add_metric([node, str(reason)], float(count))
        for peer, value in enumerate(status.get("phi") or []):
            if peer != n and isinstance(value, (int, float)):
                phi.add_metric([node, str(peer)], value / 100)
    return [online, *gauges.values(), *store_gauges.values(), drops, phi]


def serve(run_dir: Path, port: int) -> None:
    """Serve the cluster's metrics on 127.0.0.1:``port`` until killed."""
    registry = CollectorRegistry()
    registry.register(ClusterCollector(run_dir))
    start_http_server(port, addr=lab.LOOPBACK, registry=registry)
    threading.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgebft.lab.prometheus",
                                     description="Serve a lab cluster's metrics to Prometheus.")
    parser.add_argument("--dir", type=Path, required=True, help="The cluster's run folder.")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1.")
    args = parser.parse_args(argv)
    serve(args.dir, args.port)


if __name__ == "__main__":
    main()
