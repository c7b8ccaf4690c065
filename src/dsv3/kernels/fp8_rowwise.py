"""Row-wise scaled FP8 for the routed experts' grouped GEMMs: the fast alternative to the report's 1x128 / 128x128
scaling where no block-scaled grouped GEMM is fast (issue 15).

On Hopper, torch's only FP8 grouped GEMM is `torch._scaled_grouped_mm` (CUTLASS), which takes one scale per row of
each operand: 800-880 TFLOP/s at lite's expert shapes, 1.4-1.6x bf16 `torch._grouped_mm` (issue 15's probe,
RESULTS.md); its block-wise recipes have no sm_90 kernel ("No gemm implementation was found"), and our block-scaled
Triton grouped GEMM reaches 0.72-0.81x bf16. Row-wise scaling is coarser than the report's (one scale per token
over the whole hidden dimension, one per weight row over its whole input), so an outlier costs its row more
precision; the loss comparison in RESULTS.md says what that costs. The GEMM also accumulates in FP8 MMA precision
without the report's promotion every 128 products (`use_fast_accum`: 3x faster here than the promoted variant).

    quantize_rows(x (M, K))  -> q (M, K) e4m3, scale (M,) fp32         scale = max(amax, EPS) / 448 (the dequantisation
                                                                      multiplier, as kernels.fp8_quant's tiles)
    quantize_rows_both(w (E, N, K)) -> q, scale, q_t (E, K, N), scale_t (E, K): rows of w and of w^T (the forward
                                    and input-gradient operands of a weight)

W^T's rows (the input gradient's operand, one scale per column of w) come from one Triton kernel over coalesced
2-D tiles of w as stored: per column strip, its amax, then the cast stored transposed through shared memory, the
strip's second read served from L2 (`quantize_rows_transposed_triton`; the dispatcher takes it for any transposed
view).
    fp8_grouped_gemm_rowwise(a (M, K), a_scale (M,), b (E, N, K), b_scale (E, N), offs (E,))
        -> c (M, N):  c[rows of group e] = (a_scale[:, None] * a) @ (b_scale[e][:, None] * b[e]).T

offs are cumulative row ends as torch._grouped_mm takes them, and every row belongs to a group (offs[-1] = M: the
experts' sorted rows always are; checking it would cost a host sync, so the fast path leaves any other rows
undefined where the reference zeroes them). The
`*_reference` versions dequantise to fp32 and multiply group by group; the dispatchers take torch's kernel on CUDA
sm_90 (K and N multiples of 16) and Triton for the quantiser on sm_89+, else the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fp8_quant import _scales
from .triton_setup import FP8_MAX, HAS_TRITON, capability, need_triton, tl, triton, use_triton

__all__ = ["fp8_grouped_gemm_rowwise", "fp8_grouped_gemm_rowwise_reference", "quantize_rows", "quantize_rows_both",
           "quantize_rows_both_reference", "quantize_rows_reference", "quantize_rows_transposed_triton",
           "quantize_rows_triton"]

_E4M3 = torch.float8_e4m3fn


def _check_x(x: Tensor) -> None:
    if x.dim() not in (2, 3) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise ValueError(f"x must be a 2-D or 3-D floating tensor, got shape {tuple(x.shape)} dtype {x.dtype}")


def quantize_rows_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """One e4m3 scale per row (last dim) of x (M, K) or (B, M, K), any strides: q contiguous float8_e4m3fn of x's
    shape, scale (M,) or (B, M) fp32."""
    _check_x(x)
    xf = x.float()
    amax = xf.abs().amax(dim=-1) if x.shape[-1] else xf.new_zeros(x.shape[:-1])
    scale = _scales(amax, pow2=False)
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX)
    return q.to(_E4M3).contiguous(), scale.contiguous()


def quantize_rows_both_reference(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows of w and rows of w^T (one scale per column of w): quantize_rows_reference(w) and
    quantize_rows_reference(w.transpose(-1, -2)), the second contiguous (..., K, N)."""
    return (*quantize_rows_reference(w), *quantize_rows_reference(w.transpose(-1, -2)))


