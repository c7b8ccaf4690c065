"""FP8 training GEMMs on the GPU (issue 6): block-scaled FP8 GEMM TFLOP/s vs bf16 cuBLAS and torch's blockwise
scaled_mm, the grouped FP8 GEMM vs bf16 torch._grouped_mm at lite expert shapes, and the quantisers' bandwidth.

Every kernel is first checked against its PyTorch reference on the same inputs (relative Frobenius error), then
timed with `triton.testing.do_bench` (median). FLOPs = 2 M N K. Targets (ANCHORS / issue 6): >= 1300 TFLOP/s at
8192^3 and never slower than scaled_mm blockwise; grouped >= 1.4x bf16.

GPU: PYTHONPATH=src python benchmarks/fp8_gemm_bench.py            (JSON in $OUT/fp8_gemm_bench.json)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton.testing

from dsv3.kernels.fp8_gemm import (fp8_gemm_reference, fp8_gemm_scaled_mm, fp8_gemm_triton,
                                   fp8_grouped_gemm_reference, fp8_grouped_gemm_triton)
from dsv3.kernels.fp8_quant import (quantize_blocks, quantize_blocks_reference, quantize_tiles,
                                    quantize_tiles_reference, quantize_tiles_transposed,
                                    quantize_tiles_transposed_reference)

# (name, M, N, K): 8192^3, then V3 (hidden 7168) and lite (hidden 2048) projections at 4096 / 8192 tokens
SHAPES = [("cube", 8192, 8192, 8192),
          ("v3 q_a", 4096, 1536, 7168), ("v3 q_b", 4096, 24576, 1536), ("v3 o_proj", 4096, 7168, 16384),
          ("v3 ffn up", 4096, 18432, 7168), ("v3 ffn down", 4096, 7168, 18432), ("v3 expert up", 4096, 2048, 7168),
          ("lite q_proj", 8192, 3072, 2048), ("lite o_proj", 8192, 2048, 2048), ("lite ffn up", 8192, 10944, 2048),
          ("lite ffn down", 8192, 2048, 10944)]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    rows = []
    for name, M, N, K in SHAPES:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        xq, xs = quantize_tiles(x)
        wq, ws = quantize_blocks(w)
        ref = fp8_gemm_reference(xq, xs, wq, ws)
        flops = 2 * M * N * K
        r = {"name": name, "M": M, "N": N, "K": K,
             "err_triton": rel(fp8_gemm_triton(xq, xs, wq, ws), ref),
             "tflops_triton": flops / bench(lambda: fp8_gemm_triton(xq, xs, wq, ws)) / 1e12,
             "tflops_bf16": flops / bench(lambda: torch.nn.functional.linear(x, w)) / 1e12}
        try:
            r["err_scaled_mm"] = rel(fp8_gemm_scaled_mm(xq, xs, wq, ws), ref)
            r["tflops_scaled_mm"] = flops / bench(lambda: fp8_gemm_scaled_mm(xq, xs, wq, ws)) / 1e12
        except Exception as e:        # shapes or builds scaled_mm refuses
            r["scaled_mm_error"] = repr(e)[:200]
        rows.append(r)
        print(f"{name:14s} {M}x{N}x{K}: triton {r['tflops_triton']:7.1f} TFLOP/s (err {r['err_triton']:.1e})  "
              f"scaled_mm {r.get('tflops_scaled_mm', float('nan')):7.1f}  bf16 cuBLAS {r['tflops_bf16']:7.1f}",
              flush=True)
    # launch-config sweep (the defaults in kernels/fp8_gemm.py are untuned starting points)
    sweep = [(128, 128, 8, 4), (128, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3), (128, 256, 8, 4),
             (256, 128, 8, 3), (64, 256, 4, 4), (64, 128, 4, 4)]
    M = N = K = 8192
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
    xq, xs = quantize_tiles(x)
    wq, ws = quantize_blocks(w)
    for bm, bn, nw, ns in sweep:
        kw = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        try:
            t = bench(lambda: fp8_gemm_triton(xq, xs, wq, ws, **kw))
            rows.append({"name": "sweep cube", **kw, "tflops_triton": 2 * M * N * K / t / 1e12})
            print(f"sweep 8192^3 {kw}: {2 * M * N * K / t / 1e12:7.1f} TFLOP/s", flush=True)
        except Exception as e:           # out of shared memory, etc.
            print(f"sweep 8192^3 {kw}: failed {repr(e)[:120]}", flush=True)
    # grouped: lite's 64 experts, 4 x 2048 tokens x 6 experts each, routed at random
    E, T = 64, 4 * 2048
    for name, N, K in (("lite experts gate/up", 1408, 2048), ("lite experts down", 2048, 1408)):
        idx = torch.stack([torch.randperm(E, device=dev)[:6] for _ in range(T)]).flatten()
        counts = torch.bincount(idx, minlength=E)
        offs = counts.cumsum(0).to(torch.int32)
        M = idx.numel()
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16) * 0.02
        xq, xs = quantize_tiles(x)
        pairs = [quantize_blocks(m) for m in w]
        wq, ws = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        ref = fp8_grouped_gemm_reference(xq, xs, wq, ws, offs)
        flops = 2 * M * N * K
        wt = w.transpose(-2, -1)
        r = {"name": name, "M": M, "N": N, "K": K, "groups": E,
             "err_triton": rel(fp8_grouped_gemm_triton(xq, xs, wq, ws, offs), ref),
             "tflops_triton": flops / bench(lambda: fp8_grouped_gemm_triton(xq, xs, wq, ws, offs)) / 1e12,
             "tflops_bf16": flops / bench(lambda: torch._grouped_mm(x, wt, offs=offs)) / 1e12}
        r["speedup"] = r["tflops_triton"] / r["tflops_bf16"]
        rows.append(r)
        for bm, bn, nw, ns in sweep:
            kw = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
            try:
                t = bench(lambda: fp8_grouped_gemm_triton(xq, xs, wq, ws, offs, **kw))
                rows.append({"name": f"sweep {name}", **kw, "tflops_triton": flops / t / 1e12})
                print(f"  sweep {kw}: {flops / t / 1e12:7.1f} TFLOP/s", flush=True)
            except Exception as e:
                print(f"  sweep {kw}: failed {repr(e)[:120]}", flush=True)
        print(f"{name:20s} M={M} N={N} K={K}: fp8 grouped {r['tflops_triton']:7.1f} TFLOP/s (err "
              f"{r['err_triton']:.1e})  bf16 _grouped_mm {r['tflops_bf16']:7.1f}  -> {r['speedup']:.2f}x", flush=True)
    # quantisers: bytes read + written per second
    x = torch.randn(8192, 7168, device=dev, dtype=torch.bfloat16)
    for name, fn, ref_fn in (("tiles", quantize_tiles, quantize_tiles_reference),
                             ("tiles transposed", quantize_tiles_transposed, quantize_tiles_transposed_reference),
                             ("blocks", quantize_blocks, quantize_blocks_reference)):
        q, s = fn(x)
        rq, rs = ref_fn(x)
        exact = bool(torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs))
        t = bench(lambda: fn(x))
        nbytes = x.numel() * 3 + s.numel() * 4
        rows.append({"name": f"quantize {name}", "GBps": nbytes / t / 1e9, "exact_vs_reference": exact})
        print(f"quantize {name:17s}: {nbytes / t / 1e12:.2f} TB/s (vs 4.28 copy), exact vs reference: {exact}",
              flush=True)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_gemm_bench.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
