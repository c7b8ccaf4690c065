"""Weight-only FP8 GEMMs (dsv3.kernels.fp8_weight_gemm) at `lite` decode shapes vs bf16 cuBLAS / torch._grouped_mm.

Dense: the FP8-stored projections of a lite layer (q_proj 3072x2048, kv_a 576x2048, o_proj 2048x2048, dense-FFN
gate/up 10944x2048 and down 2048x10944) at M = 1, 32, 64 rows. Grouped: the 64 routed experts (gate/up 1408x2048,
down 2048x1408) with B = 1, 32, 64 tokens x 6 experts each, routed at random. Each case is first checked against the
reference, then timed with `triton.testing.do_bench_cudagraph` (median; eager timing would measure the launch): the default launch config and the best of a small
sweep (block_n, warps, stages; split-K slices for the dense ones). Bandwidth = weight bytes the call must read (fp8 + scales; for grouped, only the
experts hit) / time, against the 4.28 TB/s copy bandwidth; the bf16 rows read twice the bytes.

GPU: PYTHONPATH=src python benchmarks/fp8_weight_gemm_bench.py     (JSON in $OUT/fp8_weight_gemm.json)
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import torch
import triton.testing

from dsv3.fp8 import quantize_blocks
from dsv3.kernels.fp8_weight_gemm import (fp8_grouped_linear_reference, fp8_grouped_linear_triton,
                                          fp8_linear_reference, fp8_linear_triton)

COPY_BW = 4.28e12
DENSE = {"q_proj": (3072, 2048), "kv_a": (576, 2048), "o_proj": (2048, 2048), "ffn_up": (10944, 2048),
         "ffn_down": (2048, 10944)}
EXPERTS = {"expert_up": (1408, 2048), "expert_down": (2048, 1408)}
SWEEP = [dict(block_n=bn, num_warps=w, num_stages=s) for bn, w, s in itertools.product((16, 32, 64, 128), (4, 8),
                                                                                         (3, 5))]
# dense decode GEMMs: K slices too (split_k = 1 is the kernel without them)
DENSE_SWEEP = [dict(block_n=bn, num_warps=4, num_stages=s, split_k=k)
               for bn, s, k in itertools.product((16, 32, 64), (3, 5), (1, 2, 4, 8, 16))]


def bench(fn) -> float:
    # replayed from a CUDA graph: single small GEMMs take less GPU time than their launch on this host
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e-3


def best(fn_of_cfg, sweep=SWEEP) -> tuple[float, dict]:
    out = []
    for cfg in sweep:
        try:
            out.append((bench(lambda: fn_of_cfg(cfg)), cfg))
        except Exception:     # configs over the shared-memory limit
            continue
    return min(out, key=lambda t: t[0])


def main() -> None:
    dev = "cuda"
    torch.manual_seed(0)
    rows = []
    for (name, (N, K)), M in itertools.product(DENSE.items(), (1, 32, 64)):
        w = torch.randn(N, K, device=dev) * 0.02
        q, s = quantize_blocks(w)
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        ref = fp8_linear_reference(x, q, s).float()
        err = ((fp8_linear_triton(x, q, s).float() - ref).norm() / ref.norm()).item()
        wb = w.to(torch.bfloat16)
        t_def = bench(lambda: fp8_linear_triton(x, q, s))
        t_best, cfg = best(lambda c: fp8_linear_triton(x, q, s, **c), DENSE_SWEEP)
        t_bf16 = bench(lambda: torch.nn.functional.linear(x, wb))
        nbytes = q.numel() + s.numel() * 4
        rows.append(dict(kind="dense", name=name, M=M, N=N, K=K, rel_err=err, us_default=t_def * 1e6,
                         us_best=t_best * 1e6, best=cfg, us_bf16=t_bf16 * 1e6,
                         bw_best=nbytes / t_best, bw_bf16=2 * N * K / t_bf16))
    for (name, (N, K)), B in itertools.product(EXPERTS.items(), (1, 32, 64)):
        E = 64
        w = torch.randn(E, N, K, device=dev) * 0.02
        pairs = [quantize_blocks(m) for m in w]
        q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        idx = torch.stack([torch.randperm(E, device=dev)[:6] for _ in range(B)]).flatten()
        counts = torch.bincount(idx, minlength=E)
        offs = counts.cumsum(0).to(torch.int32)
        M = idx.numel()
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        ref = fp8_grouped_linear_reference(x, q, s, offs).float()
        err = ((fp8_grouped_linear_triton(x, q, s, offs).float() - ref).norm() / ref.norm()).item()
        wb = w.to(torch.bfloat16).transpose(-2, -1)
        t_def = bench(lambda: fp8_grouped_linear_triton(x, q, s, offs))
        t_best, cfg = best(lambda c: fp8_grouped_linear_triton(x, q, s, offs, **c))
        t_bf16 = bench(lambda: torch._grouped_mm(x, wb, offs=offs))
        hit = int((counts > 0).sum())
        nbytes = hit * (N * K + s[0].numel() * 4)
        rows.append(dict(kind="grouped", name=name, B=B, M=M, N=N, K=K, experts_hit=hit, rel_err=err,
                         us_default=t_def * 1e6, us_best=t_best * 1e6, best=cfg, us_bf16=t_bf16 * 1e6,
                         bw_best=nbytes / t_best, bw_bf16=2 * hit * N * K / t_bf16))
    for r in rows:
        m = f"M={r['M']}" if r["kind"] == "dense" else f"B={r['B']} ({r['experts_hit']} experts)"
        print(f"{r['name']:11s} {m:20s} err {r['rel_err']:.1e}  fp8 {r['us_default']:7.1f} us default, "
              f"{r['us_best']:7.1f} us best {r['best']}  ({r['bw_best'] / 1e12:.2f} TB/s)  bf16 {r['us_bf16']:7.1f} us "
              f"({r['bw_bf16'] / 1e12:.2f} TB/s)  speed-up {r['us_bf16'] / r['us_best']:.2f}x", flush=True)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_weight_gemm.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
