"""Fused MoE for decode-sized batches: every selected expert of a layer in one launch per GEMM stage, reading only
the selected experts' weights (spec 1.6; the design follows vLLM's / SGLang's fused_moe, written anew here).

Inputs: x (T, D) tokens, weights (T, K) fp32 gate weights and idx (T, K) expert ids (the router's output), stacked
experts gate_proj / up_proj (E, I, D) and down_proj (E, D, I), either in x's dtype or in the released FP8 block
format (e4m3 + one fp32 `scale_inv` per 128x128 block, shapes (E, ceil(N/128), ceil(K/128)), as
dsv3.kernels.fp8_weight_gemm). Output (T, D) in x's dtype:

    y[t] = sum_k weights[t, k] * down_{e}( silu(gate_{e}(x[t])) * up_{e}(x[t]) ),   e = idx[t, k]
           (+ down_s( silu(gate_s(x[t])) * up_s(x[t]) )   with the shared experts' tensors)

Optionally the shared experts too: gate_s / up_s (I_s, D), down_s (D, I_s) (I_s = n_shared * moe_intermediate_size),
2-D scale_inv for FP8 weights. Batches of the GEMV form (below) run them as one more (token, k) pair per token,
inside the same two launches: at batch 1 the shared MLP beside the kernel costs 3-4 launches per MoE layer
(dsv3.kernels.moe_rows says why that matters). The tiled form adds them apart (torch ops; the engine's dispatch,
dsv3.infer.moe_dispatch, keeps the module's shared MLP for those batches).

Algorithm (Triton):
  1. sort the P = T*K (token, k) pairs by expert (a stable one-hot rank for small P*E, a stable sort otherwise),
     per-expert counts and their cumulative ends `offs`, and the tile map of dsv3.kernels.fp8_weight_gemm
     (each BLOCK_M-row tile of an expert's segment -> (expert, first sorted row)); all on the device, no host sync,
     over a shape-only upper bound of cdiv(P, BLOCK_M) + min(E, P) tiles (the real ones come first);
  2. gate-up kernel, grid (tiles, I / BLOCK_N, GATE_UP_SPLIT_K): a tile gathers its pairs' token rows of x, streams
     its expert's gate and up rows for one BLOCK_N slice in the same K loop (two accumulators, one pass over x), and
     writes h = silu(gate) * up (fp32 math, stored in x's dtype) in sorted order; with split-K (small batches: more
     programs, shorter loops) each program writes its slice's fp32 gate and up partials instead, and the down
     kernel sums them in slice order and applies the same epilogue as it loads h;
  3. down kernel, grid (tiles, D / BLOCK_N, SPLIT_K): h (sorted rows) times the expert's down rows, multiplied in
     the epilogue by each pair's routed weight and stored (fp32) at the pair's own (token, k) place; with split-K
     each program takes 1/SPLIT_K of the I loop and the partial rows are summed in slice order after the launch;
  4. the combine: the K weighted rows of each token summed (fp32), cast to x's dtype. A fixed-order sum, not
     atomics: the output is deterministic (bit-equal between a captured graph and an eager call).
At most ROWS_MAX_TOKENS tokens (batch-1 decode) take the GEMV form of steps 2-3 instead (dsv3.kernels.moe_rows: no
sort, one program per (pair, strip), fp8_gemv's wide loads; with the shared experts, K + 1 pairs per token whose
K + 1 rows step 4 sums, the shared row last). Programs of tiles past the real ones return at once.
FP8 weights are converted to x's dtype in registers (exact) with the block's scale applied to each 128-long partial
sum (BLOCK_K = 128, BLOCK_N divides 128). The grid's first axis is the tile: programs that share an expert's weight
slice are launched side by side (its rows read once from HBM, the other tiles' reads hit L2). The launch (`MoELaunch`:
tile sizes, warps, stages per stage, split-K) comes from `LAUNCH_TABLE` (dsv3.kernels.moe_decode_launch) by weight
format and token count, measured by benchmarks/moe_decode_sweep.py; the token count is not a compile-time constant
(one compile serves every decode bucket).

`moe_decode_reference`: the same math in PyTorch, expert by expert (host syncs; the CPU path and the oracle).
`moe_decode`: Triton on CUDA (sm_89+ for FP8 weights, any Triton GPU otherwise) when triton imports, else the
reference (DSV3_MOE_DECODE=reference forces it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fp8_quant import dequantize_blocks
from .fp8_weight_gemm import grouped_tile_map
from .moe_decode_launch import LAUNCH_TABLE, MoELaunch, _launch_kwargs, fused_token_range, launch_config
from .moe_rows import ROWS_MAX_TOKENS, moe_decode_rows_triton, rows_form
from .triton_setup import (BLOCK, HAS_TRITON, TRITON_DTYPES, need_triton, pdl_entry, pdl_launch, tl, triton,
                           use_triton)

__all__ = ["HAS_TRITON", "LAUNCH_TABLE", "ROWS_MAX_TOKENS", "MoELaunch", "down_stage", "fused_token_range",
           "gate_up_stage", "launch_config", "moe_decode", "moe_decode_reference", "moe_decode_rows_triton",
           "moe_decode_sorted_triton", "moe_decode_triton", "rows_form", "sort_pairs"]


def _check(x: Tensor, weights: Tensor, idx: Tensor, gate: Tensor, up: Tensor, down: Tensor, scales,
           shared: tuple = (None,) * 6) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D float tensor (T, D), got shape {tuple(x.shape)} dtype {x.dtype}")
    T, D = x.shape
    if idx.dim() != 2 or idx.shape[0] != T or weights.shape != idx.shape or idx.is_floating_point():
        raise ValueError(f"idx (T, K) integer and weights (T, K) expected for T={T}, got {tuple(idx.shape)} "
                         f"{idx.dtype}, {tuple(weights.shape)}")
    if gate.dim() != 3 or gate.shape != up.shape or gate.shape[2] != D or down.shape != (gate.shape[0], D,
                                                                                        gate.shape[1]):
        raise ValueError(f"gate/up (E, I, D={D}) and down (E, D, I) expected, got {tuple(gate.shape)}, "
                         f"{tuple(up.shape)}, {tuple(down.shape)}")
    fp8 = gate.dtype == torch.float8_e4m3fn
    if fp8 != (scales[0] is not None) or any((s is None) != (scales[0] is None) for s in scales):
        raise ValueError("FP8 expert weights need all three scale_inv tensors, other weights none")
    if fp8:
        for w, s in zip((gate, up, down), scales):
            want = (w.shape[0], -(-w.shape[1] // BLOCK), -(-w.shape[2] // BLOCK))
            if w.dtype != torch.float8_e4m3fn or tuple(s.shape) != want:
                raise ValueError(f"FP8 weight {tuple(w.shape)} {w.dtype} needs an e4m3 weight and scale_inv of "
                                 f"shape {want}, got {tuple(s.shape)}")
    ws, ss = shared[:3], shared[3:]
    if all(w is None for w in shared):
        return
    if any(w is None for w in ws) or ws[0].dim() != 2 or ws[0].shape != ws[1].shape or ws[0].shape[1] != D or \
            ws[2].shape != (D, ws[0].shape[0]) or any(w.dtype != gate.dtype for w in ws):
        raise ValueError(f"shared gate/up (I_s, D={D}) and down (D, I_s) in the experts' dtype {gate.dtype} expected, "
                         f"got {[None if w is None else (tuple(w.shape), w.dtype) for w in ws]}")
    if any((s is None) == fp8 for s in ss):
        raise ValueError("FP8 shared weights need all three scale_inv tensors, other weights none")
    if fp8:
        for w, s in zip(ws, ss):
            want = (-(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK))
            if tuple(s.shape) != want:
                raise ValueError(f"FP8 shared weight {tuple(w.shape)} needs a scale_inv of shape {want}, got "
                                 f"{tuple(s.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def _weight(w: Tensor, s: Tensor | None) -> Tensor:
    """One matrix in fp32: as it is, or dequantised from its 128x128 blocks."""
    return w.float() if s is None else dequantize_blocks(w, s, torch.float32)


def _swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, gate_scale: Tensor | None = None,
            up_scale: Tensor | None = None, down_scale: Tensor | None = None) -> Tensor:
    """One expert's (or the shared experts') SwiGLU on rows x as the kernels compute it: fp32 GEMMs, h rounded to
    x's dtype (as the kernels store it), fp32 out."""
    xf = x.float()
    h = (F.silu(xf @ _weight(gate, gate_scale).T) * (xf @ _weight(up, up_scale).T)).to(x.dtype)
    return h.float() @ _weight(down, down_scale).T