if HAS_TRITON:
    from .fp8_quant import _absmax, _max_nan, _quant, _scale_of
    from .fp8_grouped_wgrad import _cols_one_pass, _cols_two_pass, _strip_grid

    @triton.jit
    def _rows_kernel(X, Q, S, M, K, stride_xb, stride_xm, stride_xk, ROWS: tl.constexpr, CHUNK: tl.constexpr):
        # two passes over the row block: its max-abs, then the scaled cast (the second read is served from L2)
        b = tl.program_id(1).to(tl.int64)
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        mask_m = rows < M
        X += b * stride_xb
        amax = tl.zeros((ROWS,), dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            cols = k0 + tl.arange(0, CHUNK)
            mask = mask_m[:, None] & (cols < K)[None, :]
            x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
            amax = _max_nan(amax, _absmax(x.to(tl.float32), 1))
        s = _scale_of(amax, False)
        for k0 in range(0, K, CHUNK):
            cols = k0 + tl.arange(0, CHUNK)
            mask = mask_m[:, None] & (cols < K)[None, :]
            x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
            q = _quant(x.to(tl.float32), s[:, None])
            tl.store(Q + (b * M + rows[:, None]) * K + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
        tl.store(S + b * M + rows, s, mask=mask_m)


    @triton.jit
    def _rows_t_strip(X, QT, ST, N, K, e, kb, stride_xe, stride_xn, stride_xk, BN: tl.constexpr, BK: tl.constexpr,
                      ONE_M: tl.constexpr, STAGES: tl.constexpr):
        # rows of w^T for w (E, N, K): BK columns (block kb) of expert e's w. N <= ONE_M: the strip read once
        # and held in registers (`fp8_grouped_wgrad._cols_one_pass`, one group of N tokens); else (or ONE_M = 0)
        # read twice, the second time from L2 (`_cols_two_pass`, one group of N rows)
        e = e.to(tl.int64)
        cols = (kb * BK + tl.arange(0, BK)).to(tl.int64)
        mask_k = cols < K
        X += e * stride_xe
        QT += e * K * N
        if ONE_M > 0:
            if N <= ONE_M:
                s = _cols_one_pass(X, X, QT, cols, mask_k, 0, N, 0, N, stride_xn, stride_xk, N, False, ONE_M, BN)
            else:
                s = _cols_two_pass(X, X, QT, cols, mask_k, 0, N, 0, N, stride_xn, stride_xk, N, False, BN, BK, STAGES)
        else:
            s = _cols_two_pass(X, X, QT, cols, mask_k, 0, N, 0, N, stride_xn, stride_xk, N, False, BN, BK, STAGES)
        tl.store(ST + e * K + cols, s, mask=mask_k)

    @triton.jit
    def _rows_t_kernel(X, QT, ST, E, N, K, stride_xe, stride_xn, stride_xk, BN: tl.constexpr, BK: tl.constexpr,
                       ONE_M: tl.constexpr, STAGES: tl.constexpr, PERSIST: tl.constexpr):
        # one strip a program (grid (K / BK, E)), or PERSIST: a 1-D grid of fewer programs, each taking every
        # num_programs-th strip, so that fewer strips are in flight at once and each one's second read (the cast
        # pass) can still find it in L2 (ncu, thirty-second session: the one-strip-a-program grid moved DRAM at 80%
        # of peak with a 26% L2 hit rate: its strips were re-read from HBM)
        if PERSIST:
            n_kb = tl.cdiv(K, BK)
            for t in range(tl.program_id(0), E * n_kb, tl.num_programs(0)):
                _rows_t_strip(X, QT, ST, N, K, t // n_kb, t % n_kb, stride_xe, stride_xn, stride_xk, BN, BK, ONE_M,
                              STAGES)
        else:
            _rows_t_strip(X, QT, ST, N, K, tl.program_id(1), tl.program_id(0), stride_xe, stride_xn, stride_xk, BN,
                          BK, ONE_M, STAGES)


def quantize_rows_triton(x: Tensor, rows: int | None = None, chunk: int | None = None,
                         num_warps: int = 4) -> tuple[Tensor, Tensor]:
    """Row-wise quantisation through Triton (contract of `quantize_rows_reference`; bit-equal to it on the GPU).
    Strided input is read in place: rows along a contiguous dim (tokens, weight rows) take 1 row x 2048 columns per
    step; rows across it (the columns of a weight, for W^T) 64 x 64, so that each load is coalesced along the
    contiguous dim and no transposed high-precision copy is made."""
    need_triton("quantize_rows_triton")
    _check_x(x)
    x3 = x if x.dim() == 3 else x[None]
    B, M, K = x3.shape
    q = torch.empty(B, M, K, device=x.device, dtype=_E4M3)
    scale = torch.empty(B, M, device=x.device, dtype=torch.float32)
    along = x3.stride(2) == 1 or K == 1
    # launch shape: the best of benchmarks/fp8_quant_sweep.py (H200: 81-84% of copy bandwidth along rows, 38%
    # across them, where each program's 64 columns share a 128-byte line per row). Along rows, one 2048-wide chunk
    # per step where K fills it (K = 2048, 7168: 97% on an H100); at K = 1408 (lite's expert FFN output) it masked
    # 640 of 2048 lanes twice (51%), 4 rows x 256 columns reach 76% (H100, fourteenth session)
    wide = K % 2048 == 0 or K >= 4096
    rows = rows or (64 if not along else 1 if wide else 4)
    chunk = chunk or (64 if not along else 2048 if wide else 256)
    if B and M:
        _rows_kernel[(triton.cdiv(M, rows), B)](x3, q, scale, M, K, x3.stride(0), x3.stride(1), x3.stride(2),
                                                 ROWS=rows, CHUNK=chunk, num_warps=num_warps)
    return (q, scale) if x.dim() == 3 else (q[0], scale[0])


# launch shape of the transposing quantiser: (BN, BK) tiles, and ONE_M: the widest w read once (0: every w twice;
# the one-pass form is unmeasured), STAGES: the two passes' pipelining depth (fp8_grouped_wgrad._STAGES; 1 = none).
# benchmarks/fp8_quant_sweep.py sweeps the alternatives: 64 x 64 tiles pipelined 3 deep read lite's expert weights at
# 56% / 55% of copy (gate-up / down; bit-exact) against 51% / 49% for the earlier 128 x 32 unpipelined (H100,
# thirty-first session); 128 x 32 at depths 2-4 gained nothing (the group-column quantiser's depth 3 lost 6%)
_T_BLOCK_N, _T_BLOCK_K, _T_WARPS, _T_ONE_M, _T_STAGES = 64, 64, 4, 0, 3
# PROGRAMS: 0 = one program a strip; N = N programs looping over the strips (fewer in flight: L2 keeps each one
# between its two reads). Unmeasured: 0 until benchmarks/fp8_quant_sweep.py times it
_T_PROGRAMS = 0


def quantize_rows_transposed_triton(w: Tensor, rows: bool = False, block_n: int | None = None,
                                    block_k: int | None = None, num_warps: int | None = None,
                                    one_pass_m: int | None = None, stages: int | None = None,
                                    programs: int | None = None) -> tuple[Tensor, ...]:
    """Rows of w^T through Triton: quantize_rows_reference(w.transpose(-1, -2)) for w (N, K) or (E, N, K), bit for
    bit, as (q_t (..., K, N) contiguous, scale_t (..., K)), from one kernel that reads w once from HBM (its second
    read of each column strip is served from L2) and writes q_t coalesced (`_rows_t_kernel`); rows=True also
    returns the rows of w first (`quantize_rows_both_reference`'s contract; the row kernel, a second read).
    `programs`: a looping grid of that many programs over the column strips (0: one program a strip)."""
    need_triton("quantize_rows_transposed_triton")
    _check_x(w)
    if not w.numel():     # nothing to read: the reference gives the shapes (and EPS / 448 for empty rows)
        out = quantize_rows_both_reference(w)
        return out if rows else out[2:]
    w3 = w if w.dim() == 3 else w[None]
    if w3.stride(2) != 1 and w3.shape[2] > 1:
        w3 = w3.contiguous()    # the tiles are read along K
    E, N, K = w3.shape
    q_t = torch.empty(E, K, N, device=w.device, dtype=_E4M3)
    s_t = torch.empty(E, K, device=w.device, dtype=torch.float32)
    bn, bk = block_n or _T_BLOCK_N, block_k or _T_BLOCK_K
    programs = _T_PROGRAMS if programs is None else programs
    _rows_t_kernel[_strip_grid(triton.cdiv(K, bk), E, programs)](
        w3, q_t, s_t, E, N, K, w3.stride(0), w3.stride(1), w3.stride(2), BN=bn, BK=bk,
        ONE_M=_T_ONE_M if one_pass_m is None else one_pass_m, STAGES=stages or _T_STAGES, PERSIST=bool(programs),
        num_warps=num_warps or _T_WARPS)
    out = (q_t, s_t) if w.dim() == 3 else (q_t[0], s_t[0])
    return (*quantize_rows_triton(w), *out) if rows else out


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dispatcher: Triton for CUDA tensors on sm_89+ (DSV3_FP8_QUANT=reference forces the reference)."""
    if use_triton(x, "DSV3_FP8_QUANT", fp8=True):
        if x.dim() >= 2 and x.stride(-2) == 1 and x.stride(-1) != 1 and x.shape[-2] > 1:
            # a transposed view, W^T (the input gradient's operand): the transposing quantiser reads W as stored
            # (the row kernel's strided read of the view reached 38% of copy bandwidth; issue 15)
            return quantize_rows_transposed_triton(x.transpose(-1, -2))
        return quantize_rows_triton(x)
    return quantize_rows_reference(x)


def quantize_rows_both(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows of w and of w^T, (q, scale, q_t, scale_t): both operands a weight gives the row-wise GEMMs (forward and
    input gradient); on the GPU the row kernel and the transposing one (`quantize_rows_transposed_triton`)."""
    if use_triton(w, "DSV3_FP8_QUANT", fp8=True):
        return quantize_rows_transposed_triton(w, rows=True)
    return quantize_rows_both_reference(w)


def _check_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, offs: Tensor) -> tuple[int, int, int, int]:
    if a.dim() != 2 or b.dim() != 3 or a.dtype != _E4M3 or b.dtype != _E4M3:
        raise ValueError(f"a (M, K) and b (E, N, K) must be float8_e4m3fn, got {tuple(a.shape)} {a.dtype}, "
                         f"{tuple(b.shape)} {b.dtype}")
    (M, K), (E, N, Kb) = a.shape, b.shape
    if K != Kb or tuple(a_scale.shape) != (M,) or tuple(b_scale.shape) != (E, N) or tuple(offs.shape) != (E,):
        raise ValueError(f"shapes disagree: a {tuple(a.shape)}, a_scale {tuple(a_scale.shape)} (want ({M},)), "
                         f"b {tuple(b.shape)}, b_scale {tuple(b_scale.shape)} (want ({E}, {N})), offs "
                         f"{tuple(offs.shape)} (want ({E},))")
    return M, K, E, N


def fp8_grouped_gemm_rowwise_reference(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, offs: Tensor,
                                       out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Dequantise to fp32 and multiply each group's rows by its matrix (host syncs for the group bounds)."""
    M, K, E, N = _check_gemm(a, a_scale, b, b_scale, offs)
    af = a.float() * a_scale[:, None]
    out = torch.zeros(M, N, device=a.device, dtype=torch.float32)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = af[start:end] @ (b[e].float() * b_scale[e][:, None]).t()
        start = end
    return out.to(out_dtype)


def _use_scaled_grouped_mm(a: Tensor, N: int, K: int) -> bool:
    return (a.is_cuda and hasattr(torch, "_scaled_grouped_mm") and capability(a.device) == (9, 0)
            and K % 16 == 0 and N % 16 == 0)


def fp8_grouped_gemm_rowwise(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, offs: Tensor,
                             out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Dispatcher: torch._scaled_grouped_mm on sm_90 (no host sync; fast FP8 accumulation; bf16 output, widened
    when out_dtype asks for more), else the reference."""
    M, K, E, N = _check_gemm(a, a_scale, b, b_scale, offs)
    if not _use_scaled_grouped_mm(a, N, K):
        return fp8_grouped_gemm_rowwise_reference(a, a_scale, b, b_scale, offs, out_dtype)
    out = torch._scaled_grouped_mm(a, b.transpose(-2, -1), a_scale, b_scale, offs=offs.to(torch.int32),
                                   out_dtype=torch.bfloat16, use_fast_accum=True)   # its only output dtype
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)
