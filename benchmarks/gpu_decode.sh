#!/usr/bin/env bash
# Issue 16 on one H200 (torch 2.11, triton 3.6, no network), in ONE device call; logs and JSON under $OUT.
#   1. CUDA tests of the decode-speed paths (pytest -n 8, -m gpu): the fused MoE kernel (bf16 / FP8, lite shapes,
#      graph capture), compiled / fused decode under graph capture vs the eager step and the plain engine, and the
#      existing graph-decode tests of the engine.                                                     ~1.5 min
#   2. engine decode on `lite` at batch 1/32/64, 64 new tokens after 128-token prompts, modes overlap (the engine's
#      defaults: compiled layers, fused MoE auto, the overlap schedule, dense GEMV at one token) and fp8-auto (the
#      same with FP8 block weights); after each mode the TTFT of 64 queued 128-token prompts, whole (one prefill step) and chunked (2048 tokens per
#      step). Modes that would start after 260 s are skipped (engine_decode.json is rewritten after every row). ~5 min
#   3. the server row: `dsv3 bench serve` at 64 streams (256 requests, 128-token prompts, 128 new tokens, compiled
#      decode, fused_moe auto): the engine alone and through the server in one call, TTFT p50/p99, and both runs'
#      step mix (pure decode vs prefill steps, sequences per step).                                       ~3 min
#   4. the HF peer (static cache + compile, grouped_mm kept: the strongest HF setup) at batch 1 and 32, two
#      processes whose compiles overlap and whose timed sections never do.                              ~2 min
# Expected total ~11 min (each stage has its own timeout: 150 + 330 + 240 + 170 s at most).
# Usage (repo root): bash benchmarks/gpu_decode.sh       CPU dry run: DRY_RUN=1 bash benchmarks/gpu_decode.sh
#   SKIP_TESTS=1 skips stage 1, SKIP_SERVE=1 stage 3, SKIP_PEER=1 stage 4 (the peer's numbers do not change between runs of the engine); SERVE_DELAYS="0 4"
#   runs stage 3 once per admission delay (EngineConfig.admission_delay: arrivals prefilled together).
set -u
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 OUT=${OUT:-out}
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "[gpu_decode $(( $(date +%s) - start )) s] $*" | tee -a "$OUT/stages.txt"; }
if [ "${DRY_RUN:-0}" = 1 ]; then     # CPU: the same commands on the tiny config, GPU tests skipped
  BENCH=(--tiny --device cpu --batches 1,2 --tokens 4 --modes graphs,fused,fp8-fused --ttft-batch 4 --prompt 16)
  SERVE=(--config tiny --device cpu --concurrency 4 --requests 8 --prompt 16 --tokens 8)
  PEER=(--small --layers 2 --new 4 --phases batched_mm --attempts static_eager)
  PEERS_B="1"
else
  nvidia-smi --query-gpu=name,memory.used,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  BENCH=(--batches 1,32,64 --tokens 64 --modes overlap,fp8-auto --deadline-s 260)
  SERVE=(--config lite --concurrency 64 --requests 256 --prompt 128 --tokens 128 --compile-decode --fused-moe auto)
  PEER=(--layers 27 --new 64 --phases grouped_kept)
  PEERS_B="1 32"
fi

stamp "1. CUDA tests"
[ "${SKIP_TESTS:-0}" = 1 ] && stamp "tests skipped (SKIP_TESTS=1: the gate ran them)" || \
timeout 150 python -m pytest -q -p no:cacheprovider -n 8 -m gpu -rs tests/test_kernels_moe_decode.py \
  tests/test_infer_decode_compile.py tests/test_infer_engine.py 2>&1 | tail -25 | tee "$OUT/pytest.txt"

stamp "2. engine decode"
timeout 330 python benchmarks/engine_decode.py "${BENCH[@]}" 2>&1 | grep -v "Warning" | tee "$OUT/engine_decode.txt"

stamp "3. server vs engine at 64 streams"
[ "${SKIP_SERVE:-0}" = 1 ] && SERVE_DELAYS=none
for d in ${SERVE_DELAYS:-0}; do
  [ "$d" = none ] && { stamp "server skipped (SKIP_SERVE=1)"; break; }      # e.g. SERVE_DELAYS="0 4": EngineConfig.admission_delay 0 and 4 (~3 min each)
  timeout 240 python -m dsv3.cli bench serve "${SERVE[@]}" --admission-delay "$d" --json "$OUT/bench_serve_d$d.json" \
    2>&1 | grep -v "Warning" | tail -12 | tee "$OUT/bench_serve_d$d.txt"
done

stamp "4. HF peer"
peer=""
for p in "${HF_STATIC:-}" shared/bench/peers/hf_static.py ../shared/bench/peers/hf_static.py; do
  [ -n "$p" ] && [ -f "$p" ] && peer=$p && break
done
if [ "${SKIP_PEER:-0}" = 1 ]; then
  stamp "HF peer skipped (SKIP_PEER=1)"
elif [ -z "$peer" ]; then
  stamp "HF peer not found (set HF_STATIC=path/to/hf_static.py): skipped"
else
  sync_dir=$(mktemp -d)
  deadline=$(( $(date +%s) + 160 ))
  n=$(echo $PEERS_B | wc -w)
  rank=0
  for b in $PEERS_B; do
    timeout 170 python "$peer" --batch "$b" --rank $rank --nranks "$n" --sync_dir "$sync_dir" --deadline $deadline \
      "${PEER[@]}" > "$OUT/hf_static_b$b.log" 2>&1 &
    rank=$((rank + 1))
  done
  wait
  python "$peer" --report "$OUT" 2>&1 | tee "$OUT/hf_static.txt"
  rm -rf "$sync_dir"
fi
stamp "done"
python - <<'PY'
import json, os
path = os.path.join(os.environ["OUT"], "engine_decode.json")
rows = json.load(open(path)) if os.path.exists(path) else []
print("mode            batch    tok/s   TPOT ms  roofline")
for r in rows:
    if "ttft_p50_s" in r:
        print(f"{r['mode']:14s} {r['batch']:5d}  TTFT p50 {r['ttft_p50_s'] * 1e3:.1f} ms, "
              f"p99 {r['ttft_p99_s'] * 1e3:.1f} ms ({r['budget']} tokens per step, {r['steps']} prefill steps)")
        continue
    if "error" in r:
        print(f"{r['mode']:14s} {r['batch']:5d}  FAILED {r['error'][:100]}")
        continue
    print(f"{r['mode']:14s} {r['batch']:5d} {r['tok_per_s']:9.1f} {r['tpot_ms']:8.2f}  {r['roofline_fraction']:.1%}")
PY
