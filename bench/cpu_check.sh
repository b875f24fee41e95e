#!/usr/bin/env bash
# The first thing to run on a CPU this project has not measured yet - above all an Intel Xeon
# with AVX-512-BF16 and AMX (`lscpu` flags avx512_bf16 amx_bf16 amx_tile), whose AMX kernels
# (kernels/cpu: bsr16_mm_amx, sddmm_blocks_amx) have so far run only on the emulated build (the
# AVX-512-BF16 ones - bsr16_mv_dpbf16, csr_mm_*_dpbf16, sddmm_*_dpbf16, bsr16_mm_dpbf16,
# sddmm_blocks_dpbf16 - ran on an AMD EPYC Zen 4 on 2026-12-07: results/cpu_check/amd_epyc_avx512_bf16/).
# One command, its phases under `timeout` within a total budget:
#
#     bash bench/cpu_check.sh                       # -> bench/results/cpu_check/<cpu>_<build>/
#     bash bench/cpu_check.sh OUT_DIR               # elsewhere
#     CPU_CHECK_BUDGET_S=900 bash bench/cpu_check.sh
#
# Phases, in order, each skipped when the budget is spent:
#   1. the CPU, the variant kernels.cpu loads and the kernels it can run (on an AMX CPU the
#      AMX kernels' first-run check runs here: "amx: on" or why not)                    <= 60 s
#   1b. only where the CPU has AMX: the amx build's instructions one step at a time (python -m
#      kernels.cpu --amx-steps: the grant, LDTILECFG, TILEZERO / TILESTORED, TILELOADD,
#      TDPBF16PS, each in a child process; the first to fault or go wrong is named)      <= 60 s
#   2. the native-product tests on this CPU's build (the "this CPU" halves of the AMX /
#      AVX-512-BF16 tests run here where the flags are present; emu runs them anywhere)   <= 400 s
#   3. bench/cpu_infer.py --precision bf16, 1 thread, batch 1 / 32 / 256 (issue 23's layer
#      table: every format against dense bf16 and dense fp32 side by side)                <= 3 x 240 s
#   4. the same at 32 / 256 tokens with the AVX2 build forced (KERNELS_CPU_VARIANT=avx2):
#      the wide kernels' gain over the AVX2 ones on this CPU, one run after the other     <= 2 x 240 s
#   4b. bench/cpu_train.py at 32 / 256 tokens (one layer's training step and the SDDMM weight
#      gradient, fp32 and bf16, vs dense fp32 and bf16), this CPU's build then AVX2 forced <= 4 x 240 s
#   4c. only where the CPU has AMX: cpu_infer bf16 at 32 / 256 tokens and cpu_train at 256 with
#      the avx512-bf16 build forced - the AVX-512-BF16 block products (bsr16_mm_dpbf16,
#      sddmm_blocks_dpbf16) against the AMX tiles on the same Xeon                       <= 3 x 240 s
#   5. bench/e2e.py ViT-B/16 batch 32 under bf16 autocast, inference only, then the
#      training step: dense, diag16, fan-in (issue 23's end-to-end rows)                   <= 600 s + 900 s
#   5c. the same for BERT-base, batch 8 (1024 tokens), training step and inference         <= 600 s
#   5d. bench/cpu_attention.py in bf16: torch's CPU flash attention against models.attention's
#      batched GEMMs at ViT-B/16 / BERT-base / GPT-2 shapes ("auto" takes the GEMMs on CPUs
#      without AMX, measured on a Zen 4; on AMX CPUs torch's kernel until this measures it)  <= 300 s
#   5e. only where the CPU has AMX: 5b again with MODELS_ATTENTION=bmm (the e2e rows with the
#      attention path "auto" does not take there)                                          <= 900 s
#   6. bench/cpu_targets.py: issue 23's targets judged from the files above for this CPU's class
#      (AMX / AVX-512-BF16 / AVX2), met / missed / not measured, into cpu_targets.md      (always)
# Files: cpu_check.log (every phase's output, with times), cpu_infer_bf16_batch{1,32,256}.md / .csv,
# cpu_infer_bf16_batch{32,256}_avx2_forced.md,
# cpu_train_t{32,256}.md and _avx2_forced.md, (AMX CPUs) *_avx512_bf16_forced.md,
# e2e_{infer,train,bert}.md / .csv, cpu_attention_bfloat16.md / .csv, (AMX CPUs)
# e2e_train_attention_bmm.md / .csv, cpu_targets.md.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python
CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1 | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '_' | sed 's/_$//')
# "AMD EPYC" names a Zen 3 (AVX2) and a Zen 4 (AVX-512-BF16) alike: the folder names the build too
VARIANT=$("$PY" -c 'import alwayssparse.kernels.cpu as c; print(c.variant()[0])' 2>/dev/null | tr -c 'a-z0-9\n' '_')
OUT_DIR=${1:-bench/results/cpu_check/${CPU:-unknown_cpu}${VARIANT:+_$VARIANT}}
BUDGET=${CPU_CHECK_BUDGET_S:-3600}
mkdir -p "$OUT_DIR"
SCRATCH=$(mktemp -d /tmp/cpu_check.XXXXXX)
LOG="$OUT_DIR/cpu_check.log"
START=$(date +%s)
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1

