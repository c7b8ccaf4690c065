#!/usr/bin/env bash
# The open GPU measurements of issues 15, 16 and 17 as three device calls of <= 9.5 minutes each, in the order they
# matter (benchmarks/RESULTS.md, thirteenth session). Logs under $OUT; each step under its own `timeout`, so a call
# that runs long still returns what finished.
#   bash benchmarks/gpu_next.sh a   the GPU gate (carry .whl; copy ../shared to shared/ first) + the FP8 quantiser
#                                   sweep (rows at K = 1408) + the dense FP8 training GEMMs (cuBLASLt and Triton
#                                   beside bf16) + the AdamW update with FP32 vs split masters
#   bash benchmarks/gpu_next.sh b   MTP speculation on a trained small-gpu, chained vs unchained (issue 16's 1.6x)
#   bash benchmarks/gpu_next.sh c   issue 17 stages 2-3 with split masters (step, MFU, peak memory), then the FP8
#                                   weight GEMV's bandwidth (issue 16, FP8 at batch 1)
#   bash benchmarks/gpu_next.sh d   the gate again, the GEMV (M = 1, 2, 4, 16), AdamW with the trainer's stacked
#                                   expert shapes + torch's fused AdamW, and BF16 vs FP8 decode at batch 1 profiled
#   bash benchmarks/gpu_next.sh f   d's measurements with only the CUDA tests of the files its kernels reach (~5 min)
#   bash benchmarks/gpu_next.sh g   f without AdamW, the gate only the changed kernels' own test files (~3.5 min)
#   bash benchmarks/gpu_next.sh h   g in ~2 minutes (the FP8 kernel files, the GEMV at its default launches)
#   bash benchmarks/gpu_next.sh i   the GEMV timed cold, the server at 64 streams, small-gpu's MTP speculation compiled
#   bash benchmarks/gpu_next.sh j   i's first two (~5 min)
#   bash benchmarks/gpu_next.sh k   the cold GEMV at M = 1, engine shapes, K-slice sweep (~2.5 min)
#   bash benchmarks/gpu_next.sh l   the MLA small-grid change: its CUDA tests, the kernel at B = 1 / 8 / 64, lite batch 1
#   bash benchmarks/gpu_next.sh n   l then k: the next session's first call
#   bash benchmarks/gpu_next.sh o   the gate of the graphs captured at start (infer tests), the GEMV probe timed cold
#   bash benchmarks/gpu_next.sh p   the server at 64 streams, graphs captured at start
#   bash benchmarks/gpu_next.sh q   the GEMV probe under ncu (where a cold FP8 GEMV's time goes)
#   bash benchmarks/gpu_next.sh r   the next session's first call: the gate of this session's kernels and infer changes,
#                                   the GEMV probe, lite batch 1 BF16 vs FP8 profiled
#   bash benchmarks/gpu_next.sh s   the fused MoE at T = 1, 2: tiled launches, the GEMV form and its launch grid
#   bash benchmarks/gpu_next.sh t   the MLA decode's fused cache store: its CUDA tests, lite batch 1 A/B (BF16, FP8)
#   bash benchmarks/gpu_next.sh u   the bf16 GEMV at M = 1, 2, 4, 8 vs cuBLAS (before dense_gemv becomes the default)
#   bash benchmarks/gpu_next.sh v   the next session's first call: the GPU gate (gpu_suite.sh gpu), then t
#   bash benchmarks/gpu_next.sh w   its second: u, then s
#   bash benchmarks/gpu_next.sh x   eighteenth session: the gate of its decode changes (MLA append taken, dense GEMV at
#                                   one row by default, rows_launch defaults), lite batch 1 profiled, the HF peer
#   bash benchmarks/gpu_next.sh y   on an H200 (kind nvidia-h200): issue 16's absolute targets, benchmarks/gpu_decode.sh
#                                   (decode at 1 / 32 / 64 BF16 and FP8 with TTFT, the server at 64 streams, the HF
#                                   peer at 1 and 32), ~11 min: its stages have their own timeouts
#   bash benchmarks/gpu_next.sh z   y without its CUDA tests (the gate ran them), ~8.5 min: one call
#   bash benchmarks/gpu_next.sh A   fresh prefill rows in groups: CUDA engine tests, TTFT at 64 after / before, profiled
#   bash benchmarks/gpu_next.sh B   compiled prefill: its CUDA tests, TTFT at 64 x 128 tokens with / without, profiled
#   bash benchmarks/gpu_next.sh C   the shared pair: its CUDA tests, lite batch 1 on / off profiled, the prefill's top kernels
#   bash benchmarks/gpu_next.sh G   the twenty-first session's gate failure (fp8-compile-fused): per-row routing margins
#   bash benchmarks/gpu_next.sh H   the MLA decode's TMA kernel at 128 heads: its CUDA tests, a sweep beside the gather one
#   bash benchmarks/gpu_next.sh I   the next session's second call: PDL A/B at batch 1, warp specialisation, H's
#                                   sweep, the 2K prefill step profiled
#   bash benchmarks/gpu_next.sh O   after the gate: lite batch 1 with the 8-warp MLA split kernel; ncu on the group-
#                                   column FP8 quantiser and the 16-head MLA split kernel; the seesaw's split counts
#                                   (~7 min)
#   bash benchmarks/gpu_next.sh Q   O (the split form it swept was removed)
#   bash benchmarks/gpu_next.sh R   the group-column quantiser probed and swept again, then the lite-8L step with
#                                   the FP8 expert wgrad vs BF16 wgrad (~8 min)
#   bash benchmarks/gpu_next.sh S   the column quantisers with pipelined loops (stages 1-4) swept, then the seesaw
#                                   MLA body's split counts 1-8 over B = 8-128 x 4K-16K (~8 min)
#   bash benchmarks/gpu_next.sh T   ncu on the seesaw MLA body (128 heads) and on the W^T rows quantiser (~4 min)
#   bash benchmarks/gpu_next.sh U   train.cuda_graphs: its CUDA tests, lite-8L's full recipe without / with (~6 min)
#   bash benchmarks/gpu_next.sh V   after the gate: U's A/B, the column-quantiser probe (~7 min)
#   bash benchmarks/gpu_next.sh W   the changed files' CUDA tests (a short gate), then U's A/B (~8 min)
#   bash benchmarks/gpu_next.sh X   U's A/B on configs/small-gpu.toml (~4 min)
#   bash benchmarks/gpu_next.sh Y   the column quantisers' looping grid: CUDA bit tests, W^T and group-column sweeps
#                                   (~6 min)
#   bash benchmarks/gpu_next.sh Z   the 16-head gather MLA kernel's launch grid at every B x context of lite's decode
#                                   (1-64 x 256-16K, CUDA-graph replays) beside the default launch (~6 min)
#   bash benchmarks/gpu_next.sh F   issue 17: lite-8L's full recipe (configs/lite-8L.toml, as `dsv3 train` runs it)
#                                   profiled by op category, the GPU's idle time included (~4 min)
#   bash benchmarks/gpu_next.sh P   the column quantisers without a reduction per tile: CUDA bit tests, sweeps (~6 min)
#                                   beside the replay's errors, then the file's CUDA cases (SHORT=1: that case only)
#   bash benchmarks/gpu_next.sh e   FP8 (block, row-fp8-wgrad) vs BF16 loss over 300 steps beside BF16 from two more
#                                   seeds (the comparison's noise floor); the server row is in j
set -u
PART=${1:-}
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 OUT=${OUT:-out}
mkdir -p "$OUT"
install_wheels() {   # the carried .whl (the device image has no network)
  compgen -G ".whl/*.whl" > /dev/null && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
}
mla_ncu() {   # mla_ncu FILE KERNEL_REGEX B H: ncu (sections $S) on the third MLA decode launch, B x 8K tokens, H heads
  cat > /tmp/mla_ncu.py <<'PY'
import sys
import torch
from mla_gluon_probe import ragged
from dsv3.kernels import mla_decode_triton
case = ragged([8192] * int(sys.argv[1]), int(sys.argv[2]), seed=0, nan_tail=False)
for _ in range(3):
    mla_decode_triton(*case)
torch.cuda.synchronize()
PY
  PYTHONPATH=$PYTHONPATH:benchmarks timeout 120 ncu --clock-control none -k "regex:$2" --launch-skip 2 --launch-count 1 \
    $S python /tmp/mla_ncu.py "$3" "$4" > "$OUT/$1" 2>&1
}
case $PART in
  a)
    bash benchmarks/gpu_suite.sh gpu
    rm -f "$OUT/junit-gpu.xml"
    timeout 100 python benchmarks/fp8_quant_sweep.py > "$OUT/quant_sweep.txt" 2>&1; tail -30 "$OUT/quant_sweep.txt"
    timeout 130 python benchmarks/fp8_gemm_bench.py --training > "$OUT/dense.txt" 2>&1; grep -c "'layer'" "$OUT/dense.txt"
    timeout 60 python benchmarks/adamw_bench.py 2>&1 | tee "$OUT/adamw.txt" ;;
  b)
    bash benchmarks/gpu_spec.sh ;;
  c)
    MASTER=split STAGES="2 3" LIMIT=330 bash benchmarks/issue17_gpu.sh
    timeout 200 python benchmarks/fp8_weight_gemm_bench.py --only gemv 2>&1 | grep -v Warning | tee "$OUT/gemv.txt" ;;
  d)    # fourteenth session: the gate after the GEMV / dispatch / quantiser changes, then their measurements
    bash benchmarks/gpu_suite.sh gpu
    rm -f "$OUT/junit-gpu.xml"
    timeout 120 python benchmarks/fp8_weight_gemm_bench.py --only gemv 2>&1 | grep -v Warning | tee "$OUT/gemv.txt"
    timeout 60 python benchmarks/adamw_bench.py 2>&1 | tee "$OUT/adamw.txt"
    timeout 150 python benchmarks/engine_decode.py --batches 1 --tokens 64 --modes overlap,fp8-auto --ttft-batch 0 \
      --profile > "$OUT/engine.txt" 2>&1; grep -v Warn "$OUT/engine.txt" | tail -40 ;;
  e)    # issue 15's loss: the report's block recipe and row-fp8-wgrad beside BF16 from three seeds (the noise floor;
        # fifteenth session: +1.5% paired for row-fp8-wgrad, -0.1% for one reseed; on the CPU every recipe sat in
        # the seeds' noise, so what is left is the GPU's fast FP8 accumulation of the row recipes, or noise)
    timeout 560 python benchmarks/fp8_loss_gpu.py --steps 300 --batch 2 --arms bf16,block,row-fp8-wgrad,bf16@1,bf16@2 \
      2>&1 | grep -v Warning | tail -40 | tee "$OUT/fp8_loss.txt" ;;
  f)    # d in less device time: the CUDA tests of the files this session's kernels reach, then the GEMV and AdamW
    install_wheels
    timeout 170 python -m pytest -q -n 14 -p no:cacheprovider -rfEs tests/test_kernels_fp8_weight_gemm.py \
      tests/test_kernels_fp8_gemm.py tests/test_kernels_fp8_rowwise.py tests/test_kernels_edge.py \
      tests/test_fp8_recipe.py tests/test_infer_fused_proj.py tests/test_fp8_weight_cache.py \
      tests/test_kernels_fp8_grouped_wgrad.py tests/test_fp8_shared_input.py 2>&1 | tail -15 | tee "$OUT/gate.txt"
    timeout 110 python benchmarks/fp8_weight_gemm_bench.py --only gemv 2>&1 | grep -v Warning | tee "$OUT/gemv.txt"
    timeout 50 python benchmarks/adamw_bench.py 2>&1 | tee "$OUT/adamw.txt" ;;
  g)    # f in ~3.5 minutes: the CUDA tests of the changed kernels' own files, then the GEMV
    timeout 100 python -m pytest -q -n 14 -p no:cacheprovider -rfEs tests/test_kernels_fp8_weight_gemm.py \
      tests/test_kernels_fp8_gemm.py tests/test_kernels_fp8_rowwise.py tests/test_kernels_edge.py 2>&1 | tail -8 \
      | tee "$OUT/gate.txt"
    timeout 100 python benchmarks/fp8_weight_gemm_bench.py --only gemv 2>&1 | grep -v Warning | tee "$OUT/gemv.txt" ;;
  h)    # g in ~2 minutes: the three changed kernels' test files, then the GEMV at its default launches only
    timeout 75 python -m pytest -q -n 14 -p no:cacheprovider -rfEs tests/test_kernels_fp8_weight_gemm.py \
      tests/test_kernels_fp8_gemm.py tests/test_kernels_fp8_rowwise.py 2>&1 | tail -6 | tee "$OUT/gate.txt"
    timeout 45 python benchmarks/fp8_weight_gemm_bench.py --only gemv --gemv-sweep none 2>&1 | grep -v Warning \
      | tee "$OUT/gemv.txt" ;;
  i)    # fifteenth session: the GEMV timed cold (the engine's FP8 GEMVs averaged 0.66 TB/s against 1.18 warm), the
        # server row (bench serve's prompts fixed), MTP speculation with the compiled decode layers on small-gpu
    install_wheels
    timeout 150 python benchmarks/fp8_weight_gemm_bench.py --only gemv 2>&1 | grep -v Warning | tee "$OUT/gemv.txt"
    timeout 140 python -m dsv3.cli bench serve --config lite --concurrency 64 --requests 256 --prompt 128 --tokens 128 \
      --compile-decode --fused-moe auto --json "$OUT/bench_serve.json" 2>&1 | grep -v Warn | tail -9
    timeout 190 python -m dsv3.cli train --config configs/small-gpu.toml train.steps=1000 log.progress=false 2>&1 \
      | tail -2 | tee "$OUT/train.txt"
    timeout 100 python benchmarks/spec_decode_tiny.py runs/small-gpu --device cuda --dtype bf16 --prompts 8 --compile \
      --prompt-len 64 --tokens 96 --k 1,2 2>&1 | grep -v Warning | tail -4 | tee "$OUT/spec.txt" ;;
  j)    # i without the small-gpu training (~5 min): the GEMV timed cold, then the server row
    install_wheels
    timeout 150 python benchmarks/fp8_weight_gemm_bench.py --only gemv 2>&1 | grep -v Warning | tee "$OUT/gemv.txt"
    timeout 140 python -m dsv3.cli bench serve --config lite --concurrency 64 --requests 256 --prompt 128 --tokens 128 \
      --compile-decode --fused-moe auto --json "$OUT/bench_serve.json" 2>&1 | grep -v Warn | tail -9 ;;
  k)    # the cold GEMV alone at M = 1 on the fused shapes a lite step runs, K slices 1..8 (~2.5 min)
    timeout 170 python benchmarks/fp8_weight_gemm_bench.py --only gemv --gemv-m 1 --gemv-shapes engine \
      --gemv-sweep split 2>&1 | grep -v Warning | tee "$OUT/gemv.txt" ;;
  l)    # fifteenth session's MLA change (small grids: 64-token tiles and splits, the combine over live splits): its
        # CUDA tests, the kernel at batch 1 / 8 (short and long contexts, the regression check), lite decode at batch 1
    timeout 90 python -m pytest -q -n 8 -p no:cacheprovider -rfEs tests/test_kernels_mla_decode.py tests/test_mla.py \
      tests/test_infer_engine.py 2>&1 | tail -4 | tee "$OUT/gate.txt"
    timeout 150 python benchmarks/mla_decode_bench.py --graph-timing --heads 16 --batches 1 8 64 \
      --contexts 192 8192 32768 2>&1 | grep -v Warn | tail -12
    timeout 150 python benchmarks/engine_decode.py --batches 1 --tokens 64 --modes overlap,fp8-auto --ttft-batch 0 \
      --profile > "$OUT/engine.txt" 2>&1; grep -v Warn "$OUT/engine.txt" | grep -A7 "graph replay" | head -20 ;;
  n)    # the sixteenth session's first call (~9 min): l (the MLA change's tests and rows, lite batch 1 profiled), then k
    bash "$0" l
    bash "$0" k ;;
  o)    # sixteenth session: the gate for the graphs captured at start (infer/), then the GEMV probe timed cold
    install_wheels
    timeout 150 python -m pytest -q -n 14 -p no:cacheprovider -rfEs tests/test_infer_engine.py \
      tests/test_infer_spec.py tests/test_infer_overlap.py tests/test_infer_decode_compile.py 2>&1 | tail -6 \
      | tee "$OUT/gate.txt"
    timeout 120 python benchmarks/gemv_probe.py 2>&1 | grep -v Warn | tee "$OUT/gemv_probe.txt" ;;
  p)    # the server at 64 streams with every graph captured at start (the lazy captures stalled it: 66%)
    install_wheels
    timeout 280 python -m dsv3.cli bench serve --config lite --concurrency 64 --requests 256 --prompt 128 --tokens 128 \
      --compile-decode --fused-moe auto --json "$OUT/bench_serve.json" 2>&1 | grep -v Warn | tail -11 ;;
  q)    # the GEMV probe under ncu: one cold call per variant, counters of latency / occupancy / issue
    timeout 300 ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats -k regex:"_fp8_gemv_kernel|_wide_kernel|gemv|nvjet" --csv --page details \
      python benchmarks/gemv_probe.py --ncu > "$OUT/gemv_ncu.csv" 2> "$OUT/gemv_ncu.err"; tail -3 "$OUT/gemv_ncu.err"
    grep -A40 "ncu order" "$OUT/gemv_ncu.csv" | head -40 ;;
  r)    # the seventeenth session's first call (~8 min): the gate of the sixteenth session's kernels (fp8_gemv's wide
        # loads, the fused MoE's GEMV form at batch 1) and infer changes (graphs captured at start), then the GEMV
        # probe (the library's default is now the wide form) and lite batch 1, BF16 vs FP8, profiled
    install_wheels
    timeout 220 python -m pytest -q -n 14 -p no:cacheprovider -rfEs tests/test_kernels_fp8_weight_gemm.py \
      tests/test_kernels_gemv.py tests/test_kernels_moe_decode.py tests/test_kernels_edge.py tests/test_infer_engine.py \
      tests/test_infer_decode_compile.py tests/test_infer_fused_proj.py 2>&1 | tail -6 | tee "$OUT/gate.txt"
    timeout 90 python benchmarks/gemv_probe.py 2>&1 | grep -v Warn | grep -E "lib|bf16" | tee "$OUT/gemv_probe.txt"
    timeout 190 python benchmarks/engine_decode.py --batches 1 --tokens 64 --modes overlap,nogemv,fp8-auto --ttft-batch 0 \
      --profile > "$OUT/engine.txt" 2>&1; grep -v Warn "$OUT/engine.txt" | grep -E "tok/s|graph replay|ms .*x " \
      | head -30 ;;
  s)    # the fused MoE at T = 1, 2: the tiled stages (the table's launch, the best of their grid) and the GEMV form the
        # engine takes there (whole call, then its steps 2-3 over rows_launch's grid: strips, loads, gate-up paired)
    timeout 230 python benchmarks/moe_decode_sweep.py --tokens 1,2 --deadline-s 190 --warm-s 40 2>&1 \
      | grep -v Warn | grep -E "T= *[0-9]+ hit|GEMV form|  best " ;;
  t)    # seventeenth session: the MLA decode's fused cache store (append, second form: the tiles' loads feed tl.dot
        # directly; the first form's select cost ~11 us per layer). Its CUDA tests and the engine's graph tests, then
        # lite batch 1 A/B in one call: main (cache write, then decode) vs the model passing `append` (54 index_copy
        # launches fewer per step). If faster, the model's pure-decode branch passes append (src/dsv3/model/mla.py)
    timeout 120 python -m pytest -q -n 8 -p no:cacheprovider -rfEs tests/test_kernels_mla_decode.py \
      tests/test_infer_engine.py tests/test_infer_overlap.py -k "cuda" 2>&1 | tail -4 | tee "$OUT/gate.txt"
    timeout 100 python benchmarks/engine_decode.py --batches 1 --tokens 64 --modes overlap,fp8-auto --ttft-batch 0 \
      2>&1 | grep -E "tok/s" | sed 's/^/write+decode  /'
    cp src/dsv3/model/mla.py /tmp/mla_main.py
    python - <<'PY'
