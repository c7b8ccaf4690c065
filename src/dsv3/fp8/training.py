"""FP8 training GEMMs as autograd functions, and `apply_fp8(model)` that switches a model's linears to them
(TR 3.3, Figure 6; spec section 4).

For y = x W^T with x (M, K) and W (N, K), all three GEMMs run in E4M3 with FP32 accumulation:
    forward       y  = Q_tile(x)            @ Q_block(W)^T        x: 1x128 tiles along K,   W: 128x128 blocks
    input grad    dx = Q_tile(dy)           @ Q_block(W)          dy: 1x128 tiles along N,  W^T: the same blocks
    weight grad   dW = Q_tile(dy^T)         @ Q_tile(x^T)^T       both 1x128 tiles along M (the tokens)
The forward quantises x twice in one pass: along K for its own GEMM and along the tokens for the weight gradient
(`quantize_tiles_transposed`); only that FP8 copy and its scales are saved for backward (the report caches
activations in FP8), plus the FP8 weight. Everything outside these GEMMs stays in the model's precision: the
embedding, the output head, the router, norms and attention (TR 3.3.1).

Routed experts use the grouped form over the expert-sorted rows (offsets as torch._grouped_mm). Their weight
gradient is a GEMM over each expert's own tokens, whose 128-token tiles would straddle experts; it is computed
from the FP8 values of the activations and gradients (dequantised), by one `torch._grouped_mm` whose groups split
the token dimension: the same operands a grouped FP8 weight-gradient kernel with per-expert 128-aligned segments
would multiply, up to the tile scales at segment edges, accumulated in high precision. That kernel (DeepGEMM's
"contiguous" layout) is future work.

`apply_fp8(model, experts="row")` gives the experts row-wise scales instead (`FP8RowwiseGroupedFunction`,
dsv3.kernels.fp8_rowwise): on Hopper the only fast FP8 grouped GEMM, at the cost of coarser scaling, FP8 MMA
accumulation and a bf16 weight gradient (the trade-off and its measured loss cost: RESULTS.md, issue 15).

`apply_fp8` changes classes in place (`nn.Linear` -> `FP8TrainLinear`, `Experts` -> `FP8TrainExperts`): the
parameters, their names and the state dict stay the same, so optimisers, checkpoints and export are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.fp8_quant import dequantize_tiles, quantize_blocks_both
from .ops import (fp8_gemm, fp8_grouped_gemm, fp8_grouped_gemm_rowwise, grouped_weight_grad, quantize_blocks,
                  quantize_rows, quantize_tiles, quantize_tiles_transposed)
from ..model.layers import MLP
from ..model.mla import MLA
from ..model.moe import Experts
from .weight_cache import check_fresh


def _no_autocast(fn):
    """The quantised GEMMs choose their own dtypes; autocast cannot handle fp8 tensors (torch.stack of e4m3 fails
    in its dtype promotion), so it is off inside them."""
    def wrapper(ctx, *args):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(ctx, *args)
    return wrapper


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    @_no_autocast
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, *cached: torch.Tensor) -> torch.Tensor:
        """cached: W's (q, scale, q.T, scale.T) from dsv3.fp8.weight_cache, or nothing (quantised here)."""
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        xq, xs = quantize_tiles(x2)
        wq, ws = cached[:2] if cached else quantize_blocks(weight)
        y = fp8_gemm(xq, xs, wq, ws, out_dtype=dtype)
        xq_t, xs_t = quantize_tiles_transposed(x2)
        ctx.save_for_backward(xq_t, xs_t, *(cached[2:] if cached else (wq, ws)))
        ctx.shape, ctx.weight_dtype, ctx.n_cached = shape, weight.dtype, len(cached)
        return y.view(*shape[:-1], -1)

    @staticmethod
    @_no_autocast
    def backward(ctx, dy: torch.Tensor):
        xq_t, xs_t, wq, ws = ctx.saved_tensors
        if ctx.n_cached:        # saved: the cached W^T blocks
            wq_t, ws_t = wq, ws
        else:                   # W^T (K, N) in 128x128 blocks is W's blocks transposed (as quantize_blocks_both)
            wq_t, ws_t = wq.t().contiguous(), ws.t().contiguous()
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        gq, gs = quantize_tiles(dy2)
        dx = fp8_gemm(gq, gs, wq_t, ws_t, out_dtype=dy.dtype)
        gq_t, gs_t = quantize_tiles_transposed(dy2)
        dw = fp8_gemm(gq_t, gs_t, xq_t, xs_t, out_dtype=torch.float32)
        return (dx.view(ctx.shape), dw.to(ctx.weight_dtype)) + (None,) * ctx.n_cached


