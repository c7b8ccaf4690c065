"""Tokens/s and MFU of the dsv3 trainer's optimizer step on `lite-8L` (issue 3's GPU acceptance), with a profile.

What is timed is `Trainer.train_step()` itself, on real data (the standard-library corpus, an 8K BPE vocabulary
inside the model's 102,400): forward with the MTP module and the sequence-wise balance loss, backward, gradient
clipping, AdamW, the aux-loss-free bias update, and the per-step loss read-back. MFU uses the ANCHORS formula
    F = 6 * N_active + 3 * L * H * (d_qk + d_v) * S      (main model; the MTP module's work is extra, uncounted)
so the number is comparable with the HF peer (which has no MTP) and with gpu_lite8l.py; the MTP module's FLOPs are
reported in their own column (`mfu_mtp_module`, and `mfu_with_mtp` for both: issue 17). `--config FILE` times the
run a `dsv3 train` config describes (e.g. configs/lite.toml, 27 layers with recomputation) instead of the flags.

Under torchrun every rank runs the trainer's step in the layout dp x ep (dp = nproc / ep): `--batch` sequences per
rank, so the global batch is nproc * batch; rank 0 prints the loss per step and the global tokens/s (the sum of the
ranks'), and MFU per GPU.

GPU:  PYTHONPATH=src python benchmarks/train_lite8l.py --dtype bf16-params --compile --profile
      issue 15's comparison in one call (--arms: BF16, FP8 block experts, FP8 row-wise experts, FP8 row-wise
      experts only (dense GEMMs BF16); each in its own process at each --micro-batches count (gradient accumulation,
      global batch N x --batch), same settings; a table of step time, tok/s, ratio to BF16 at the same N and peak
      memory, and with --profile each run's GPU time by op category):
      PYTHONPATH=src python benchmarks/train_lite8l.py --compare --micro-batches 1 4 --compile --dtype bf16-params \
          --state-dtype bf16 --no-mtp --steps 6 --warmup 3
      PYTHONPATH=src torchrun --standalone --nproc_per_node 8 benchmarks/train_lite8l.py --ep 8 --dtype bf16-params
      PYTHONPATH=src python benchmarks/train_lite8l.py --config configs/lite.toml --steps 4 --warmup 2
CPU dry run: PYTHONPATH=src python benchmarks/train_lite8l.py --tiny --device cpu --steps 2 --warmup 1
      PYTHONPATH=src OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/train_lite8l.py --tiny \
          --device cpu --steps 2 --warmup 1 --seq 256 --ep 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
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
from dsv3.train.config import load_run_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="time the steps of this `dsv3 train` run config (TOML or a run's "
                   "config.json) with its train/optim/model settings as `dsv3 train --config` runs them; only the run "
                   "directory, validation, checkpoints and the batch ramp are set for timing (--set: more overrides). "
                   "The model/precision/batch flags below then do not apply")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="with --config: overrides (the flag may repeat)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank and micro-batch")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1], help="micro-batches per optimizer step "
                   "(gradient accumulation: train.batch_size = N x train.micro_batch_size); several values with "
                   "--compare: each arm at each N")
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
    p.add_argument("--fp8-experts", default="block", choices=["block", "row", "row-fp8-wgrad"],
                   help="train.fp8_experts")
    p.add_argument("--fp8-experts-only", action="store_true", help="train.fp8_linears = false: only the routed "
                   "experts in FP8")
    p.add_argument("--fp8-weight-cache", default="both", choices=["both", "backward"],
                   help="train.fp8_weight_cache (with several micro-batches): W and W^T, or W^T only")
    p.add_argument("--torchao", default="off", choices=["off", "all", "experts"], help="the issue-15 peer: torchao's "
                   "FP8 training swapped into the same model after the Trainer is built (benchmarks/torchao_peer.py; "
                   "use with --precision bf16): blockwise linears and row-wise experts, or the experts only")
    p.add_argument("--state-dtype", default="fp32", choices=["fp32", "bf16"], help="AdamW moments (optim.state_dtype)")
    p.add_argument("--master", default="fp32", choices=["fp32", "split"], help="with --state-dtype bf16 and "
                   "--dtype bf16-params: the FP32 masters whole or split into the BF16 weight + an int16 low half "
                   "(optim.master)")
    p.add_argument("--compare", action="store_true", help="run the --arms with the other flags, one process each "
                   "(per --micro-batches value), and print the comparison")
    p.add_argument("--arms", default="bf16,block,row,row-exponly",
                   help=f"with --compare, a comma list of {', '.join(COMPARE)}")
    return p.parse_args()


# ---- the comparison (issue 15) ------------------------------------------------------------------------------------

# arm: (table name, flags); the FP8 arms' weights are quantised once per optimizer step (dsv3.fp8.weight_cache)
# when a step has several micro-batches, as `dsv3 train` does
COMPARE = {"bf16": ("BF16", ["--precision", "bf16"]),
           "block": ("FP8 block experts", ["--precision", "fp8", "--fp8-experts", "block"]),
           "row": ("FP8 row-wise experts", ["--precision", "fp8", "--fp8-experts", "row"]),
           "row-exponly": ("FP8 row experts only", ["--precision", "fp8", "--fp8-experts", "row",
                                                    "--fp8-experts-only"]),
           "block-exponly": ("FP8 block experts only", ["--precision", "fp8", "--fp8-experts", "block",
                                                        "--fp8-experts-only"]),
           # W^T cached only (train.fp8_weight_cache = backward): half the cache, W quantised in every forward
           "row-exponly-wt": ("FP8 row experts only, W^T cache", ["--precision", "fp8", "--fp8-experts", "row",
                                                                  "--fp8-experts-only", "--fp8-weight-cache",
                                                                  "backward"]),
           # the experts' weight gradients in FP8 too (train.fp8_experts = row-fp8-wgrad): A/B against row-exponly
           "row-exponly-w8": ("FP8 row experts only, FP8 wgrad", ["--precision", "fp8", "--fp8-experts",
                                                                 "row-fp8-wgrad", "--fp8-experts-only"]),
           "row-wt": ("FP8 row-wise experts, W^T cache", ["--precision", "fp8", "--fp8-experts", "row",
                                                          "--fp8-weight-cache", "backward"]),
           # the peer (torchao 0.18 prototypes on the same model and Trainer): beside `row` and `row-exponly`
           "torchao": ("torchao FP8 block+row", ["--precision", "bf16", "--torchao", "all"]),
           "torchao-exponly": ("torchao FP8 row experts", ["--precision", "bf16", "--torchao", "experts"])}


def _common_flags(argv: list[str]) -> list[str]:
    """argv without the flags compare sets per run (and their values)."""
    drop = {"--compare", "--precision", "--fp8-experts", "--fp8-experts-only", "--tag", "--arms", "--micro-batches",
            "--fp8-weight-cache", "--torchao"}
    common, skipping = [], False
    for arg in argv:
        if arg.split("=")[0] in drop:
            skipping = "=" not in arg and arg not in ("--compare", "--fp8-experts-only")
        elif skipping and not arg.startswith("--"):
            continue                             # a dropped flag's value (--micro-batches takes several)
        else:
            skipping = False
            common.append(arg)
    return common


def compare(argv: list[str], arms: list[str], micro_batches: list[int]) -> None:
    """One run per arm and micro-batch count, each in a fresh process (no compiled code, allocator state or memory
    peak carried over), with the remaining command-line flags; then one table (ratios against BF16 at the same
    global batch: the same tokens per step)."""
    unknown = [a for a in arms if a not in COMPARE]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {', '.join(COMPARE)}")
    common = _common_flags(argv)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in micro_batches:
        for arm in arms:
            name, extra = COMPARE[arm]
            tag = f"compare_{arm}_mb{n}"
            cmd = [sys.executable, __file__, *common, *extra, "--micro-batches", str(n), "--tag", tag]
            print(f"== {name}, {n} micro-batches: {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd)
            path = out / f"{tag}.json"
            rows.append((name, n, json.loads(path.read_text()) if proc.returncode == 0 and path.exists() else None))
    # loss: the mean over the timed steps (same seed, same data in every arm: "at equal or better loss")
    print(f"\n{'GEMMs':24s} {'micro':>5s} {'step ms':>9s} {'tok/s':>9s} {'vs BF16':>8s} {'MFU':>6s} {'peak GiB':>9s} "
          f"{'loss':>7s}")
    for name, n, r in rows:
        if r is None:
            print(f"{name:24s} {n:5d} failed")
            continue
        base = next((b for m, k, b in rows if m == "BF16" and k == n and b), None)
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(f"{name:24s} {n:5d} {r['median_step_s'] * 1e3:9.1f} {r['tokens_per_s']:9,.0f} {ratio:7.2f}x "
              f"{r['mfu']:6.1%} {r['peak_memory_gib'] or 0:9.1f} {statistics.mean(r['losses']):7.4f}")
    (out / "compare.json").write_text(json.dumps([{"name": m, "micro_batches": k, **(r or {})} for m, k, r in rows],
                                                 indent=1))


# ---- profile by op category ---------------------------------------------------------------------------------------

# first match wins; names of CUDA kernels (GPU profile) and of operators (CPU profile)
CATEGORIES = (
    ("FP8 quantisers", r"_tiles_kernel|_tiles_t_kernel|_blocks_kernel|_rows_kernel|_amax_2d_kernel|_cast_t_kernel|"
                       r"dsv3::quantize"),
    ("FP8 GEMMs", r"_fp8_gemm_kernel|_fp8_grouped_gemm_kernel|scaled_mm|scaled_grouped|f8|e4m3|fp8_gemm|"
                  r"fp8_grouped_gemm"),
    ("BF16 grouped GEMMs", r"_grouped_mm|grouped_gemm|GroupProblemShape|grouped_weight_grad"),
    # before the dense GEMMs: cuDNN's attention kernels are named cudnn_..._sdpa_sm90_flash_..., which `sm90_` took
    ("attention", r"flash|fmha|attention|sdpa|_efficient_attention"),
    ("BF16 dense GEMMs", r"gemm|nvjet|xmma|cutlass|matmul|aten::mm|aten::addmm|aten::bmm|sm90_"),
    ("optimizer", r"_adamw_kernel|adamw|multi_tensor|foreach"),
    ("communication", r"nccl|all_reduce|all_gather|reduce_scatter|alltoall|all_to_all"),
    ("compiled fusions (inductor)", r"^triton_|triton_poi|triton_red|triton_per"),
    ("copies, casts, fills", r"copy|memcpy|memset|fill|cat|_to_copy|aten::to\b|contiguous|index|scatter|gather"),
)


def categorise(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return cat
    return "other"


def category_table(prof, device: bool, steps: int) -> list[dict]:
    """Self time per category and step: the GPU's kernels (device=True), else the CPU's operators. On the GPU only
    the kernel events count: an operator's own self device time is its kernels' again, and counting both made the
    per-step totals about twice the step (twelfth session: 260 ms of categories in a 139.5 ms step). User
    annotations (the optimizer's `Optimizer.step#...` range, ProfilerStep#) are GPU-side events too, spanning
    kernels counted already: skipped (fourteenth session: the optimizer was counted twice, 55.8 of 27.9 ms)."""
    from torch.autograd import DeviceType
    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        if device and getattr(ev, "device_type", DeviceType.CUDA) != DeviceType.CUDA:
            continue
        if getattr(ev, "is_user_annotation", False) or re.match(r"(Optimizer\.\w+#|ProfilerStep#)", ev.key):
            continue
        t = getattr(ev, "self_device_time_total", None) if device else ev.self_cpu_time_total
        if device and t is None:
            t = getattr(ev, "self_cuda_time_total", 0)
        if t:
            cat = categorise(ev.key)
            totals[cat] = totals.get(cat, 0.0) + t / 1e3 / steps
    whole = sum(totals.values()) or 1.0
    return [{"category": c, "ms_per_step": ms, "share": ms / whole}
            for c, ms in sorted(totals.items(), key=lambda kv: -kv[1])]


def mtp_flops_per_token(model: Transformer, seq: int) -> float:
    """FLOPs per token of the MTP module(s) (TR 2.2), in their own column: 6 x their matmul parameters active per
    token, counting the shared output head again (each depth runs it on its own hidden states; the embedding is a
    lookup), plus one attention layer per depth. 0 without MTP."""
    cfg = model.config
    if not cfg.num_nextn_predict_layers:
        return 0.0
    counts = model.num_params()
    norms = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 1 and n.startswith("mtp."))
    matmul = counts["mtp_active"] - model.embed_tokens.weight.numel() - norms
    attn = 3 * cfg.num_nextn_predict_layers * cfg.num_attention_heads * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * seq
    return 6.0 * matmul + attn


def config_file_run(a: argparse.Namespace, world: int) -> tuple[RunConfig, str]:
    """--config: the run config `dsv3 train --config` would train with, set up for timing (a fresh temporary run
    directory, no validation or checkpoints, no batch ramp: every timed step has the full batch)."""
    timing = [f"run_dir={json.dumps(tempfile.mkdtemp(prefix='dsv3-bench-'))}", "train.steps=100000",
              "train.batch_size_start=0", "log.val_batches=0", "log.val_interval=0", "log.tensorboard=false",
              "log.progress=false", "checkpoint.interval=0", f"data.cache_dir={json.dumps(a.data_cache)}"]
    cfg = load_run_config(a.config, [*a.set, *timing])
    tag = a.tag or f"config_{Path(a.config).stem}" + (f"_w{world}" if world > 1 else "")
    return cfg, tag


def flag_run(a: argparse.Namespace, world: int) -> tuple[RunConfig, str]:
    """The run config of the command-line flags (lite-8L, or the tiny shrink of it with --tiny)."""
    n_micro = a.micro_batches[0]
    model = load_model_config("lite-8L")
    if a.tiny:
        model = shrink(model)
    if a.no_mtp:
        model = model.replace(num_nextn_predict_layers=0)
    tag = a.tag or (f"trainer_{a.dtype}{'_compile' if a.compile else ''}{'_recompute' if a.recompute else ''}"
                    f"{'_copt' if a.compile_optimizer else ''}{'_nomtp' if a.no_mtp else ''}"
                    f"{'_noaux' if a.alpha == 0 else ''}"
                    f"{'_fp8' if a.precision == 'fp8' else ''}"
                    f"{'_rowexp' if a.fp8_experts == 'row' else ''}"
                    f"{'_rowexp_w8' if a.fp8_experts == 'row-fp8-wgrad' else ''}"
                    f"{'_exponly' if a.fp8_experts_only else ''}"
                    f"{'_wtcache' if a.fp8_weight_cache == 'backward' else ''}"
                    f"{'_bf16state' if a.state_dtype == 'bf16' else ''}{'_split' if a.master == 'split' else ''}"
                    f"{'' if a.torchao == 'off' else '_torchao_' + a.torchao}"
                    f"{f'_mb{n_micro}' if n_micro > 1 else ''}")
    if world > 1 and not a.tag:
        tag += f"_w{world}_ep{a.ep}"
    cfg = RunConfig.from_dict({
        "model": model.to_dict(), "run_dir": tempfile.mkdtemp(prefix="dsv3-bench-"),
        "data": {"sources": ["stdlib"], "vocab_size": 8192 if not a.tiny else 1024, "cache_dir": a.data_cache,
                 "seq_len": a.seq},
        "train": {"steps": 100_000, "batch_size": n_micro * a.batch * world, "micro_batch_size": a.batch * world,
                  "device": a.device,
                  "dtype": a.dtype, "compile": a.compile, "recompute": a.recompute,
                  "compile_optimizer": a.compile_optimizer, "precision": a.precision,
                  "fp8_experts": a.fp8_experts, "fp8_linears": not a.fp8_experts_only,
                  "fp8_weight_cache": a.fp8_weight_cache},
        "optim": {"state_dtype": a.state_dtype, "master": a.master},
        "balance": {"seq_aux_alpha": a.alpha},
        "parallel": {"ep": a.ep},
        "log": {"val_batches": 0, "tensorboard": False, "progress": False},
    })
    return cfg, tag


def main() -> None:
    a = parse_args()
    if a.compare:
        compare(sys.argv[1:], a.arms.split(","), a.micro_batches)
        return
    if len(a.micro_batches) != 1:
        raise SystemExit("--micro-batches takes several values only with --compare")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, tag = config_file_run(a, world) if a.config else flag_run(a, world)
    n_micro = cfg.train.batch_size // cfg.train.micro_batch_size
    seq, rows = cfg.data.seq_len, cfg.train.micro_batch_size // world      # this rank's rows per micro-batch
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False)
    build_s = time.perf_counter() - t0
    swapped = None
    if a.torchao != "off":                       # the peer: torchao's FP8 modules, the Trainer's parameters kept
        from torchao_peer import apply_torchao
        swapped = apply_torchao(trainer.model, linears=a.torchao == "all")
        print(f"[{tag}] torchao: {swapped}", flush=True)
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
    tokens = n_micro * rows * seq                # this rank's tokens per step
    # global tokens/s: the sum of the ranks' own rates
    tok_s = layout.sum(torch.tensor(tokens / sec, dtype=torch.float64, device=dev)).item()
    with torch.device("meta"):                   # FLOPs of the whole model (a rank holds only its experts with ep > 1)
        whole = Transformer(trainer.model.config)
        fl = flops_per_token(whole, seq)
        fl["mtp_flops_per_token"] = mtp_flops_per_token(whole, seq)
    t = cfg.train
    res = dict(tag=tag, config=a.config, device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
               torch=torch.__version__, batch=rows, micro_batches=n_micro, seq=seq, dtype=t.dtype, compile=t.compile,
               recompute=t.recompute, mtp=cfg.model.num_nextn_predict_layers > 0, alpha=cfg.balance.seq_aux_alpha,
               layers=cfg.model.num_hidden_layers, build_s=build_s, warmup_s=warm_s,
               step_seconds=times, median_step_s=sec, tokens_per_s=tok_s,
               mfu=fl["flops_per_token"] * tok_s / world / a.peak,
               # the MTP module's work on its own (TR 2.2), and main + MTP: issue 17 reports both beside `mfu`
               mfu_mtp_module=fl["mtp_flops_per_token"] * tok_s / world / a.peak,
               mfu_with_mtp=(fl["flops_per_token"] + fl["mtp_flops_per_token"]) * tok_s / world / a.peak,
               losses=losses, torchao=swapped,
               peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None, **fl)
    if world > 1:
        res.update(world=world, ep=cfg.parallel.ep, dp=layout.dp, global_batch=n_micro * rows * world)
    if main_rank:
        mtp_part = (f" (+ MTP module {res['mfu_mtp_module']:.1%}, all {res['mfu_with_mtp']:.1%})"
                    if res["mtp"] else "")
        print(f"[{tag}] step {sec * 1e3:.1f} ms  {tok_s:,.0f} tok/s  MFU {res['mfu']:.1%}{mtp_part}  "
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
            cats = category_table(prof, dev.type == "cuda", steps=2)
            res["profile_categories"] = cats
            print(f"[{tag}] {'GPU' if dev.type == 'cuda' else 'CPU'} time per step by op category:")
            for c in cats:
                print(f"  {c['category']:30s} {c['ms_per_step']:8.2f} ms  {c['share']:6.1%}")
            if dev.type == "cuda":   # kernels serialise on one stream: the timed step less their sum is idle time
                busy = sum(c["ms_per_step"] for c in cats)
                res["profile_idle_ms"] = sec * 1e3 - busy
                print(f"  {'GPU idle (timed step - kernels)':30s} {sec * 1e3 - busy:8.2f} ms  of {sec * 1e3:.1f}")
    if main_rank:
        (out / f"{tag}.json").write_text(json.dumps(res, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
