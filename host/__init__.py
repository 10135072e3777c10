"""EdgeBFT's host package. For applications: ``from edgebft import Client`` (edgebft.client).

The client is imported on first use only: node processes and tools that import a module of
this package (``python -m edgebft.devices.romboot``) do not pay for paho and the lab.
"""

_CLIENT_NAMES = ("AsyncClient", "Client", "ClientError", "Rejected", "Timeout", "UnknownKey")
__all__ = list(_CLIENT_NAMES)


def __getattr__(name: str) -> object:
    if name in _CLIENT_NAMES:
        from edgebft import client

        return getattr(client, name)
    raise AttributeError(f"module 'edgebft' has no attribute {name!r}")