. "$ROOT/bench/phases.sh"   # left, phase

echo "cpu_check $(date -u '+%Y-%m-%d %H:%M UTC') git $(git rev-parse --short=12 HEAD 2>/dev/null || echo '?')" \
     "budget ${BUDGET} s" > "$LOG"

phase "1 this CPU" 60 10 bash -c "lscpu | grep -E '^(Model name|Vendor ID|CPU\(s\)|Thread|Core|Socket|L1d|L2|L3)'; \
    grep -m1 -o -w -E 'avx512f|avx512_bf16|amx_tile|amx_bf16|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; \
    $PY -c 'import alwayssparse.kernels.cpu as c; c.lib(); print(\"variant\", c.loaded_variant(), \"features\", sorted(c.features()), \"error\", c.error()); \
    print(\"amx:\", \"on\" if \"amx\" in c.features() else c.missing_feature(\"amx\"))'"

if grep -q -w amx_bf16 /proc/cpuinfo; then
    phase "1b the AMX instructions step by step" 60 10 env KERNELS_CPU_VARIANT=amx "$PY" -m alwayssparse.kernels.cpu \
        --amx-steps
fi

phase "2 native-product tests" 400 60 "$PY" -m pytest -q -p no:cacheprovider -rs tests/kernels/test_cpu_native.py \
    tests/kernels/test_cpu_blocks.py tests/kernels/test_cpu_emu.py tests/kernels/test_cpu_inference.py \
    tests/kernels/test_autocast.py

for B in 1 32 256; do
    phase "3 cpu_infer bf16, batch $B" 240 60 "$PY" bench/cpu_infer.py --threads 1 --clock cpu --precision bf16 \
        --batch "$B" --out "$SCRATCH/b$B"
    cp "$SCRATCH/b$B/cpu_infer_bf16.md" "$OUT_DIR/cpu_infer_bf16_batch$B.md" 2>/dev/null
    cp "$SCRATCH/b$B/cpu_infer_bf16.csv" "$OUT_DIR/cpu_infer_bf16_batch$B.csv" 2>/dev/null
done
for B in 32 256; do
    phase "4 cpu_infer bf16, batch $B, AVX2 build forced" 240 60 env KERNELS_CPU_VARIANT=avx2 "$PY" bench/cpu_infer.py \
        --threads 1 --clock cpu --precision bf16 --batch "$B" --out "$SCRATCH/avx2_b$B"
    cp "$SCRATCH/avx2_b$B/cpu_infer_bf16.md" "$OUT_DIR/cpu_infer_bf16_batch${B}_avx2_forced.md" 2>/dev/null
done
for T in 32 256; do
    phase "4b cpu_train, $T tokens" 240 60 "$PY" bench/cpu_train.py --threads 1 --clock cpu --tokens "$T" \
        --out "$SCRATCH/train_t$T"
    cp "$SCRATCH/train_t$T/cpu_train.md" "$OUT_DIR/cpu_train_t$T.md" 2>/dev/null
    phase "4b cpu_train, $T tokens, AVX2 build forced" 240 60 env KERNELS_CPU_VARIANT=avx2 "$PY" bench/cpu_train.py \
        --threads 1 --clock cpu --tokens "$T" --out "$SCRATCH/train_avx2_t$T"
    cp "$SCRATCH/train_avx2_t$T/cpu_train.md" "$OUT_DIR/cpu_train_t${T}_avx2_forced.md" 2>/dev/null
done