p = "src/dsv3/model/mla.py"; s = open(p).read()
a = ("        ctx.cache.write(ctx.layer, ctx.slots, c_kv, k_pe)\n        if ctx.decode_rows is None:"
     "               # a pure decode step: every token, in order\n"
     "            return self._attend_absorbed_paged(q_nope, q_pe, ctx)\n")
b = ("        if ctx.decode_rows is None:\n"
     "            return self._attend_absorbed_paged(q_nope, q_pe, ctx, append=(ctx.slots, c_kv, k_pe))\n"
     "        ctx.cache.write(ctx.layer, ctx.slots, c_kv, k_pe)\n")
assert a in s, "mla.py changed: update gpu_next.sh t"
open(p, "w").write(s.replace(a, b))
PY
    timeout 60 python -m pytest -q -n 8 -p no:cacheprovider tests/test_infer_engine.py tests/test_infer_overlap.py \
      -k "cuda" 2>&1 | tail -1 | sed 's/^/append engine tests: /'
    timeout 100 python benchmarks/engine_decode.py --batches 1 --tokens 64 --modes overlap,fp8-auto --ttft-batch 0 \
      2>&1 | grep -E "tok/s" | sed 's/^/append        /'
    cp /tmp/mla_main.py src/dsv3/model/mla.py ;;
  u)    # before EngineConfig.dense_gemv is made the default: the bf16 GEMV at M = 1, 2, 4, 8 beside cuBLAS (M = 2 is
        # an MTP verify step at batch 1), cold, engine shapes (~2 min)
    timeout 150 python benchmarks/gemv_probe.py --m 1,2,4,8 2>&1 | grep -v Warn | grep -E "lib default|bf16" \
      | tee "$OUT/gemv_probe_m.txt" ;;
  v)    # the eighteenth session's first call (~8 min): the GPU gate of the seventeenth session's kernel changes
        # (fp8_gemv's _row_strips, moe_rows' paired loads and launch fields, mla_decode's append), then t's A/B
    timeout 300 bash benchmarks/gpu_suite.sh gpu > /dev/null 2>&1; tail -3 "$OUT/suite-gpu.log"
    bash "$0" t ;;
  w)    # its second call (~6 min): u (the bf16 GEMV at M = 1..8), then s (the fused MoE's GEMV form and its grid)
    bash "$0" u
    bash "$0" s ;;
  x)    # eighteenth session (~9 min): the CUDA tests of the files its decode changes reach, lite batch 1 (overlap =
        # the new defaults, nogemv = cuBLAS projections, FP8) profiled, then the strongest HF setup at batch 1
    install_wheels
    timeout 330 python -m pytest -q -n 14 -p no:cacheprovider -rfEs tests/test_kernels_gemv.py \
      tests/test_kernels_moe_decode.py tests/test_kernels_mla_decode.py tests/test_kernels_edge.py \
      tests/test_infer_fused_proj.py tests/test_infer_engine.py tests/test_infer_overlap.py tests/test_infer_spec.py \
      tests/test_infer_decode_compile.py 2>&1 | tail -6 | tee "$OUT/gate.txt"
    timeout 190 python benchmarks/engine_decode.py --batches 1 --tokens 64 --modes overlap,nogemv,fp8-auto \
      --ttft-batch 0 --profile > "$OUT/engine.txt" 2>&1; grep -v Warn "$OUT/engine.txt" \
      | grep -E "tok/s|graph replay|kernels .* ms" | head -40
    timeout 200 python shared/bench/peers/hf_static.py --batch 1 --phases grouped_kept > "$OUT/hf.txt" 2>&1
    grep -v Warn "$OUT/hf.txt" | tail -6 ;;
  y)    # issue 16's targets are tok/s on an H200 (3,070 / 6,140 at 32 / 64, 2x HF at 1 and 1.8x at 32): the H100
        # rows give shares of its own roofline only. Stage 3 (server) skipped to fit one call: measured on the H100
    install_wheels
    SKIP_SERVE=1 SKIP_TESTS=${SKIP_TESTS:-0} bash benchmarks/gpu_decode.sh ;;
  z)    # nineteenth session, second call (~8.5 min): y after the gate (gpu_suite.sh gpu ran the CUDA tests)
    SKIP_TESTS=1 bash "$0" y ;;
  A)    # nineteenth session: fresh prefill rows attended in groups (dsv3.model.context.PrefillGroup; the per-row loop
        # was ~15 launches per row and layer). The CUDA tests of the engine files, then TTFT of 64 x 128-token prompts
        # after / before (carry out/prefill.patch: the change, reversed onto a copy of src for the before), profiled
    install_wheels
    timeout 200 python -m pytest -q -n 14 -p no:cacheprovider -m gpu -rfEs tests/test_infer_engine.py \
      tests/test_infer_sampling.py tests/test_infer_context.py tests/test_infer_spec.py tests/test_infer_decode_compile.py 2>&1 | tail -5 \
      | tee "$OUT/gate.txt"
    TT=(--batches 1 --tokens 8 --modes overlap,fp8-auto --ttft-batch 64 --ttft-profile)
    timeout 150 python benchmarks/engine_decode.py "${TT[@]}" > "$OUT/ttft_after.txt" 2>&1
    grep -E "TTFT of|prefill step|kernels .* ms$" "$OUT/ttft_after.txt" | sed 's/^/after  /'
    rm -rf /tmp/old && mkdir -p /tmp/old && cp -r src /tmp/old/ && patch -s -d /tmp/old -p1 -R < out/prefill.patch \
      && OUT=$OUT/before PYTHONPATH=/tmp/old/src:${PYTHONPATH#*:} timeout 150 python benchmarks/engine_decode.py \
      "${TT[@]}" > "$OUT/ttft_before.txt" 2>&1
    grep -E "TTFT of|prefill step|kernels .* ms$" "$OUT/ttft_before.txt" | sed 's/^/before /' ;;
  B)    # twentieth session: the blocks of prefill steps through torch.compile (EngineConfig.compile_prefill; eager,
        # 2,736 small kernels were 64 of a prefill step's 148 ms at 64 x 128 tokens). Its CUDA tests and the compiled
        # decode's (SKIP_TESTS=1: not, after the gate ran them), then TTFT at 64 prompts and one profiled prefill
        # step, overlap (eager prefill) vs cprefill
    install_wheels
    [ "${SKIP_TESTS:-0}" = 1 ] || timeout 200 python -m pytest -q -n 14 -p no:cacheprovider -m gpu -rfEs tests/test_infer_prefill_compile.py \
      tests/test_infer_decode_compile.py tests/test_infer_engine.py 2>&1 | tail -4 | tee "$OUT/gate.txt"
    timeout 330 python benchmarks/engine_decode.py --batches 1 --tokens 8 --modes overlap,cprefill --ttft-batch 64 \
      --ttft-profile > "$OUT/ttft.txt" 2>&1
    grep -v Warn "$OUT/ttft.txt" | grep -E "TTFT|prefill step|kernels .* ms$|FAILED" | head -40 ;;
  C)    # nineteenth session: the shared experts as one more pair of the fused MoE's GEMV form (EngineConfig.shared_pair).
        # The CUDA tests of the files it reaches, lite batch 1 A/B profiled (overlap = on, noshared = off; BF16 and
        # FP8), then one prefill step of 64 x 128 tokens profiled with its top kernels
    install_wheels
    timeout 200 python -m pytest -q -n 14 -p no:cacheprovider -m gpu -rfEs tests/test_kernels_moe_decode.py \
      tests/test_infer_decode_compile.py tests/test_infer_engine.py tests/test_infer_fused_proj.py 2>&1 | tail -4 \
      | tee "$OUT/gate.txt"
    timeout 240 python benchmarks/engine_decode.py --batches 1 --tokens 64 --modes overlap,noshared,fp8-overlap,fp8-noshared \
      --ttft-batch 0 --profile > "$OUT/engine.txt" 2>&1
    grep -v Warn "$OUT/engine.txt" | grep -E "tok/s|graph replay|kernels .* ms" | head -40
    OUT=$OUT/ttft timeout 100 python benchmarks/engine_decode.py --batches 1 --tokens 8 --modes overlap --ttft-batch 64 \
      --ttft-budgets 0 --ttft-profile > "$OUT/ttft.txt" 2>&1; grep -A30 "prefill step" "$OUT/ttft.txt" ;;
  D)    # twentieth session: bf16 projections of 2..64-row steps through the tiled Triton kernel with split-K
        # (EngineConfig.skinny_gemm, off; cuBLAS read lite's at ~0.7 TB/s at batch 32). Its CUDA tests (SKIP_TESTS=1:
        # not, after the gate), the per-shape probe (cold, cuBLAS beside it, a launch sweep), then lite at 32 / 64,
        # overlap vs skinny (issue 16's 1.8x at 32 is 2,807 tok/s on an H100 against 1,559.6 for the peer)
    install_wheels
    [ "${SKIP_TESTS:-0}" = 1 ] || timeout 120 python -m pytest -q -n 14 -p no:cacheprovider -m gpu -rfEs \
      tests/test_kernels_gemv.py 2>&1 | tail -4 | tee "$OUT/gate.txt"
    timeout 200 python benchmarks/skinny_probe.py --m 8,32,64 > "$OUT/probe.txt" 2>&1; grep -v "^  " "$OUT/probe.txt"
    timeout 240 python benchmarks/engine_decode.py --batches 32,64 --tokens 64 --modes overlap,skinny --ttft-batch 0 \
      > "$OUT/engine.txt" 2>&1
    grep -v Warn "$OUT/engine.txt" | grep -E "tok/s|FAILED|Error" | head -20 ;;
  E)    # twentieth session: the router's fp32 logits at batch 1 in one GEMV launch (kernels.gemv.gate_logits) vs the
        # upcasts + cuBLAS dot + reduce (DSV3_GATE_GEMV=reference), lite batch 1 BF16 and FP8 (RUNS="ref new ref2
        # new2": each side twice, ~8 minutes; default once each)
    install_wheels
    for run in ${RUNS:-ref new}; do
      env=(); [[ $run == ref* ]] && env=(DSV3_GATE_GEMV=reference)
      env "${env[@]}" timeout 140 python benchmarks/engine_decode.py --batches 1 --tokens 64 --modes overlap,fp8-overlap \
        --ttft-batch 0 > "$OUT/gate_$run.txt" 2>&1
      echo "== $run"; grep -v Warn "$OUT/gate_$run.txt" | grep -E "tok/s|Error" | head -4
    done ;;
  G)    # twenty-second session: the twenty-first's gate failure. Per row of the test's flow, the eager step's routing
        # margin and the replay's largest error (benchmarks/decode_routing_ties.py: a row off with a margin below
        # ~1e-3 is a routing tie, not a kernel bug), then every CUDA case of the file once, rows at a tie held out
    # SHORT=1: the failing case only (~2 minutes)
    cases=fp8-compile,fp8,compile; T=tests/test_infer_decode_compile.py
    [ "${SHORT:-0}" = 1 ] && cases=fp8-compile && T="$T::test_cuda_fast_decode_matches_plain_decode[fp8-compile-fused]"
    timeout 200 python benchmarks/decode_routing_ties.py --cases $cases 2>&1 | grep -E "fp8=|Error"
    timeout 200 python -m pytest -q -p no:cacheprovider -p no:logging --tb=short -m gpu -rfEs "$T" 2>&1 \
      | grep -E "^E  .*(Mismatch|Greatest|margin|rows|compares)|passed|failed|FAILED" ;;
  H)    # twenty-third session: the MLA decode's TMA kernel at V3's 128 heads (dsv3.kernels.mla_decode_tma, tma=True):
        # its CUDA tests, then a sweep against the gather kernel at B = 64 x 16K, the best of each in the table at
        # B = 64 and 128, 8K and 32K (issue 16: >= 60% of bf16 tensor peak at 128 heads; the gather kernel ~20%)
    [ "${SKIP_TESTS:-0}" = 1 ] || timeout 150 python -m pytest -q -n 8 -p no:cacheprovider -p no:logging -m gpu -rfEs \
      --tb=short tests/test_kernels_mla_decode.py 2>&1 | tail -6 | tee "$OUT/gate.txt"
    timeout ${MLA_S:-330} python benchmarks/mla_decode_bench.py --sweep --graph-timing --heads 128 --batches 64 128 \
      --contexts 8192 32768 --sweep-block-h 64 --sweep-block-n ${MLA_BN:-32 64} --sweep-warps 8 \
      --sweep-stages ${MLA_STAGES:-1 2 3} --sweep-tma 0 1 > "$OUT/mla.txt" 2>&1
    grep -E "sweep|best|^ *128 |failed|Error" "$OUT/mla.txt" | head -40 ;;
  I)    # twenty-fourth session (~8 min, after the gate): programmatic dependent launch (EngineConfig.pdl) at batch 1,
        # BF16 and FP8, A/B in one process; warp specialisation on the TMA MLA kernel and the sweep at 128 heads;
        # the first step of a chunked prefill (2,048 tokens) profiled, eager vs compiled (is a step the host's?)
    [ "${SKIP_TESTS:-0}" = 1 ] || timeout 150 python -m pytest -q -n 8 -p no:cacheprovider -p no:logging -m gpu \
      -rfEs --tb=short tests/test_kernels_mla_decode.py tests/test_infer_pdl.py 2>&1 | tail -4 | tee "$OUT/gate.txt"
    # one process per side: the compiled layers are made once per process, with inductor's PDL only if compiled
    # inside a PDL engine's capture (dsv3.infer.graphs._launch_mode)
    for m in overlap,fp8-overlap pdl,fp8-pdl; do
      OUT=$OUT/${m%%,*} timeout 120 python benchmarks/engine_decode.py --batches 1 --tokens 64 --modes $m \
        --ttft-batch 0 > "$OUT/pdl_${m%%,*}.txt" 2>&1; grep -v Warn "$OUT/pdl_${m%%,*}.txt" | grep -E "tok/s|Error" | head -4
    done
    timeout 120 python benchmarks/mla_ws_probe.py 2>&1 | grep -E "warp_specialize|Error" | tee "$OUT/ws.txt"
    SKIP_TESTS=1 MLA_S=150 MLA_BN=64 MLA_STAGES=2 bash "$0" H
    timeout 200 python benchmarks/engine_decode.py --batches 1 --tokens 8 --modes overlap,cprefill --ttft-batch 64 \
      --ttft-budgets 2048 --ttft-profile --ttft-profile-budget 2048 > "$OUT/ttft2048.txt" 2>&1
    grep -v Warn "$OUT/ttft2048.txt" | grep -E "TTFT|prefill step|kernels .* ms$|Error" | head -30 ;;
  J)    # twenty-fourth session (~5 min): the Gluon MLA decode body (dsv3.kernels.mla_decode_gluon, gluon=True) at
        # 64 / 128 heads: its CUDA tests beside the TMA body's, then mla_gluon_probe.py (every config checked against
        # the reference first, then timed against the TMA body at B = 64 x 8K / 16K / 32K and 128 x 8K)
    timeout 200 python -m pytest -q -n 4 -p no:cacheprovider -p no:logging -rfEs --tb=short \
      tests/test_kernels_mla_decode.py -k many_heads_bodies 2>&1 | tail -12 | tee "$OUT/gate.txt"
    timeout 300 python benchmarks/mla_gluon_probe.py 2>&1 | tee "$OUT/gluon.txt" | tail -30 ;;
  K|P)  # twenty-fourth session (~6 min): the one-pass FP8 quantisers (issue 15: W^T rows 47-50% and group columns
        # 21-37% of copy; one_pass_m holds a column strip in registers, read once): their CUDA bit-equality tests
        # with the new launch shapes, then the sweeps (set _T_ONE_M in kernels/fp8_rowwise.py and _ONE_M /
        # _BLOCK_K / _WARPS in kernels/fp8_grouped_wgrad.py from the best exact rows). P, twenty-sixth session: the
        # same after the two-pass forms' amax lost its cross-warp reduction per tile (H100 before: W^T rows 47-50%,
        # group columns 22-41% of copy, the FP8 expert wgrad 0.97-1.25x BF16)
    timeout 200 python -m pytest -q -n 4 -p no:cacheprovider -p no:logging -rfEs --tb=short \
      tests/test_kernels_fp8_rowwise.py tests/test_kernels_fp8_grouped_wgrad.py 2>&1 | tail -8 | tee "$OUT/gate.txt"
    timeout 150 python benchmarks/fp8_quant_sweep.py > "$OUT/quant_sweep.txt" 2>&1
    grep -E "W\^T|failed" "$OUT/quant_sweep.txt" | head -50
    timeout 150 python benchmarks/fp8_grouped_bench.py > "$OUT/grouped.txt" 2>&1
    grep -E "group columns|wgrad|failed" "$OUT/grouped.txt" | head -40 ;;
  L)    # twenty-fifth session (~3 min): where the 128-head MLA decode's time goes (issue 16's 60% of peak; the
        # Gluon body at 29-31%): is the second head group's tile served from L2 (--sharing: 64 heads at twice the
        # batch, same CTAs and FLOPs, no sharing), and ncu's speed-of-light, memory, occupancy and warp-stall
        # sections for one launch of the Gluon and TMA bodies at B = 64 x 16K
    F='^ *%|^ *tt\.|^ *ttg|^ *scf|^ *arith|^ *}|^#|ttng'
    timeout 90 python benchmarks/mla_gluon_probe.py --sharing --bodies gluon-bn64-s2,tma 2>&1 | grep -Ev "$F" \
      | tail -8 | tee "$OUT/sharing.txt"
    for body in gluon-bn64-s2 tma; do
      timeout 120 ncu --clock-control none -k regex:mla_decode --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --section ComputeWorkloadAnalysis python benchmarks/mla_gluon_probe.py --launch $body \
        > "$OUT/ncu-$body.txt" 2>&1
      grep -E "Duration|Throughput|Hit Rate|DRAM|Pipe|Stall|Occupancy|Registers|Warp Cycles|Issued" \
        "$OUT/ncu-$body.txt" | head -40
    done ;;
  N)    # twenty-fifth session's owed measurements in one call after the gate (~8 min), each under its own timeout:
        # the grad-norm kernel's vector loads (3.71 ms / 2.72 TB/s on the H200 before), the group-column
        # quantiser's vector stores (21-37% of copy before; the expert wgrad 0.94-1.09x BF16 at lite width), the
        # seesaw body's check and timing (always partials now), then L's sharing probe and ncu on the Gluon body
    timeout 60 python benchmarks/grad_norm_bench.py 2>&1 | tail -6 | tee "$OUT/grad_norm.txt"
    timeout 150 python -m pytest -q -n 4 -p no:cacheprovider -p no:logging -rfEs --tb=short \
      tests/test_kernels_fp8_grouped_wgrad.py tests/test_kernels_grad_norm.py 2>&1 | tail -4 | tee "$OUT/gate.txt"
    timeout 170 python benchmarks/fp8_grouped_bench.py > "$OUT/grouped.txt" 2>&1
    grep -E "group columns|wgrad|failed" "$OUT/grouped.txt" | head -40
    F='^ *%|^ *tt\.|^ *ttg|^ *scf|^ *arith|^ *}|^#|ttng'
    timeout 60 python benchmarks/mla_gluon_probe.py --bodies seesaw 2>&1 | grep -Ev "$F" | tail -8 \
      | tee "$OUT/seesaw.txt"
    timeout 45 python benchmarks/mla_gluon_probe.py --sharing --bodies gluon-bn64-s2 2>&1 | grep -Ev "$F" \
      | tail -4 | tee "$OUT/sharing.txt"
    timeout 60 ncu --clock-control none -k regex:mla_decode --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      python benchmarks/mla_gluon_probe.py --launch gluon-bn64-s2 > "$OUT/ncu-gluon.txt" 2>&1
    grep -E "Duration|Throughput|Hit Rate|Stall|Warp Cycles" "$OUT/ncu-gluon.txt" | head -30 ;;
  O)    # twenty-sixth session (~7 min, after the gate): lite at batch 1 with the 8-warp MLA split kernel (H100,
        # twenty-fourth session, PDL: BF16 344.2, FP8 422.1 tok/s); then ncu on the two kernels furthest from their
        # targets: the group-column FP8 quantiser (issue 15: 22-41% of copy; latency or bandwidth?) and the 16-head
        # MLA split kernel at B = 32 x 8K (issue 16: 85% of copy; met only at 64 x 32K)
    timeout 150 python benchmarks/engine_decode.py --batches 1 --tokens 64 --modes overlap,fp8-overlap \
      --ttft-batch 0 > "$OUT/batch1.txt" 2>&1; grep -v Warn "$OUT/batch1.txt" | grep -E "tok/s|Error" | head -4
    S='--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy
      --section SchedulerStats --section LaunchStats'
    cat > /tmp/cols.py <<'PY'
