"""Build a node's device image: the one layout that emulation runs and deploy writes.

Layout (DESIGN.md section 1)::

    main.py                        firmware/main.py
    lib/edgebft/__init__.py        empty: on the device edgebft is only a namespace
    lib/edgebft/protocol/*.py      the portable core
    lib/edgebft/firmware/*.py      the MicroPython runtime (without main.py)
    edgebft.json                   this node's configuration and its row of keys
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any


def _source_dir(package: str) -> Path:
    return Path(str(resources.files(package)))


def build_lib(lib: Path) -> Path:
    """Write ``edgebft/`` (protocol and firmware modules) into ``lib``; return ``lib``."""
    root = lib / "edgebft"
    root.mkdir(parents=True, exist_ok=True)
    (root / "__init__.py").write_text("")
    for package, name in (("edgebft.protocol", "protocol"), ("edgebft.firmware", "firmware")):
        dest = root / name
        dest.mkdir(exist_ok=True)
        for src in sorted(_source_dir(package).glob("*.py")):
            if src.name != "main.py":
                shutil.copyfile(src, dest / src.name)
    return lib


def build_image(dest: Path, config: dict[str, Any]) -> Path:
    """Lay out a complete device image for one node in ``dest``; return ``dest``.

    ``config`` must be JSON-serialisable (keys as hex strings); it becomes ``edgebft.json``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_source_dir("edgebft.firmware") / "main.py", dest / "main.py")
    build_lib(dest / "lib")
    (dest / "edgebft.json").write_text(json.dumps(config, sort_keys=True, indent=1) + "\n")
    return dest
