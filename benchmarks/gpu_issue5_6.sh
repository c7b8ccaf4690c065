#!/usr/bin/env bash
# The GPU measurements issues 5 and 6 still need, in one device call (logs and JSON under $OUT):
#   carry .wheels (fastapi, uvicorn, pydantic, httpx, prometheus_client, jinja2 wheels for cp312: the device image
#   lacks them; `pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .wheels
#   fastapi uvicorn prometheus-client httpx jinja2`), then:  bash benchmarks/gpu_issue5_6.sh [a|b|all]
#   a = kernel tests + the server benchmark, b = FP8 GEMM benchmark + lite-8L FP8 vs BF16; all (default) does both,
#   which can pass the 10-minute limit of one device command: give each part its own call then.
PART=${1:-all}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT" /tmp/pylib
for w in .wheels/*.whl; do python -m zipfile -e "$w" /tmp/pylib; done
export PYTHONPATH=/tmp/pylib:$PWD/src
if [[ $PART == a || $PART == all ]]; then
# 1. kernels on the GPU against their references (the interpreter is not the final word)
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_kernels_fp8_quant.py tests/test_kernels_fp8_gemm.py \
  tests/test_kernels_fp8_weight_gemm.py tests/test_fp8_recipe.py -k "not quarter" -rs 2>&1 | tail -8 | tee "$OUT/pytest.txt"
# 2. issue 5: server vs engine at 64 streams, engine in its own process (the dsv3 serve layout)
timeout 200 python -m dsv3.cli bench serve --config lite --concurrency 64 --requests 256 --prompt 128 --tokens 128 \
  --json "$OUT/serve.json" 2>&1 | tee "$OUT/serve.txt"
fi
if [[ $PART == b || $PART == all ]]; then
# 3. issue 6: FP8 GEMMs, grouped GEMMs, quantisers; then lite-8L training FP8 vs BF16
timeout 200 python benchmarks/fp8_gemm_bench.py 2>&1 | tee "$OUT/fp8_gemm.txt"
for p in bf16 fp8; do
  timeout 150 python benchmarks/train_lite8l.py --dtype bf16 --precision $p --state-dtype bf16 --no-mtp --steps 10 \
    2>&1 | tail -2 | tee -a "$OUT/train_fp8.txt"
done
fi
