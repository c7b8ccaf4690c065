"""Candidates for the W^T row quantiser (issue 15: >= 80% of copy bandwidth, bit-equal), measured beside the kernel
in `dsv3.kernels.fp8_rowwise` before any of them replaces it (this file is a benchmark, not library code).

Rows of W^T = one scale per column of w (E, N, K) as stored: a column's amax needs all N rows, and q_t (E, K, N) is
the transpose. The library's one-pass kernel (`_rows_t_kernel`: a program owns an N x BK column strip, amax, then a
re-read from L2 stored through tl.trans) reaches 39-42% of copy on an H200 (RESULTS.md, sixth session): its reads
are BK = 32 columns (64 bytes) per row, one (BN, BK) tile in flight per program. The candidates:

  split   two kernels per group of G experts, so that the second's reads of the group hit L2 (G x N x K x 2 bytes,
          5.8 MB per lite gate/up expert; G = 4: 23 MB of the H200's 50 MB L2):
          1. column amax over coalesced (BN, BKA) tiles of full 128-byte+ rows, merged across row tiles by an
             integer atomic max on the float bits (amax >= 0, so the int order is the float order, and a NaN's bits
             (0x7FC00000) beat +inf's: NaN propagates as torch's amax does);
          2. the cast over (BN, BK) tiles with the finished scales, stored through tl.trans as the library's.
          Useful traffic 3 bytes per element (read 2, write 1); HBM traffic the same when the re-read hits L2.
  stages  the library kernel launched with num_stages 1-4 (its launch passes none: does Triton's pipeliner give
          the strip loop more loads in flight?).

Each candidate is checked bit for bit against `quantize_rows_reference(w.transpose(1, 2))` before it is timed.
GPU: PYTHONPATH=src python benchmarks/fp8_wt_candidates.py         (~40 s; JSON in $OUT/fp8_wt_candidates.json)
CPU: TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/fp8_wt_candidates.py   (tiny shapes: that each runs; the
     interpreter's e4m3 cast is not faithful, so `exact` says nothing there; scales are compared exactly)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from dsv3.kernels.fp8_quant import _absmax, _quant, _scale_of
from dsv3.kernels.fp8_rowwise import quantize_rows_reference, quantize_rows_transposed_triton
from fp8_quant_sweep import DRY, bench     # benchmarks/ is on sys.path when this file runs as a script

E4M3 = torch.float8_e4m3fn


@triton.jit
def _col_amax_kernel(X, AMAX, N, K, e0, stride_xe, stride_xn, BN: tl.constexpr, BKA: tl.constexpr):
    # one (BN, BKA) tile of expert e0 + program_id(2): its columns' max-abs, merged into AMAX (int32 bits of fp32)
    e = (e0 + tl.program_id(2)).to(tl.int64)
    rows = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
    cols = (tl.program_id(1) * BKA + tl.arange(0, BKA)).to(tl.int64)
    mask_k = cols < K
    x = tl.load(X + e * stride_xe + rows[:, None] * stride_xn + cols[None, :],
                mask=(rows < N)[:, None] & mask_k[None, :], other=0.0)
    amax = _absmax(x.to(tl.float32), 0)
    tl.atomic_max(AMAX + e * K + cols, amax.to(tl.int32, bitcast=True), mask=mask_k)


@triton.jit
def _cast_t_kernel(X, AMAX, QT, ST, N, K, e0, stride_xe, stride_xn, BN: tl.constexpr, BK: tl.constexpr):
    # one (BN, BK) tile of w cast with its columns' finished scales, stored transposed into q_t (E, K, N)
    e = (e0 + tl.program_id(2)).to(tl.int64)
    pid_n = tl.program_id(0)
    rows = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    cols = (tl.program_id(1) * BK + tl.arange(0, BK)).to(tl.int64)
    mask_n, mask_k = rows < N, cols < K
    s = _scale_of(tl.load(AMAX + e * K + cols, mask=mask_k, other=0).to(tl.float32, bitcast=True), False)
    x = tl.load(X + e * stride_xe + rows[:, None] * stride_xn + cols[None, :],
                mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    q = tl.trans(_quant(x.to(tl.float32), s[None, :]))
    tl.store(QT + (e * K + cols[:, None]) * N + rows[None, :], q.to(QT.dtype.element_ty),
             mask=mask_k[:, None] & mask_n[None, :])
    if pid_n == 0:
        tl.store(ST + e * K + cols, s, mask=mask_k)


def split(w: torch.Tensor, group: int = 4, bn: int = 32, bka: int = 256, bn2: int = 128, bk2: int = 64,
          warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of w^T for w (E, N, K) contiguous: per group of experts, the amax kernel then the cast kernel."""
    E, N, K = w.shape
    amax = torch.zeros(E, K, device=w.device, dtype=torch.int32)
    q_t = torch.empty(E, K, N, device=w.device, dtype=E4M3)
    s_t = torch.empty(E, K, device=w.device, dtype=torch.float32)
    for e0 in range(0, E, group):
        g = min(group, E - e0)
        _col_amax_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bka), g)](
            w, amax, N, K, e0, w.stride(0), w.stride(1), BN=bn, BKA=bka, num_warps=warps)
        _cast_t_kernel[(triton.cdiv(N, bn2), triton.cdiv(K, bk2), g)](
            w, amax, q_t, s_t, N, K, e0, w.stride(0), w.stride(1), BN=bn2, BK=bk2, num_warps=warps)
    return q_t, s_t


