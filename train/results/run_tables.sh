#!/usr/bin/env bash
# The accuracy tables of train/results/RESULTS.md, on 2 CPU cores: every method at 90% sparsity
# and dense, one budget per task, seeds 0 1 2, two runs at a time with one thread each.
# Finished runs (summary.json present) are skipped, so it can be re-run.
#   ViT / MNIST and ViT / Fashion-MNIST: tiny preset, 500 steps of 128 images, mask updates every 50 steps
#   BERT / pydoc: tiny preset, 300 steps of 32 sequences of 64 tokens, mask updates every 50 steps
# Then: .venv/bin/python -m train.table runs/table/vit runs/table/vit-variants
#       .venv/bin/python -m train.table runs/table/fashion   and   ... runs/table/bert
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
METHODS=${METHODS:-"dense rigl srigl dynadiag set gse static"}
VIT="--sparsity 0.9 --steps 500 --delta-t 50 --threads 1 --no-progress --overwrite"
BERT="--sparsity 0.9 --steps 300 --seq-len 64 --delta-t 50 --eval-every 100 --threads 1 --no-progress --overwrite"
for seed in ${SEEDS:-0 1 2}; do
  for method in $METHODS; do
    for task in "vit:mnist" "fashion:fashion_mnist"; do
      dir=${task%%:*}; data=${task#*:}
      out=runs/table/$dir/$method-seed$seed
      echo "[ -f $out/summary.json ] || $PY -m train.vit --dataset $data --method $method $VIT --seed $seed --out-dir $out > /dev/null"
    done
    out=runs/table/bert/$method-seed$seed
    echo "[ -f $out/summary.json ] || $PY -m train.bert --method $method $BERT --seed $seed --out-dir $out > /dev/null"
  done
done | xargs -P "${JOBS:-2}" -I{} sh -c '{}'
