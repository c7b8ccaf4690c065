"""Tokens/s and MFU of the dsv3 trainer's optimizer step on `lite-8L` (issue 3's GPU acceptance), with a profile.

What is timed is `Trainer.train_step()` itself, on real data (the standard-library corpus, an 8K BPE vocabulary
inside the model's 102,400): forward with the MTP module and the sequence-wise balance loss, backward, gradient
clipping, AdamW, the aux-loss-free bias update, and the per-step loss read-back. MFU uses the ANCHORS formula
    F = 6 * N_active + 3 * L * H * (d_qk + d_v) * S      (main model; the MTP module's work is extra, uncounted)
so the number is comparable with the HF peer (which has no MTP) and with gpu_lite8l.py.

Under torchrun every rank runs the trainer's step in the layout dp x ep (dp = nproc / ep): `--batch` sequences per
rank, so the global batch is nproc * batch; rank 0 prints the loss per step and the global tokens/s (the sum of the
ranks'), and MFU per GPU.

GPU:  PYTHONPATH=src python benchmarks/train_lite8l.py --dtype bf16-params --compile --profile
      PYTHONPATH=src torchrun --standalone --nproc_per_node 8 benchmarks/train_lite8l.py --ep 8 --dtype bf16-params
CPU dry run: PYTHONPATH=src python benchmarks/train_lite8l.py --tiny --device cpu --steps 2 --warmup 1
      PYTHONPATH=src OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/train_lite8l.py --tiny \
          --device cpu --steps 2 --warmup 1 --seq 256 --ep 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_lite8l import flops_per_token, shrink  # noqa: E402

from dsv3.config import load_model_config  # noqa: E402
from dsv3.model import Transformer  # noqa: E402
from dsv3.train import RunConfig, Trainer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree under torchrun (dp = nproc / ep)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bf16-params", choices=["bf16", "bf16-params", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--compile-optimizer", action="store_true")
    p.add_argument("--no-mtp", action="store_true")
    p.add_argument("--alpha", type=float, default=1e-4, help="sequence-wise balance loss weight (0: off)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="profile 2 more steps; table under $OUT")
    p.add_argument("--data-cache", default="out/data")
    p.add_argument("--peak", type=float, default=989e12)
    p.add_argument("--tag", default=None)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp8"], help="GEMM precision (train.precision)")
    p.add_argument("--fp8-experts", default="block", choices=["block", "row"], help="train.fp8_experts")
    p.add_argument("--fp8-experts-only", action="store_true", help="train.fp8_linears = false: only the routed "
                   "experts in FP8")
    p.add_argument("--state-dtype", default="fp32", choices=["fp32", "bf16"], help="AdamW moments (optim.state_dtype)")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    model = load_model_config("lite-8L")
    if a.tiny:
        model = shrink(model)
    if a.no_mtp:
        model = model.replace(num_nextn_predict_layers=0)
    tag = a.tag or (f"trainer_{a.dtype}{'_compile' if a.compile else ''}{'_recompute' if a.recompute else ''}"
                    f"{'_copt' if a.compile_optimizer else ''}{'_nomtp' if a.no_mtp else ''}{'_noaux' if a.alpha == 0 else ''}"
                    f"{'_fp8' if a.precision == 'fp8' else ''}{'_rowexp' if a.fp8_experts == 'row' else ''}{'_exponly' if a.fp8_experts_only else ''}{'_bf16state' if a.state_dtype == 'bf16' else ''}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not a.tag:
        tag += f"_w{world}_ep{a.ep}"
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.from_dict({
        "model": model.to_dict(), "run_dir": tempfile.mkdtemp(prefix="dsv3-bench-"),
        "data": {"sources": ["stdlib"], "vocab_size": 8192 if not a.tiny else 1024, "cache_dir": a.data_cache,
                 "seq_len": a.seq},
        "train": {"steps": 100_000, "batch_size": a.batch * world, "micro_batch_size": a.batch * world,
                  "device": a.device,
                  "dtype": a.dtype, "compile": a.compile, "recompute": a.recompute,
                  "compile_optimizer": a.compile_optimizer, "precision": a.precision,
                  "fp8_experts": a.fp8_experts, "fp8_linears": not a.fp8_experts_only},
        "optim": {"state_dtype": a.state_dtype},
        "balance": {"seq_aux_alpha": a.alpha},
        "parallel": {"ep": a.ep},
        "log": {"val_batches": 0, "tensorboard": False, "progress": False},
    })
    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False)
    build_s = time.perf_counter() - t0
    dev, layout = trainer.device, trainer.layout
    main_rank = layout.is_main
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        trainer.train_step()
    sync()
    warm_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(a.steps):
        t = time.perf_counter()
        stats, _ = trainer.train_step()          # reads the loss back: the step is synchronous
        sync()
        times.append(time.perf_counter() - t)
        losses.append(stats.loss)                # the global batch's loss, the same on every rank
        if main_rank and world > 1:
            print(f"[{tag}] step {i + 1}: loss {stats.loss:.4f}  {times[-1] * 1e3:.1f} ms", flush=True)
    sec = statistics.median(times)
    tokens = a.batch * a.seq                     # this rank's tokens per step
    # global tokens/s: the sum of the ranks' own rates
    tok_s = layout.sum(torch.tensor(tokens / sec, dtype=torch.float64, device=dev)).item()
    with torch.device("meta"):                   # FLOPs of the whole model (a rank holds only its experts with ep > 1)
        fl = flops_per_token(Transformer(trainer.model.config), a.seq)
    res = dict(tag=tag, device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
               torch=torch.__version__, batch=a.batch, seq=a.seq, dtype=a.dtype, compile=a.compile,
               recompute=a.recompute, mtp=not a.no_mtp, alpha=a.alpha, build_s=build_s, warmup_s=warm_s,
               step_seconds=times, median_step_s=sec, tokens_per_s=tok_s,
               mfu=fl["flops_per_token"] * tok_s / world / a.peak, losses=losses,
               peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None, **fl)
    if world > 1:
        res.update(world=world, ep=a.ep, dp=layout.dp, global_batch=a.batch * world)
    if main_rank:
        print(f"[{tag}] step {sec * 1e3:.1f} ms  {tok_s:,.0f} tok/s  MFU {res['mfu']:.1%}  "
              f"peak {res['peak_memory_gib'] or 0:.1f} GiB  (build {build_s:.0f}s, warm-up {warm_s:.0f}s)", flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                trainer.train_step()
            sync()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        if main_rank:
            table = prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=70)
            (out / f"profile_{tag}.txt").write_text(table)
            print(table[:6000])
    if main_rank:
        (out / f"{tag}.json").write_text(json.dumps(res, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
