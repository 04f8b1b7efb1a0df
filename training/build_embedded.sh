#!/usr/bin/env bash
# Builds the embedded model as shipped: the two train_embedded commands back to back (13.8 minutes of
# training on one H200; the first trains from scratch, the second continues from its files). Each stage is
# time-limited, so the whole build takes the same time on any GPU.
# Usage: training/build_embedded.sh [OUT_DIR] [extra train_embedded args, e.g. --t5-tokenizer DIR]
set -euo pipefail
out="${1:-embedded_model}"
shift || true
python -m training.train_embedded --out "$out" --time-limit 540 --distill-steps 0 --flow-steps 30000 "$@"
python -m training.train_embedded --init-from "$out" --seed 1 --images 100000 --flow-steps 20000 \
    --flow-batch 512 --flow-lr 3e-4 --distill-steps 1500 --distill-lr 1e-4 --time-limit 380 --out "$out" \
    --benchmark "$out/benchmark.json" "$@"
