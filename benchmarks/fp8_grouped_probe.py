"""Probe (issue 15): which FP8 grouped GEMMs torch offers on this GPU, at lite expert shapes, and their speed vs bf16
torch._grouped_mm. Rowwise scales (torch._scaled_grouped_mm: one scale per token row, one per expert output column)
and, where F.scaled_grouped_mm exists, the report's 1x128 / 128x128 blockwise recipes. Groups padded to 16 rows.

GPU: PYTHONPATH=src python benchmarks/fp8_grouped_probe.py     (JSON in $OUT/fp8_grouped_probe.json)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

FP8 = torch.float8_e4m3fn


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3


def rowwise(x: torch.Tensor, dim: int = -1):
    amax = x.abs().amax(dim=dim, keepdim=True).float().clamp(min=1e-12)
    scale = 448.0 / amax
    return (x.float() * scale).clamp(-448, 448).to(FP8), (1.0 / scale).squeeze(dim)


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    E, T, topk = 64, 4 * 2048, 6
    rows = []
    print("torch", torch.__version__, "has _scaled_grouped_mm:", hasattr(torch, "_scaled_grouped_mm"),
          "F.scaled_grouped_mm:", hasattr(F, "scaled_grouped_mm"), flush=True)
    for imbalance in ("uniform", "skewed"):
        if imbalance == "uniform":
            idx = torch.stack([torch.randperm(E, device=dev)[:topk] for _ in range(T)]).flatten()
        else:   # zipf-like expert popularity
            p = 1.0 / torch.arange(1, E + 1, device=dev, dtype=torch.float32) ** 0.8
            idx = torch.stack([torch.multinomial(p, topk) for _ in range(T)]).flatten()
        counts = torch.bincount(idx, minlength=E)
        padded = (counts + 15) // 16 * 16
        offs = counts.cumsum(0).to(torch.int32)
        poffs = padded.cumsum(0).to(torch.int32)
        for name, N, K in (("gate/up", 1408, 2048), ("down", 2048, 1408), ("gate+up fused", 2816, 2048)):
            M, Mp = int(offs[-1]), int(poffs[-1])
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            xp = torch.randn(Mp, K, device=dev, dtype=torch.bfloat16)
            w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16) * 0.02
            flops = 2 * M * N * K
            r = {"imbalance": imbalance, "name": name, "M": M, "Mp": Mp, "N": N, "K": K}
            r["bf16"] = flops / bench(lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)) / 1e12
            xg = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
            r["bf16_dgrad"] = flops / bench(lambda: torch._grouped_mm(xg, w, offs=offs)) / 1e12
            r["bf16_wgrad"] = flops / bench(lambda: torch._grouped_mm(xg.t(), x, offs=offs)) / 1e12
            try:
                xq, xs = rowwise(xp)
                wq, wsc = rowwise(w)                      # (E, N, K) per output row n
                ref = torch._grouped_mm(xp, w.transpose(-2, -1), offs=poffs)
                y = torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), xs, wsc, offs=poffs, out_dtype=torch.bfloat16,
                                             use_fast_accum=True)
                r["rowwise_err"] = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                r["rowwise"] = flops / bench(lambda: torch._scaled_grouped_mm(
                    xq, wq.transpose(-2, -1), xs, wsc, offs=poffs, out_dtype=torch.bfloat16,
                    use_fast_accum=True)) / 1e12
                r["rowwise_slow_accum"] = flops / bench(lambda: torch._scaled_grouped_mm(
                    xq, wq.transpose(-2, -1), xs, wsc, offs=poffs, out_dtype=torch.bfloat16,
                    use_fast_accum=False)) / 1e12
                r["quant_rowwise_ms"] = bench(lambda: rowwise(xp)) * 1e3
            except Exception as e:
                r["rowwise_error"] = repr(e)[:300]
            try:   # unaligned groups
                xq, xs = rowwise(x)
                torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), xs, wsc, offs=offs, out_dtype=torch.bfloat16)
                torch.cuda.synchronize()
                r["unaligned_ok"] = True
            except Exception as e:
                r["unaligned_error"] = repr(e)[:200]
            if hasattr(F, "scaled_grouped_mm"):
                try:
                    from torch.nn.functional import ScalingType, SwizzleType  # noqa: F401
                    xq, _ = rowwise(xp)
                    sa = torch.ones(Mp, K // 128, device=dev)
                    sb = torch.ones(E, N // 128 if N % 128 == 0 else N // 128 + 1, K // 128, device=dev)
                    F.scaled_grouped_mm(xq, wq.transpose(-2, -1), sa, ScalingType.BlockWise1x128, sb,
                                        ScalingType.BlockWise128x128, offs=poffs, output_dtype=torch.bfloat16)
                    torch.cuda.synchronize()
                    r["blockwise_ok"] = True
                except Exception as e:
                    r["blockwise_error"] = repr(e)[:300]
            rows.append(r)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_grouped_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
