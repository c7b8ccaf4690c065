#!/usr/bin/env bash
# Issue 17 (BF16 training MFU) on one H200, in ONE device call of <= 9 minutes; logs and JSON under $OUT.
# Every acceptance point still open, each command under its own `timeout`, a stage skipped (and said so) when it
# would end past the 9-minute line:
#   1. CUDA tests: compiled-vs-eager expert loads and routing-bias updates over 5 steps (train.compile, inductor);
#      the one-pass gradient norm vs float64; the one-pass AdamW and its folded clipping (the corpus is
#      tokenised beside them).                                                                         <= 100 s
#   2. peer-equivalent work (no MTP, no balance loss), compiled, the report's optimizer precision (BF16 weights and
#      moments, FP32 masters), B4 x 2048, with the profile by op category: MFU (target 50%).            <= 160 s
#   3. the full recipe (MTP, balance loss, clipping, bias update), compiled, same precision, 20 timed steps: MFU on
#      main-model FLOPs and the MTP module's in its own column (target 45%), peak memory (issue: <= 45.7 GiB). <= 130 s
#   4. the same full recipe eager with the reference optimizer and norm (DSV3_ADAMW / DSV3_GRAD_NORM=reference),
#      recomputation on (to fit an H100), the same 20 steps from the same seed and data: the per-step losses of 3
#      vs 4 (bf16 noise).                                                                               <= 100 s
#   5. `lite` (27 layers) with recomputation: `--config configs/lite.toml`, i.e. what `dsv3 train --config
#      configs/lite.toml` runs: tokens/s, MFU and peak memory (retried without MTP if it does not fit). <= 170 s
#      ~122 GiB of weights, gradients and moments: an H200 only (the device call passes needs_h200: it cannot fit
#      78 GiB); on an 80 GB card the stage is skipped and says so.
#   6. if time is left: the HF transformers + compile peer on the peer-equivalent work (issue 3's 34.4-35.0%).
# Usage (repo root): bash benchmarks/issue17_gpu.sh          CPU dry run: DRY_RUN=1 bash benchmarks/issue17_gpu.sh
#   MASTER=fp32 bash benchmarks/issue17_gpu.sh: the same stages with whole FP32 masters (default: split, as
#   configs/lite-8L.toml; 134.3 vs 139.5 ms and 8.5 GiB less on an H100, fourteenth session)
#   STAGES="2 3" bash benchmarks/issue17_gpu.sh: only the stages named (default: all six)
set -u
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 OUT=${OUT:-out}
mkdir -p "$OUT"
start=$(date +%s)
LIMIT=${LIMIT:-530}          # seconds: a stage starts only if its timeout ends before this
stamp() { echo "[issue17 $(( $(date +%s) - start )) s] $*" | tee -a "$OUT/stages.txt"; }
STAGES=" ${STAGES:-1 2 3 4 5 6} "   # e.g. STAGES="2 3": only those stages
fits() {
  local n=${2%%.*}; n=${n%b}
  if [[ $STAGES != *" $n "* ]]; then stamp "not asked (STAGES=$STAGES): $2"; return 1; fi
  if [ $(( $(date +%s) - start + $1 )) -le "$LIMIT" ]; then return 0; fi; stamp "SKIPPED (no time): $2"; return 1; }
B=benchmarks/train_lite8l.py
if [ "${DRY_RUN:-0}" = 1 ]; then     # CPU: the same commands on tiny shapes, eager, GPU tests skipped
  SHAPE=(--tiny --device cpu --seq 128 --batch 2 --data-cache /tmp/issue17-data)
  COMPILE=()
  STEPS=(--steps 2 --warmup 1)
  PSTEPS=(--steps 2 --warmup 1)
  LITE=(--set 'train.device="cpu"' train.compile=false model.num_hidden_layers=2 model.hidden_size=128
        model.intermediate_size=256 model.moe_intermediate_size=64 model.kv_lora_rank=32 model.qk_nope_head_dim=16
        model.qk_rope_head_dim=16 model.v_head_dim=16 model.num_attention_heads=4 model.num_key_value_heads=4
        model.vocab_size=1024 data.vocab_size=1024 data.seq_len=128 --data-cache /tmp/issue17-data)
  PEER=(--small --batch 1 --seq 128 --steps 2 --warmup 1)
  DATA=(/tmp/issue17-data 1024)
