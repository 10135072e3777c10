"""The fault kinds, each defined once: its name, what it does, and which tools apply it.

One vocabulary for every command: ``edgebft inject`` (a lab cluster), ``--nemesis`` of bench
and demo (strikes the primary), ``edgebft sim --faults`` (the simulator), their help texts and
the report. A kind lists where it applies:

- ``inject``: how ``edgebft inject`` applies it to an emulated node: ``"signal"`` (to the node's
  process group), ``"control"`` (an authenticated control command, firmware/faults.py) or
  ``"broker"`` (to the cluster's broker: no node named);
- ``nemesis``: bench and demo strike the current primary with it (host/lab/nemesis.py);
- ``sim``: the simulator draws it in its schedules (host/sim/simulator.py).

Adding a kind is one entry here plus the code that applies it where it applies. Older names
stay accepted as aliases (``kill``, ``crash-primary``, ``loss``, ``byzantine-primary``).
"""

from __future__ import annotations

from dataclasses import dataclass


class FaultKindError(ValueError):
    """A name that is no fault kind (of the tool asked); the message lists the known ones."""


@dataclass(frozen=True)
class FaultKind:
    name: str
    summary: str                  # what it does, one clause (help texts and README)
    inject: str | None = None     # "signal", "control" or None (not injectable)
    nemesis: bool = False
    sim: bool = False
    aliases: tuple[str, ...] = ()
    options: str = ""             # the options of ``edgebft inject`` it takes


KINDS = (
    FaultKind("crash", "the node dies by SIGKILL; heal boots it again from its flash",
              inject="signal", nemesis=True, sim=True, aliases=("kill", "crash-primary")),
    FaultKind("reboot", "the node resets itself and boots again from its flash at once",
              inject="control", sim=True),
    FaultKind("oom", "the node's heap fills up until an allocation fails; it restarts in place "
              "from its flash", inject="control", nemesis=True),
    FaultKind("pause", "the node stands still under SIGSTOP until heal resumes it",
              inject="signal", nemesis=True, sim=True),
    FaultKind("partition", "the node, with its group, cut off from the other replicas",
              inject="control", nemesis=True, sim=True, options="--group"),
    FaultKind("omission", "the node loses a share of its messages",
              inject="control", nemesis=True, sim=True, aliases=("loss",), options="--p, --peers"),
    FaultKind("delay", "the node's messages held back a while",
              inject="control", nemesis=True, sim=True, options="--ms, --jitter"),
    FaultKind("duplicate", "the node sends a share of its messages twice",
              inject="control", nemesis=True, sim=True, options="--p"),
    FaultKind("skew", "the node's clock offset", inject="control", options="--ms"),
    FaultKind("byzantine", "the node misbehaves; the nemesis makes it equivocate",
              inject="control", nemesis=True, aliases=("byzantine-primary",),
              options="--mode, --colluders"),
    FaultKind("broker-restart", "the broker stops (every connection drops, retained messages "
              "go) and starts again on the same port after a while", inject="broker",
              nemesis=True, options="--ms"),
)
_BY_NAME = {name: kind for kind in KINDS for name in (kind.name, *kind.aliases)}


def names(tool: str) -> tuple[str, ...]:
    """The kinds ``tool`` ("inject", "nemesis" or "sim") applies, in registry order."""
    return tuple(kind.name for kind in KINDS if getattr(kind, tool))


def aliases(tool: str) -> tuple[str, ...]:
    """The older names ``tool`` still accepts."""
    return tuple(alias for kind in KINDS if getattr(kind, tool) for alias in kind.aliases)


def kind(name: str, tool: str) -> FaultKind:
    """The kind ``name`` (or an alias of it) names, if ``tool`` applies it; FaultKindError
    otherwise."""
    found = _BY_NAME.get(name.strip())
    if found is None or not getattr(found, tool):
        raise FaultKindError(f"unknown fault {name.strip()!r}: expected one of "
                             f"{', '.join(names(tool))}")
    return found


def inject_options() -> str:
    """``name --option, ...; ...`` for the injectable kinds that take options (help texts)."""
    return "; ".join(f"{k.name} {k.options}" for k in KINDS if k.inject and k.options)


def describe(tool: str) -> str:
    """``name (summary), ...`` of the kinds ``tool`` applies, for a help text."""
    return ", ".join(f"{k.name} ({k.summary})" for k in KINDS if getattr(k, tool))
