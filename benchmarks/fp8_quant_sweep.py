"""Bandwidth of the FP8 quantisers against a plain copy, with a launch-shape sweep of the row-wise one (issue 15:
>= 80% of copy bandwidth, bit-equal to the reference). Bytes = read + written (values and scales).

GPU: PYTHONPATH=src python benchmarks/fp8_quant_sweep.py        (JSON in $OUT/fp8_quant_sweep.json)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton.testing

from dsv3.kernels.fp8_quant import quantize_blocks, quantize_tiles, quantize_tiles_transposed
from dsv3.kernels.fp8_rowwise import quantize_rows_reference, quantize_rows_triton


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3


def main() -> None:
    dev, rows = "cuda", []
    x = torch.randn(49152, 2048, device=dev, dtype=torch.bfloat16)          # lite experts' sorted tokens
    w = torch.randn(64, 1408, 2048, device=dev, dtype=torch.bfloat16)       # lite gate_proj, (E, I, D)
    copy_gbs = 2 * x.numel() * 2 / bench(lambda: x.clone()) / 1e9
    rows.append({"name": "copy bf16", "GBps": copy_gbs})
    print(f"copy: {copy_gbs:.0f} GB/s", flush=True)
    for name, t in (("x rows", x), ("W rows", w), ("W^T rows (strided)", w.transpose(1, 2))):
        q_ref, s_ref = quantize_rows_reference(t)
        nbytes = t.numel() * 3 + s_ref.numel() * 4
        for r, c, nw in ((None, None, 4), (1, 2048, 4), (2, 2048, 8), (4, 1024, 8), (8, 512, 4), (16, 256, 4),
                         (32, 128, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8), (32, 64, 4)):
            try:
                q, s = quantize_rows_triton(t, r, c, nw)
                exact = bool(torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref))
                gbs = nbytes / bench(lambda: quantize_rows_triton(t, r, c, nw)) / 1e9
                rows.append({"name": name, "rows": r, "chunk": c, "warps": nw, "GBps": gbs, "exact": exact})
                print(f"{name:20s} rows={r} chunk={c} warps={nw}: {gbs:5.0f} GB/s ({gbs / copy_gbs:.0%} of copy) "
                      f"exact={exact}", flush=True)
            except Exception as e:
                print(f"{name} {r} {c} {nw}: failed {repr(e)[:100]}", flush=True)
    for name, fn in (("tiles", quantize_tiles), ("tiles transposed", quantize_tiles_transposed),
                     ("blocks", quantize_blocks)):
        q, s = fn(x)
        gbs = (x.numel() * 3 + s.numel() * 4) / bench(lambda: fn(x)) / 1e9
        rows.append({"name": name, "GBps": gbs})
        print(f"{name:20s}: {gbs:5.0f} GB/s ({gbs / copy_gbs:.0%} of copy)", flush=True)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_quant_sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
