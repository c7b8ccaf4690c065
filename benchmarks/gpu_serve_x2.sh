#!/usr/bin/env bash
# Issue 23 in ONE device call on kind nvidia-h200-x2 (2 H200s, NCCL, torch 2.11): `lite`, random bf16 weights.
#   1a. single-GPU Engine decode (benchmarks/engine_decode.py, 128-token prompts, 64 new tokens, batch 64 and 256),
#       two processes at once on disjoint GPUs: GPU 0 `eager` (no CUDA graphs: EPEngine's mode, the fair peer),
#       GPU 1 `fused` (graphs + compiled layers + fused MoE: the best measured mode, issue 16), then `compile`
#       (graphs + compiled layers, close at batch 64 in issue 16) if fused took under 70 s   ~2 min
#   1b. EP2 + DP attention (torchrun, NCCL): EPEngine, the same load split over the ranks, no overlap  ~1 min
#   2.  PD split (real PDRouter + prefill worker on GPU 0 + decode worker on GPU 1, no HTTP) vs unified (two
#       EngineProcess backends, one Engine per GPU): 48 requests, prompts 2K-4K, 256 output tokens, 16 concurrent
#       clients; TTFT / TPOT p50 and p99                                                                ~2 min
#   3.  live EPLB: EP2, 128 streams, 90% of prompts from 4 token ids, +8 redundant experts, rebalance every 24 steps
#                                                                                                       ~1 min
#   1c. EP2 with two-micro-batch overlap (last: two threads on two NCCL communicators may deadlock)       ~1 min
# Each stage has a timeout, cut to what is left of a 570 s budget (stages that would start with < 30 s left are
# skipped). Output under $OUT: serve_x2.log (everything), single_eager/engine_decode.json,
# single_best/engine_decode.json, ep_decode.json, pd.json, eplb.json; the last lines of the log are every part's table.
#
# Carry `.whl` (part 2 imports dsv3.serve, whose package needs fastapi/pydantic: `bash benchmarks/gpu_suite.sh
# wheels` builds it; without it part 2 fails and the others still run).
# Run (repo root): bash benchmarks/gpu_serve_x2.sh
# CPU dry run (gloo, tiny config, 2 processes), as run before the device call:
#   DRY_RUN=1 OMP_NUM_THREADS=1 PY=/work/main/.venv/bin/python OUT=/tmp/wt23-dry bash benchmarks/gpu_serve_x2.sh
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OUT=${OUT:-out} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # KINDS.md: keep these set
mkdir -p "$OUT"
LOG=$OUT/serve_x2.log
start=$(date +%s)
stamp() { echo "[serve_x2 $(( $(date +%s) - start )) s] $*" | tee -a "$LOG"; }
left() { echo $(( 570 - ($(date +%s) - start) )); }
limit() {  # limit SECONDS: the stage's timeout, cut to the budget left; 0 when under 30 s remain
  local l; l=$(left); (( l < 30 )) && { echo 0; return; }; (( l < $1 )) && echo "$l" || echo "$1"
}
stage() {  # stage NAME LIMIT CMD...: run CMD under its timeout, output to the log
  local name=$1 t; t=$(limit "$2"); shift 2
  if (( t == 0 )); then stamp "$name: skipped (budget spent)"; return; fi
  stamp "$name (timeout $t s)"
  timeout --signal=INT --kill-after=10 "$t" "$@" 2>&1 | grep -v -i "warning" | tee -a "$LOG"
  stamp "$name: exit ${PIPESTATUS[0]}"
}

if [ "${DRY_RUN:-0}" = 1 ]; then     # CPU: the same commands on the tiny config, small loads
  SINGLE=(--tiny --device cpu --dtype bf16 --batches 4,8 --tokens 4)
  EP=(--tiny --batches 4,8 --tokens 4 --prompt 16)
  PD=(--tiny --requests 6 --concurrency 3 --prompt-min 32 --prompt-max 64 --max-tokens 8 --chunk 64
      --cache-gib 0.05 --graphs off)
  EPLB=(--tiny --streams 8 --prompt 16 --interval 4 --redundant 4)
  GPU0=(env); GPU1=(env)
else
  nvidia-smi --query-gpu=index,name,memory.used --format=csv 2>&1 | tee -a "$LOG"
  nvidia-smi topo -m 2>&1 | head -4 | tee -a "$LOG"
  SINGLE=(--batches 64,256 --tokens 64)
  EP=(--batches 64,256 --tokens 64)
  PD=(--requests 48 --concurrency 16)
  EPLB=(--streams 128 --interval 24 --redundant 8)
  GPU0=(env CUDA_VISIBLE_DEVICES=0); GPU1=(env CUDA_VISIBLE_DEVICES=1)
fi
if compgen -G ".whl/*.whl" > /dev/null; then      # the server stack (as benchmarks/gpu_suite.sh installs it)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -2 | tee -a "$LOG"
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
RUN=($PY -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/serve_x2.py)

t=$(limit 170)
stamp "1a. single-GPU decode: eager on GPU 0, fused then compile on GPU 1, in parallel (timeout $t s)"
OUT=$OUT/single_eager timeout --signal=INT --kill-after=10 "$t" "${GPU0[@]}" $PY benchmarks/engine_decode.py \
  "${SINGLE[@]}" --modes eager > "$OUT/single_eager.txt" 2>&1 &
OUT=$OUT/single_best timeout --signal=INT --kill-after=10 "$t" "${GPU1[@]}" $PY benchmarks/engine_decode.py \
  "${SINGLE[@]}" --modes fused,compile --deadline-s $(( t - 100 )) > "$OUT/single_best.txt" 2>&1 &
wait
grep -v -i "warning" "$OUT/single_eager.txt" "$OUT/single_best.txt" | tail -40 | tee -a "$LOG"
rm -f "$OUT/single_eager.txt" "$OUT/single_best.txt"
stamp "1a: done"
stage "1b. EP2 decode, no overlap" 120 "${RUN[@]}" ep-decode "${EP[@]}" --tbo off
stage "2. PD split" 110 $PY benchmarks/serve_x2.py pd --system pd "${PD[@]}"
stage "2. unified, two engines" 110 $PY benchmarks/serve_x2.py pd --system unified "${PD[@]}"
stage "3. live EPLB" 90 "${RUN[@]}" eplb "${EPLB[@]}"
stage "1c. EP2 decode, two-micro-batch overlap" 120 "${RUN[@]}" ep-decode "${EP[@]}" --tbo on
stamp "done"
$PY benchmarks/serve_x2.py report 2>&1 | tee -a "$LOG"