def moe_decode_reference(x: Tensor, weights: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor,
                         down_proj: Tensor, gate_scale: Tensor | None = None, up_scale: Tensor | None = None,
                         down_scale: Tensor | None = None, shared_gate: Tensor | None = None,
                         shared_up: Tensor | None = None, shared_down: Tensor | None = None,
                         shared_gate_scale: Tensor | None = None, shared_up_scale: Tensor | None = None,
                         shared_down_scale: Tensor | None = None) -> Tensor:
    """The fused MoE's math, expert by expert: fp32 GEMMs, h rounded to x's dtype (as the kernel stores it), fp32
    weighted sum over k. With the shared experts' tensors (module docstring), their output is one more row of each
    token's sum, with weight 1, after its K routed ones (the GEMV form's order). Returns (T, D) in x's dtype."""
    scales = (gate_scale, up_scale, down_scale)
    shared = (shared_gate, shared_up, shared_down, shared_gate_scale, shared_up_scale, shared_down_scale)
    _check(x, weights, idx, gate_proj, up_proj, down_proj, scales, shared)
    T, K = idx.shape
    out = torch.zeros(T, K + (shared_gate is not None), x.shape[1], dtype=torch.float32, device=x.device)
    for e in idx.unique().tolist():
        t, k = (idx == e).nonzero(as_tuple=True)
        pick = lambda s: None if s is None else s[e]  # noqa: E731
        y = _swiglu(x[t], gate_proj[e], up_proj[e], down_proj[e], *(pick(s) for s in scales))
        out[t, k] = y * weights[t, k].float()[:, None]
    if shared_gate is not None:
        out[:, K] = _swiglu(x, *shared)
    return out.sum(1).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------------