import torch
from dsv3.kernels.fp8_grouped_wgrad import quantize_cols_grouped_triton
x = torch.randn(49152, 2048, device="cuda", dtype=torch.bfloat16)
offs = torch.arange(1, 65, device="cuda", dtype=torch.int32) * 768
for _ in range(3):
    quantize_cols_grouped_triton(x, offs)
torch.cuda.synchronize()
PY
    timeout 90 ncu --clock-control none -k regex:_cols_grouped --launch-skip 2 --launch-count 1 $S python /tmp/cols.py \
      > "$OUT/ncu-cols.txt" 2>&1
    mla_ncu ncu-mla16.txt split_kernel 32 16
    K='^  [_a-z]|Duration|Throughput|Hit Rate|Warp Cycles|Registers|Occupancy|Eligible|Issued Warp|Block Limit'
    grep -hE "$K" "$OUT/ncu-cols.txt" "$OUT/ncu-mla16.txt" | head -60
    # the seesaw body's split counts (twenty-eighth session, H200: the _OVERLAP hand-over lost by 2-8% and went;
    # at B = 64 x 8K one split was 7% faster than the default), checked against the reference first (NaN tails,
    # 1 / default / 7 splits), then timed as CUDA-graph replays
    cat > /tmp/seesaw_splits.py <<'PY'
