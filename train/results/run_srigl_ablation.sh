#!/usr/bin/env bash
# Extra rows that explain SRigL's gap on the tiny ViT: the same budget as run_tables.sh with
# neuron ablation off, and with the CNN salience threshold gamma_sal = 0.3.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
for seed in ${SEEDS:-0 1 2}; do
  for variant in "no-ablation:--no-ablation" "gsal0.3:--gamma-sal 0.3"; do
    name=${variant%%:*}; flags=${variant#*:}
    out=runs/table/vit-srigl/$name-seed$seed
    echo "[ -f $out/summary.json ] || $PY -m train.vit --method srigl $flags --sparsity 0.9 --steps 500 --delta-t 50 --seed $seed --threads 1 --no-progress --overwrite --out-dir $out > /dev/null"
  done
done | xargs -P "${JOBS:-2}" -I{} sh -c '{}'
