#!/usr/bin/env bash
# Train built-in presets and write the pictures of docs/training.md: the last periodic sample grid and a
# denoising strip of each. Usage: benchmarks/train_presets.sh [PRESET...] (default: square-fast gradients toy2d)
# Extra flags for `ddpm train` come from $TRAIN_FLAGS (e.g. TRAIN_FLAGS="--data-dir ../shared/data/mnist").
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/images
mkdir -p "$out" runs
for preset in "${@:-square-fast gradients toy2d}"; do
    for p in $preset; do
        run=runs/docs-$p
        start=$(date +%s)
        ddpm train --preset "$p" --out "$run" --overwrite --quiet ${TRAIN_FLAGS:-}
        end=$(date +%s)
        latest=$(cat "$run/checkpoints/latest")
        cp "$run/samples/$latest.png" "$out/$p-samples.png"
        ddpm sample "$run" --num 8 --out "$run/trajectory-grid.png" --trajectory "$out/$p-denoising.png" \
            --overwrite --quiet
        echo "$p: $((end - start)) s wall for ddpm train ($(nproc) cores), $latest"
    done
done
