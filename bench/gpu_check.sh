#!/usr/bin/env bash
# The first thing to run whenever a GPU machine is lent: one command, at most ~8 minutes, at
# most 8 result files under OUT_DIR (the device tool returns 8 files, 2 folders deep).
#
#     bash bench/gpu_check.sh OUT_DIR            # e.g. run(command="bash bench/gpu_check.sh $OUT", carry=["data_cache"])
#     GPU_CHECK_BUDGET_S=300 bash bench/gpu_check.sh OUT_DIR   # a shorter total
#
# Phases, in order, each under `timeout` and skipped when the total budget is spent:
#   1. GPU-only tests (the kernels at ViT-B shapes, the compiled model, the fused MLP)  <= 100 s
#   2. bench/static.py on the GPU: every op at the target shapes with its launchers'
#      default configs, timed beside dense cuBLAS, with the model's error             <= 170 s
#   3. bench/sweep.py --no-tune: the same ops against CSR, surviving neurons, unfused  <= 80 s
#   4a. the wide b = 16 tiles and the band counts timed side by side (the L1 model's test) <= 45 s
#   4. a short tuning pass (bench/sweep.py, 8 candidates per key) if >= 150 s are left   <= 60 s
#   5. bench/e2e.py on ViT-B/16 at batch 256: training step and inference vs dense       <= 90 s
#   6. a short python -m train.vit run on the GPU (fashion_mnist from data_cache, or mnist) <= 45 s
# Files: gpu_check.log (every phase's output, with times), static/sm90.md, static/sm90.csv,
# sweep/sweep.md, sweep/sweep.csv, e2e.md, train_summary.json, configs.json (the tuned table,
# when phase 4 ran). Everything else is written under a scratch folder and left there.
set -u
OUT_DIR=${1:?usage: bench/gpu_check.sh OUT_DIR}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
mkdir -p "$OUT_DIR/static" "$OUT_DIR/sweep"
SCRATCH=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG="$OUT_DIR/gpu_check.log"
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1

. "$ROOT/bench/phases.sh"   # left, phase

{
    echo "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') git $(git rev-parse --short=12 HEAD 2>/dev/null || echo '?')" \
         "budget ${BUDGET} s"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -2
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$LOG" 2>&1

phase "1 GPU tests" 100 30 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gpu.py \
    tests/kernels/test_fused.py tests/kernels/test_cpu_inference.py -k "gpu or vit_b"

phase "2 static report, measured" 170 60 $PY bench/static.py --archs 90 --budget-s 150 --baseline bench/results/static/baseline_sm90.csv --out "$OUT_DIR/static"

phase "3 ratios vs CSR / surviving / unfused (default configs)" 80 40 $PY bench/sweep.py --no-tune \
    --shapes 768x3072,3072x768 --tokens 256,50432 --sparsities 0.9 --blocks 1,16,64 --dtypes bfloat16,float32 \
    --ablations 0,0.3 --warmup-ms 5 --rep-ms 20 --budget-s 70 --out "$SCRATCH/sweep" --table-dir "$SCRATCH/configs"

# The model's two assumptions about L1 (bench/README.md), measured side by side at ViT-B's fc2,
# b = 16: the wide tiles (32 x 64, 64 x 32, 128 x 16; the launcher picks by the L1 replay) and
# the weight gradient's band counts (64, 128) against the stacks; every time is in the log.
WIDE='"num_warps": 8, "num_stages": 1'
phase "4a wide tiles and band counts side by side" 45 120 $PY bench/sweep.py --ops diag_fwd,diag_dw \
    --shapes 3072x768 --tokens 50432 --sparsities 0.9 --blocks 16 --dtypes bfloat16 --ablations 0 \
    --max-candidates 1 --warmup-ms 5 --rep-ms 15 --budget-s 35 --out "$SCRATCH/side" --table-dir "$SCRATCH/side_configs" \
    --extra-candidate "diag_fwd={\"BLOCK_T\": 32, \"NB\": 64, $WIDE}" \
    --extra-candidate "diag_fwd={\"BLOCK_T\": 64, \"NB\": 32, $WIDE}" \
    --extra-candidate "diag_fwd={\"BLOCK_T\": 128, \"NB\": 16, $WIDE}" \
    --extra-candidate 'diag_dw={"BANDS": 0}' --extra-candidate 'diag_dw={"BANDS": 64, "band_warps": 8}' \
    --extra-candidate 'diag_dw={"BANDS": 128, "band_warps": 16}'

phase "4 short tuning pass" 60 150 $PY bench/sweep.py --ops fanin_fwd,fanin_dx,diag_fwd,mlp_fwd \
    --shapes 3072x768 --tokens 256,50432 --sparsities 0.9 --blocks 1,16,64 --dtypes bfloat16 --ablations 0 \
    --max-candidates 8 --warmup-ms 5 --rep-ms 15 --budget-s 50 --resume --out "$SCRATCH/sweep" \
    --table-dir "$SCRATCH/configs"

# batch 256 (50,432 tokens): the shape of bench/step_model.py's model in static/step_sm90.csv, so
# that its train_ms / infer_ms against the model's are the step model's error
phase "5 e2e ViT-B/16" 90 40 $PY bench/e2e.py --models vit-b16 --formats dense,diag64,diag16,fanin,diag64-fused,csr \
    --batch 256 --steps 5 --warmup 2 --out "$SCRATCH/e2e"

DATASET=mnist
if [ -d data_cache/fashion-mnist ]; then DATASET=fashion_mnist; fi
phase "6 train.vit on the GPU ($DATASET)" 45 25 $PY -m train.vit --method dynadiag --sparsity 0.9 \
    --dataset "$DATASET" --device cuda --steps 150 --warmup 20 --eval-every 150 --ckpt-every 0 --no-plots --no-progress \
    --out-dir "$SCRATCH/train" --overwrite

cp "$SCRATCH/sweep/sweep.md" "$SCRATCH/sweep/sweep.csv" "$OUT_DIR/sweep/" 2>/dev/null
cp "$SCRATCH"/e2e/*.md "$OUT_DIR/e2e.md" 2>/dev/null
cp "$SCRATCH/train/summary.json" "$OUT_DIR/train_summary.json" 2>/dev/null
ls "$SCRATCH"/configs/*.json > /dev/null 2>&1 && cp "$(ls "$SCRATCH"/configs/*.json | head -1)" "$OUT_DIR/configs.json"
echo "== done in $(( $(date +%s) - START )) s; scratch $SCRATCH; files:" >> "$LOG"
(cd "$OUT_DIR" && find . -type f | sort) >> "$LOG"
