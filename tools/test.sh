#!/usr/bin/env bash
# Run the whole test suite (unit, property, conformance on MicroPython, emulated cluster), lint
# and the firmware's type check against the board stubs.
# Sets up .venv first (fast when it is already there). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/ruff check host tests hil_tests tools
bash tools/typecheck.sh
.venv/bin/python -m pytest "$@"