from mla_gluon_probe import ragged
from mla_small_batch import bench
from dsv3.kernels import mla_decode_reference, mla_decode_triton
case = ragged([1, 64, 65, 1000, 2048, 3001, 0, 127], 128, seed=1)
ref = mla_decode_reference(*case).float()
errs = [(mla_decode_triton(*case, num_splits=ns).float() - ref).abs().max().item() for ns in (None, 1, 7)]
print(f"check: max err over splits None / 1 / 7 = {max(errs):.2e}", flush=True)
for B, ctx in ((64, 4096), (64, 8192), (64, 16384), (64, 32768), (16, 4096), (32, 8192)):
    c = ragged([ctx] * B, 128, seed=2, nan_tail=False)
    row = [f"S={ns}: {bench(lambda: mla_decode_triton(*c, num_splits=ns)):7.1f}" for ns in (None, 1, 2, 3, 6)]
    print(f"B={B} ctx={ctx} us " + "  ".join(row), flush=True)
PY
    PYTHONPATH=$PYTHONPATH:benchmarks timeout 150 python /tmp/seesaw_splits.py 2>&1 | grep -E "check|^B=|Error" \
      | tee "$OUT/seesaw_splits.txt" ;;
  Q)    # twenty-ninth session: the group-column quantiser's split form swept and under ncu, then O. The split form
        # lost and was removed (thirtieth session, RESULTS.md); what is left of Q is O
    bash "$0" O ;;
  R)    # thirtieth session (~8 min, after the gate): has the looped group-column quantiser, now free of its ten
        # small torch ops a call, moved to ncu's kernel time (probe and sweep), and does the FP8 expert wgrad now pay
        # in the lite-8L step (twelfth-session H200: 486.0 vs 447.4 ms, 0.92x, five column quantisations a layer)?
    timeout 100 python benchmarks/cols_probe.py 2>&1 | grep -v Warn | tee "$OUT/cols_probe.txt"
    timeout 200 python benchmarks/fp8_grouped_bench.py > "$OUT/grouped.txt" 2>&1
    grep -E "group columns|wgrad|failed|Error" "$OUT/grouped.txt" | head -60
    timeout 250 python benchmarks/train_lite8l.py --compare --arms row-exponly,row-exponly-w8 --compile \
      --dtype bf16-params --state-dtype bf16 --no-mtp --steps 5 --warmup 2 > "$OUT/wgrad_step.txt" 2>&1
    grep -v Warn "$OUT/wgrad_step.txt" | tail -12 ;;
  S)    # thirtieth session (~8 min, after the gate, which runs the pipelined quantisers' CUDA bit tests): the two-pass
        # column quantisers (group columns, W^T rows) with their loops software-pipelined (stages 2-4: cp.async
        # through shared memory; ncu read them latency-bound) swept beside stages 1, then the seesaw MLA body's split
        # counts 1-8 over B = 8-128 x 4K-16K (to fit a rule: the default lost 10-14% at three shapes)
    timeout 60 python benchmarks/cols_probe.py 2>&1 | grep -v Warn | tee "$OUT/cols_probe.txt"
    timeout 120 python benchmarks/fp8_quant_sweep.py > "$OUT/quant_sweep.txt" 2>&1
    grep -E "W\^T rows|failed|Error" "$OUT/quant_sweep.txt" | head -50
    timeout 150 python benchmarks/fp8_grouped_bench.py > "$OUT/grouped.txt" 2>&1
    grep -E "group columns|wgrad with|failed|Error" "$OUT/grouped.txt" | head -80
    PYTHONPATH=$PYTHONPATH:benchmarks timeout 200 python benchmarks/mla_seesaw_splits.py 2>&1 | grep -v Warn \
      | tee "$OUT/seesaw_splits.txt" ;;
  T)    # thirty-first session (~4 min; after S, whose stages it reads): ncu on the two kernels whose next step the
        # numbers alone do not say. The seesaw MLA body at 128 heads (issue 16: 36.5-38.3% of bf16 peak at B = 64 x
        # 8K-32K, target 60%; never under ncu: is a warpgroup waiting on its TMA loads, on the other's barrier or on
        # wgmma?) and the W^T rows quantiser (issue 15: 55-56% of copy), its default (64 x 64, 3 deep) beside the
        # 128 x 32 unpipelined launch it replaced, with the stall reasons
    S='--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy
      --section SchedulerStats --section ComputeWorkloadAnalysis'
    mla_ncu ncu-seesaw.txt seesaw 64 128
    cat > /tmp/wt.py <<'PY'
