"""Put a node on a board over its REPL (mpremote's serial transport): our code, the node's
configuration, then a reset that boots it.

The board runs MicroPython's stock firmware: our modules go to its filesystem as ``lib/*.mpy``
(ROMFS, where a custom firmware has it, is written by ``edgebft flash --romfs``), with
``main.py`` and the node's ``edgebft.json``. A file whose SHA-256 on the board already matches
is skipped, so a second deploy of the same code writes only what changed. Each file is written
to ``<name>.new`` and renamed over the old one (atomic on LittleFS and on the Unix port), so a
deploy cut off halfway leaves every file either old or new, never truncated. The configuration
holds the node's keys and password: they are never printed, only file names are.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mpremote.transport import TransportError
from mpremote.transport_serial import SerialTransport

from edgebft.devices.image import build_lib, main_source

CONFIG_NAME = "edgebft.json"
BAUD = 115200


class DeployError(RuntimeError):
    """The board could not be reached or written; one line for a user."""


@dataclass(frozen=True)
class Deployed:
    port: str
    written: tuple[str, ...]
    skipped: tuple[str, ...]
    reset: bool


def node_files(config: dict[str, Any]) -> dict[str, bytes]:
    """What a node's board holds: main.py, lib/edgebft/** (compiled as for emulation) and
    edgebft.json with ``config``; paths relative to the board's root."""
    files = {"main.py": main_source()}
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_lib(Path(tmp) / "lib")
        for path in sorted(lib.rglob("*")):
            if path.is_file():
                files["lib/" + path.relative_to(lib).as_posix()] = path.read_bytes()
    files[CONFIG_NAME] = (json.dumps(config, sort_keys=True) + "\n").encode()
    return files


def deploy(port: str, files: dict[str, bytes], reset: bool = True,
           progress: Callable[[str, bool], None] | None = None) -> Deployed:
    """Write ``files`` to the board on ``port`` (skipping those already there), then, with
    ``reset``, soft-reset it so it boots main.py. ``progress(path, written)`` is called per
    file.

    Raises:
        DeployError: the port cannot be opened, no REPL answers, or a write failed.
    """
    try:
        transport = SerialTransport(port, baudrate=BAUD)
    except TransportError as e:
        raise DeployError(f"{port}: {' '.join(str(e).split())}") from None
    written, skipped = [], []
    try:
        transport.enter_raw_repl(soft_reset=False)
        made: set[str] = set()
        for path, data in files.items():
            _make_dirs(transport, PurePosixPath(path).parent, made)
            if transport.fs_exists(path) and \
                    transport.fs_hashfile(path, "sha256") == hashlib.sha256(data).digest():
                skipped.append(path)
            else:
                transport.fs_writefile(path + ".new", data)
                transport.exec(f"import os\nos.rename({path + '.new'!r}, {path!r})")
                written.append(path)
            if progress is not None:
                progress(path, written[-1:] == [path])
        transport.exit_raw_repl()
        if reset:
            transport.serial.write(b"\x04")  # soft reset at the REPL: the board boots main.py
    except (TransportError, OSError) as e:
        raise DeployError(f"{port}: {' '.join(str(e).split()) or type(e).__name__}") from None
    finally:
        transport.close()
    return Deployed(port, tuple(written), tuple(skipped), reset)


def _make_dirs(transport: SerialTransport, folder: PurePosixPath, made: set[str]) -> None:
    for part in reversed([folder, *folder.parents]):
        name = str(part)
        if name in (".", "") or name in made:
            continue
        if not transport.fs_exists(name):
            transport.fs_mkdir(name)
        made.add(name)