else
  nvidia-smi --query-gpu=name,memory.used,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  SHAPE=()
  COMPILE=(--compile)
  STEPS=(--steps 20 --warmup 3)
  PSTEPS=(--steps 10 --warmup 3)
  LITE=()
  PEER=(--layers 8 --batch 4 --seq 2048 --steps 10 --experts grouped_mm --compile regional)
  DATA=(out/data 8192)
fi
# BF16 weights/grads, FP32 masters, BF16 moments (TR 3.3.3); MASTER=split: the masters split into the BF16 weight
# and an int16 low half (optim.master; the same FP32 value, 2 bytes per parameter less, 18 bytes per update not 20)
RECIPE=(--dtype bf16-params --state-dtype bf16 --master "${MASTER:-split}")

stamp "1. CUDA tests (the corpus's tokenizer and shards are built beside them, on the CPU, for stages 2-5)"
python -c "import sys; from dsv3.train.config import DataConfig; from dsv3.train.dataset import prepare_dataset
prepare_dataset(DataConfig(sources=['stdlib'], cache_dir=sys.argv[1]), int(sys.argv[2]), progress=False)" \
  "${DATA[@]}" > "$OUT/data.log" 2>&1 &
DATA_PID=$!
if fits 100 "1. CUDA tests"; then
  timeout 100 python -m pytest -q -p no:cacheprovider -rfEs \
    tests/test_train_compiled_loads.py::test_compiled_trainer_keeps_expert_loads_and_bias_updates_on_cuda \
    tests/test_kernels_grad_norm.py::test_triton_matches_float64_on_cuda \
    tests/test_kernels_adamw.py::test_triton_matches_reference_on_cuda \
    tests/test_gpu.py::test_trainer_on_cuda_clips_inside_adamw_bf16_like_a_separate_pass \
    2>&1 | tail -15 | tee "$OUT/pytest.txt"
  if grep -q "^\(FAILED\|ERROR\) tests/test_kernels_grad_norm.py" "$OUT/pytest.txt"; then
    export DSV3_GRAD_NORM=reference      # the measurements below still run, on the _foreach_norm reference
    stamp "the one-pass gradient norm failed its CUDA test: stages 2-5 use DSV3_GRAD_NORM=reference"
  fi
fi

wait $DATA_PID || stamp "data preparation failed: $(tail -1 "$OUT/data.log")"
stamp "2. peer-equivalent work, compiled, with the profile"
if fits 160 "2. peer-equivalent"; then
  timeout 160 python $B "${SHAPE[@]}" "${RECIPE[@]}" "${COMPILE[@]}" --no-mtp --alpha 0 "${PSTEPS[@]}" \
    --profile --tag peer_equivalent > "$OUT/peer_equivalent.log" 2>&1
  { grep "^\[peer_equivalent\] step" "$OUT/peer_equivalent.log"
    sed -n '/by op category/,$p' "$OUT/peer_equivalent.log" | head -12; } | tee -a "$OUT/stages.txt"
fi

stamp "3. full recipe, compiled"
if fits 130 "3. full recipe"; then
  timeout 130 python $B "${SHAPE[@]}" "${RECIPE[@]}" "${COMPILE[@]}" "${STEPS[@]}" --tag full_compiled \
    > "$OUT/full_compiled.log" 2>&1
  grep "^\[full_compiled\]" "$OUT/full_compiled.log" | tee -a "$OUT/stages.txt"
fi

