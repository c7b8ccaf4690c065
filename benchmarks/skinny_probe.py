"""bf16 projections of 2..64-row decode steps: cuBLAS against the tiled Triton kernel with split-K
(`kernels.fp8_weight_gemm.dense_linear_triton`, what `EngineConfig.skinny_gemm` switches on), cold, on lite's shapes.

Why: at batch 32 the dense GEMMs of a lite step read ~1.2 GB in 1.36 ms (H100, RESULTS.md eighteenth session), ~0.7
TB/s for the per-layer projections: cuBLAS's few-row kernels leave most SMs idle. Each call of the captured sequence
reads the next of 256 MB of weight copies (cold, as in a step). Every variant is checked against F.linear first.
Prints per (shape, M): cuBLAS, the kernel at its default launch, and the best of a small launch sweep, in us and TB/s.

GPU:  PYTHONPATH=src python benchmarks/skinny_probe.py [--m 2,8,16,32,64]
CPU:  TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/skinny_probe.py --dry-run   (correctness only, tiny shapes)
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from dsv3.kernels.fp8_weight_gemm import dense_linear_triton

# (N, K) of lite's bf16 decode projections: MLA's fused q + kv_a, o_proj, the dense layer's fused gate + up and its
# down, the head (the shared experts run inside the fused MoE kernel)
SHAPES = {"q_kv_a": (3648, 2048), "o_proj": (2048, 2048), "dense_up": (21888, 2048), "dense_down": (2048, 10944),
          "lm_head": (102400, 2048)}
SWEEP = [dict(block_n=bn, split_k=sk, num_warps=w, num_stages=st)
         for bn, sk, w, st in itertools.product((16, 32), (1, 2, 4, 8), (4,), (3, 4))]
COLD_BYTES = 256 << 20


def bench(fn, x: torch.Tensor, copies: list[torch.Tensor]) -> float:
    import triton.testing
    it = itertools.cycle(copies)
    return triton.testing.do_bench_cudagraph(lambda: fn(x, next(it)), rep=20, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", default="2,8,16,32,64", help="rows of x, comma-separated")
    ap.add_argument("--dry-run", action="store_true", help="CPU interpreter: correctness on tiny shapes")
    ap.add_argument("--no-sweep", action="store_true", help="the default launch only")
    args = ap.parse_args()
    if args.dry_run:
        from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
        patch_interpreter_for_numpy2()
    dev, dtype = ("cpu", torch.float32) if args.dry_run else ("cuda", torch.bfloat16)
    shapes = {"tiny": (40, 300)} if args.dry_run else SHAPES
    sweep = [] if args.no_sweep or args.dry_run else SWEEP
    torch.manual_seed(0)
    for (name, (N, K)), m in itertools.product(shapes.items(), [int(v) for v in args.m.split(",")]):
        w = torch.randn(N, K, device=dev, dtype=dtype) * 0.02
        x = torch.randn(m, K, device=dev, dtype=dtype)
        want = F.linear(x.double(), w.double())
        err = ((dense_linear_triton(x, w).double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-2, (name, m, err)
        if args.dry_run:
            print(f"{name} M={m}: err {err:.1e}")
            continue
        copies = [w.clone() for _ in range(max(1, COLD_BYTES // (2 * w.numel())))]
        nbytes = 2 * w.numel()
        cublas = bench(F.linear, x, copies)
        default = bench(dense_linear_triton, x, copies)
        best, best_cfg = default, "default"
        for cfg in sweep:
            try:
                us = bench(lambda a, b, c=cfg: dense_linear_triton(a, b, **c), x, copies)
            except Exception as e:                       # a launch past the SM's shared memory: skip it
                print(f"  {name} M={m} {cfg}: {type(e).__name__}", flush=True)
                continue
            if us < best:
                best, best_cfg = us, cfg
        print(f"{name:10s} M={m:<3d} cuBLAS {cublas:7.2f} us ({nbytes / cublas / 1e6:4.2f} TB/s)  triton default "
              f"{default:7.2f} us ({nbytes / default / 1e6:4.2f} TB/s, {cublas / default:4.2f}x)  best {best:7.2f} us "
              f"({cublas / best:4.2f}x) {best_cfg}  err {err:.1e}", flush=True)
        del copies
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