import torch
from dsv3.kernels.fp8_rowwise import quantize_rows_transposed_triton
w = torch.randn(64, 1408, 2048, device="cuda", dtype=torch.bfloat16)     # lite's gate / up experts
for old in (True, True, False, False):     # the launch before the thirty-first session, then the default
    quantize_rows_transposed_triton(w, block_n=128, block_k=32, stages=1) if old else quantize_rows_transposed_triton(w)
torch.cuda.synchronize()
PY
    timeout 120 ncu --clock-control none -k regex:_rows_t_kernel --launch-skip 1 --launch-count 3 $S python /tmp/wt.py \
      > "$OUT/ncu-wt.txt" 2>&1
    K='^  [_a-z]|Duration|Throughput|Hit Rate|Warp Cycles|Registers|Occupancy|Eligible|Issued Warp|Block Limit|Stall|Pipe'
    grep -hE "$K" "$OUT/ncu-seesaw.txt" "$OUT/ncu-wt.txt" | head -90 ;;
  U)    # thirty-first session (~6 min; the gate runs the tests first): train.cuda_graphs (the compiled blocks'
        # forward and backward as CUDA graphs; issue 17's profile had the GPU idle 6.7 ms of a 126 ms step). Its
        # CUDA tests (eager's loads, biases and weights, one and two micro-batches), then lite-8L's full recipe as
        # `dsv3 train --config configs/lite-8L.toml` runs it, without and with the graphs, one process each
    [ "${SKIP_TESTS:-0}" = 1 ] || timeout 150 python -m pytest -q -p no:cacheprovider -rfEs \
      tests/test_train_compiled_loads.py 2>&1 | tail -4
    # lite-8L's corpus (tokenizer and shards) first, once (both runs read them; two first runs would build them at
    # once); another CONFIG's first run builds its own
    [ -n "${CONFIG:-}" ] || timeout 150 python -c "from dsv3.train.config import DataConfig; from dsv3.train.dataset import prepare_dataset
