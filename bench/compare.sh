#!/usr/bin/env bash
# Accuracy and training time of the baselines and the transfer-learning modes on the shared datasets.
# Usage: bash bench/compare.sh [DATASETS_DIR] [OUT_DIR] [DATASET ...]   (about 40 minutes on 2 CPU cores for both)
set -euo pipefail
datasets=${1:-"$(dirname "$0")/../../shared/datasets"}
out=${2:-runs/bench-compare}
models=logreg-pixels,small-cnn,efficientnet_lite0:features,efficientnet_lite0:frozen,efficientnet_lite0:finetune
names=("${@:3}")
[ ${#names[@]} -gt 0 ] || names=(hymenoptera oxford17_flowers)
for name in "${names[@]}"; do
  echo "## $name"
  /usr/bin/time -v tlearn compare "$datasets/$name" --models "$models" --out "$out/$name" 2> "$out-$name.log" \
    || { tail -20 "$out-$name.log"; exit 1; }
  grep -E "Maximum resident|Elapsed" "$out-$name.log"
done
