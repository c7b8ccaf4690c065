"""FP8 weight gradients of the routed experts, row-wise recipe: dW_e = dY_e^T X_e over each expert's tokens through
`torch._scaled_grouped_mm`'s 2-D x 2-D form (issue 15; the BF16 `_grouped_mm` weight gradient was 23.4 ms per two
profiled lite-8L steps, RESULTS.md).

The reduction runs over the tokens, so a scale per token (the forward's row-wise scaling) cannot be factored out of
the sum. torchao's `prototype.moe_training` (`fp8_grouped_mm.py`, `_Float8GroupedMM.backward`;
`kernels/jagged_float8_scales.py`) scales both operands per expert group and per column instead: one scale for
column n of dY over expert e's tokens, one for column k of X; then dW_e[n, k] = s_dy[e, n] s_x[e, k] sum_t
q_dy[t, n] q_x[t, k] is exact in the scales. `torch._scaled_grouped_mm(a (N, M), b (M, K), scale_a (E*N,),
scale_b (E*K,), offs)` with offsets along M (the tokens) computes exactly that: a row-major (dY^T), b column-major
(X, i.e. X^T stored row-major), scales group-major, out (E, N, K).

    quantize_cols_grouped(x (M, K), offs (E,))  -> q_t (K, M_pad) e4m3, scale (E, K) fp32
        1. each group's columns: amax over its rows, scale = max(amax, EPS) / 448 (as every quantiser here)
        2. q_t[k, p_start(e) + i] = x[start(e) + i, k] / scale[e, k]: the transpose, each group's tokens starting
           at a multiple of 16 (CUTLASS reads the token dim contiguously and wants every group 16-byte aligned),
           zeros in the padding (they add nothing to the sum; an empty group gets 16 zero columns, so its dW is
           exactly 0); the last group runs to M_pad = round16(M + 16 E), a static size: nothing here syncs with the
           host
    fp8_grouped_wgrad_rowwise(dy_t, dy_scale, x_t, x_scale, offs) -> dW (E, N, K)
        3. one `_scaled_grouped_mm` over the padded group ends (fast FP8 accumulation, bf16 out: its only dtype)

Where this differs from torchao: its scales are rounded to powers of two (ours are amax / 448, as the row-wise
forward's); it asks the caller to pad the token groups to 16 (`pad_token_groups`), here the quantiser writes the
padded layout. The `*_reference` versions (dequantised fp32 math, host syncs for the group bounds) are what the CPU
runs; the dispatchers take Triton for the quantiser on sm_89+ and `_scaled_grouped_mm` on sm_90.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fp8_quant import _scales
from .triton_setup import FP8_MAX, HAS_TRITON, capability, need_triton, tl, triton, use_triton

__all__ = ["ALIGN", "fp8_grouped_wgrad_rowwise", "fp8_grouped_wgrad_rowwise_reference", "padded_groups",
           "padded_groups_reference", "padded_groups_triton", "padded_tokens", "quantize_cols_grouped",
           "quantize_cols_grouped_reference", "quantize_cols_grouped_triton"]

_E4M3 = torch.float8_e4m3fn
ALIGN = 16       # tokens: a group's start along the contiguous token dim is 16-byte aligned in FP8


def padded_tokens(M: int, E: int) -> int:
    """M_pad: room for M tokens in E groups each starting at a multiple of 16 and at least 16 wide, itself a
    multiple of 16 (the row stride of q_t, which CUTLASS wants 16-byte aligned)."""
    return -(-(M + ALIGN * E) // ALIGN) * ALIGN


def padded_groups(offs: Tensor, m_pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """(starts, padded starts, padded ends) of the groups whose cumulative ends are offs (E,), as int32 on offs'
    device: group e's tokens x[starts[e]:offs[e]] go to columns [p_starts[e], p_starts[e] + count) of q_t, and the
    GEMM's group e spans [p_starts[e], p_ends[e]); the last group ends at m_pad (= padded_tokens(M, E)). On CUDA
    one Triton launch (the reference is ten small torch ops, each a launch and host time: the FP8 weight gradient
    paid them on every GEMM)."""
    if HAS_TRITON and offs.is_cuda:
        return padded_groups_triton(offs, m_pad)
    return padded_groups_reference(offs, m_pad)


def padded_groups_reference(offs: Tensor, m_pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """`padded_groups` in torch ops."""
    ends = offs.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    # an expert without tokens gets 16 zero columns: a zero-length group would leave its output to the GEMM
    # (CUTLASS need not write a group with no K), 16 zeros make it exactly 0
    padded = ((ends - starts + ALIGN - 1) // ALIGN).clamp_min(1) * ALIGN
    p_ends = padded.cumsum(0)
    p_starts = p_ends - padded
    p_ends[-1:] = m_pad
    return starts.to(torch.int32), p_starts.to(torch.int32), p_ends.to(torch.int32)


def _check(x: Tensor, offs: Tensor, row_scale: Tensor | None = None) -> tuple[int, int, int]:
    if row_scale is not None:      # x: E4M3 codes with one scale per row (quantize_rows' output)
        if x.dim() != 2 or x.dtype != _E4M3 or tuple(row_scale.shape) != (x.shape[0],):
            raise ValueError(f"with row_scale, x must be (M, K) float8_e4m3fn and row_scale (M,), got "
                             f"{tuple(x.shape)} {x.dtype}, {tuple(row_scale.shape)}")
    elif x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise ValueError(f"x must be a 2-D floating tensor (tokens, columns), got {tuple(x.shape)} {x.dtype}")
    if offs.dim() != 1 or offs.shape[0] == 0:
        raise ValueError(f"offs must hold the groups' cumulative token ends, (E,) with E >= 1, got {tuple(offs.shape)}")
    return x.shape[0], x.shape[1], offs.shape[0]


def quantize_cols_grouped_reference(x: Tensor, offs: Tensor, row_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per group and column e4m3 codes of x (M, K) sorted by group (offs[-1] = M), transposed into the padded token
    layout (module docstring): q_t (K, padded_tokens(M, E)) float8_e4m3fn, scale (E, K) fp32. With row_scale (M,),
    x is row-wise E4M3 codes and the values quantised are float(x) * row_scale in fp32 (requantising a saved FP8
    activation without a dequantised copy)."""
    M, K, E = _check(x, offs, row_scale)
    m_pad = padded_tokens(M, E)
    starts, p_starts, _ = (t.tolist() for t in padded_groups(offs.cpu(), m_pad))
    q_t = torch.zeros(K, m_pad, device=x.device, dtype=_E4M3)
    scale = torch.empty(E, K, device=x.device, dtype=torch.float32)
    xf = x.float() if row_scale is None else x.float() * row_scale[:, None]
    for e, (a, b, p) in enumerate(zip(starts, offs.tolist(), p_starts)):
        xe = xf[a:b]
        amax = xe.abs().amax(0) if b > a else xf.new_zeros(K)
        scale[e] = _scales(amax, pow2=False)
        q_t[:, p:p + b - a] = (xe / scale[e]).clamp(-FP8_MAX, FP8_MAX).t().to(_E4M3)
    return q_t, scale


