"""Gradient-norm pass at lite-8L's gradient sizes (issue 17): the Triton FP64-accumulating sum of squares vs the
reference (`torch._foreach_norm` in FP64) vs a plain FP32 `_foreach_norm`, time and effective read bandwidth.

    python benchmarks/grad_norm_bench.py            # on the GPU: ~9.2 GB of bf16 gradients (4.59B elements)
    python benchmarks/grad_norm_bench.py --scale 0.001 --device cpu   # dry run
"""

from __future__ import annotations

import argparse
import time

import torch

from dsv3.kernels.grad_norm import sum_of_squares_reference, sum_of_squares_triton


def shapes(scale: float) -> list[tuple[int, ...]]:
    """lite-8L-like: 8 layers x 3 expert tensors (64, 1408, 2048) (stacked, as `dsv3.model.moe` holds them) + dense
    projections, embeddings (~5.05B). The per-expert matrices this listed before made 1,600 launches per update,
    which bound the AdamW bench on the host (1.76-1.97 TB/s where the trainer's kernels ran at ~3 TB/s)."""
    s = lambda n: max(1, int(n * scale))  # noqa: E731
    out = [(s(102400), 2048), (s(102400), 2048)]
    for _ in range(8):
        out += [(64, s(1408), 2048)] * 3 + [(s(2048), 2048)] * 6 + [(s(2048),)] * 4
    return out


def bench(fn, tensors, iters: int, sync) -> float:
    fn(tensors); sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(tensors)
    sync()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    tensors = [torch.randn(sh, device=dev, generator=g, dtype=torch.bfloat16) * 1e-3 for sh in shapes(a.scale)]
    n = sum(t.numel() for t in tensors)
    nbytes = n * 2
    ref = sum_of_squares_reference(tensors)
    arms = {"reference (foreach_norm fp64)": sum_of_squares_reference,
            "foreach_norm fp32": lambda ts: torch.stack(torch._foreach_norm(ts, 2)).square().sum()}
    if dev.type == "cuda":
        arms["triton fp64 accumulate"] = sum_of_squares_triton
        got = sum_of_squares_triton(tensors)
        print(f"triton vs reference relative error {abs(got.item() - ref.item()) / ref.item():.2e}")
    print(f"{len(tensors)} tensors, {n / 1e9:.2f}B elements, {nbytes / 1e9:.2f} GB bf16")
    for name, fn in arms.items():
        t = bench(fn, tensors, a.iters, sync)
        print(f"{name:32s} {t * 1e3:8.2f} ms  {nbytes / t / 1e12:6.2f} TB/s")


if __name__ == "__main__":
    main()
