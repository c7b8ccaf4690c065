"""Fused MoE for decode-sized batches: every selected expert of a layer in one launch per GEMM stage, reading only
the selected experts' weights (spec 1.6; the design follows vLLM's / SGLang's fused_moe, written anew here).

Inputs: x (T, D) tokens, weights (T, K) fp32 gate weights and idx (T, K) expert ids (the router's output), stacked
experts gate_proj / up_proj (E, I, D) and down_proj (E, D, I), either in x's dtype or in the released FP8 block
format (e4m3 + one fp32 `scale_inv` per 128x128 block, shapes (E, ceil(N/128), ceil(K/128)), as
dsv3.kernels.fp8_weight_gemm). Output (T, D) in x's dtype:

    y[t] = sum_k weights[t, k] * down_{e}( silu(gate_{e}(x[t])) * up_{e}(x[t]) ),   e = idx[t, k]

Algorithm (Triton):
  1. sort the P = T*K (token, k) pairs by expert (a stable one-hot rank for small P*E, a stable sort otherwise),
     per-expert counts and their cumulative ends `offs`, and the tile map of dsv3.kernels.fp8_weight_gemm
     (each BLOCK_M-row tile of an expert's segment -> (expert, first sorted row)); all on the device, no host sync,
     over a shape-only upper bound of cdiv(P, BLOCK_M) + min(E, P) tiles (the real ones come first);
  2. gate-up kernel, grid (tiles, I / BLOCK_N): a tile gathers its pairs' token rows of x, streams its expert's
     gate and up rows for one BLOCK_N slice in the same K loop (two accumulators, one pass over x), and writes
     h = silu(gate) * up (fp32 math, stored in x's dtype) in sorted order;
  3. down kernel, grid (tiles, D / BLOCK_N): h (sorted rows) times the expert's down rows, multiplied in the
     epilogue by each pair's routed weight and stored (fp32) at the pair's own (token, k) place;
  4. the combine: the K weighted rows of each token summed (fp32), cast to x's dtype. A fixed-order sum, not
     atomics: the output is deterministic (bit-equal between a captured graph and an eager call).
Programs of tiles past the real ones return at once. FP8 weights are converted to x's dtype in registers (exact)
with the block's scale applied to each 128-long partial sum (BLOCK_K = 128, BLOCK_N divides 128).

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
from .triton_setup import BLOCK, HAS_TRITON, TRITON_DTYPES, need_triton, tl, triton, use_triton

__all__ = ["HAS_TRITON", "moe_decode", "moe_decode_reference", "moe_decode_sorted_triton",
           "moe_decode_triton", "sort_pairs"]


def _check(x: Tensor, weights: Tensor, idx: Tensor, gate: Tensor, up: Tensor, down: Tensor, scales) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def _expert(w: Tensor, s: Tensor | None, e: int) -> Tensor:
    return w[e].float() if s is None else dequantize_blocks(w[e], s[e], torch.float32)


def moe_decode_reference(x: Tensor, weights: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor,
                         down_proj: Tensor, gate_scale: Tensor | None = None, up_scale: Tensor | None = None,
                         down_scale: Tensor | None = None) -> Tensor:
    """The fused MoE's math, expert by expert: fp32 GEMMs, h rounded to x's dtype (as the kernel stores it), fp32
    weighted sum over k. Returns (T, D) in x's dtype."""
    scales = (gate_scale, up_scale, down_scale)
    _check(x, weights, idx, gate_proj, up_proj, down_proj, scales)
    T, K = idx.shape
    out = torch.zeros(T, K, x.shape[1], dtype=torch.float32, device=x.device)
    for e in idx.unique().tolist():
        t, k = (idx == e).nonzero(as_tuple=True)
        xe = x[t].float()
        h = (F.silu(xe @ _expert(gate_proj, gate_scale, e).T) * (xe @ _expert(up_proj, up_scale, e).T)).to(x.dtype)
        out[t, k] = (h.float() @ _expert(down_proj, down_scale, e).T) * weights[t, k].float()[:, None]
    return out.sum(1).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------------

