#!/usr/bin/env bash
# Issue 24's part that a 2-GPU machine allows (kind nvidia-h200-x2, NCCL), in one device call; logs under $OUT:
#   A. tokens/s and MFU per GPU through the trainer (benchmarks/train_lite8l.py, lite-8L, B4 x 2048 per GPU, the
#      V3 precision recipe, eager): 1 GPU, then EP2 and DP2 on 2 GPUs (scaling vs 1 GPU), peak memory beside
#      `dsv3 plan`'s prediction for the same layout.
#   B. a DCP checkpoint saved by `dsv3 train` at EP2 on 2 GPUs (every rank writes its shard), resumed on 1 GPU: the
#      resumed step's loss against the step the 2-GPU run took from the same checkpoint.
# Usage (repo root):  bash benchmarks/gpu_x2_train.sh
# CPU dry run (tiny, gloo, 2 processes): DRY_RUN=1 bash benchmarks/gpu_x2_train.sh
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OUT=${OUT:-out} PYTHONPATH=$PWD/src
mkdir -p "$OUT"
R=$(mktemp -d /tmp/dsv3-x2-XXXX)
start=$(date +%s)
stamp() { echo "[gpu_x2_train $(( $(date +%s) - start )) s] $*" | tee -a "$OUT/x2_train.txt"; }
if [ "${DRY_RUN:-0}" = 1 ]; then
  export OMP_NUM_THREADS=1
  BENCH=(--tiny --device cpu --seq 256 --steps 2 --warmup 1)
  CFG=configs/tiny.toml; TRAIN=(train.device=cpu data.seq_len=128 train.batch_size=4 train.micro_batch_size=4)
  STEPS=3; SAVE=2; CUDA0=""
else
  export OMP_NUM_THREADS=4
  nvidia-smi --query-gpu=name,memory.used --format=csv | tee -a "$OUT/x2_train.txt"
  BENCH=(--dtype bf16-params --state-dtype bf16 --no-mtp --steps 6 --warmup 2)
  CFG=configs/lite-8L.toml; TRAIN=(train.compile=false train.batch_size=8 train.micro_batch_size=8)
  STEPS=6; SAVE=5; CUDA0="CUDA_VISIBLE_DEVICES=0"
fi

[ "${SKIP_A:-0}" = 1 ] || {
stamp "A. trainer step: 1 GPU, EP2 and DP2 on 2 GPUs"
timeout 150 env $CUDA0 python benchmarks/train_lite8l.py "${BENCH[@]}" --tag one_gpu 2>&1 | grep -v Warn | tail -3 \
  | tee -a "$OUT/x2_train.txt"
for ep in 2 1; do
  timeout 150 torchrun --standalone --nproc_per_node 2 benchmarks/train_lite8l.py "${BENCH[@]}" --ep $ep \
    --tag two_gpu_ep$ep 2>&1 | grep -v Warn | tail -3 | tee -a "$OUT/x2_train.txt"
done
python -m dsv3.cli plan --config lite-8L --gpus 2 --gpus-per-node 2 --ep 2 --pp 1 --micro-batch 4 --seq-len 2048 \
  --micro-batches 1 --moments bf16 --gpu-memory 141 2>&1 | tee -a "$OUT/x2_train.txt"
}

stamp "B. dsv3 train EP2 on 2 GPUs, DCP checkpoint at step $SAVE, then step $STEPS on 1 GPU from it"
common=(train.steps=$STEPS log.interval=1 log.val_interval=0 checkpoint.interval=$SAVE checkpoint.keep=0)
timeout 240 torchrun --standalone --nproc_per_node 2 -m dsv3.cli train --config $CFG --quiet --run-dir $R/ep2 \
  "${TRAIN[@]}" parallel.ep=2 "${common[@]}" > "$OUT/x2_dcp_ep2.log" 2>&1; echo "EP2 run rc $?" | tee -a "$OUT/x2_train.txt"
ls $R/ep2/checkpoints/* 2>&1 | head -20 | tee -a "$OUT/x2_train.txt"
ck=$(printf "step_%08d" $SAVE)
if [ -d "$R/ep2/checkpoints/$ck" ]; then
  mkdir -p $R/one && cp -r $R/ep2/. $R/one/ && find $R/one/checkpoints -mindepth 1 -maxdepth 1 ! -name $ck \
    -exec rm -rf {} +
  timeout 150 env $CUDA0 python -m dsv3.cli train --config $CFG --quiet --run-dir $R/one --resume \
    "${TRAIN[@]}" parallel.ep=1 "${common[@]}" > "$OUT/x2_dcp_resume1.log" 2>&1; echo "1-GPU resume rc $?" | tee -a "$OUT/x2_train.txt"
fi
python - "$R" $STEPS <<'EOF' 2>&1 | tee -a "$OUT/x2_train.txt"
import json, sys
from pathlib import Path
root, step = Path(sys.argv[1]), int(sys.argv[2])
def losses(d):
    f = root / d / "metrics.jsonl"
    if not f.exists():
        return {}
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("kind", "train") == "train" and "loss" in r}
two, one = losses("ep2"), losses("one")
for s in sorted(two):
    r = two[s]
    print(f"EP2 step {s}: loss {r['loss']:.6f}" + "".join(f", {k} {r[k]:.4g}" for k in ("tokens_per_s", "tok_s",
          "mem_gib", "peak_mem_gib") if k in r))
if step in two and step in one:
    a, b = two[step]["loss"], one[step]["loss"]
    print(f"step {step}: EP2 on 2 GPUs {a:.6f}, resumed on 1 GPU from the EP2 DCP checkpoint {b:.6f}, "
          f"rel. diff {abs(a - b) / abs(a):.2e}")
else:
    print(f"missing step {step}: EP2 {sorted(two)}, 1-GPU {sorted(one)}")
EOF
stamp "done"
