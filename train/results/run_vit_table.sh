#!/usr/bin/env bash
# The ViT / MNIST accuracy table of train/results/RESULTS.md: every method at 90% sparsity and
# dense, one budget (500 steps of 128 images, tiny preset, mask updates every 50 steps), seeds
# 0 1 2, two runs at a time with one thread each (2 CPU cores); finished runs are skipped.
# Then: .venv/bin/python -m train.table runs/table/vit
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
for seed in 0 1 2; do
  for method in dense rigl srigl dynadiag set gse static; do
    out=runs/table/vit/$method-seed$seed
    echo "[ -f $out/summary.json ] || $PY -m train.vit --method $method --sparsity 0.9 --steps 500 --delta-t 50 --seed $seed --threads 1 --no-progress --overwrite --out-dir $out > /dev/null"
  done
done | xargs -P "${JOBS:-2}" -I{} sh -c '{}'
