"""DualPipeV step time, bubble and what the forward/backward overlap hides (issue 7), under torchrun.

    torchrun --standalone --nproc_per_node 2 benchmarks/pipeline_dualpipev.py            # PP2, lite-8L, bf16, GPU
    torchrun --standalone --nproc_per_node 4 benchmarks/pipeline_dualpipev.py --ep 2     # PP2 x EP2
    CPU dry run: OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/pipeline_dualpipev.py \
        --tiny --device cpu --batch 4 --seq 64 --steps 2

Per rank: the busy time is what its two chunks cost alone, n_micro x (forward + backward) of each, timed outside the
pipeline on one micro-batch (with EP the ep ranks of one pipeline position time their chunks together: the expert
all-to-alls are part of a chunk's cost). bubble = 1 - busy / step time, for the sequential runtime (torch runs each
OVERLAP_F_B pair one after the other) and with `dsv3.parallel.overlap` (the pair's backward on a second thread).
hidden = (sequential step - overlapped step) / sequential step: the share of the step the overlap removed. TR 3.2.1's
figure for DualPipe is a bubble of (PP/2 - 1)(F&B + B - 3W) with all-to-all fully hidden; this measures ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_lite8l import build, shrink  # noqa: E402

from dsv3.config import load_model_config  # noqa: E402
from dsv3.parallel.expert import apply_expert_parallel  # noqa: E402
from dsv3.parallel.overlap import enable_overlap  # noqa: E402
from dsv3.parallel.mesh import ParallelMesh  # noqa: E402
from dsv3.parallel.pipeline import build_dualpipev  # noqa: E402
from dsv3.train.losses import PipelineLoss  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="sequences per step and pipeline (n_micro micro-batches)")
    p.add_argument("--micro", type=int, default=0, help="micro-batches (default: 2 x 2 x pp, DualPipeV needs 2 pp)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunk_cost(stage, mb: int, seq: int, cfg, device, dtype, loss_fn, reps: int = 3) -> float:
    """Seconds of forward + backward of this stage's chunk on one micro-batch (median of reps), outside the pipeline."""
    chunk = stage.submod
    ids = torch.randint(0, cfg.vocab_size, (mb, seq + 1), device=device)
    times = []
    for _ in range(reps + 1):
        if chunk.first:
            args = (ids[:, :-1],)
        else:
            act = lambda: torch.randn(mb, seq, cfg.hidden_size, device=device, dtype=dtype,  # noqa: E731
                                      requires_grad=True)
            args = (act(), act()) if chunk.with_emb else (act(),)
        _sync(device)
        t = time.perf_counter()
        out = chunk(*args)
        if chunk.last:
            loss = loss_fn(out, ids)
        else:
            outs = out if isinstance(out, tuple) else (out,)
            loss = sum((o.float() * 1e-3).sum() for o in outs)
        loss.backward()
        _sync(device)
        times.append(time.perf_counter() - t)
    chunk.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main() -> None:
    a = parse_args()
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    pp = world // a.ep
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(a.device, torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    cfg = load_model_config("lite-8L")
    cfg = shrink(cfg) if a.tiny else cfg
    cfg = cfg.replace(num_hidden_layers=max(cfg.num_hidden_layers, 2 * pp))
    n_micro = a.micro or 4 * pp
    if a.batch % n_micro:
        raise SystemExit(f"--batch {a.batch} must be a multiple of the {n_micro} micro-batches")
    mb = a.batch // n_micro
    mesh = ParallelMesh(pp, 1, a.ep, device.type, overlap=True)
    model = build(cfg, device, dtype, seed=0).train()
    if a.ep > 1:
        apply_expert_parallel(model, mesh.ep_group)
    loss_fn = PipelineLoss(lam=0.3)
    result = {"pp": pp, "ep": a.ep, "n_micro": n_micro, "micro_batch": mb, "seq": a.seq, "device": str(device)}
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), device=device,
                        generator=None if a.device == "cuda" else torch.Generator().manual_seed(0))
    for mode in ("sequential", "overlap"):
        schedule, stages = build_dualpipev(model, mesh.pp_rank, pp, loss_fn, n_micro, (mb, a.seq),
                                           group=mesh.pp_group, device=device)
        handler = None
        if mode == "overlap":
            handler = enable_overlap(schedule, {mesh.ep_group: mesh.ep_group_bwd} if a.ep > 1 else None)
            if handler is None:
                result["overlap"] = "unavailable on this torch"
                break
        if mode == "sequential":
            result["busy_s"] = n_micro * sum(chunk_cost(s, mb, a.seq, cfg, device, dtype, loss_fn) for s in stages)
        times, losses_seen = [], []
        for step in range(a.warmup + a.steps):
            _sync(device)
            dist.barrier()
            t = time.perf_counter()
            if mesh.pp_rank == 0:
                losses = []
                schedule.step(ids[:, :-1].contiguous(), target=ids, losses=losses)
                losses_seen.append(torch.stack(losses).mean().item())
            else:
                schedule.step()
            _sync(device)
            times.append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
        step_s = statistics.median(times[a.warmup:])
        t = torch.tensor([step_s, result["busy_s"]], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)         # the slowest rank sets the step
        result[mode] = {"step_s": t[0].item(), "busy_s_max": t[1].item(),
                        "bubble_this_rank": 1 - result["busy_s"] / step_s,
                        "loss": losses_seen[-1] if losses_seen else None,
                        "tok_per_s": a.batch * a.ep * a.seq / t[0].item()}
        if handler is not None:
            result[mode]["pairs_overlapped"] = handler.n_overlapped
            handler.close()
    if isinstance(result.get("overlap"), dict):
        seq_s, ovl_s = result["sequential"]["step_s"], result["overlap"]["step_s"]
        result["hidden"] = (seq_s - ovl_s) / seq_s
    if rank == 0:
        print(json.dumps(result, indent=1), flush=True)
        out = Path(os.environ.get("OUT", "out"))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"dualpipev_pp{pp}_ep{a.ep}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