class FP8GroupedFunction(torch.autograd.Function):
    """y[rows of expert e] = x[rows of e] @ W[e]^T for x (M, K) sorted by expert, W (E, N, K), offs (E,)."""

    @staticmethod
    @_no_autocast
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, *cached: torch.Tensor
                ) -> torch.Tensor:
        """cached: `_quantize_stacked_both(weight)` (dsv3.fp8.weight_cache), or nothing (quantised here)."""
        xq, xs = quantize_tiles(x)
        wq, ws = cached[:2] if cached else _quantize_stacked(weight)
        y = fp8_grouped_gemm(xq, xs, wq, ws, offs, out_dtype=x.dtype)
        ctx.save_for_backward(xq, xs, *(cached[2:] if cached else (wq, ws)), offs)
        ctx.weight_dtype, ctx.n_cached = weight.dtype, len(cached)
        return y

    @staticmethod
    @_no_autocast
    def backward(ctx, dy: torch.Tensor):
        xq, xs, wq, ws, offs = ctx.saved_tensors
        if ctx.n_cached:        # saved: the cached W^T blocks
            wq_t, ws_t = wq, ws
        else:
            wq_t, ws_t = wq.transpose(1, 2).contiguous(), ws.transpose(1, 2).contiguous()
        dy = dy.contiguous()
        gq, gs = quantize_tiles(dy)
        dx = fp8_grouped_gemm(gq, gs, wq_t, ws_t, offs, out_dtype=dy.dtype)
        # weight gradient of every expert from the FP8 copies (see the module docstring): one grouped GEMM whose
        # groups split the reduction (token) dimension, no host synchronisation; bf16 operands on CUDA (what
        # _grouped_mm takes there), fp32 elsewhere
        dtype = torch.bfloat16 if dy.is_cuda else torch.float32
        x = dequantize_tiles(xq, xs).to(dtype)
        g = dequantize_tiles(gq, gs).to(dtype)
        dw = grouped_weight_grad(g, x, offs)
        return (dx, dw.to(ctx.weight_dtype), None) + (None,) * ctx.n_cached


class FP8RowwiseGroupedFunction(torch.autograd.Function):
    """The experts' grouped GEMM with row-wise scales (`kernels.fp8_rowwise`, `apply_fp8(experts="row")`): forward
    and input gradient in FP8 through torch._scaled_grouped_mm; the weight gradient, whose reduction runs over each
    expert's own tokens where row-wise scales cannot be factored out, in bf16 from the saved activation."""

    @staticmethod
    @_no_autocast
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, *cached: torch.Tensor
                ) -> torch.Tensor:
        """cached: `_quantize_rows_both(weight)` (dsv3.fp8.weight_cache), or nothing (quantised here)."""
        xq, xs = quantize_rows(x)
        wq, ws = cached[:2] if cached else quantize_rows(weight)     # (E, N, K), (E, N)
        y = fp8_grouped_gemm_rowwise(xq, xs, wq, ws, offs, out_dtype=x.dtype)
        ctx.save_for_backward(x, weight, offs, *cached[2:])
        ctx.n_cached = len(cached)
        return y

    @staticmethod
    @_no_autocast
    def backward(ctx, dy: torch.Tensor):
        x, weight, offs, *cached_t = ctx.saved_tensors
        dy = dy.contiguous()
        gq, gs = quantize_rows(dy)
        wtq, wts = cached_t if cached_t else _quantize_rows_t(weight)
        dx = fp8_grouped_gemm_rowwise(gq, gs, wtq, wts, offs, out_dtype=dy.dtype)
        dtype = torch.bfloat16 if dy.is_cuda else torch.float32
        dw = grouped_weight_grad(dy.to(dtype), x.to(dtype), offs)
        return (dx, dw.to(weight.dtype), None) + (None,) * ctx.n_cached


