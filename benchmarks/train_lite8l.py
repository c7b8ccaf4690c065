"""Tokens/s and MFU of the dsv3 trainer's optimizer step on `lite-8L` (issue 3's GPU acceptance), with a profile.

What is timed is `Trainer.train_step()` itself, on real data (the standard-library corpus, an 8K BPE vocabulary
inside the model's 102,400): forward with the MTP module and the sequence-wise balance loss, backward, gradient
clipping, AdamW, the aux-loss-free bias update, and the per-step loss read-back. MFU uses the ANCHORS formula
    F = 6 * N_active + 3 * L * H * (d_qk + d_v) * S      (main model; the MTP module's work is extra, uncounted)
so the number is comparable with the HF peer (which has no MTP) and with gpu_lite8l.py.

GPU:  PYTHONPATH=src python benchmarks/train_lite8l.py --dtype bf16-params --compile --profile
CPU dry run: PYTHONPATH=src python benchmarks/train_lite8l.py --tiny --device cpu --steps 2 --warmup 1
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
from dsv3.train import RunConfig, Trainer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=4)
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
                    f"{'_fp8' if a.precision == 'fp8' else ''}{'_bf16state' if a.state_dtype == 'bf16' else ''}")
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.from_dict({
        "model": model.to_dict(), "run_dir": tempfile.mkdtemp(prefix="dsv3-bench-"),
        "data": {"sources": ["stdlib"], "vocab_size": 8192 if not a.tiny else 1024, "cache_dir": a.data_cache,
                 "seq_len": a.seq},
        "train": {"steps": 100_000, "batch_size": a.batch, "micro_batch_size": a.batch, "device": a.device,
                  "dtype": a.dtype, "compile": a.compile, "recompute": a.recompute,
                  "compile_optimizer": a.compile_optimizer, "precision": a.precision},
        "optim": {"state_dtype": a.state_dtype},
        "balance": {"seq_aux_alpha": a.alpha},
        "log": {"val_batches": 0, "tensorboard": False, "progress": False},
    })
    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False)
    build_s = time.perf_counter() - t0
    dev = trainer.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        trainer.train_step()
    sync()
    warm_s = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        stats, _ = trainer.train_step()          # reads the loss back: the step is synchronous
        sync()
        times.append(time.perf_counter() - t)
        losses.append(stats.loss)
    sec = statistics.median(times)
    tokens = a.batch * a.seq
    fl = flops_per_token(trainer.model, a.seq)
    res = dict(tag=tag, device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
               torch=torch.__version__, batch=a.batch, seq=a.seq, dtype=a.dtype, compile=a.compile,
               recompute=a.recompute, mtp=not a.no_mtp, alpha=a.alpha, build_s=build_s, warmup_s=warm_s,
               step_seconds=times, median_step_s=sec, tokens_per_s=tokens / sec,
               mfu=fl["flops_per_token"] * tokens / sec / a.peak, losses=losses,
               peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None, **fl)
    print(f"[{tag}] step {sec * 1e3:.1f} ms  {tokens / sec:,.0f} tok/s  MFU {res['mfu']:.1%}  "
          f"peak {res['peak_memory_gib'] or 0:.1f} GiB  (build {build_s:.0f}s, warm-up {warm_s:.0f}s)", flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                trainer.train_step()
            sync()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=70)
        (out / f"profile_{tag}.txt").write_text(table)
        print(table[:6000])
    (out / f"{tag}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
