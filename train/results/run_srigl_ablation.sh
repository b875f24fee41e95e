#!/usr/bin/env bash
# The variant rows beside run_tables.sh's, same budgets: SRigL without neuron ablation and with
# the CNN salience threshold gamma_sal = 0.3, and DynaDiag frozen with its top-K gates set to 1
# (the authors' freeze) instead of folded into the values (the default).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
VIT="--sparsity 0.9 --steps 500 --delta-t 50 --threads 1 --no-progress --overwrite"
BERT="--sparsity 0.9 --steps 300 --seq-len 64 --delta-t 50 --eval-every 100 --threads 1 --no-progress --overwrite"
for seed in ${SEEDS:-0 1 2}; do
  for variant in "srigl-noabl:--method srigl --no-ablation" "srigl-gsal0.3:--method srigl --gamma-sal 0.3" \
                 "dynadiag-ones:--method dynadiag --freeze-gate ones"; do
    name=${variant%%:*}; flags=${variant#*:}
    for task in "vit-variants:mnist" "fashion:fashion_mnist"; do
      dir=${task%%:*}; data=${task#*:}
      out=runs/table/$dir/$name-seed$seed
      echo "[ -f $out/summary.json ] || $PY -m train.vit --dataset $data $flags $VIT --seed $seed --out-dir $out > /dev/null"
    done
  done
  out=runs/table/bert/dynadiag-ones-seed$seed
  echo "[ -f $out/summary.json ] || $PY -m train.bert --method dynadiag --freeze-gate ones $BERT --seed $seed --out-dir $out > /dev/null"
done | xargs -P "${JOBS:-2}" -I{} sh -c '{}'
