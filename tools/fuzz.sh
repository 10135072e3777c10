#!/bin/bash
# A longer fuzz campaign than CI's 300 examples per target (tests/test_fuzz.py says what each
# target is and what it must never do): bash tools/fuzz.sh [EXAMPLES per target, 20000].
# Each campaign draws afresh; hypothesis prints how to replay a failure: make each one a test.
set -euo pipefail
cd "$(dirname "$0")/.."
EDGEBFT_FUZZ_EXAMPLES="${1:-20000}" exec .venv/bin/python -m pytest -q tests/test_fuzz.py \
    tests/test_fuzz_mqtt.py
