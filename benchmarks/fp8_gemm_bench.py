"""FP8 training GEMMs on the GPU (issue 6): block-scaled FP8 GEMM TFLOP/s vs bf16 cuBLAS and torch's blockwise
scaled_mm, the grouped FP8 GEMM vs bf16 torch._grouped_mm at lite expert shapes, and the quantisers' bandwidth.

Every kernel is first checked against its PyTorch reference on the same inputs (relative Frobenius error), then
timed with `triton.testing.do_bench` (median). FLOPs = 2 M N K. Targets (ANCHORS / issue 6): >= 1300 TFLOP/s at
8192^3 and never slower than scaled_mm blockwise; grouped >= 1.4x bf16.

GPU: PYTHONPATH=src python benchmarks/fp8_gemm_bench.py            (JSON in $OUT/fp8_gemm_bench.json)

--training (issue 15: dense FP8 GEMMs never slower than `torch._scaled_mm` blockwise, >= 1.5x bf16, M = 1..16
handled): the three GEMMs of each lite / V3 projection as training runs them through the dispatcher `fp8_gemm`
(cuBLASLt blockwise on sm_90, operands padded where K or N is not a multiple of 128, M to 16), against bf16 cuBLAS:
forward (M tokens, N, K), input gradient (M, K, N), weight gradient (N, K, M tokens: both operands 1x128 tiles along
the tokens), and the forward at M = 1, 2, 4, 8, 16; each checked against the fp32 reference first.
      PYTHONPATH=src python benchmarks/fp8_gemm_bench.py --training   (JSON in $OUT/fp8_gemm_training.json)
      PYTHONPATH=src python benchmarks/fp8_gemm_bench.py --training --dry-run    (CPU, the reference, tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from dsv3.kernels.fp8_gemm import (fp8_gemm, fp8_gemm_reference, fp8_gemm_scaled_mm, fp8_gemm_triton,
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
    if not torch.cuda.is_available():        # --dry-run: wall clock, that the path runs
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3


# (name, N, K) of the projections whose GEMMs training runs in FP8 (lite: hidden 2048; V3: hidden 7168)
TRAIN_LAYERS = [("lite q_proj", 3072, 2048), ("lite kv_a", 576, 2048), ("lite o_proj", 2048, 2048),
                ("lite ffn up", 10944, 2048), ("lite ffn down", 2048, 10944), ("v3 q_a", 1536, 7168),
                ("v3 q_b", 24576, 1536), ("v3 ffn up", 18432, 7168), ("v3 ffn down", 7168, 18432)]


def training_gemms(dry_run: bool) -> list[dict]:
    """--training: fp8_gemm (what FP8TrainLinear calls) vs bf16 for forward, dgrad, wgrad and small M."""
    dev, tokens = ("cpu", 256) if dry_run else ("cuda", 8192)
    layers = [("tiny", 320, 256)] if dry_run else TRAIN_LAYERS
    rows = []
    for name, N, K in layers:
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_blocks(w)
        wq_t, ws_t = wq.t().contiguous(), ws.t().contiguous()       # W^T's blocks (the input gradient's)
        cases = []
        for m in (tokens, 1, 2, 4, 8, 16):
            cases.append((f"fwd M={m}", torch.randn(m, K, device=dev, dtype=torch.bfloat16), (wq, ws), w))
        cases.append(("dgrad", torch.randn(tokens, N, device=dev, dtype=torch.bfloat16), (wq_t, ws_t), w.t()))
        x = torch.randn(tokens, K, device=dev, dtype=torch.bfloat16)
        dy_t = torch.randn(N, tokens, device=dev, dtype=torch.bfloat16)
        cases.append(("wgrad", dy_t, quantize_tiles_transposed(x), x.t()))     # dW = dy^T x: (N, M) @ (M, K)
        for gemm, a, (bq, bs), b_hp in cases:
            aq, as_ = quantize_tiles(a)
            Mg, Ng, Kg = a.shape[0], bq.shape[0], a.shape[1]
            flops = 2 * Mg * Ng * Kg
            b_lin = b_hp if gemm != "wgrad" else b_hp.contiguous()   # bf16 peer: a @ b_lin^T, b_lin (Ng, Kg)
            r = {"layer": name, "gemm": gemm, "M": Mg, "N": Ng, "K": Kg,
                 "err": rel(fp8_gemm(aq, as_, bq, bs), fp8_gemm_reference(aq, as_, bq, bs)),
                 "fp8_tflops": flops / bench(lambda: fp8_gemm(aq, as_, bq, bs)) / 1e12,
                 "bf16_tflops": flops / bench(lambda: torch.nn.functional.linear(a, b_lin)) / 1e12}
            r["speedup"] = r["fp8_tflops"] / r["bf16_tflops"]
            # the Triton kernel beside the dispatcher's choice: where it wins, a shape rule for the dispatcher
            if dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
                r["triton_tflops"] = flops / bench(lambda: fp8_gemm_triton(aq, as_, bq, bs)) / 1e12
                r["triton_speedup"] = r["triton_tflops"] / r["bf16_tflops"]
            rows.append(r)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--training", action="store_true", help="only the training GEMM shapes (module docstring)")
    p.add_argument("--dry-run", action="store_true", help="with --training: CPU, tiny shapes")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.training:
        out = Path(os.environ.get("OUT", "out"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "fp8_gemm_training.json").write_text(json.dumps(training_gemms(a.dry_run), indent=1))
        return
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
