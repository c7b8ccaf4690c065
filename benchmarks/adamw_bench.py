"""The one-pass AdamW update at lite-8L's parameter sizes (issue 17): FP32 masters whole (20 bytes moved per
parameter: grad, m, v, master read; m, v, master, param written) against split ones (18: the BF16 parameter is the
master's high half, an int16 tensor its low half; `dsv3.kernels.adamw`), BF16 moments, time and effective bandwidth.

    python benchmarks/adamw_bench.py                  # on the GPU: 5.05B parameters, ~60 GB of state per arm
    python benchmarks/adamw_bench.py --scale 0.0005 --device cpu     # dry run (the reference)
"""

from __future__ import annotations

import argparse

import torch

from dsv3.kernels.adamw import adamw_update, split_master
from grad_norm_bench import bench, shapes   # lite-8L's parameter shapes (benchmarks/: the script's directory)

HP = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def state(shape: tuple[int, ...], dev: torch.device, split: bool) -> tuple[torch.Tensor, ...]:
    w = torch.randn(shape, device=dev) * 0.02
    p, master = split_master(w) if split else (w.to(torch.bfloat16), w)
    grad = (torch.randn(shape, device=dev) * 1e-3).to(torch.bfloat16)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    return p, grad, m, v, master


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="of lite-8L's parameter count")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=5, help="timed updates per arm")
    a = ap.parse_args()
    dev = torch.device(a.device)
    for split, per_param in ((False, 20), (True, 18)):
        torch.manual_seed(0)
        tensors = [state(sh, dev, split) for sh in shapes(a.scale)]
        n = sum(t[0].numel() for t in tensors)
        dt = bench(lambda ts: [adamw_update(*t, step=2, **HP) for t in ts], tensors, a.iters,
                   torch.cuda.synchronize if dev.type == "cuda" else (lambda: None))
        name = "split master (bf16 + int16)" if split else "FP32 master"
        peak = f", peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if dev.type == "cuda" else ""
        print(f"{name:28s} {n / 1e9:.2f}B params: {dt * 1e3:8.2f} ms/step  {n * per_param / dt / 1e12:5.2f} TB/s "
              f"({per_param} B/param){peak}", flush=True)
        del tensors
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if dev.type == "cuda":      # the peer: torch's fused AdamW, BF16 parameters and state, no master (14 B/param)
        params = [torch.nn.Parameter((torch.randn(sh, device=dev) * 0.02).to(torch.bfloat16)) for sh in shapes(a.scale)]
        for p in params:
            p.grad = (torch.randn_like(p, dtype=torch.float32) * 1e-3).to(torch.bfloat16)
        opt = torch.optim.AdamW(params, fused=True, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                                weight_decay=HP["weight_decay"])
        n = sum(p.numel() for p in params)
        dt = bench(lambda _: opt.step(), None, a.iters, torch.cuda.synchronize)
        print(f"{'torch fused AdamW (peer)':28s} {n / 1e9:.2f}B params: {dt * 1e3:8.2f} ms/step  "
              f"{n * 14 / dt / 1e12:5.2f} TB/s (14 B/param, bf16 state, no master)", flush=True)


if __name__ == "__main__":
    main()