def staged(w: torch.Tensor, stages: int, bn: int = 128, bk: int = 32, warps: int = 4):
    """The library's one-pass kernel, launched with num_stages."""
    return quantize_rows_transposed_triton(w, block_n=bn, block_k=bk, num_warps=warps, stages=stages)


def check(got, want) -> tuple[bool, bool]:
    """(values bit-equal, scales bit-equal), a NaN equal to any NaN (its sign and payload are not specified)."""
    nan = got[0].float().isnan() & want[0].float().isnan()
    values = torch.equal(got[0].view(torch.uint8)[~nan], want[0].view(torch.uint8)[~nan])
    return values and torch.equal(got[0].float().isnan(), nan), torch.equal(got[1], want[1]) or bool(
        torch.allclose(got[1], want[1], rtol=0, atol=0, equal_nan=True))


def main() -> None:
    if DRY:
        from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
        patch_interpreter_for_numpy2()
    dev, f = ("cpu", 32) if DRY else ("cuda", 1)
    x = torch.randn(49152 // f, 2048 // f, device=dev, dtype=torch.bfloat16)
    copy = 2 * x.numel() * 2 / bench(lambda: x.clone()) / 1e9
    rows: list[dict] = [{"name": "copy bf16", "GBps": copy}]
    print(f"copy: {copy:.0f} GB/s", flush=True)
    gate = torch.randn(64 // f or 2, 1408 // f, 2048 // f, device=dev, dtype=torch.bfloat16)   # lite gate/up (E,I,D)
    down = torch.randn(64 // f or 2, 2048 // f, 1408 // f, device=dev, dtype=torch.bfloat16)   # lite down (E,D,I)
    gate[0, 3, 5] = float("nan")            # NaN propagates into its column's scale (torch's amax)
    cands = [("library", {}, lambda w: quantize_rows_transposed_triton(w))]
    cands += [(f"stages={s}", {"stages": s}, lambda w, s=s: staged(w, s)) for s in (1, 2, 3, 4)]
    launches = [dict(group=g, bn=bn, bka=bka, bn2=bn2, bk2=bk2, warps=nw)
                for g, bn, bka, bn2, bk2, nw in ((4, 32, 256, 128, 64, 4), (8, 32, 256, 128, 64, 4),
                                                 (2, 32, 256, 128, 64, 4), (4, 64, 128, 128, 64, 4),
                                                 (4, 16, 512, 128, 64, 4), (4, 32, 256, 64, 64, 4),
                                                 (4, 32, 256, 128, 128, 8), (4, 32, 256, 256, 64, 8),
                                                 (64, 32, 256, 128, 64, 4))]
    if DRY:     # tiny shapes: blocks no larger than the tensors, two launches
        launches = [dict(group=1, bn=16, bka=32, bn2=16, bk2=16, warps=4), dict(group=4, bn=8, bka=64, bn2=32,
                                                                                  bk2=32, warps=4)]
    cands += [("split", kw, lambda w, kw=kw: split(w, **kw)) for kw in launches]
    for wname, w in (("gate/up (E, 1408, 2048)", gate), ("down (E, 2048, 1408)", down)):
        ref = quantize_rows_reference(w.transpose(1, 2))
        useful = w.numel() * 3 + ref[1].numel() * 4
        for name, kw, fn in cands:
            if DRY and name.startswith("stages"):
                continue        # the interpreter ignores num_stages
            try:
                got = fn(w)
                exact, scales = check(got, ref)
                gbs = useful / bench(lambda: fn(w)) / 1e9
            except Exception as e:    # a launch that does not compile: reported, the sweep goes on
                print(f"{wname} {name} {kw}: failed {repr(e)[:160]}", flush=True)
                continue
            rows.append({"weight": wname, "name": name, **kw, "GBps": gbs, "of_copy": gbs / copy, "exact": exact,
                         "scales_exact": scales})
            print(f"{wname:24s} {name:9s} {kw}: {gbs:5.0f} GB/s ({gbs / copy:.0%} of copy) exact={exact} "
                  f"scales={scales}", flush=True)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_wt_candidates.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
