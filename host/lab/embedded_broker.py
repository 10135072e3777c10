"""A pure-Python MQTT broker (amqtt) for machines without mosquitto.

Run as its own process so that the host's event loop and GIL are not shared with it::

    python -m edgebft.lab.embedded_broker --port 41883 [--host 127.0.0.1]

It listens on one TCP listener, allows anonymous clients, publishes no ``$SYS`` topics and logs
only warnings and errors (to stderr). It prints ``ready <host>:<port>`` on stdout once the
listener is bound and runs until SIGTERM or SIGINT. ``edgebft.lab.broker.start_broker`` is the
usual way to start it; this module is the subprocess's entry point.

amqtt 0.12.1 was checked by tests/test_broker.py for what EdgeBFT uses: publish/subscribe round
trips at QoS 0 and 1, retained messages, and the Last Will on an abrupt disconnect. It is an
MQTT 3.1.1 broker only (no MQTT 5) and is far slower than mosquitto; use it for tests and
laptops, not for latency measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

DEFAULT_HOST = "127.0.0.1"


def broker_config(host: str, port: int) -> dict[str, Any]:
    """Return the amqtt configuration: one TCP listener on ``host:port``, anonymous, no $SYS."""
    assert 0 < port < 65536
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Only the plugins named here are loaded: no event/packet logging, no $SYS publisher.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def serve(host: str, port: int) -> None:
    """Run the broker until SIGTERM or SIGINT, then shut it down."""
    from amqtt.broker import Broker

    broker = Broker(broker_config(host, port))
    await broker.start()
    print(f"ready {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    try:
        await asyncio.wait_for(broker.shutdown(), timeout=2)
    except Exception:  # noqa: BLE001 - exiting anyway; the parent kills the group if we hang
        pass


def main(argv: list[str] | None = None) -> int:
    """Parse ``--host``/``--port`` and serve; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m edgebft.lab.embedded_broker")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s "
                        "%(message)s", stream=sys.stderr)
    logging.getLogger("transitions").setLevel(logging.ERROR)
    from amqtt.errors import BrokerError

    try:
        asyncio.run(serve(args.host, args.port))
    except (OSError, BrokerError) as exc:  # typically: address already in use
        print(f"embedded broker: cannot listen on {args.host}:{args.port}: {exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
