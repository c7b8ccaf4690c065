"""Issue 17 probe: is one grouped GEMM over a fused gate+up weight (E, 2I, D) worth a parameter-layout change?
Forward + backward of the routed experts' SwiGLU at lite-8L's training shape (B4 x 2048 tokens, top-6 of 64
experts, D 2048, I 1408, bf16), three ways, CUDA-event timed after warm-up:
  separate   silu(x Wg^T) * (x Wu^T), then down: today's `expert_ffn` (two grouped GEMMs for gate and up)
  fused      one grouped GEMM over a stored (E, 2I, D) weight, split, then down
  cat        the fused GEMM over torch.cat of the two stored weights every step (no layout change; pays a copy)
GPU: PYTHONPATH=src python benchmarks/gate_up_probe.py     CPU dry run: --tokens 256 --experts 8 --device cpu
"""
import argparse

import torch
import torch.nn.functional as F


def ffn(mode, x, wg, wu, wgu, wd, offs):
    if mode == "separate":
        h = F.silu(torch._grouped_mm(x, wg.transpose(-2, -1), offs=offs)) * \
            torch._grouped_mm(x, wu.transpose(-2, -1), offs=offs)
    else:
        w = wgu if mode == "fused" else torch.cat([wg, wu], dim=1)
        g, u = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        h = F.silu(g) * u
    return torch._grouped_mm(h, wd.transpose(-2, -1), offs=offs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    dev, dt = a.device, (torch.bfloat16 if a.device == "cuda" else torch.float32)
    E, D, I, M = a.experts, a.dim, a.inter, a.tokens * a.topk
    torch.manual_seed(0)
    counts = torch.bincount(torch.randint(0, E, (M,)), minlength=E)
    offs = counts.cumsum(0).to(torch.int32).to(dev)
    x = torch.randn(M, D, device=dev, dtype=dt, requires_grad=True)
    mk = lambda *s: (torch.randn(*s, device=dev, dtype=dt) * 0.02).requires_grad_()
    wg, wu, wd = mk(E, I, D), mk(E, I, D), mk(E, D, I)
    wgu = torch.cat([wg, wu], dim=1).detach().requires_grad_()
    dy = torch.randn(M, D, device=dev, dtype=dt)
    ref = ffn("separate", x, wg, wu, wgu, wd, offs)
    for mode in ("fused", "cat"):
        err = (ffn(mode, x, wg, wu, wgu, wd, offs) - ref).abs().max().item()
        print(f"{mode}: max |diff| vs separate {err:.3g}")
    flops = 2 * M * D * I * 3 * 3          # three GEMMs forward, twice that backward
    for mode in ("separate", "fused", "cat"):
        def step():
            y = ffn(mode, x, wg, wu, wgu, wd, offs)
            y.backward(dy)
        for _ in range(3):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(a.iters):
                step()
            e.record()
            torch.cuda.synchronize()
            ms = s.elapsed_time(e) / a.iters
            print(f"{mode:9s} fwd+bwd {ms:7.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
        else:
            step()
            print(f"{mode:9s} ran", flush=True)


if __name__ == "__main__":
    main()
