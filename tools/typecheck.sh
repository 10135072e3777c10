#!/usr/bin/env bash
# Type-check the code a board runs (firmware/, protocol/, main.py) against MicroPython's ESP32
# API: pyright with micropython-esp32-stubs (and the stdlib stubs they bring) as the only
# typeshed, over the tree as the device sees it (edgebft/firmware, edgebft/protocol, main.py
# copied to build/device: pyright does not follow linked folders); findings name the sources. Exit 0 only when pyright finds nothing; a finding
# that cannot be fixed is suppressed where it is, with its reason.
# Needs .venv (tools/setup.sh: pyright is a test dependency); installs the stubs once.
set -euo pipefail
cd "$(dirname "$0")/.."
stubs=.venv/device-typings
version=1.29.0.post1
if [ "$(cat "$stubs/.version" 2>/dev/null || true)" != "$version" ]; then
  rm -rf "$stubs"
  .venv/bin/python -m pip install -q --disable-pip-version-check --target "$stubs" \
    "micropython-esp32-stubs==$version"
  echo "$version" > "$stubs/.version"
fi
tree=build/device
rm -rf "$tree"
mkdir -p "$tree/edgebft"
: > "$tree/edgebft/__init__.py"
cp -r firmware protocol "$tree/edgebft/"
cp firmware/main.py "$tree/main.py"
cat > "$tree/pyrightconfig.json" <<EOF
{
  "include": ["edgebft", "main.py"],
  "typeshedPath": "../../$stubs",
  "stubPath": "../../$stubs",
  "pythonVersion": "3.8",
  "pythonPlatform": "Linux",
  "typeCheckingMode": "standard",
  "reportMissingModuleSource": "none"
}
EOF
cd "$tree"
../../.venv/bin/pyright --outputjson > ../pyright.json || true
cd ../..
.venv/bin/python - <<'EOF'
import json, sys
report = json.load(open("build/pyright.json"))
found = [d for d in report["generalDiagnostics"] if d["severity"] in ("error", "warning")]
for d in found:
    start = d["range"]["start"]
    path = d["file"].split("build/device/")[-1].replace("edgebft/", "", 1)
    path = "firmware/main.py" if path == "main.py" else path
    print(f"{path}:{start['line'] + 1}: {d['severity']}: {d['message'].splitlines()[0]}")
print(f"typecheck: {len(found)} finding(s) in {report['summary']['filesAnalyzed']} files "
      "(pyright, micropython-esp32-stubs)")
sys.exit(1 if found else 0)
EOF
