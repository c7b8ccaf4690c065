"""Which operand layouts make bf16 `torch._grouped_mm` fast for the routed experts' forward, dgrad and wgrad (issue 17).

The training step's grouped GEMMs run at ~540 TFLOP/s against ~725 for the forward layout (RESULTS.md, issue 17):
autograd's backward of `_grouped_mm(x, W.mT, offs)` feeds CUTLASS the operands in whatever layout the forward's
views give. This times every GEMM of one expert layer (gate/up: N = 1408, K = 2048; down: N = 2048, K = 1408;
64 experts, 8,192 tokens x 6 = 49,152 rows, uniform or imbalanced groups) in each layout that yields the same
result, checking each against the first variant:
  fwd   y = x @ W_e^T              b = W.mT (col-major view) | W.mT.contiguous() (row-major copy)
  dgrad dx = dy @ W_e              b = W (row-major)         | W.mT.contiguous().mT (col-major copy)
  wgrad dW_e = dy_e^T @ x_e        (E,N,K) directly: a = dy.t() | dy.t().contiguous()
        dW_e^T = x_e^T @ dy_e      (E,K,N), as autograd's b-grad: a = x.t() | x.t().contiguous(), then .mT

GPU: PYTHONPATH=src python benchmarks/grouped_mm_layouts.py     (JSON in $OUT/grouped_mm_layouts.json)
"""

from __future__ import annotations

import json
import os

import torch
import triton.testing


def offsets(M: int, E: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.rand(E, generator=gen) ** skew          # skew 0: uniform; 3: a few hot experts
    # multiples of 16 rows: a contiguous copy of dy.t() / x.t() puts the groups on the 16-byte-aligned dimension
    # (CUTLASS asserts otherwise, and the assert poisons the CUDA context for every later variant)
    counts = (w / w.sum() * M / 16).floor().long() * 16
    counts[0] += M - counts.sum()
    return counts.cumsum(0).to(torch.int32).cuda()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60)


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    E, M, rows = 64, 49152, []
    for name, N, K in (("gate/up", 1408, 2048), ("down", 2048, 1408)):
        for skew in (0.0, 3.0):
            offs = offsets(M, E, skew, gen)
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            W = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
            flop = 2 * M * N * K
            variants = {
                "fwd b=W.mT view": lambda: torch._grouped_mm(x, W.mT, offs=offs),
                "fwd b=row-major copy": lambda: torch._grouped_mm(x, W.mT.contiguous(), offs=offs),
                "dgrad b=W row-major": lambda: torch._grouped_mm(dy, W, offs=offs),
                "dgrad b=col-major copy": lambda: torch._grouped_mm(dy, W.mT.contiguous().mT, offs=offs),
                "wgrad (E,N,K) a=dy.t() view": lambda: torch._grouped_mm(dy.t(), x, offs=offs),
                "wgrad (E,N,K) a=dy.t() copy": lambda: torch._grouped_mm(dy.t().contiguous(), x, offs=offs),
                "wgrad (E,K,N) a=x.t() view (autograd)": lambda: torch._grouped_mm(x.t(), dy, offs=offs).mT,
                "wgrad (E,K,N) a=x.t() copy": lambda: torch._grouped_mm(x.t().contiguous(), dy, offs=offs).mT,
            }
            ref = {}
            for vname, fn in variants.items():
                kind = vname.split()[0]
                try:
                    out = fn().float()
                    if kind in ref:
                        err = ((out - ref[kind]).abs().max() / ref[kind].abs().max()).item()
                    else:
                        ref[kind], err = out, 0.0
                    ms = bench(fn)
                    row = dict(gemm=name, skew=skew, variant=vname, ms=ms, tflops=flop / ms / 1e9, rel_err=err)
                except Exception as e:  # noqa: BLE001 - a layout CUTLASS refuses is a result too
                    row = dict(gemm=name, skew=skew, variant=vname, error=str(e)[:160])
                rows.append(row)
                print(row, flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "grouped_mm_layouts.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
