"""Bandwidth of the FP8 quantisers against a plain copy, with launch-shape sweeps, and bit-equality of every
variant with its reference (issue 15: >= 80% of copy bandwidth, bit-equal). Bytes = read + written (values and
scales; the two-pass kernels' second read is not counted: the number is the useful traffic).

Kernels: rows (tokens, weights), rows of W^T (the in-place strided read of before, and the one-pass transposing
quantiser: per column strip its amax, then the cast re-read from L2 and stored through tl.trans), both orientations
of W's rows (the row kernel + the transposing one), 1x128 tiles,
1x128 tiles of x^T, 128x128 blocks (one pass or two over row chunks), and blocks with their transpose.

GPU: PYTHONPATH=src python benchmarks/fp8_quant_sweep.py        (JSON in $OUT/fp8_quant_sweep.json)
CPU dry run (shapes / 64, default launch shapes, the Triton interpreter: that each variant runs; its e4m3
conversion is not faithful, so exact=False there says nothing, tests/test_kernels_fp8_quant.py's _compare):
     TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/fp8_quant_sweep.py
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import triton.testing

from dsv3.kernels.fp8_quant import (quantize_blocks_both, quantize_blocks_both_reference, quantize_blocks_reference,
                                    quantize_blocks_triton, quantize_tiles, quantize_tiles_transposed_reference,
                                    quantize_tiles_transposed_triton)
from dsv3.kernels.fp8_rowwise import (quantize_rows_both_reference, quantize_rows_reference,
                                      quantize_rows_transposed_triton, quantize_rows_triton)


DRY = os.environ.get("TRITON_INTERPRET") == "1"     # CPU dry run: tiny shapes through the interpreter


def bench(fn) -> float:
    if DRY:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3


def _exact(got, want) -> bool:
    return all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn
               else torch.equal(a, b) for a, b in zip(got, want))


def _nbytes(x: torch.Tensor, outs) -> int:
    return x.numel() * x.element_size() + sum(t.numel() * t.element_size() for t in outs)


class Sweep:
    def __init__(self):
        self.rows: list[dict] = []
        self.copy_gbs = 0.0

    def run(self, name: str, x: torch.Tensor, fn, ref, **launch) -> None:
        if DRY and any(v is not None for v in launch.values()):
            return      # the dry run checks that each kernel runs, at its default launch shape only
        try:
            got = fn()
            exact = _exact(got, ref)
            gbs = _nbytes(x, got) / bench(fn) / 1e9
        except Exception as e:  # a launch shape that does not compile: reported, the sweep goes on
            print(f"{name:28s} {launch}: failed {repr(e)[:120]}", flush=True)
            return
        self.rows.append({"name": name, **launch, "GBps": gbs, "of_copy": gbs / self.copy_gbs, "exact": exact})
        print(f"{name:28s} {launch}: {gbs:5.0f} GB/s ({gbs / self.copy_gbs:.0%} of copy) exact={exact}", flush=True)


def main() -> None:
    if DRY:
        from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
        patch_interpreter_for_numpy2()
    (dev, f), sw = ("cpu", 64) if DRY else ("cuda", 1), Sweep()
    sms = 2 if DRY else torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(49152 // f, 2048 // f, device=dev, dtype=torch.bfloat16)      # lite experts' sorted tokens
    w = torch.randn(64 // f or 2, 1408 // f, 2048 // f, device=dev, dtype=torch.bfloat16)  # lite gate_proj (E, I, D)
    wd = torch.randn(7168 // f, 2048 // f, device=dev, dtype=torch.bfloat16)      # a dense weight (N, K)
    sw.copy_gbs = 2 * x.numel() * 2 / bench(lambda: x.clone()) / 1e9
    sw.rows.append({"name": "copy bf16", "GBps": sw.copy_gbs})
    print(f"copy: {sw.copy_gbs:.0f} GB/s", flush=True)
    for name, t in (("x rows", x), ("W rows", w), ("W^T rows, strided in place", w.transpose(1, 2))):
        ref = quantize_rows_reference(t)
        for r, c, nw in ((None, None, 4), (1, 2048, 4), (2, 2048, 8), (64, 64, 4), (64, 128, 8), (32, 64, 4)):
            sw.run(name, t, lambda: quantize_rows_triton(t, r, c, nw), ref, rows=r, chunk=c, warps=nw)
    # rows of the experts' SwiGLU output h (K = 1408, lite's moe_intermediate_size): 51% of copy with the default
    # launch on an H100 (twelfth session) against 97% at K = 2048: a 2048-wide chunk leaves 31% of its lanes masked
    h = torch.randn(49152 // f, 1408 // f, device=dev, dtype=torch.bfloat16)
    ref = quantize_rows_reference(h)
    for r, c, nw in ((None, None, 4), (1, 512, 4), (2, 512, 4), (4, 512, 4), (4, 256, 4), (2, 2048, 8), (8, 128, 4)):
        sw.run("h rows (K = 1408)", h, lambda: quantize_rows_triton(h, r, c, nw), ref, rows=r, chunk=c, warps=nw)
    # the transposing quantiser (one pass: a column strip's amax, then its cast re-read from L2 and stored through
    # tl.trans), at lite's gate/up (E, 1408, 2048) and down (E, 2048, 1408) weights and a dense one
    wdown = w.transpose(1, 2).contiguous()
    for name, t in (("W^T rows, transposing", w), ("down W^T rows, transposing", wdown),
                    ("dense W^T rows, transposing", wd)):
        ref = quantize_rows_reference(t.transpose(-1, -2))
        # one_pass_m: a strip of at most that many rows read once, held in registers (0 = two reads); stages: the
        # two passes' pipelining depth (cp.async through shared memory for 2 and up)
        for bn, bk, nw, one, st in ((None, None, None, None, None), (64, 64, 4, 0, 1), (128, 64, 8, 0, 1),
                                    (256, 32, 8, 0, 1), (128, 16, 4, 0, 1), (64, 16, 8, 2048, 1), (128, 32, 4, 0, 2),
                                    (128, 32, 4, 0, 3), (128, 32, 4, 0, 4), (64, 64, 4, 0, 3), (128, 64, 8, 0, 3),
                                    (256, 32, 8, 0, 3), (64, 32, 4, 0, 3), (64, 32, 2, 0, 4)):
            sw.run(name, t, lambda: quantize_rows_transposed_triton(t, False, bn, bk, nw, one_pass_m=one, stages=st),
                   ref, block_n=bn, block_k=bk, warps=nw, one_pass_m=one, stages=st)
        # the looping grid: `programs` programs over the strips, fewer in flight so that L2 holds each strip between
        # its two reads (ncu, thirty-second session: 26% L2 hits with one program a strip)
        for bn, bk, nw, st, per_sm in ((64, 64, 4, 3, 1), (64, 64, 4, 3, 2), (64, 64, 4, 3, 4), (128, 32, 4, 1, 2),
                                       (64, 32, 4, 3, 2), (64, 32, 4, 3, 4), (128, 64, 8, 3, 1)):
            progs = per_sm * sms
            sw.run(name, t, lambda: quantize_rows_transposed_triton(t, False, bn, bk, nw, stages=st, programs=progs),
                   ref, block_n=bn, block_k=bk, warps=nw, stages=st, programs=progs)
    ref = quantize_rows_both_reference(w)
    sw.run("W rows + W^T rows", w, lambda: quantize_rows_transposed_triton(w, True), ref)
    sw.run("tiles", x, lambda: quantize_tiles(x), quantize_tiles(x))
    ref = quantize_tiles_transposed_reference(x)
    for bk, nw in ((None, None), (32, 4), (64, 8), (128, 4), (128, 8), (256, 8)):
        sw.run("tiles of x^T", x, lambda: quantize_tiles_transposed_triton(x, False, bk, nw), ref,
               block_k=bk, warps=nw)
    for name, t in (("blocks (tokens as a matrix)", x), ("blocks, dense weight", wd)):
        ref, ref_both = quantize_blocks_reference(t), quantize_blocks_both_reference(t)
        for chunk, nw in ((None, None), (128, 4), (128, 16), (64, 4), (32, 4), (32, 8), (16, 4)):
            sw.run(name, t, lambda: quantize_blocks_triton(t, False, chunk, nw), ref, chunk=chunk, warps=nw)
        sw.run(name + " + transpose", t, lambda: quantize_blocks_both(t), ref_both)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_quant_sweep.json").write_text(json.dumps(sw.rows, indent=1))


if __name__ == "__main__":
    main()