prepare_dataset(DataConfig(sources=['stdlib'], cache_dir='out/data'), 8192, progress=False)" > "$OUT/data.log" 2>&1
    for g in false true; do   # perf_hints: inductor says there why it skipped a graph (thirty-first session: unknown)
      TORCH_LOGS=perf_hints timeout "${RUN_S:-200}" python benchmarks/train_lite8l.py --config "${CONFIG:-configs/lite-8L.toml}" \
        --set train.compile=true train.cuda_graphs=$g \
        --steps 10 --warmup 3 --tag graphs_$g > "$OUT/graphs_$g.txt" 2>&1
      grep -vE "Warn|warn" "$OUT/graphs_$g.txt" | grep -E "ms|tok/s|MFU|GiB|Error|error|skipping" | tail -6
    done ;;
  Y)    # thirty-second session, owed (~6 min): the quantisers' looping grid (`programs`: fewer column strips in
        # flight, so each one's second read finds it in L2; ncu read the one-program-a-strip W^T kernel at 80% of DRAM
        # peak with 26% L2 hits): its CUDA bit tests, then the W^T and group-column sweeps with it beside the defaults
    install_wheels
    timeout 130 python -m pytest -q -n 8 -p no:cacheprovider -rfEs -k "not interpreter and not dry_run" \
      tests/test_kernels_fp8_rowwise.py tests/test_kernels_fp8_grouped_wgrad.py 2>&1 | tail -4 | tee "$OUT/tests.txt"
    timeout 90 python benchmarks/fp8_quant_sweep.py > "$OUT/quant_sweep.txt" 2>&1
    grep -E "W\^T rows|failed|Error" "$OUT/quant_sweep.txt" | head -60
    timeout 150 python benchmarks/fp8_grouped_bench.py > "$OUT/grouped.txt" 2>&1
    grep -E "group columns|failed|Error" "$OUT/grouped.txt" | head -80 ;;
  Z)    # thirty-third session (~6 min): the 16-head gather kernel (lite's MLA decode) at the launches a decode step
        # makes. Offline (mla_kernel_resources.py --offline, with the launch's divisibility hints) the B = 2-8 default
        # (64-token tiles, 4 warps) spills 248 B where 8 warps or 32-token tiles spill none; the B = 9+ default does
        # not spill. The sweep that chose the defaults ran at 64 x 16K only
    install_wheels
    timeout 480 python benchmarks/mla_decode_bench.py --heads 16 --batches 1 4 8 32 64 \
      --contexts 256 1024 4096 16384 --sweep-each --graph-timing --sweep-stages 2 3 4 --sweep-tma 0 \
      > "$OUT/mla16_sweep.txt" 2>&1
    grep -E "^ *16 |best of|failed|Error" "$OUT/mla16_sweep.txt" | head -80 ;;
  F)    # thirty-third session (~4 min): where lite-8L's full recipe (MTP, balance loss, split masters, BF16
        # moments, compiled) spends its step today: 26.7% MFU against 45% asked. The last profile by category was of
        # the peer-equivalent work (no MTP) before the one-pass AdamW and gradient norm; the thirty-second session
        # judged the host reads (`sums.tolist()`, `grad_norm.item()`) < 1 ms a step: the table's idle row says
    install_wheels
    timeout 150 python -c "from dsv3.train.config import DataConfig; from dsv3.train.dataset import prepare_dataset