if grep -q -w amx_bf16 /proc/cpuinfo; then
    for B in 32 256; do
        phase "4c cpu_infer bf16, batch $B, AVX-512-BF16 build forced (no AMX)" 240 60 env KERNELS_CPU_VARIANT=avx512-bf16 \
            "$PY" bench/cpu_infer.py --threads 1 --clock cpu --precision bf16 --batch "$B" --out "$SCRATCH/dp_b$B"
        cp "$SCRATCH/dp_b$B/cpu_infer_bf16.md" "$OUT_DIR/cpu_infer_bf16_batch${B}_avx512_bf16_forced.md" 2>/dev/null
    done
    phase "4c cpu_train, 256 tokens, AVX-512-BF16 build forced (no AMX)" 240 60 env KERNELS_CPU_VARIANT=avx512-bf16 \
        "$PY" bench/cpu_train.py --threads 1 --clock cpu --tokens 256 --out "$SCRATCH/train_dp_t256"
    cp "$SCRATCH/train_dp_t256/cpu_train.md" "$OUT_DIR/cpu_train_t256_avx512_bf16_forced.md" 2>/dev/null
fi

phase "5a e2e ViT-B/16 batch 32, bf16 autocast, inference" 600 120 "$PY" bench/e2e.py --models vit-b16 \
    --formats dense,diag16,fanin --autocast bf16 --batch 32 --steps 3 --clock cpu --infer-only --out "$SCRATCH/e2e_infer"
cp "$SCRATCH"/e2e_infer/e2e.md "$OUT_DIR/e2e_infer.md" 2>/dev/null
cp "$SCRATCH"/e2e_infer/e2e.csv "$OUT_DIR/e2e_infer.csv" 2>/dev/null
phase "5b e2e ViT-B/16 batch 32, bf16 autocast, training step" 900 300 "$PY" bench/e2e.py --models vit-b16 \
    --formats dense,diag16,fanin --autocast bf16 --batch 32 --steps 3 --clock cpu --out "$SCRATCH/e2e_train"
cp "$SCRATCH"/e2e_train/e2e.md "$OUT_DIR/e2e_train.md" 2>/dev/null
cp "$SCRATCH"/e2e_train/e2e.csv "$OUT_DIR/e2e_train.csv" 2>/dev/null
phase "5c e2e BERT-base batch 8, bf16 autocast" 600 120 "$PY" bench/e2e.py --models bert-base \
    --formats dense,diag16,fanin --autocast bf16 --batch 8 --steps 3 --clock cpu --out "$SCRATCH/e2e_bert"
cp "$SCRATCH"/e2e_bert/e2e.md "$OUT_DIR/e2e_bert.md" 2>/dev/null
cp "$SCRATCH"/e2e_bert/e2e.csv "$OUT_DIR/e2e_bert.csv" 2>/dev/null
phase "5d attention, bf16: torch's CPU flash kernel vs batched GEMMs" 300 60 "$PY" bench/cpu_attention.py \
    --threads 1 --clock cpu --shapes "vit-b16 b8,bert-base b8,gpt2-small b8,512 tokens b2,gpt2-small 1024 b1" \
    --out "$SCRATCH/attention"
cp "$SCRATCH"/attention/cpu_attention_bfloat16.md "$OUT_DIR/" 2>/dev/null
cp "$SCRATCH"/attention/cpu_attention_bfloat16.csv "$OUT_DIR/" 2>/dev/null
if grep -q -w amx_bf16 /proc/cpuinfo; then
    phase "5e e2e ViT-B/16 batch 32, bf16 autocast, training step, attention as batched GEMMs" 900 300 \
        env MODELS_ATTENTION=bmm "$PY" bench/e2e.py --models vit-b16 --formats dense,diag16,fanin --autocast bf16 \
        --batch 32 --steps 3 --clock cpu --out "$SCRATCH/e2e_train_bmm"
    cp "$SCRATCH"/e2e_train_bmm/e2e.md "$OUT_DIR/e2e_train_attention_bmm.md" 2>/dev/null
    cp "$SCRATCH"/e2e_train_bmm/e2e.csv "$OUT_DIR/e2e_train_attention_bmm.csv" 2>/dev/null
fi

echo "== 6 issue 23's targets: bench/cpu_targets.py $OUT_DIR" >> "$LOG"
"$PY" bench/cpu_targets.py "$OUT_DIR" >> "$LOG" 2>&1
echo "== 6 issue 23's targets: exit $?" >> "$LOG"

echo "== done in $(( $(date +%s) - START )) s; scratch $SCRATCH; files:" >> "$LOG"
(cd "$OUT_DIR" && find . -type f | sort) >> "$LOG"
echo "cpu_check: $OUT_DIR (log: $LOG)"
