#!/usr/bin/env bash
# Issue 4 on the GPU (logs under $OUT).   Usage: bash benchmarks/gpu_issue4.sh [1|2]
#  1: GPU tests; engine decode on `lite` (eager / CUDA graphs / FP8 weights, with a profile of each step); the FP8
#     weight-only GEMMs; the MLA decode kernel (graph-replayed timing).
#  2: GPU tests; engine decode (graphs, FP8); a larger model trained for MTP speculative decoding and measured.
#  3: only the MTP part of 2.
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 OUT=${OUT:-out}
mkdir -p "$OUT"
part=${1:-1}
nvidia-smi --query-gpu=name,memory.used,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
[ "$part" = 3 ] || timeout 170 python -m pytest -q -p no:cacheprovider tests/test_infer_engine.py tests/test_kernels_fp8_weight_gemm.py \
  tests/test_kernels_mla_decode.py tests/test_infer_sampling.py tests/test_moe.py -rs 2>&1 | tail -15 | tee "$OUT/pytest.txt"
if [ "$part" = 1 ]; then
  timeout 200 python benchmarks/engine_decode.py --batches 1,32,64 --tokens 64 --modes eager,graphs,fp8 --profile \
    2>&1 | tee "$OUT/engine_decode.txt"
  timeout 150 python benchmarks/fp8_weight_gemm_bench.py 2>&1 | tee "$OUT/fp8_gemm.txt"
  timeout 60 python benchmarks/mla_decode_bench.py --graph-timing --heads 16 128 --batches 32 64 128 \
    --contexts 8192 32768 2>&1 | tail -16 | tee "$OUT/mla_decode.txt"
else
  [ "$part" = 3 ] || timeout 120 python benchmarks/engine_decode.py --batches 1,32,64 --tokens 64 --modes graphs,fp8 \
    2>&1 | tee "$OUT/engine_decode.txt"
  [ "$part" = 3 ] && timeout 100 python -m pytest -q -p no:cacheprovider tests/test_infer_engine.py -k cuda -rs 2>&1 \
    | tail -5 | tee "$OUT/pytest.txt"
  timeout 300 python -m dsv3.cli train --config configs/small-gpu.toml log.progress=false 2>&1 | tail -30 | tee "$OUT/train.txt"
  cp runs/small-gpu/metrics.jsonl "$OUT/small-gpu-metrics.jsonl"
  timeout 150 python benchmarks/spec_decode_tiny.py runs/small-gpu --device cuda --dtype bf16 --prompts 8 \
    --prompt-len 64 --tokens 96 --k 1,2,3 2>&1 | tee "$OUT/spec.txt"
  timeout 150 python benchmarks/engine_decode.py --batches 1 --tokens 64 --modes graphs --spec-k 1 2>&1 \
    | tee "$OUT/engine_spec.txt"
fi