prepare_dataset(DataConfig(sources=['stdlib'], cache_dir='out/data'), 8192, progress=False)" > "$OUT/data.log" 2>&1
    OUT=$OUT/prof timeout 220 python benchmarks/train_lite8l.py --config configs/lite-8L.toml \
      --steps 8 --warmup 3 --profile --tag full_recipe > "$OUT/full_recipe.txt" 2>&1
    grep -vE "Warn|warn" "$OUT/full_recipe.txt" | tail -40 ;;
  X)    # thirty-first session: U's A/B on small-gpu (~4 min; ~40M parameters, 2 micro-batches of 16 x 512: a step
        # of many small kernels, where graphs should matter more than at lite-8L's +0.5%)
    CONFIG=configs/small-gpu.toml SKIP_TESTS=1 RUN_S=150 bash "$0" U ;;
  V)    # thirty-first session's second call, after the gate (~8 min): U's A/B, then S's column-quantiser probe
    SKIP_TESTS=1 bash "$0" U
    timeout 60 python benchmarks/cols_probe.py 2>&1 | grep -v Warn | tee "$OUT/cols_probe.txt" ;;
  W)    # thirty-first session, one call where the device time left is too short for the whole gate then U (~8 min):
        # the CUDA tests of the files changed since the last gate (the quantisers' stages, the split form's removal,
        # the MLA decode refactor, train.cuda_graphs), then U's A/B
    install_wheels
    timeout 150 python -c "from dsv3.train.config import DataConfig; from dsv3.train.dataset import prepare_dataset
prepare_dataset(DataConfig(sources=['stdlib'], cache_dir='out/data'), 8192, progress=False)" > "$OUT/data.log" 2>&1 &
    timeout 170 python -m pytest -q -n 12 -p no:cacheprovider -rfEs -k "not interpreter and not dry_run" \
      tests/test_kernels_fp8_grouped_wgrad.py tests/test_kernels_fp8_rowwise.py tests/test_kernels_fp8_quant.py \
      tests/test_kernels_mla_decode.py tests/test_train_compiled_loads.py 2>&1 | tail -6 | tee "$OUT/gate.txt"
    wait                  # the corpus (U's own prepare_dataset then finds it built)
    SKIP_TESTS=1 RUN_S=185 bash "$0" U ;;
  *) echo "usage: $0 a|b|c|d|e|f|g|h|i|j|k|l|n|o|p|q|r|s|t|u|v|w|x|y|z|A|B|C|D|E|G|H|I|J|K|L|N|O|P|Q|R|S|T|U|V|W|X"; exit 2 ;;
esac
