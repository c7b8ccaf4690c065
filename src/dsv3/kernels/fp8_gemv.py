"""Weight-streaming FP8 GEMV for decode (M <= GEMV_MAX_M rows): y (M, N) = x (M, K) @ dequant(W (N, K) e4m3).T.

Why: at batch 1 a projection is bound by reading W once. The tiled GEMM in fp8_weight_gemm.py (tiles sized for
M >= 16) read 0.19-1.93 TB/s at M = 1 on `lite`'s shapes, below bf16 cuBLAS (benchmarks/RESULTS.md, issue 16).
As in gpt-fast's int8/int4 and vLLM's/SGLang's weight-only decode GEMVs, the whole job is to keep enough weight
bytes in flight: many programs, each streaming a narrow strip of W with wide contiguous loads and no masks on K.

Same weight format and contract as `fp8_linear_reference` (one fp32 multiplier per 128x128 block, spec "FP8
block weights"); the scale is constant over each 128-long K slice of a BLOCK_N strip (BLOCK_N divides 128), so

    y[m, n] = sum_kb scale_inv[n // 128, kb] * sum_{k in kb} x[m, k] * float(W[n, k])

Steps, one program per (BLOCK_N strip of W, K slice) [grouped: per (row, strip, K slice), W = the row's expert]:
  1. one row (M = 1, and each row of the grouped form), `_row_strip`: for each KU * 128 columns of its K slice,
     a. one wide load of the strip's e4m3 codes W[n0:n0+BLOCK_N, KU * 128 columns] (16-byte vectors; rows past N
        re-read row n % N: no mask; K masked only when K or the slice is ragged: EVEN_K) and of x's columns;
     b. each column's block scale scale_inv[n0 // 128, k // 128] gathered beside x (L1-resident) and folded into it;
     c. the products kept per lane (BLOCK_N, KU * 128) on the CUDA cores, reduced across lanes once after the loop.
     Loading KU blocks of 128 columns as KU separate (BLOCK_N, 128) loads instead read cold weights at 0.4-1.0
     TB/s on an H100, one wide load 0.9-1.8 (RESULTS.md, sixteenth session);
     M >= 2, `_dot_strip`: partial (16, BLOCK_N) = x . W^T per 128-column block by tl.dot with bf16/fp16 operands
     (rows past M masked), acc += partial * scale, KU blocks' loads issued together. A broadcast multiply-add summed
     across lanes every block, which M = 2..4 used before, read 0.09-0.2 TB/s (fourteenth session);
  2. one K slice: store acc in x's dtype. Several (too few strips to fill the GPU): each slice stores its fp32
     plane of a (split, M, N) buffer and one small kernel sums the planes in a fixed order and casts: deterministic,
     no atomics, one extra launch (graph node) per call.

Launch table (`gemv_launch`), autotune-free: BLOCK_N (4..128; 4 and 8 only for one row: tl.dot needs 16), KU,
split, warps by shape, from H100 sweeps (benchmarks/fp8_weight_gemm_bench.py, benchmarks/gemv_probe.py); each can be
overridden per call. Nothing depends on values on the host (grouped: the row -> expert map is built on the device),
so calls capture in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_setup import BLOCK, HAS_TRITON, TRITON_DTYPES, pdl_entry, pdl_launch, tl, triton

__all__ = ["GEMV_MAX_M", "fp8_gemv", "fp8_grouped_gemv", "gemv_launch"]

GEMV_MAX_M = 16

if HAS_TRITON:

    @triton.jit
    def _row_strip(X, W, S, n0, N, K, kb0, kb1, stride_wn, stride_sn,
                   BLOCK_N: tl.constexpr, KU: tl.constexpr, EVEN_K: tl.constexpr, SCALED: tl.constexpr):
        """One row of x times a BLOCK_N strip of W over K blocks [kb0, kb1): each step loads the strip's next
        KU * 128 columns in one wide load (16-byte vectors), the block scale of each column gathered beside x, and
        keeps the products per lane; one cross-lane sum at the end. Returns acc (BLOCK_N,) fp32 and the rows.
        SCALED=False: W in a float dtype, no scales (S unused; the fused MoE's GEMV form, kernels.moe_decode)."""
        acc, _, offs_n = _row_strips(X, W, S, W, S, n0, N, K, kb0, kb1, stride_wn, stride_sn, BLOCK_N, KU, EVEN_K,
                                     SCALED, False)
        return acc, offs_n

    @triton.jit
    def _row_strips(X, W, S, W2, S2, n0, N, K, kb0, kb1, stride_wn, stride_sn,
                    BLOCK_N: tl.constexpr, KU: tl.constexpr, EVEN_K: tl.constexpr, SCALED: tl.constexpr,
                    PAIR: tl.constexpr):
        """`_row_strip`, and with PAIR the same strip of a second matrix W2 / S2 (same strides) in the same steps:
        both wide loads in flight together (the fused MoE's gate and up). Returns (acc, acc2, rows); acc2 is zeros
        without PAIR."""
        KW: tl.constexpr = KU * 128
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows = offs_n % N                                    # 1a. past-N rows re-read a real row, never stored
        cols = tl.arange(0, KW)
        w_off = rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
        s_off = (n0 // 128) * stride_sn + cols // 128        # BLOCK_N divides 128: one scale row per strip
        acc = tl.zeros([BLOCK_N, KW], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, KW], dtype=tl.float32)
        for k0 in range(kb0 * 128, kb1 * 128, KW):          # 1. one wide load per step (and matrix)
            if EVEN_K:
                w = tl.load(W + w_off + k0)
                if PAIR:
                    w2 = tl.load(W2 + w_off + k0)
                x = tl.load(X + k0 + cols).to(tl.float32)
                xs = x
                xs2 = x
                if SCALED:
                    xs = x * tl.load(S + s_off + k0 // 128)                                       # 1b.
                    if PAIR:
                        xs2 = x * tl.load(S2 + s_off + k0 // 128)
            else:
                kmask = k0 + cols < tl.minimum(kb1 * 128, K)
                w = tl.load(W + w_off + k0, mask=kmask[None, :], other=0.0)
                if PAIR:
                    w2 = tl.load(W2 + w_off + k0, mask=kmask[None, :], other=0.0)
                x = tl.load(X + k0 + cols, mask=kmask, other=0.0).to(tl.float32)
                xs = x
                xs2 = x
                if SCALED:
                    xs = x * tl.load(S + s_off + k0 // 128, mask=kmask, other=0.0)
                    if PAIR:
                        xs2 = x * tl.load(S2 + s_off + k0 // 128, mask=kmask, other=0.0)
            acc += w.to(tl.float32) * xs[None, :]            # 1c.
            if PAIR:
                acc2 += w2.to(tl.float32) * xs2[None, :]
        return tl.sum(acc, axis=1), tl.sum(acc2, axis=1), offs_n

    @triton.jit
    def _dot_strip(X, W, S, offs_m, mask_m, n0, N, K, kb0, kb1, stride_xm, stride_wn, stride_sn,
                   BM: tl.constexpr, BLOCK_N: tl.constexpr, KU: tl.constexpr, EVEN_K: tl.constexpr,
                   DOT_PREC: tl.constexpr):
        """M >= 2 rows: partial (BM, BLOCK_N) = x . W^T per 128-column block by tl.dot, scaled, KU blocks' loads
        issued together."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows = offs_n % N
        cols = tl.arange(0, 128)
        w_base = W + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
        x_base = X + offs_m.to(tl.int64)[:, None] * stride_xm + cols[None, :]
        s_base = S + (n0 // 128) * stride_sn
        acc = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
        for kb in range(kb0, kb1, KU):
            for j in tl.static_range(KU):
                k0 = (kb + j) * 128
                if EVEN_K:
                    w = tl.load(w_base + k0)
                    x = tl.load(x_base + k0, mask=mask_m[:, None], other=0.0)
                    s = tl.load(s_base + kb + j)
                else:
                    kmask = (k0 + cols < K) & (kb + j < kb1)
                    w = tl.load(w_base + k0, mask=kmask[None, :], other=0.0)
                    x = tl.load(x_base + k0, mask=mask_m[:, None] & kmask[None, :], other=0.0)
                    s = tl.load(s_base + kb + j, mask=kb + j < kb1, other=0.0)
                acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PREC) * s
        return acc, offs_n

    @triton.jit
    def _fp8_gemv_kernel(X, W, S, Y, M, N, K, KB_PER_SPLIT, NKB,
                         stride_xm, stride_wn, stride_sn, stride_ys, stride_ym,
                         BM: tl.constexpr, BLOCK_N: tl.constexpr, KU: tl.constexpr, EVEN_K: tl.constexpr,
                         USE_DOT: tl.constexpr, SCALED: tl.constexpr, DOT_PREC: tl.constexpr,
                         PDL: tl.constexpr = False):
        pdl_entry(PDL)
        offs_m = tl.arange(0, BM)
        mask_m = offs_m < M
        kb0 = tl.program_id(1) * KB_PER_SPLIT
        kb1 = tl.minimum(kb0 + KB_PER_SPLIT, NKB)
        n0 = tl.program_id(0) * BLOCK_N
        if USE_DOT:
            acc, offs_n = _dot_strip(X, W, S, offs_m, mask_m, n0, N, K, kb0, kb1, stride_xm, stride_wn, stride_sn,
                                     BM, BLOCK_N, KU, EVEN_K, DOT_PREC)
        else:
            row, offs_n = _row_strip(X, W, S, n0, N, K, kb0, kb1, stride_wn, stride_sn, BLOCK_N, KU, EVEN_K, SCALED)
            acc = row[None, :]
        y = Y + tl.program_id(1).to(tl.int64) * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & (offs_n[None, :] < N))    # 2.

    @triton.jit
    def _fp8_grouped_gemv_kernel(X, W, S, Y, ROW_GROUP, M, N, K, E, KB_PER_SPLIT, NKB,
                                 stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ys, stride_ym,
                                 BLOCK_N: tl.constexpr, KU: tl.constexpr, EVEN_K: tl.constexpr,
                                 PDL: tl.constexpr = False):
        pdl_entry(PDL)
        r = tl.program_id(0)
        g = tl.load(ROW_GROUP + r)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        y = Y + tl.program_id(2).to(tl.int64) * stride_ys + r.to(tl.int64) * stride_ym + offs_n
        if g >= E:                                           # a row of no group: zeros
            tl.store(y, tl.zeros([BLOCK_N], dtype=Y.dtype.element_ty), mask=offs_n < N)
        else:
            kb0 = tl.program_id(2) * KB_PER_SPLIT
            kb1 = tl.minimum(kb0 + KB_PER_SPLIT, NKB)
            g64 = g.to(tl.int64)                             # E * N * K overflows int32 for V3's experts
            acc, offs_n = _row_strip(X + r.to(tl.int64) * stride_xm, W + g64 * stride_we, S + g64 * stride_se,
                                     tl.program_id(1) * BLOCK_N, N, K, kb0, kb1, stride_wn, stride_sn,
                                     BLOCK_N, KU, EVEN_K, True)
            tl.store(y, acc.to(Y.dtype.element_ty), mask=offs_n < N)


if HAS_TRITON:

    @triton.jit
    def _sum_planes_kernel(P, Y, NUMEL, SPLIT, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl_entry(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < NUMEL
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(SPLIT):                               # fixed order: deterministic
            acc += tl.load(P + i * NUMEL + offs, mask=mask, other=0.0)
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


def gemv_launch(M: int, N: int, K: int, sms: int, programs_per_row: int = 1) -> dict:
    """The launch table: dict(block_n, ku, split, num_warps), from cold H100 sweeps at lite's shapes (RESULTS.md).
    `programs_per_row`: the grouped form's rows (each a one-row strip program).
    - M >= 2 (tl.dot): 32-row strips, 2 K blocks per step; K slices (4) only when the strips fill < half the SMs
      (fourteenth session).
    - one row: 4-row strips, 8 K blocks (1024 columns) per wide load, 4 warps: the best or within 4% of the best of
      the sixteenth session's cold probe on every fused lite shape (q+kv_a 4.7 us, o 3.8, shared gate+up 6.7:
      1.5-1.7x bf16 cuBLAS; the per-128-column loads before read 0.4-1.0 TB/s); fewer K blocks where K has fewer;
      K slices until ~2 programs per SM when the strips alone are fewer than the SMs."""
    nkb = -(-K // BLOCK)
    if M >= 2 and programs_per_row == 1:
        strips = -(-N // 32)
        return dict(block_n=32, ku=2, split=1 if strips >= sms // 2 else max(1, min(nkb // 2, 4)), num_warps=4)
    ku = min(8, 1 << (nkb - 1).bit_length())
    strips = max(1, -(-N // 4) * programs_per_row)
    split = 1 if strips >= sms else max(1, min(-(-nkb // ku), -(-2 * sms // strips)))
    return dict(block_n=4, ku=ku, split=split, num_warps=4)


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _resolve(M: int, N: int, K: int, device: torch.device, rows: int, over: dict) -> tuple[dict, int, int, bool]:
    """(launch config, K blocks per slice, slices, EVEN_K) for K >= 1."""
    cfg = gemv_launch(M, N, K, _sms(device), rows)
    cfg.update({k: v for k, v in over.items() if v is not None})
    one_row = M == 1 or rows > 1
    if cfg["block_n"] not in (4, 8, 16, 32, 64, 128) or (cfg["block_n"] < 16 and not one_row) or \
            cfg["ku"] < 1 or (one_row and cfg["ku"] & (cfg["ku"] - 1)) or cfg["split"] < 1:
        raise ValueError(f"fp8 GEMV launch: block_n in 4..128 dividing {BLOCK} (4 or 8 only for one row: tl.dot "
                         f"needs 16), ku >= 1 (a power of two for one row: one load of ku * 128 columns), "
                         f"split >= 1; got {cfg}")
    nkb = -(-K // BLOCK)
    per = -(-nkb // min(cfg["split"], nkb))
    per = -(-per // cfg["ku"]) * cfg["ku"]                   # whole KU steps per slice
    split = -(-nkb // per)                                   # no empty slice
    even = K % BLOCK == 0 and nkb % per == 0
    return cfg, per, split, even


def _out(split: int, M: int, N: int, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty(split, M, N, device=x.device, dtype=(dtype or x.dtype) if split == 1 else torch.float32)


def fp8_gemv(x: Tensor, weight: Tensor, scale_inv: Tensor | None, *, block_n: int | None = None,
             ku: int | None = None, split: int | None = None, num_warps: int | None = None,
             out_dtype: torch.dtype | None = None) -> Tensor:
    """x (M <= GEMV_MAX_M, K) @ dequant(weight (N, K), scale_inv).T -> (M, N) in `out_dtype` (default x's); inputs
    as fp8_weight_gemm's `_check_common` validated them. Keywords override the launch table. scale_inv None: one
    row (M = 1) times a weight in a float dtype, unscaled (the same wide-load strips: kernels.gemv's one-row path;
    x and the weight may differ in dtype: both are read into fp32)."""
    M, K = x.shape
    N = weight.shape[0]
    if M > GEMV_MAX_M or x.dtype not in TRITON_DTYPES or weight.stride(1) != 1 or x.stride(1) != 1 or \
            (scale_inv is None and (M > 1 or weight.dtype == torch.float8_e4m3fn)):
        raise ValueError(f"fp8_gemv takes M <= {GEMV_MAX_M} rows in {TRITON_DTYPES} with unit K stride (without "
                         f"scales: one row and a float weight), got x {tuple(x.shape)} {x.dtype} stride "
                         f"{x.stride()}, weight {weight.dtype} stride {weight.stride()}")
    if M == 0 or N == 0 or K == 0:
        return torch.zeros(M, N, device=x.device, dtype=out_dtype or x.dtype)
    cfg, per, split, even = _resolve(M, N, K, x.device, 1, dict(block_n=block_n, ku=ku, split=split,
                                                                num_warps=num_warps))
    y = _out(split, M, N, x, out_dtype)
    use_dot = M >= 2
    bm = 16 if use_dot else 1                                # tl.dot's smallest M; rows past M masked
    scaled = scale_inv is not None
    # the kernel steps along a scale row with stride 1; unscaled, a placeholder it never reads
    scale_inv = scale_inv.float().contiguous() if scaled else weight
    _fp8_gemv_kernel[(triton.cdiv(N, cfg["block_n"]), split)](
        x, weight, scale_inv, y, M, N, K, per, -(-K // BLOCK), x.stride(0), weight.stride(0), scale_inv.stride(0),
        y.stride(0), y.stride(1), BM=bm, BLOCK_N=cfg["block_n"], KU=cfg["ku"], EVEN_K=even, USE_DOT=use_dot,
        SCALED=scaled, DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"],
        **pdl_launch(x))
    return _sum_planes(y, out_dtype or x.dtype)


def fp8_grouped_gemv(x: Tensor, weight: Tensor, scale_inv: Tensor, offs: Tensor, *, block_n: int | None = None,
                     ku: int | None = None, split: int | None = None, num_warps: int | None = None) -> Tensor:
    """Grouped form (MoE decode: the 6 selected experts of a token in one launch): row r of x (M <= GEMV_MAX_M)
    times dequant(weight[e]).T for the group e that owns it per `offs` (cumulative row ends); rows of no group are
    zeros. One program per (row, strip, K slice): rows of one expert re-read its strip through L2."""
    M, K = x.shape
    E, N, _ = weight.shape
    if M > GEMV_MAX_M or x.dtype not in TRITON_DTYPES or weight.stride(2) != 1 or x.stride(1) != 1:
        raise ValueError(f"fp8_grouped_gemv takes M <= {GEMV_MAX_M} rows in {TRITON_DTYPES} with unit K stride, "
                         f"got x {tuple(x.shape)} {x.dtype} stride {x.stride()}, weight stride {weight.stride()}")
    if M == 0 or N == 0 or K == 0 or E == 0:
        return torch.zeros(M, N, device=x.device, dtype=x.dtype)
    cfg, per, split, even = _resolve(M, N, K, x.device, M, dict(block_n=block_n, ku=ku, split=split,
                                                                num_warps=num_warps))
    y = _out(split, M, N, x)
    # row -> group on the device (no host sync): the first e with offs[e] > r; E past the last group
    row_group = torch.searchsorted(offs.to(torch.int64), torch.arange(M, device=x.device), right=True)
    scale_inv = scale_inv.float().contiguous()               # as in fp8_gemv: unit stride along a scale row
    _fp8_grouped_gemv_kernel[(M, triton.cdiv(N, cfg["block_n"]), split)](
        x, weight, scale_inv, y, row_group.to(torch.int32), M, N, K, E, per, -(-K // BLOCK),
        x.stride(0), weight.stride(0), weight.stride(1), scale_inv.stride(0), scale_inv.stride(1),
        y.stride(0), y.stride(1), BLOCK_N=cfg["block_n"], KU=cfg["ku"], EVEN_K=even,
        num_warps=cfg["num_warps"], **pdl_launch(x))
    return _sum_planes(y, x.dtype)


def _sum_planes(y: Tensor, dtype: torch.dtype) -> Tensor:
    """Step 2's second pass: the split planes summed in order and cast, in one launch (sum + cast would be two
    graph nodes per GEMV, ~160 GEMVs per `lite` decode step)."""
    if y.shape[0] == 1:
        return y[0]
    out = torch.empty(y.shape[1:], device=y.device, dtype=dtype)
    n = out.numel()
    _sum_planes_kernel[(triton.cdiv(n, 1024),)](y, out, n, y.shape[0], BLOCK=1024, num_warps=4,
                                                **pdl_launch(y))
    return out