if HAS_TRITON:
    from .fp8_quant import _absmax, _max_nan, _quant, _scale_of

    @triton.jit
    def _cols_two_pass(X, RS, QT, cols, mask_k, start, end, p_start, width, stride_xm, stride_xk, ld_q,
                       HAS_RS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
        """1. the columns' amax over rows [start, end) in (BM, BK) tiles read along K (coalesced); 2. the cast,
        the tiles re-read in reverse order (the last ones read are still in L2), each transposed (tl.trans, on the
        fp32 values) and stored along the tokens from p_start, `width` tokens in all, zeros past end - start.
        Returns the scales. Also the rows of W^T (`fp8_rowwise`: one group of N rows, width N). STAGES > 1: both
        loops software-pipelined (`tl.range(num_stages=)`: the tiles ahead copied to shared memory by cp.async,
        in flight without registers; ncu: the kernel is latency-bound at 0.69 eligible warps a scheduler). The amax runs
        element-wise over the tiles and is reduced across the rows once, after the loop: a reduction per tile
        crossed the warps through shared memory (three barriers a tile in the sm_90 PTX), so no tile's load could
        start before the last one's reduction ended. Max is exact: the same scales, bit for bit."""
        acc = tl.zeros((BM, BK), dtype=tl.float32)
        for r0 in tl.range(start, end, BM, num_stages=STAGES):
            rows = (r0 + tl.arange(0, BM)).to(tl.int64)
            x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                        mask=(rows < end)[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            if HAS_RS:
                x = x * tl.load(RS + rows, mask=rows < end, other=0.0)[:, None]
            acc = _max_nan(acc, tl.abs(x))
        s = _scale_of(_absmax(acc, 0), False)
        n_tiles = tl.cdiv(width, BM)
        for t in tl.range(0, n_tiles, num_stages=STAGES):
            i = ((n_tiles - 1 - t) * BM + tl.arange(0, BM)).to(tl.int64)
            rows = start + i
            valid = (rows < end)[:, None] & mask_k[None, :]
            x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=valid, other=0.0).to(tl.float32)
            if HAS_RS:
                x = x * tl.load(RS + rows, mask=rows < end, other=0.0)[:, None]
            # padding stays 0 where the column's scale is NaN or inf too (0 / NaN would store NaN)
            q = tl.trans(tl.where(valid, _quant(x, s[None, :]), 0.0))    # (BK, BM)
            tl.store(QT + cols[:, None] * ld_q + (p_start + i)[None, :], q.to(QT.dtype.element_ty),
                     mask=mask_k[:, None] & (i < width)[None, :])
        return s

    @triton.jit
    def _cols_one_pass(X, RS, QT, cols, mask_k, start, end, p_start, width, stride_xm, stride_xk, ld_q,
                       HAS_RS: tl.constexpr, ONE_M: tl.constexpr, BM: tl.constexpr):
        """`_cols_two_pass` with one read: the whole strip (end - start <= ONE_M rows) held in registers, its amax,
        the e4m3 codes transposed (as codes: a quarter of the fp32 tile's shared memory) and stored; the padding
        past the register tile (the last group's slack) as zeros. The same codes, bit for bit."""
        i = tl.arange(0, ONE_M).to(tl.int64)
        rows = start + i
        valid = (rows < end)[:, None] & mask_k[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=valid, other=0.0).to(tl.float32)
        if HAS_RS:
            x = x * tl.load(RS + rows, mask=rows < end, other=0.0)[:, None]
        s = _scale_of(_absmax(x, 0), False)
        q = tl.trans(tl.where(valid, _quant(x, s[None, :]), 0.0).to(QT.dtype.element_ty))   # (BK, ONE_M)
        tl.store(QT + cols[:, None] * ld_q + (p_start + i)[None, :], q, mask=mask_k[:, None] & (i < width)[None, :])
        for i0 in range(ONE_M, width, BM):
            j = (i0 + tl.arange(0, BM)).to(tl.int64)
            zero = (cols[:, None] * 0 + j[None, :] * 0).to(tl.float32).to(QT.dtype.element_ty)
            tl.store(QT + cols[:, None] * ld_q + (p_start + j)[None, :], zero,
                     mask=mask_k[:, None] & (j < width)[None, :])
        return s

    @triton.jit
    def _padded_blocks(OFFS, E, E_P2: tl.constexpr):
        """Every group's (index, start, end, padded width in ALIGN-token blocks, cumulative blocks) as (E_P2,)
        vectors from the cumulative ends OFFS (E,) (E <= E_P2, a power of two; zeros past E)."""
        j = tl.arange(0, E_P2)
        ends = tl.load(OFFS + j, mask=j < E, other=0).to(tl.int32)
        starts = tl.load(OFFS + j - 1, mask=(j >= 1) & (j < E), other=0).to(tl.int32)
        blocks = tl.where(j < E, tl.maximum((ends - starts + 15) // 16, 1), 0)    # an empty group: one block
        return j, starts, ends, blocks, tl.cumsum(blocks, 0)

    @triton.jit
    def _padded_groups_kernel(OFFS, STARTS, PSTARTS, PENDS, E, M_PAD, E_P2: tl.constexpr):
        j, starts, _, blocks, b_ends = _padded_blocks(OFFS, E, E_P2)
        tl.store(STARTS + j, starts, mask=j < E)
        tl.store(PSTARTS + j, (b_ends - blocks) * 16, mask=j < E)
        tl.store(PENDS + j, tl.where(j == E - 1, M_PAD, b_ends * 16), mask=j < E)

    @triton.jit
    def _group_bounds(OFFS, e, E, M_PAD, E_P2: tl.constexpr):
        """padded_groups' (start, end, padded start, padded end) of group e, in the program itself: no launches
        before the kernel (padded_groups' reference was ten small torch ops a call)."""
        j, starts, ends, blocks, b_ends = _padded_blocks(OFFS, E, E_P2)
        mine = j == e
        b_end = tl.sum(tl.where(mine, b_ends, 0), 0)
        # counted in blocks and multiplied by 16 here, so the compiler sees the bounds' alignment (a multiple_of
        # hint on the reduced values was dropped: the transposed stores went back to one byte each)
        p_start = (b_end - tl.sum(tl.where(mine, blocks, 0), 0)) * 16
        p_end = tl.where(e == E - 1, M_PAD, b_end * 16)     # the last group runs to M_PAD
        return tl.sum(tl.where(mine, starts, 0), 0), tl.sum(tl.where(mine, ends, 0), 0), p_start, p_end

    @triton.jit
    def _cols_group_strip(X, RS, QT, S, OFFS, E, K, M_PAD, e, kb, stride_xm, stride_xk, HAS_RS: tl.constexpr,
                          BM: tl.constexpr, BK: tl.constexpr, ONE_M: tl.constexpr, E_P2: tl.constexpr,
                          STAGES: tl.constexpr):
        # BK columns (block kb) of group e; a group of at most ONE_M tokens in one read (registers), a longer one
        # (or ONE_M = 0) in two (the second from L2 where it still holds the strip)
        cols = (kb * BK + tl.arange(0, BK)).to(tl.int64)
        mask_k = cols < K
        # the padded bounds, multiples of ALIGN as the compiler sees (_group_bounds): the transposed stores along the
        # tokens are 16-byte vectors (without it, one byte per store instruction: 32 of them a thread)
        start, end, p_start, p_end = _group_bounds(OFFS, e, E, M_PAD, E_P2)
        if ONE_M > 0:
            if end - start <= ONE_M:
                s = _cols_one_pass(X, RS, QT, cols, mask_k, start, end, p_start, p_end - p_start, stride_xm,
                                   stride_xk, M_PAD, HAS_RS, ONE_M, BM)
            else:
                s = _cols_two_pass(X, RS, QT, cols, mask_k, start, end, p_start, p_end - p_start, stride_xm,
                                   stride_xk, M_PAD, HAS_RS, BM, BK, STAGES)
        else:
            s = _cols_two_pass(X, RS, QT, cols, mask_k, start, end, p_start, p_end - p_start, stride_xm, stride_xk,
                               M_PAD, HAS_RS, BM, BK, STAGES)
        tl.store(S + e * K + cols, s, mask=mask_k)

    @triton.jit
    def _cols_grouped_kernel(X, RS, QT, S, OFFS, E, K, M_PAD, stride_xm, stride_xk, HAS_RS: tl.constexpr,
                             BM: tl.constexpr, BK: tl.constexpr, ONE_M: tl.constexpr, E_P2: tl.constexpr,
                             STAGES: tl.constexpr, PERSIST: tl.constexpr):
        # one strip (BK columns of one group) a program, grid (K / BK, E); or PERSIST: a 1-D grid of fewer programs
        # taking every num_programs-th strip in the same order, fewer strips in flight (L2 keeps each between its
        # two reads: `fp8_rowwise._rows_t_kernel`)
        if PERSIST:
            n_kb = tl.cdiv(K, BK)
            for t in range(tl.program_id(0), E * n_kb, tl.num_programs(0)):
                _cols_group_strip(X, RS, QT, S, OFFS, E, K, M_PAD, t // n_kb, t % n_kb, stride_xm, stride_xk,
                                  HAS_RS, BM, BK, ONE_M, E_P2, STAGES)
        else:
            _cols_group_strip(X, RS, QT, S, OFFS, E, K, M_PAD, tl.program_id(1), tl.program_id(0), stride_xm,
                              stride_xk, HAS_RS, BM, BK, ONE_M, E_P2, STAGES)


def _strip_grid(n_kb: int, groups: int, programs: int) -> tuple[int, ...]:
    """The column quantisers' grid over their (column block, group) strips: one program a strip, (n_kb, groups);
    or, with programs, a looping grid of that many (at most one a strip): the kernels' PERSIST form."""
    return (min(programs, n_kb * groups),) if programs else (n_kb, groups)


# launch shape: (BM tokens, BK columns) tiles. Swept on an H100 (fp8_grouped_bench.py, RESULTS.md twenty-fifth and
# twenty-sixth sessions): (128, 32, 4 warps) gives 28-35% of copy over lite / V3 widths, uniform and skewed, vs
# 21-34% for (64, 64, 4); with the 16-byte store hint 22-41% (no clear gain). ONE_M: the longest group read once
# (0: every group twice); the one-pass form measured 7-31%, the strip in registers costing more occupancy than the
# second read saves. The amax loop without a reduction per tile (twenty-sixth session): 0.88-0.96x the time (H200).
# Thirtieth session (H100), the group bounds derived in the kernel (no torch ops before it): 39-47% of copy, the
# default the sweep's best; ncu: latency-bound (27% occupancy, 0.69 eligible warps a scheduler)
_BLOCK_M, _BLOCK_K, _WARPS, _ONE_M = 128, 32, 4, 0
# STAGES: 1 = plain loops. 2-4 pipeline the loads through shared memory (cp.async, 16-byte copies, same registers
# in the sm_90 build). Thirty-first session (H100, benchmarks/cols_probe.py, lite gate/up X): 3 deep 247.3 us a
# kernel vs 232.4 plain (0.94x), so off; the W^T rows quantiser, which shares the loops, gains from it (fp8_rowwise)
_STAGES = 1
# PROGRAMS: 0 = one program a strip; N = N programs looping over the strips (`programs`). Unmeasured: 0 until
# benchmarks/fp8_grouped_bench.py times it
_PROGRAMS = 0
# A split form (two kernels over every tile, no loop: column maxima by atomics, then the cast; twenty-ninth
# session) measured slower at every shape on an H100 and was removed (thirtieth session, RESULTS.md): 22-32% of copy
# vs 39-47% looped; the profiler's kernel times agreed (85 + 214 us vs 232 us at lite gate/up)


def padded_groups_triton(offs: Tensor, m_pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """`padded_groups` in one Triton launch."""
    need_triton("padded_groups_triton")
    E = offs.shape[0]
    starts, p_starts, p_ends = (torch.empty(E, device=offs.device, dtype=torch.int32) for _ in range(3))
    _padded_groups_kernel[(1,)](offs, starts, p_starts, p_ends, E, m_pad, E_P2=triton.next_power_of_2(E))
    return starts, p_starts, p_ends


def quantize_cols_grouped_triton(x: Tensor, offs: Tensor, block_m: int | None = None, block_k: int | None = None,
                                 num_warps: int | None = None, row_scale: Tensor | None = None,
                                 one_pass_m: int | None = None, stages: int | None = None,
                                 programs: int | None = None) -> tuple[Tensor, Tensor]:
    """`quantize_cols_grouped_reference` in Triton (bit-equal to it on the GPU), no host sync. By default one
    kernel looping over each group's tokens (`one_pass_m`, a power of two or 0: groups of at most that many tokens
    are read once, held in registers; `stages`: the two-pass loops' software-pipelining depth, 1 = none;
    `programs`: a looping grid of that many programs over the (group, column block) strips, 0 = one a strip)."""
    need_triton("quantize_cols_grouped_triton")
    M, K, E = _check(x, offs, row_scale)
    m_pad = padded_tokens(M, E)
    q_t = torch.empty(K, m_pad, device=x.device, dtype=_E4M3)
    scale = torch.empty(E, K, device=x.device, dtype=torch.float32)
    rs = x if row_scale is None else row_scale      # (a pointer the kernel ignores without HAS_RS)
    if K:
        bk = block_k or _BLOCK_K
        programs = _PROGRAMS if programs is None else programs
        _cols_grouped_kernel[_strip_grid(triton.cdiv(K, bk), E, programs)](
            x, rs, q_t, scale, offs, E, K, m_pad, x.stride(0), x.stride(1),
            HAS_RS=row_scale is not None, BM=block_m or _BLOCK_M, BK=bk,
            ONE_M=_ONE_M if one_pass_m is None else one_pass_m, E_P2=triton.next_power_of_2(E),
            STAGES=stages or _STAGES, PERSIST=bool(programs), num_warps=num_warps or _WARPS)
    return q_t, scale


def quantize_cols_grouped(x: Tensor, offs: Tensor, row_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dispatcher: Triton for CUDA tensors on sm_89+ (DSV3_FP8_QUANT=reference forces the reference)."""
    if use_triton(x if row_scale is None else row_scale, "DSV3_FP8_QUANT", fp8=True):
        return quantize_cols_grouped_triton(x, offs, row_scale=row_scale)
    return quantize_cols_grouped_reference(x, offs, row_scale)


def _check_gemm(a_t: Tensor, a_scale: Tensor, b_t: Tensor, b_scale: Tensor, offs: Tensor) -> tuple[int, int, int]:
    if a_t.dim() != 2 or b_t.dim() != 2 or a_t.dtype != _E4M3 or b_t.dtype != _E4M3:
        raise ValueError(f"a_t (N, M_pad) and b_t (K, M_pad) must be 2-D float8_e4m3fn, got {tuple(a_t.shape)} "
                         f"{a_t.dtype}, {tuple(b_t.shape)} {b_t.dtype}")
    (N, m_pad), (K, m_pad_b), E = a_t.shape, b_t.shape, offs.shape[0]
    if m_pad != m_pad_b or tuple(a_scale.shape) != (E, N) or tuple(b_scale.shape) != (E, K) or offs.dim() != 1:
        raise ValueError(f"shapes disagree: a_t {tuple(a_t.shape)}, b_t {tuple(b_t.shape)}, a_scale "
                         f"{tuple(a_scale.shape)} (want ({E}, {N})), b_scale {tuple(b_scale.shape)} (want ({E}, {K}))")
    return N, K, E


def fp8_grouped_wgrad_rowwise_reference(a_t: Tensor, a_scale: Tensor, b_t: Tensor, b_scale: Tensor, offs: Tensor,
                                        out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """dW[e] = dequant(a_t)[:, group e] @ dequant(b_t)[:, group e]^T in fp32 over the padded group columns, from
    quantize_cols_grouped's outputs of dY (a) and X (b) and the unpadded group ends offs: (E, N, K)."""
    N, K, E = _check_gemm(a_t, a_scale, b_t, b_scale, offs)
    _, p_starts, p_ends = padded_groups(offs.cpu(), a_t.shape[1])
    out = torch.empty(E, N, K, device=a_t.device, dtype=torch.float32)
    for e, (p, q) in enumerate(zip(p_starts.tolist(), p_ends.tolist())):
        out[e] = (a_t[:, p:q].float() * a_scale[e][:, None]) @ (b_t[:, p:q].float() * b_scale[e][:, None]).t()
    return out.to(out_dtype)


def fp8_grouped_wgrad_rowwise(a_t: Tensor, a_scale: Tensor, b_t: Tensor, b_scale: Tensor, offs: Tensor,
                              out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Dispatcher: torch._scaled_grouped_mm 2-D x 2-D on sm_90 (offsets along the padded tokens; no host sync:
    the padded ends come from offs on the device), else the reference."""
    N, K, E = _check_gemm(a_t, a_scale, b_t, b_scale, offs)
    if not (a_t.is_cuda and hasattr(torch, "_scaled_grouped_mm") and capability(a_t.device) == (9, 0)
            and N % 16 == 0 and K % 16 == 0):
        return fp8_grouped_wgrad_rowwise_reference(a_t, a_scale, b_t, b_scale, offs, out_dtype)
    _, _, p_ends = padded_groups(offs, a_t.shape[1])
    out = torch._scaled_grouped_mm(a_t, b_t.t(), a_scale.reshape(-1), b_scale.reshape(-1), offs=p_ends,
                                   out_dtype=torch.bfloat16, use_fast_accum=True)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)
