#!/usr/bin/env bash
# Issue 15 (FP8 training) on one H200, in one device call of <= 9 minutes: every acceptance point still open that a
# measurement can close, most important first. Each step runs under `timeout`, its log in $OUT/<step>.log, one line
# per step (rc, seconds) in $OUT/summary.txt; a step whose limit no longer fits in the budget is skipped (and says so).
#
#   bash benchmarks/issue15_gpu.sh              on the GPU (from the repo root; carry .whl for the torchao peer)
#   DRY_RUN=1 bash benchmarks/issue15_gpu.sh    on the CPU: every step at tiny sizes (that the commands run)
#   SKIP="tests grouped" BUDGET=400 bash ...     leave steps out (names below) when device time is short;
#                                                ARMS=... replaces the step arms
#
# Steps (limit, s):
#   tests    (120) the new FP8 weight-gradient kernels and the FP8 experts on CUDA: bit-equal quantiser,
#                  _scaled_grouped_mm 2-D x 2-D vs the reference, autograd vs fp64 for block / row / row-fp8-wgrad;
#                  and under this torch's dynamo: compiled blocks with row-fp8-wgrad experts and the shared-input
#                  dense FP8 linears keep one graph per block kind (no graph break)
#   grouped  (110) benchmarks/fp8_grouped_bench.py: fwd / dgrad / wgrad FP8 vs bf16 _grouped_mm (>= 1.3x asked), lite
#                  and V3 widths, uniform and skewed; the SwiGLU FFN fwd+bwd vs bf16 and torchao (if its wheel is here)
#   step     (330) train_lite8l --compare, B4 x 2048 x 4 micro-batches, compiled, BF16 moments: bf16 vs FP8 row experts
#                  only (bf16 wgrad) vs the torchao peer on the same model and Trainer (its row-wise experts only; its
#                  blockwise linears + row-wise experts: benchmarks/torchao_peer.py) vs dsv3 with FP8 weight
#                  gradients: tok/s, peak GiB and mean loss (each arm's JSON stays in $OUT should the step time out)
#   loss     (170) benchmarks/fp8_loss_gpu.py: lite-8L 300 steps B2 x 2048, eager, bf16 vs row-fp8-wgrad (dense GEMMs
#                  in FP8 too: every FP8 GEMM we have), last-50 mean gap (< 0.25% asked), chart in $OUT
#   dense     (60) fp8_gemm_bench.py --training: dense FP8 GEMMs fwd / dgrad / wgrad and M = 1..16 vs bf16
#   wtq       (50) fp8_wt_candidates.py: W^T row quantiser candidates (amax + cast split per expert group, the
#                  library kernel with num_stages) vs copy, each bit-checked first (>= 80% of copy asked)
# The torchao 0.18 wheel (3.4 MB, cp310-abi3) is expected in .whl/peers/ (not .whl/: gpu_suite.sh installs every
# .whl/*.whl for the test gate, and the peer has no place there), downloaded on the CPU machine with
# `pip download torchao==0.18.* --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64
# -d .whl/peers`; it is installed with --no-deps into a scratch directory, nothing else changes on the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${BUDGET:-535}
DRY=${DRY_RUN:-0}
PP=src
if [[ $DRY != 1 ]]; then
  whl=$(ls .whl/peers/torchao-0.18*.whl 2>/dev/null | head -1)
  if [[ -n $whl ]] && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/issue15-torchao "$whl" >"$OUT/torchao-install.log" 2>&1
  then PP=src:/tmp/issue15-torchao; else echo "torchao: no wheel in .whl/peers/ or install failed" >>"$OUT/summary.txt"; fi
fi
export PYTHONPATH=$PP

step() {   # step NAME LIMIT CMD...: run CMD under timeout if LIMIT fits in what is left of BUDGET
  local name=$1 limit=$2; shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "$name skipped: in SKIP" | tee -a "$OUT/summary.txt"; return; fi
  local left=$((BUDGET - SECONDS))
  if (( left < limit / 2 )); then echo "$name skipped: ${left}s left of ${BUDGET}s" | tee -a "$OUT/summary.txt"; return; fi
  (( limit > left )) && limit=$left
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}

if [[ $DRY == 1 ]]; then
  step tests 300 $PY -m pytest -q tests/test_kernels_fp8_grouped_wgrad.py -k "reference or padded"
  step grouped 120 $PY benchmarks/fp8_grouped_bench.py --dry-run
  step step 400 $PY benchmarks/train_lite8l.py --compare --tiny --device cpu --micro-batches 2 \
    --arms bf16,row-exponly,row-exponly-w8 --steps 2 --warmup 1 --seq 128 --batch 2 --no-mtp --dtype bf16-params \
    --state-dtype bf16 --data-cache /tmp/issue15-data
  step loss 300 $PY benchmarks/fp8_loss_gpu.py --tiny --device cpu --steps 4 --seq 128 --batch 2 \
    --data-cache /tmp/issue15-data
  step dense 120 $PY benchmarks/fp8_gemm_bench.py --training --dry-run
  TRITON_INTERPRET=1 step wtq 300 $PY benchmarks/fp8_wt_candidates.py
  exit 0
fi

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/summary.txt"
step tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_fp8_grouped_wgrad.py \
  tests/test_kernels_fp8_rowwise.py tests/test_fp8_recipe.py tests/test_fp8_weight_cache.py \
  -k "cuda or (compiled and wgrad)"
step grouped 110 $PY benchmarks/fp8_grouped_bench.py
step step 330 $PY benchmarks/train_lite8l.py --compare --micro-batches 4 \
  --arms ${ARMS:-bf16,row-exponly,torchao-exponly,torchao,row-exponly-w8} \
  --compile --dtype bf16-params --state-dtype bf16 --no-mtp --steps 4 --warmup 2
step loss 170 $PY benchmarks/fp8_loss_gpu.py --steps 300 --batch 2 --arms bf16,row-fp8-wgrad
step dense 60 $PY benchmarks/fp8_gemm_bench.py --training
step wtq 50 $PY benchmarks/fp8_wt_candidates.py
echo "total ${SECONDS}s" | tee -a "$OUT/summary.txt"