def _quantize_stacked(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 blocks of each expert's (N, K) matrix: one call on the (E*N, K) stack when N is a multiple of 128
    (no block straddles two experts), else one per expert."""
    E, N, K = weight.shape
    if N % 128 == 0:
        q, s = quantize_blocks(weight.reshape(E * N, K))
        return q.view(E, N, K), s.view(E, N // 128, -1)
    pairs = [quantize_blocks(w) for w in weight]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def _quantize_stacked_both(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The block experts' cached operands: W's stacked blocks and W^T's (the transposed codes, as backward makes)."""
    wq, ws = _quantize_stacked(weight)
    return wq, ws, wq.transpose(1, 2).contiguous(), ws.transpose(1, 2).contiguous()


def _quantize_rows_t(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W^T (E, K, N) in rows: one scale per input column of W, read in place."""
    return quantize_rows(weight.transpose(1, 2))


def _quantize_rows_both(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The row-wise experts' cached operands, by the same calls as the uncached path (bit-identical)."""
    return (*quantize_rows(weight), *_quantize_rows_t(weight))


def _cached_args(module: nn.Module, weights: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The module's cached FP8 operands per weight (dsv3.fp8.weight_cache), checked fresh in eager; or empties."""
    cache = module.fp8_cache
    if cache is None:
        return ((),) * len(weights)
    if not torch.compiler.is_compiling():      # an int compare per weight; compiled graphs do not guard on it
        check_fresh(module, weights)
    return cache


class FP8TrainLinear(nn.Linear):
    """An nn.Linear whose matmul runs in FP8 in forward and backward (same parameters; no bias in V3)."""

    fp8_cache = None          # W's FP8 operands, set by dsv3.fp8.weight_cache.refresh_fp8_weights

    def fp8_weights(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,)

    def fp8_quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.autocast(w.device.type, enabled=False):
            return quantize_blocks_both(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):     # activations in the autocast dtype, as a bf16 linear's
            x = x.to(torch.get_autocast_dtype(x.device.type))
        (cached,) = _cached_args(self, (self.weight,))
        y = FP8LinearFunction.apply(x, self.weight, *cached)
        return y if self.bias is None else y + self.bias


class FP8TrainExperts(Experts):
    fp8_scaling = "block"     # or "row": set by apply_fp8
    fp8_cache = None          # gate, up, down's FP8 operands, set by dsv3.fp8.weight_cache.refresh_fp8_weights

    def fp8_weights(self) -> tuple[torch.Tensor, ...] | None:
        weights = self.stacked_weights()        # cached only where they are the parameters themselves
        return weights if all(isinstance(w, nn.Parameter) for w in weights) else None

    def fp8_quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.autocast(w.device.type, enabled=False):
            return _quantize_rows_both(w) if self.fp8_scaling == "row" else _quantize_stacked_both(w)

    def ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate, up, down = weights = self.stacked_weights()
        c_gate, c_up, c_down = _cached_args(self, weights)
        offs = counts.cumsum(0).to(torch.int32)
        if torch.is_autocast_enabled(xs.device.type):
            xs = xs.to(torch.get_autocast_dtype(xs.device.type))
        fn = FP8RowwiseGroupedFunction if self.fp8_scaling == "row" else FP8GroupedFunction
        h = F.silu(fn.apply(xs, gate, offs, *c_gate)) * fn.apply(xs, up, offs, *c_up)
        return fn.apply(h, down, offs, *c_down)


_MLA_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def apply_fp8(model: nn.Module, experts: str = "block", linears: bool = True) -> nn.Module:
    """Run the MLA projections, dense / shared FFNs and routed experts in FP8, in place; the embedding, head,
    router, norms and attention core keep their precision (TR 3.3.1). `experts`: "block" (the report's 1x128 /
    128x128 scaling, all three GEMMs) or "row" (row-wise scales, `FP8RowwiseGroupedFunction`). `linears=False`
    leaves the MLA projections and dense / shared FFNs in their precision: only the routed experts, most of an MoE
    step's GEMM FLOPs, run in FP8 (at small widths the quantisation of a dense GEMM's operands can cost more than
    FP8 saves; RESULTS.md, issue 15). Returns the model."""
    if experts not in ("block", "row"):
        raise ValueError(f"apply_fp8: experts must be 'block' or 'row', got {experts!r}")
    for module in model.modules():
        if not linears and isinstance(module, (MLA, MLP)):
            continue
        if isinstance(module, MLA):
            for name in _MLA_LINEARS:
                child = getattr(module, name, None)
                if type(child) is nn.Linear:
                    child.__class__ = FP8TrainLinear
        elif isinstance(module, MLP):
            for child in (module.gate_proj, module.up_proj, module.down_proj):
                if type(child) is nn.Linear:
                    child.__class__ = FP8TrainLinear
        elif type(module) is Experts:
            module.__class__ = FP8TrainExperts
            module.fp8_scaling = experts
    return model
