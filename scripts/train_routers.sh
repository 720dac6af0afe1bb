#!/usr/bin/env bash
# Rebuild the shipped router parameters (sot_engine/sot/data/router_*.safetensors) from the SoT authors' LIMA
# labels, with the exact commands that wrote them. Deterministic: the same labels give the same weights (the
# hidden-state features carry this CPU's kernel rounding, ~1e-6). Needs the labels in ../shared/data/ (or
# $SOT_SHARED_DATA); the questions themselves are never shipped.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${SOT_SHARED_DATA:-../shared/data}"
# the fallback for any model: hashed word n-grams, the rules' normal verdicts standing
sot train-router --labels "$DATA/sot_router_labels_lima.csv" --features text --veto on \
    --out sot_engine/sot/data/router_text.safetensors
# the default on the embedded SmolLM2: n-grams + its mean hidden state of the question, under the rules' veto
sot train-router --labels "$DATA/sot_router_labels_lima.csv" --features text+hidden --veto on --model default \
    --out sot_engine/sot/data/router_smollm2.safetensors
