#!/usr/bin/env bash
# Issue 7's GPU measurements in one device call on kind nvidia-h200-x2 (NCCL; logs under $OUT):
#   lite-8L through the trainer at batch 4 x 2048 per GPU: 1 GPU, then DP2 and EP2 on 2 GPUs (tokens/s scaling,
#   target >= 1.85x; the loss per step, equal to the 1-GPU run's within bf16 noise when the global batch matches:
#   the 1-GPU run at batch 8 is the reference for the 2-GPU runs at 4 per rank), then DualPipeV PP2: bubble and
#   the share of the step the forward/backward overlap hides (benchmarks/pipeline_dualpipev.py).
#   run: bash benchmarks/gpu_issue7.sh        (no extra wheels needed: the trainer needs torch + numpy + tokenizers)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OUT=${OUT:-out} PYTHONPATH=$PWD/src OMP_NUM_THREADS=4
mkdir -p "$OUT"
nvidia-smi topo -m 2>&1 | head -5 | tee "$OUT/topo.txt"
common="--dtype bf16-params --steps 10 --warmup 3 --no-mtp"
# the data cache is built once (rank 0 tokenises the stdlib corpus), then every run reads it
timeout 150 python benchmarks/train_lite8l.py $common --batch 8 --tag one_gpu_b8 2>&1 | tail -4 | tee "$OUT/one_gpu_b8.txt"
timeout 120 python benchmarks/train_lite8l.py $common --batch 4 --tag one_gpu_b4 2>&1 | tail -4 | tee "$OUT/one_gpu_b4.txt"
for ep in 1 2; do
  timeout 150 torchrun --standalone --nproc_per_node 2 benchmarks/train_lite8l.py $common --batch 4 --ep $ep \
    --tag two_gpu_ep$ep 2>&1 | tail -4 | tee "$OUT/two_gpu_ep$ep.txt"
done
grep -h "tok/s" "$OUT"/*.txt | tee "$OUT/summary.txt"
# DualPipeV PP2 on the two GPUs: step time, this rank's bubble, sequential vs overlapped F/B pairs
timeout 150 torchrun --standalone --nproc_per_node 2 benchmarks/pipeline_dualpipev.py --batch 16 --seq 2048 \
  2>&1 | tail -30 | tee "$OUT/dualpipev_pp2.txt"
