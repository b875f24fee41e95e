#!/usr/bin/env bash
# The perplexity table of train/results/RESULTS.md, on 2 CPU cores: every method at 90% sparsity
# and dense, one budget, seeds 0 1 2, two runs at a time with one thread each. Finished runs
# (summary.json present) are skipped, so it can be re-run.
#   GPT / pydoc: tiny preset (2 blocks, width 128), 300 steps of 32 sequences of 64 tokens,
#   mask updates every 50 steps (the BERT table's budget)
# Then: .venv/bin/python -m train.table runs/table/gpt --json train/results/gpt.json --markdown train/results/gpt.md
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
METHODS=${METHODS:-"dense rigl srigl dynadiag set gse static"}
GPT="--sparsity 0.9 --steps 300 --seq-len 64 --delta-t 50 --eval-every 100 --threads 1 --no-progress --overwrite"
for seed in ${SEEDS:-0 1 2}; do
  for method in $METHODS; do
    out=runs/table/gpt/$method-seed$seed
    echo "[ -f $out/summary.json ] || $PY -m train.gpt --method $method $GPT --seed $seed --out-dir $out > /dev/null"
  done
done | xargs -P "${JOBS:-2}" -I{} sh -c '{}'