stamp "4. full recipe, eager, reference optimizer and norm: the losses of 3 against these"
if fits 100 "4. full recipe eager"; then
  # eager keeps every activation of the step at once: 72.5 GiB allocated + a 3.1 GiB logits cast ran out of an H100's
  # 80 GB (twelfth session, 4.2 GiB reserved but fragmented). Recomputation (train.recompute: the same ops re-run in
  # backward, so the same values) keeps the reference under 80 GB; expandable segments give the fragments back
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
  DSV3_ADAMW=reference DSV3_GRAD_NORM=reference timeout 100 python $B "${SHAPE[@]}" "${RECIPE[@]}" "${STEPS[@]}" \
    --recompute --tag full_eager_reference > "$OUT/full_eager_reference.log" 2>&1
  grep "^\[full_eager_reference\]" "$OUT/full_eager_reference.log" | tee -a "$OUT/stages.txt"
  python - "$OUT" <<'EOF' 2>&1 | tee "$OUT/losses.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    fast, ref = (json.loads((out / f"{t}.json").read_text())["losses"] for t in ("full_compiled", "full_eager_reference"))
except (OSError, KeyError) as e:
    sys.exit(f"losses: a run is missing ({e})")
rel = [abs(a - b) / abs(b) for a, b in zip(fast, ref)]
print("step  compiled  eager-reference  |diff|/ref")
for i, (a, b, r) in enumerate(zip(fast, ref, rel)):
    print(f"{i + 1:4d}  {a:8.4f}  {b:15.4f}  {r:.2e}")
print(f"max relative difference over {len(rel)} steps: {max(rel):.2e}; mean {sum(rel) / len(rel):.2e} "
      f"(bf16 rounding: 2^-8 = 3.9e-3 per value)")
EOF
fi

stamp "5. lite (27 layers), recomputation, configs/lite.toml"
GIB=$(python -c "import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30 if torch.cuda.is_available() else 999)")
if [ "$GIB" -lt 130 ]; then
  stamp "SKIPPED: lite's weights, gradients and moments are ~122 GiB; this GPU has $GIB GiB (an H200 is needed)"
elif fits 170 "5. lite"; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  timeout 170 python $B --config configs/lite.toml "${LITE[@]}" --steps 4 --warmup 2 --tag lite \
    > "$OUT/lite.log" 2>&1
  if ! grep -q "^\[lite\]" "$OUT/lite.log"; then
    grep -v "^\s*$" "$OUT/lite.log" | tail -3 | tee -a "$OUT/stages.txt"
    if fits 150 "5b. lite without MTP"; then
      stamp "5b. lite did not finish: again without the MTP module"
      timeout 150 python $B --config configs/lite.toml "${LITE[@]}" --set model.num_nextn_predict_layers=0 \
        --steps 4 --warmup 2 --tag lite_nomtp > "$OUT/lite_nomtp.log" 2>&1
    fi
  fi
  grep -h "^\[lite" "$OUT"/lite*.log | tee -a "$OUT/stages.txt"
  unset PYTORCH_CUDA_ALLOC_CONF
fi

stamp "6. HF transformers peer (same work as 2)"
PEER_PY=""
for p in shared/bench/peers/hf_train.py ../shared/bench/peers/hf_train.py; do [ -f "$p" ] && PEER_PY=$p && break; done
if [ -z "$PEER_PY" ]; then
  stamp "SKIPPED: no shared/bench/peers/hf_train.py"
elif fits 110 "6. HF peer"; then
  timeout 110 python "$PEER_PY" "${PEER[@]}" --tag hf_peer > "$OUT/hf_peer.log" 2>&1
  tail -3 "$OUT/hf_peer.log" | tee -a "$OUT/stages.txt"
fi

python - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
print(f"{'run':24s} {'step ms':>8s} {'tok/s':>8s} {'MFU':>6s} {'MTP col':>8s} {'with MTP':>8s} {'peak GiB':>8s}")
for p in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text())
    if "median_step_s" in r:
        print(f"{p.stem:24s} {r['median_step_s'] * 1e3:8.1f} {r['tokens_per_s']:8,.0f} {r['mfu']:6.1%} "
              f"{r.get('mfu_mtp_module', 0):8.1%} {r.get('mfu_with_mtp', r['mfu']):8.1%} "
              f"{r['peak_memory_gib'] or 0:8.1f}")
EOF
stamp "done"