SORT_BY_COUNT_MAX_PAIRS = 2048    # sort_pairs: compare-and-count up to this many pairs (P^2 bools), a radix sort above


def sort_pairs(idx: Tensor, n_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step 1: `pairs` (P,) the (token * K + k) pair indices in stable expert order, `offs` (E,) int32 cumulative
    segment ends, and the tile map (expert, first sorted row) over cdiv(P, block_m) + min(E, P) tiles. Device ops
    only (no host sync)."""
    flat = idx.flatten().long()     # scatter_add_ and the keys need int64 (the router's ids are; int32 ones too)
    P, E = flat.numel(), n_experts
    counts = torch.zeros(E, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0)
    if P <= SORT_BY_COUNT_MAX_PAIRS:
        # decode: each pair's place = how many pairs sort before it, one compare-and-count over the (unique) keys
        # expert * P + pair. No scan: the one-hot rank it replaces scanned a (P, E) int64 tensor along P, a
        # sequential loop per expert column on CUDA (~70-200 us eager at P = 384-768 in the H200 sweep)
        order = torch.arange(P, device=idx.device)
        key = flat * P + order
        pos = (key[None, :] < key[:, None]).sum(1)
        pairs = torch.empty_like(pos).scatter_(0, pos, order)
    else:
        pairs = flat.argsort(stable=True)
    offs = offs.to(torch.int32)
    tile_e, tile_row = grouped_tile_map(offs, P, block_m)
    n_tiles = -(-P // block_m) + min(E, P)     # sum_e ceil(c_e / b) <= P / b + (non-empty experts)
    return pairs.to(torch.int32), offs, tile_e[:n_tiles], tile_row[:n_tiles]


if HAS_TRITON:

    @triton.jit(do_not_specialize=["P"])
    def _gate_up_kernel(X, PAIRS, TILE_E, TILE_ROW, OFFS, WG, WU, SG, SU, H, P, N, K, E, TOPK,
                        stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
                        stride_hm, stride_hn, stride_hs, stride_hw,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                        FP8: tl.constexpr, F16: tl.constexpr, DOT_PREC: tl.constexpr, PDL: tl.constexpr = False):
        pdl_entry(PDL)
        t = tl.program_id(0)
        e = tl.load(TILE_E + t)
        if e >= E:
            return
        rows = tl.load(TILE_ROW + t) + tl.arange(0, BLOCK_M)
        mask_m = rows < tl.minimum(tl.load(OFFS + e), P)
        tok = tl.load(PAIRS + rows, mask=mask_m, other=0) // TOPK
        n0 = tl.program_id(1) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        n_kb = tl.cdiv(K, BLOCK_K)          # this program's slice of the K blocks (all of them without split-K)
        kb_per = tl.cdiv(n_kb, SPLIT_K)
        kb0 = tl.program_id(2) * kb_per
        kb1 = tl.minimum(kb0 + kb_per, n_kb)
        offs_k = kb0 * BLOCK_K + tl.arange(0, BLOCK_K)
        e64 = e.to(tl.int64)
        x_ptrs = X + tok.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_off = e64 * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
        g_ptrs, u_ptrs = WG + w_off, WU + w_off
        s_off = e64 * stride_se + (n0 // BLOCK_K) * stride_sn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(kb0, kb1):
            mask_k = offs_k < K - (kb - kb0) * BLOCK_K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if F16:     # e4m3 -> fp16 is one conversion (bf16 takes more), exact; x clamped into fp16's range
                # (NaN kept: the GPU's min/max return the other operand, which would make a NaN -65280)
                x = tl.where(x == x, tl.minimum(tl.maximum(x, -65280.0), 65280.0), x).to(tl.float16)  # noqa: PLR0124
            wmask = mask_n[:, None] & mask_k[None, :]
            g = tl.load(g_ptrs, mask=wmask, other=0.0).to(x.dtype)
            u = tl.load(u_ptrs, mask=wmask, other=0.0).to(x.dtype)
            if FP8:
                acc_g += tl.dot(x, tl.trans(g), input_precision=DOT_PREC) * tl.load(SG + s_off + kb * stride_sk)
                acc_u += tl.dot(x, tl.trans(u), input_precision=DOT_PREC) * tl.load(SU + s_off + kb * stride_sk)
            else:
                acc_g = tl.dot(x, tl.trans(g), acc_g, input_precision=DOT_PREC)
                acc_u = tl.dot(x, tl.trans(u), acc_u, input_precision=DOT_PREC)
            x_ptrs += BLOCK_K * stride_xk
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
        h_ptrs = H + rows.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            h = acc_g * tl.sigmoid(acc_g) * acc_u                          # silu(gate) * up, fp32
            tl.store(h_ptrs, h.to(H.dtype.element_ty), mask=mask)
        else:       # fp32 partial sums of gate and up: the down kernel adds them and applies silu(gate) * up
            h_ptrs += tl.program_id(2).to(tl.int64) * stride_hs
            tl.store(h_ptrs, acc_g, mask=mask)
            tl.store(h_ptrs + stride_hw, acc_u, mask=mask)

    @triton.jit(do_not_specialize=["P"])
    def _down_kernel(H, PAIRS, TILE_E, TILE_ROW, OFFS, WD, SD, TW, Y, P, N, K, E,
                     stride_hm, stride_hk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
                     stride_ys, stride_ym, stride_yn, stride_hs, stride_hw,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     H_SPLIT: tl.constexpr, H_DTYPE: tl.constexpr, FP8: tl.constexpr, F16: tl.constexpr,
                     DOT_PREC: tl.constexpr, PDL: tl.constexpr = False):
        pdl_entry(PDL)
        t = tl.program_id(0)
        e = tl.load(TILE_E + t)
        if e >= E:
            return
        rows = tl.load(TILE_ROW + t) + tl.arange(0, BLOCK_M)
        mask_m = rows < tl.minimum(tl.load(OFFS + e), P)
        pair = tl.load(PAIRS + rows, mask=mask_m, other=0)
        n0 = tl.program_id(1) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        # this program's slice of the K blocks (all of them without split-K)
        n_kb = tl.cdiv(K, BLOCK_K)
        kb_per = tl.cdiv(n_kb, SPLIT_K)
        kb0 = tl.program_id(2) * kb_per
        kb1 = tl.minimum(kb0 + kb_per, n_kb)
        offs_k = kb0 * BLOCK_K + tl.arange(0, BLOCK_K)
        e64 = e.to(tl.int64)
        h_ptrs = H + rows.to(tl.int64)[:, None] * stride_hm + offs_k[None, :] * stride_hk
        w_ptrs = WD + e64 * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
        s_off = e64 * stride_se + (n0 // BLOCK_K) * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(kb0, kb1):
            mask_k = offs_k < K - (kb - kb0) * BLOCK_K
            mask_h = mask_m[:, None] & mask_k[None, :]
            if H_SPLIT == 1:
                h = tl.load(h_ptrs, mask=mask_h, other=0.0)
            else:   # the gate-up stage's split-K partials: summed in slice order, then its epilogue
                g = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
                u = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
                for s in tl.static_range(H_SPLIT):
                    g += tl.load(h_ptrs + s * stride_hs, mask=mask_h, other=0.0)
                    u += tl.load(h_ptrs + s * stride_hs + stride_hw, mask=mask_h, other=0.0)
                h = (g * tl.sigmoid(g) * u).to(H_DTYPE)
            if F16:     # as in the gate-up stage: NaN kept
                h = tl.where(h == h, tl.minimum(tl.maximum(h, -65280.0), 65280.0), h).to(tl.float16)  # noqa: PLR0124
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(h.dtype)
            if FP8:
                acc += tl.dot(h, tl.trans(w), input_precision=DOT_PREC) * tl.load(SD + s_off + kb * stride_sk)
            else:
                acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PREC)
            h_ptrs += BLOCK_K * stride_hk
            w_ptrs += BLOCK_K * stride_wk
        acc = acc * tl.load(TW + pair, mask=mask_m, other=0.0)[:, None]      # the routed weight, in the epilogue
        y_ptrs = (Y + tl.program_id(2).to(tl.int64) * stride_ys + pair.to(tl.int64)[:, None] * stride_ym
                  + offs_n[None, :] * stride_yn)
        tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


def _scale_args(scale: Tensor | None, like: Tensor) -> tuple:
    """A scale pointer and its 3 strides; x itself (never read) without FP8 weights."""
    if scale is None:
        return (like, 0, 0, 0)
    return (scale, scale.stride(0), scale.stride(1), scale.stride(2))


def gate_up_stage(x: Tensor, pairs: Tensor, offs: Tensor, tile_e: Tensor, tile_row: Tensor, gate_proj: Tensor,
                  up_proj: Tensor, gate_scale: Tensor | None, up_scale: Tensor | None, topk: int,
                  launch: MoELaunch) -> Tensor:
    """Step 2: h (P, I) = silu(x gate^T) * (x up^T) of each sorted pair, in x's dtype (scales fp32 contiguous).
    With gate_up_split_k = S > 1: the fp32 partial sums (2, S, P, I) of gate and up over S slices of D instead
    (more programs for small batches), which `down_stage` finishes (sum, silu(gate) * up, x's dtype) as it loads."""
    P, (E, I, D) = pairs.shape[0], gate_proj.shape
    if up_proj.stride() != gate_proj.stride() or (gate_scale is not None and up_scale.stride() != gate_scale.stride()):
        raise ValueError("gate_proj and up_proj (and their scales) must have the same strides")
    sg, su = _scale_args(gate_scale, x), _scale_args(up_scale, x)
    f16 = launch.f16_dot and gate_scale is not None             # the fp16 MMA applies to FP8 weights only
    S = launch.gate_up_split_k
    h = (torch.empty(P, I, device=x.device, dtype=x.dtype) if S == 1 else
         torch.empty(2, S, P, I, device=x.device, dtype=torch.float32))
    _gate_up_kernel[(tile_e.shape[0], triton.cdiv(I, launch.block_n), S)](
        x, pairs, tile_e, tile_row, offs, gate_proj, up_proj, sg[0], su[0], h, P, I, D, E, topk,
        x.stride(0), x.stride(1), *gate_proj.stride(), *sg[1:], *_h_strides(h),
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_K=BLOCK, SPLIT_K=S, FP8=gate_scale is not None,
        F16=f16, DOT_PREC="ieee" if x.dtype == torch.float32 and not f16 else "tf32", num_warps=launch.num_warps,
        num_stages=launch.num_stages, **pdl_launch(x))
    return h


def _h_strides(h: Tensor) -> tuple[int, int, int, int]:
    """(row, column, slice, gate/up) strides of h (P, I) or of the gate-up partials (2, S, P, I)."""
    return (h.stride(0), h.stride(1), 0, 0) if h.dim() == 2 else (h.stride(2), h.stride(3), h.stride(1), h.stride(0))


_TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def down_stage(h: Tensor, pairs: Tensor, offs: Tensor, tile_e: Tensor, tile_row: Tensor, down_proj: Tensor,
               down_scale: Tensor | None, tw: Tensor, launch: MoELaunch,
               act_dtype: torch.dtype | None = None) -> Tensor:
    """Step 3: y (P, D) fp32 = tw[pair] * (h down^T) of each sorted pair, stored at the pair's (token, k) row; with
    split_k > 1 the K slices' partial rows are summed after the launch, in slice order (deterministic). `h`: the
    gate-up stage's output; its partials (2, S, P, I) under gate_up_split_k = S > 1, with `act_dtype` (x's) the
    dtype h is rounded to, as the unsplit stage stores it."""
    P, (E, D, I) = pairs.shape[0], down_proj.shape
    S = launch.gate_up_split_k
    if (h.dim() == 4) != (S > 1) or (S > 1 and (h.shape[:2] != (2, S) or act_dtype is None)):
        raise ValueError(f"h {tuple(h.shape)} does not match gate_up_split_k={S} (partials need act_dtype)")
    act_dtype = act_dtype or h.dtype
    sd = _scale_args(down_scale, h)
    f16 = launch.down_f16_dot and down_scale is not None
    y = torch.empty(launch.split_k, P, D, device=h.device, dtype=torch.float32)
    _down_kernel[(tile_e.shape[0], triton.cdiv(D, launch.down_block_n), launch.split_k)](
        h, pairs, tile_e, tile_row, offs, down_proj, sd[0], tw, y, P, D, I, E,
        *_h_strides(h)[:2], *down_proj.stride(), *sd[1:], y.stride(0), y.stride(1), y.stride(2), *_h_strides(h)[2:],
        BLOCK_M=launch.block_m, BLOCK_N=launch.down_block_n, BLOCK_K=BLOCK, SPLIT_K=launch.split_k, H_SPLIT=S,
        H_DTYPE=getattr(tl, _TL_DTYPES[act_dtype]), FP8=down_scale is not None, F16=f16,
        DOT_PREC="ieee" if act_dtype == torch.float32 and not f16 else "tf32",
        num_warps=launch.down_num_warps, num_stages=launch.down_num_stages, **pdl_launch(h))
    return y[0] if launch.split_k == 1 else y.sum(0)


def moe_decode_sorted_triton(x: Tensor, tw: Tensor, pairs: Tensor, offs: Tensor, tile_e: Tensor, tile_row: Tensor,
                             gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor, gate_scale: Tensor | None = None,
                             up_scale: Tensor | None = None, down_scale: Tensor | None = None,
                             **overrides) -> Tensor:
    """Steps 2-3 on pairs already sorted by `sort_pairs` (with the same block_m): tw (T, K) fp32 contiguous routed
    weights -> y (T*K, D) fp32, each pair's weighted expert output at its (token, k) row. `overrides`: MoELaunch
    fields over the table's launch for T tokens. Split from step 1 so that a compiled decode step fuses the sort's
    small ops with the router's (dsv3.kernels.decode_ops)."""
    fp8 = gate_proj.dtype == torch.float8_e4m3fn
    launch = launch_config(tw.shape[0], fp8, x.dtype, **overrides)
    scales = [s.float().contiguous() if fp8 else None for s in (gate_scale, up_scale, down_scale)]
    h = gate_up_stage(x, pairs, offs, tile_e, tile_row, gate_proj, up_proj, scales[0], scales[1], tw.shape[1],
                      launch)                                                           # 2.
    return down_stage(h, pairs, offs, tile_e, tile_row, down_proj, scales[2], tw, launch, x.dtype)   # 3.


def moe_decode_triton(x: Tensor, weights: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor,
                      gate_scale: Tensor | None = None, up_scale: Tensor | None = None,
                      down_scale: Tensor | None = None, shared_gate: Tensor | None = None,
                      shared_up: Tensor | None = None, shared_down: Tensor | None = None,
                      shared_gate_scale: Tensor | None = None, shared_up_scale: Tensor | None = None,
                      shared_down_scale: Tensor | None = None, *, gemms=None, sort=None, rows=None,
                      max_tokens: int | None = None, **overrides) -> Tensor:
    """The fused MoE through Triton (same contract as `moe_decode_reference`); graph-capturable. `overrides`:
    MoELaunch fields (block_m, block_n, ..., split_k) over the table's launch for T tokens; `gemms` replaces
    `moe_decode_sorted_triton` for steps 2-3 (with its arguments; dsv3.kernels.decode_ops passes its custom op, so
    that a compiled caller sees steps 1 and 4); `sort` replaces `sort_pairs` for step 1 (same contract); `rows`
    replaces `moe_decode_rows_triton`, the GEMV form of steps 2-3 that T <= `max_tokens` tokens take
    (ROWS_MAX_TOKENS; 0: never) unless `overrides` ask for a tiled launch. The shared experts' tensors fold into
    the GEMV form as one more pair per token; the tiled form takes them apart, as `_swiglu` in torch ops (for
    completeness: dsv3.infer.moe_dispatch passes them only to batches the GEMV form takes)."""
    need_triton("moe_decode_triton")
    scales = (gate_scale, up_scale, down_scale)
    shared = (shared_gate, shared_up, shared_down, shared_gate_scale, shared_up_scale, shared_down_scale)
    has_shared = shared_gate is not None
    _check(x, weights, idx, gate_proj, up_proj, down_proj, scales, shared)
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton kernels take x in {TRITON_DTYPES}, got {x.dtype} (use the reference)")
    (T, D), E = x.shape, gate_proj.shape[0]
    launch = _launch_kwargs(T, gate_proj.dtype == torch.float8_e4m3fn, x.dtype, overrides)
    if overrides:
        MoELaunch(**launch)          # validated here too (a compiled decode layer passes none)
    if T * idx.shape[1] == 0 or E == 0:
        return _swiglu(x, *shared).to(x.dtype) if has_shared else x.new_zeros(T, D)
    # 2.-3. in the GEMV form, no sort (not when a tiled launch is asked for: `overrides` name its fields)
    if not overrides and rows_form(x, gate_proj, up_proj, down_proj, max_tokens, shared if has_shared else None):
        y = (rows or moe_decode_rows_triton)(x, weights.float().contiguous(), idx, gate_proj, up_proj, down_proj,
                                             *scales, *(shared if has_shared else ()))
        return y.view(T, -1, D).sum(1).to(x.dtype)          # 4. K (+ 1 shared) rows per token, in a fixed order
    sorted_pairs = (sort or sort_pairs)(idx, E, launch["block_m"])          # 1.
    y = (gemms or moe_decode_sorted_triton)(x, weights.float().contiguous(), *sorted_pairs, gate_proj, up_proj,
                                            down_proj, *scales, **launch)   # 2.-3.
    if has_shared:
        y = torch.cat([y.view(T, -1, D), _swiglu(x, *shared)[:, None]], 1)
    return y.view(T, -1, D).sum(1).to(x.dtype)                               # 4. the combine, in a fixed order


def moe_decode(x: Tensor, weights: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor,
               gate_scale: Tensor | None = None, up_scale: Tensor | None = None,
               down_scale: Tensor | None = None, *shared: Tensor | None) -> Tensor:
    """Dispatcher: the Triton kernels for CUDA tensors when triton imports (sm_89+ for FP8 weights), else the
    reference. `shared`: the shared experts' six optional tensors, as `moe_decode_reference` takes them."""
    args = (x, weights, idx, gate_proj, up_proj, down_proj, gate_scale, up_scale, down_scale, *shared)
    if use_triton(x, "DSV3_MOE_DECODE", fp8=gate_proj.dtype == torch.float8_e4m3fn):
        return moe_decode_triton(*args)
    return moe_decode_reference(*args)