def sort_pairs(idx: Tensor, n_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step 1: `pairs` (P,) the (token * K + k) pair indices in stable expert order, `offs` (E,) int32 cumulative
    segment ends, and the tile map (expert, first sorted row) over cdiv(P, block_m) + min(E, P) tiles. Device ops
    only (no host sync)."""
    flat = idx.flatten()
    P, E = flat.numel(), n_experts
    counts = torch.zeros(E, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0)
    if P * E <= 1 << 16:   # decode: a one-hot rank, a few tiny kernels instead of a radix sort
        rank = (F.one_hot(flat, E).cumsum(0) - 1).gather(1, flat[:, None])[:, 0]
        pos = (offs - counts)[flat] + rank
        pairs = torch.empty_like(pos).scatter_(0, pos, torch.arange(P, device=idx.device))
    else:
        pairs = flat.argsort(stable=True)
    offs = offs.to(torch.int32)
    tile_e, tile_row = grouped_tile_map(offs, P, block_m)
    n_tiles = -(-P // block_m) + min(E, P)     # sum_e ceil(c_e / b) <= P / b + (non-empty experts)
    return pairs.to(torch.int32), offs, tile_e[:n_tiles], tile_row[:n_tiles]


if HAS_TRITON:

    @triton.jit
    def _gate_up_kernel(X, PAIRS, TILE_E, TILE_ROW, OFFS, WG, WU, SG, SU, H, P, N, K, E, TOPK,
                        stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
                        stride_hm, stride_hn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr,
                        DOT_PREC: tl.constexpr):
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
        offs_k = tl.arange(0, BLOCK_K)
        e64 = e.to(tl.int64)
        x_ptrs = X + tok.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_off = e64 * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
        g_ptrs, u_ptrs = WG + w_off, WU + w_off
        s_off = e64 * stride_se + (n0 // BLOCK_K) * stride_sn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(tl.cdiv(K, BLOCK_K)):
            mask_k = offs_k < K - kb * BLOCK_K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
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
        h = acc_g * tl.sigmoid(acc_g) * acc_u                              # silu(gate) * up, fp32
        h_ptrs = H + rows.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
        tl.store(h_ptrs, h.to(H.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _down_kernel(H, PAIRS, TILE_E, TILE_ROW, OFFS, WD, SD, TW, Y, P, N, K, E,
                     stride_hm, stride_hk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
                     stride_ym, stride_yn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr,
                     DOT_PREC: tl.constexpr):
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
        offs_k = tl.arange(0, BLOCK_K)
        e64 = e.to(tl.int64)
        h_ptrs = H + rows.to(tl.int64)[:, None] * stride_hm + offs_k[None, :] * stride_hk
        w_ptrs = WD + e64 * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
        s_off = e64 * stride_se + (n0 // BLOCK_K) * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(tl.cdiv(K, BLOCK_K)):
            mask_k = offs_k < K - kb * BLOCK_K
            h = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(h.dtype)
            if FP8:
                acc += tl.dot(h, tl.trans(w), input_precision=DOT_PREC) * tl.load(SD + s_off + kb * stride_sk)
            else:
                acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PREC)
            h_ptrs += BLOCK_K * stride_hk
            w_ptrs += BLOCK_K * stride_wk
        acc = acc * tl.load(TW + pair, mask=mask_m, other=0.0)[:, None]      # the routed weight, in the epilogue
        y_ptrs = Y + pair.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


def _launch_config(P: int, E: int, dtype: torch.dtype) -> dict:
    """Row tiles sized for the mean rows per hit expert (a shape, not the counts: no sync); narrow N tiles so that
    batch 1's six experts still spread over the SMs. Not yet swept on the GPU."""
    mean = -(-P // max(min(E, P), 1))
    block_m = 16 if mean <= 16 else 32 if mean <= 32 else 64
    if dtype == torch.float32:      # exactness runs: fewer stages for the wider tiles
        return dict(block_m=block_m, block_n=32, num_warps=4, num_stages=2)
    return dict(block_m=block_m, block_n=64, num_warps=4, num_stages=3)


def _config(P: int, E: int, dtype: torch.dtype, **overrides) -> dict:
    cfg = _launch_config(P, E, dtype)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if BLOCK % cfg["block_n"] or cfg["block_m"] < 16 or cfg["block_m"] & (cfg["block_m"] - 1):
        raise ValueError(f"block_n must divide {BLOCK} and block_m be a power of two >= 16, got {cfg}")
    return cfg


def moe_decode_sorted_triton(x: Tensor, tw: Tensor, pairs: Tensor, offs: Tensor, tile_e: Tensor, tile_row: Tensor,
                             gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor, gate_scale: Tensor | None = None,
                             up_scale: Tensor | None = None, down_scale: Tensor | None = None, *,
                             block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                             num_stages: int | None = None) -> Tensor:
    """Steps 2-3 on pairs already sorted by `sort_pairs` (with the same block_m): tw (T, K) fp32 contiguous routed
    weights -> y (T*K, D) fp32, each pair's weighted expert output at its (token, k) row. Split from step 1 so that
    a compiled decode step fuses the sort's small ops with the router's (dsv3.kernels.decode_ops)."""
    (T, D), (E, I, _), K = x.shape, gate_proj.shape, tw.shape[1]
    P = T * K
    cfg = _config(P, E, x.dtype, block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    fp8 = gate_proj.dtype == torch.float8_e4m3fn
    scales = (gate_scale, up_scale, down_scale)
    sg, su, sd = (s.float().contiguous() for s in scales) if fp8 else (x, x, x)     # unused pointers without FP8
    strides_s = lambda s: (s.stride(0), s.stride(1), s.stride(2)) if fp8 else (0, 0, 0)  # noqa: E731
    if up_proj.stride() != gate_proj.stride() or (fp8 and su.stride() != sg.stride()):
        raise ValueError("gate_proj and up_proj (and their scales) must have the same strides")
    common = dict(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=BLOCK, FP8=fp8,
                  DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    # 2. gate and up in one pass, h in sorted order
    h = torch.empty(P, I, device=x.device, dtype=x.dtype)
    _gate_up_kernel[(tile_e.shape[0], triton.cdiv(I, cfg["block_n"]))](
        x, pairs, tile_e, tile_row, offs, gate_proj, up_proj, sg, su, h, P, I, D, E, K,
        x.stride(0), x.stride(1), gate_proj.stride(0), gate_proj.stride(1), gate_proj.stride(2), *strides_s(sg),
        h.stride(0), h.stride(1), **common)
    # 3. down, routed weight in the epilogue, rows back at their (token, k) place
    y = torch.empty(P, D, device=x.device, dtype=torch.float32)
    _down_kernel[(tile_e.shape[0], triton.cdiv(D, cfg["block_n"]))](
        h, pairs, tile_e, tile_row, offs, down_proj, sd, tw, y, P, D, I, E,
        h.stride(0), h.stride(1), down_proj.stride(0), down_proj.stride(1), down_proj.stride(2), *strides_s(sd),
        y.stride(0), y.stride(1), **common)
    return y


def moe_decode_triton(x: Tensor, weights: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor,
                      gate_scale: Tensor | None = None, up_scale: Tensor | None = None,
                      down_scale: Tensor | None = None, *, block_m: int | None = None, block_n: int | None = None,
                      num_warps: int | None = None, num_stages: int | None = None, gemms=None) -> Tensor:
    """The fused MoE through Triton (same contract as `moe_decode_reference`); graph-capturable. The keyword-only
    arguments override the launch configuration; `gemms` replaces `moe_decode_sorted_triton` for steps 2-3 (with its
    arguments; dsv3.kernels.decode_ops passes its custom op, so that a compiled caller sees steps 1 and 4)."""
    need_triton("moe_decode_triton")
    scales = (gate_scale, up_scale, down_scale)
    _check(x, weights, idx, gate_proj, up_proj, down_proj, scales)
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton kernels take x in {TRITON_DTYPES}, got {x.dtype} (use the reference)")
    (T, D), E, K = x.shape, gate_proj.shape[0], idx.shape[1]
    cfg = _config(T * K, E, x.dtype, block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    if T * K == 0 or E == 0:
        return x.new_zeros(T, D)
    sorted_pairs = sort_pairs(idx, E, cfg["block_m"])                        # 1.
    y = (gemms or moe_decode_sorted_triton)(x, weights.float().contiguous(), *sorted_pairs, gate_proj, up_proj,
                                            down_proj, *scales, **cfg)      # 2.-3.
    return y.view(T, K, D).sum(1).to(x.dtype)                                # 4. the combine, in a fixed order


def moe_decode(x: Tensor, weights: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor,
               gate_scale: Tensor | None = None, up_scale: Tensor | None = None,
               down_scale: Tensor | None = None) -> Tensor:
    """Dispatcher: the Triton kernels for CUDA tensors when triton imports (sm_89+ for FP8 weights), else the
    reference."""
    if use_triton(x, "DSV3_MOE_DECODE", fp8=gate_proj.dtype == torch.float8_e4m3fn):
        return moe_decode_triton(x, weights, idx, gate_proj, up_proj, down_proj, gate_scale, up_scale, down_scale)
    return moe_decode_reference(x, weights, idx, gate_proj, up_proj, down_proj, gate_scale, up_scale, down_scale)
