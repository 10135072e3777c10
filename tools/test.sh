#!/usr/bin/env bash
# Run the whole test suite (unit, property, conformance on MicroPython, emulated cluster) and lint.
# Sets up .venv first (fast when it is already there). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/ruff check host tests hil_tests tools
.venv/bin/python -m pytest "$@"
