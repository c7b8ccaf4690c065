"""Issue 17 probe: the loss head at lite-8L's training shape (8,192 tokens, D 2048, vocab 102,400, bf16), forward +
backward, time and peak memory:
  ours      F.linear -> torch.compile'd fp32 cross-entropy (today's trainer: dsv3.train.trainer.cross_entropy)
  liger     liger-kernel's LigerFusedLinearCrossEntropyLoss (chunked, never materialises the full logits)
GPU: PYTHONPATH=src:<liger wheel dir> python benchmarks/loss_head_probe.py
"""
import argparse

import torch
import torch.nn.functional as F

from dsv3.train.trainer import cross_entropy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=102400)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    h = torch.randn(a.tokens, a.dim, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(a.vocab, a.dim, device=dev, dtype=dt) * 0.02).requires_grad_()
    t = torch.randint(0, a.vocab, (a.tokens,), device=dev)
    ce = torch.compile(cross_entropy)
    ways = {"ours": lambda: ce(F.linear(h, w)[None], t[None])}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        ways["liger"] = lambda: liger(w, h, t)
    except ImportError as e:
        print(f"liger: not importable ({e})")
    ref = None
    for name, fn in ways.items():
        loss = fn()
        loss.backward()
        grads = (h.grad.float().clone(), w.grad.float().clone())
        if ref is None:
            ref = (loss.item(), *grads)
        else:
            print(f"{name}: loss {loss.item():.6f} vs {ref[0]:.6f}, grad h max|diff| "
                  f"{(grads[0] - ref[1]).abs().max().item():.3g}, grad w {(grads[1] - ref[2]).abs().max().item():.3g}")
        for _ in range(2):
            h.grad = w.grad = None
            fn().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(a.iters):
            h.grad = w.grad = None
            fn().backward()
        e.record()
        torch.cuda.synchronize()
        ms = s.elapsed_time(e) / a.iters
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        print(f"{name:6s} fwd+bwd {ms:7.3f} ms, peak above inputs {peak:6.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
