"""Why the FP8 weight GEMV reads cold weights at 0.4-1.0 TB/s where bf16 cuBLAS reads twice the bytes at 1.3-2.3
(RESULTS.md, sixteenth session): a probe, not a library path.

At M = 1 on the fused shapes a `lite` step runs (fp8_weight_gemm_bench.ENGINE) it times, cold (each call of a captured
sequence reads the next of 256 MB of weight copies), the library GEMV (kernels/fp8_gemv.py) at its default launch and
at two others, a probe kernel that loads each strip's KW contiguous columns in one wide load (16-byte vectors, the
block scales gathered per column) at a few (rows per program, KW, warps), and bf16 weights through kernels.gemv's
one-row path (the same wide loads, unscaled) and through cuBLAS. Each variant is first
checked against fp8_linear_reference. `--ncu`: one cold call of each instead (run under
`ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats`),
the order of the calls printed at the end (two launches each: the check's, the cold call's), so that the counters say
which of latency, occupancy or issue limits it.

GPU:  PYTHONPATH=src python benchmarks/gemv_probe.py [--ncu]
CPU:  TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gemv_probe.py --dry-run   (correctness only, tiny shapes)
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl
import triton.testing

from dsv3.fp8 import quantize_blocks
from dsv3.kernels.fp8_gemv import fp8_gemv
from dsv3.kernels.fp8_weight_gemm import fp8_linear_reference
from dsv3.kernels.gemv import GEMV_MAX_M, gemv_triton

ENGINE = {"q_kv_a": (3648, 2048), "o_proj": (2048, 2048), "shared_up": (5632, 2048), "shared_down": (2048, 2816)}
LIB = {"default": {}, "ku16": dict(block_n=8, ku=16, split=1), "bn16_ku8": dict(block_n=16, ku=8, split=1)}
WIDE = [dict(block_n=bn, kw=kw, num_warps=w) for bn, kw, w in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8))]
WIDE_NCU = [dict(block_n=8, kw=256, num_warps=4), dict(block_n=8, kw=512, num_warps=4),
            dict(block_n=16, kw=256, num_warps=8)]
COLD_BYTES = 256 << 20


@triton.jit
def _wide_kernel(X, W, S, Y, N, K, stride_wn, stride_sn, BLOCK_N: tl.constexpr, KW: tl.constexpr):
    """One program per BLOCK_N rows; each step loads the strip's next KW columns at once (K % KW == 0); the scale of
    column k is scale_inv[strip // 128, k // 128] (BLOCK_N divides 128: one scale row per strip)."""
    n0 = tl.program_id(0) * BLOCK_N
    rows = (n0 + tl.arange(0, BLOCK_N)) % N
    cols = tl.arange(0, KW)
    w_ptr = W + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
    s_ptr = S + (n0 // 128) * stride_sn + cols // 128
    acc = tl.zeros([BLOCK_N, KW], dtype=tl.float32)
    for k0 in range(0, K, KW):
        w = tl.load(w_ptr + k0)
        xs = tl.load(X + k0 + cols).to(tl.float32) * tl.load(s_ptr + k0 // 128)
        acc += w.to(tl.float32) * xs[None, :]
    offs = n0 + tl.arange(0, BLOCK_N)
    tl.store(Y + offs, tl.sum(acc, axis=1).to(Y.dtype.element_ty), mask=offs < N)


def wide_gemv(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block_n: int, kw: int, num_warps: int):
    N, K = w.shape
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    _wide_kernel[(triton.cdiv(N, block_n),)](x, w, s, y, N, K, w.stride(0), s.stride(0), BLOCK_N=block_n, KW=kw,
                                             num_warps=num_warps)
    return y


def variants(K: int, ncu: bool, m: int = 1) -> list[tuple[str, object]]:
    out = [(f"lib {name}", lambda x, q, s, c=cfg: fp8_gemv(x, q, s, **c)) for name, cfg in LIB.items()]
    if m > 1:                     # the probe's wide kernel is one row only; the library default alone
        return out[:1]
    out += [(f"wide bn{c['block_n']} kw{c['kw']} w{c['num_warps']}", lambda x, q, s, c=c: wide_gemv(x, q, s, **c))
            for c in (WIDE_NCU if ncu else WIDE) if K % c["kw"] == 0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ncu", action="store_true", help="one cold call per variant (for ncu), no timing")
    ap.add_argument("--dry-run", action="store_true", help="CPU interpreter: correctness on tiny shapes")
    ap.add_argument("--m", default="1", help="rows of x, comma-separated (M > 1: the library's FP8 default and the "
                    "bf16 GEMV beside cuBLAS, e.g. an MTP verify step's 2 at batch 1; EngineConfig.dense_gemv)")
    args = ap.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    if args.dry_run:
        from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
        patch_interpreter_for_numpy2()
    dev = "cpu" if args.dry_run else "cuda"
    shapes = {"tiny": (256, 1024)} if args.dry_run else ENGINE
    torch.manual_seed(0)
    order = []
    for (name, (N, K)), m in itertools.product(shapes.items(), ms):
        w = torch.randn(N, K, device=dev) * 0.02
        q, s = quantize_blocks(w)
        s = s.float().contiguous()
        x = torch.randn(m, K, device=dev, dtype=torch.bfloat16 if not args.dry_run else torch.float32)
        ref = fp8_linear_reference(x, q, s).float()
        n = 1 if args.dry_run else max(1, COLD_BYTES // q.numel())
        qs = [(q.clone(), s.clone()) for _ in range(n)]
        wb = [w.to(x.dtype) for _ in range(max(1, n // 2))] if not args.dry_run else [w]
        bf16_ref = torch.nn.functional.linear(x, wb[0]).float()
        # (name, fn, the copies it cycles, its reference, bytes read): FP8 variants, then bf16 ones
        runs = [(vname, fn, qs, ref, q.numel()) for vname, fn in variants(K, args.ncu, m)] + [
            (f"bf16 gemv M={m}", gemv_triton, [(c,) for c in wb], bf16_ref, 2 * q.numel())] * (m <= GEMV_MAX_M) + [
            ("bf16 cuBLAS", torch.nn.functional.linear, [(c,) for c in wb], bf16_ref, 2 * q.numel())]
        for vname, fn, copies, want, nbytes in runs:
            err = ((fn(x, *copies[0]).float() - want).norm() / want.norm()).item()
            assert err < 2e-2, (name, vname, err)
            if args.dry_run:
                print(f"{name} M={m} {vname}: err {err:.1e}")
                continue
            it = itertools.cycle(copies)
            call = lambda fn=fn, it=it: fn(x, *next(it))      # noqa: E731
            if args.ncu:                                 # the check's launch, then this cold one
                call()
                order.append(f"{name} {vname} (check, then cold)")
                continue
            us = triton.testing.do_bench_cudagraph(call, rep=20, return_mode="median") * 1e3
            print(f"{name:11s} M={m} {vname:22s} {us:7.2f} us  {nbytes / us / 1e6:5.2f} TB/s", flush=True)
        del qs, wb
        torch.cuda.empty_cache() if not args.dry_run else None
    if args.ncu:
        print("ncu order:", *order, sep="\n  ")


if __name__ == "__main__":
    main()
