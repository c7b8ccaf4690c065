"""FP8 training GEMMs as autograd functions, and `apply_fp8(model)` that switches a model's linears to them
(TR 3.3, Figure 6; spec section 4).

For y = x W^T with x (M, K) and W (N, K), all three GEMMs run in E4M3 with FP32 accumulation:
    forward       y  = Q_tile(x)            @ Q_block(W)^T        x: 1x128 tiles along K,   W: 128x128 blocks
    input grad    dx = Q_tile(dy)           @ Q_block(W)          dy: 1x128 tiles along N,  W^T: the same blocks
    weight grad   dW = Q_tile(dy^T)         @ Q_tile(x^T)^T       both 1x128 tiles along M (the tokens)
The forward quantises x along K for its own GEMM and along the tokens for the weight gradient
(`quantize_tiles_transposed`); only that FP8 copy and its scales are saved for backward (the report caches
activations in FP8), plus the weight itself: the GEMM ops (`ops.*_weight`) quantise W in the orientation each GEMM
needs (W^T's blocks for the input gradient from one read of W), or take it from the step's cache
(`weight_cache`: quantised once per optimizer step for all its micro-batches). Everything outside these GEMMs stays
in the model's precision: the embedding, the output head, the router, norms and attention (TR 3.3.1).

Projections that read the same activation quantise it once (issue 15): gate and up of every SwiGLU
(`FP8TrainMLP`, `FP8TrainExperts.ffn`) and MLA's two down-projections of the normed hidden state (`FP8TrainMLA`,
through `MLA.down_project`). The functions take n weights for this and sum the n input gradients in x's dtype, as
autograd did for separate linears: outputs and gradients are bit for bit those of the separate path
(test_fp8_recipe). (One input, not n copies of it: dynamo breaks the graph at an autograd.Function given the same
tensor twice.)

Routed experts use the grouped form over the expert-sorted rows (offsets as torch._grouped_mm). Their weight
gradient is a GEMM over each expert's own tokens, whose 128-token tiles would straddle experts; it is computed
from the FP8 values of the activations and gradients (dequantised), by one `torch._grouped_mm` whose groups split
the token dimension: the same operands a grouped FP8 weight-gradient kernel with per-expert 128-aligned segments
would multiply, up to the tile scales at segment edges, accumulated in high precision. That kernel (DeepGEMM's
"contiguous" layout) is future work.

`apply_fp8(model, experts="row")` gives the experts row-wise scales instead (`FP8RowwiseGroupedFunction`,
dsv3.kernels.fp8_rowwise): on Hopper the only fast FP8 grouped GEMM, at the cost of coarser scaling, FP8 MMA
accumulation and a bf16 weight gradient (the trade-off and its measured loss cost: RESULTS.md, issue 15).

`apply_fp8` changes classes in place (`nn.Linear` -> `FP8TrainLinear`, `Experts` -> `FP8TrainExperts`, `MLP` ->
`FP8TrainMLP`, `MLA` -> `FP8TrainMLA`): the parameters, their names and the state dict stay the same, so optimisers, checkpoints and export are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.fp8_quant import dequantize_tiles
from .ops import (fp8_gemm, fp8_gemm_weight, fp8_grouped_gemm_rowwise_weight, fp8_grouped_gemm_weight,
                  grouped_weight_grad, quantize_rows, quantize_tiles, quantize_tiles_transposed)
from ..model.layers import MLP
from ..model.mla import MLA
from ..model.moe import Experts


def _no_autocast(fn):
    """The quantised GEMMs choose their own dtypes; autocast cannot handle fp8 tensors (torch.stack of e4m3 fails
    in its dtype promotion), so it is off inside them."""
    def wrapper(ctx, *args):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(ctx, *args)
    return wrapper


def _forward(fn):
    """_no_autocast for a forward, which first notes the autocast dtype (ctx.cast, None when off): the input is
    taken in it, as a bf16 linear would take it."""
    def wrapper(ctx, *args):
        dev = args[0].device.type
        ctx.cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return _no_autocast(fn)(ctx, *args)
    return wrapper


def _input(ctx, x: torch.Tensor) -> torch.Tensor:
    ctx.input_dtype = x.dtype
    return x if ctx.cast is None else x.to(ctx.cast)


def _input_grad(ctx, dxs: list) -> torch.Tensor:
    """The consumers' input gradients, each in x's dtype, summed there: what autograd does for separate linears
    that each cast x (x fp32 under bf16 autocast: fp32 sums) or share it (bf16 sums), so sharing the quantisation
    changes no bit (two consumers: the sum commutes)."""
    dx = dxs[0].to(ctx.input_dtype)
    for d in dxs[1:]:
        dx = dx + d.to(ctx.input_dtype)
    return dx


class FP8LinearFunction(torch.autograd.Function):
    """y_i = x W_i^T for i = 1..n: `apply(x, w_1, .., w_n)`, several projections reading the same x (n = 1: one
    linear). x is quantised once for all n GEMMs, in both tile orientations, and one FP8 copy of x^T is saved for
    the n weight gradients. Under autocast x is taken in the autocast dtype and its gradient returned in its own."""

    @staticmethod
    @_forward
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor):
        x = _input(ctx, x)
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        xq, xsc = quantize_tiles(x2)
        # W's 128x128 blocks: quantised inside the op (or from the step's weight cache)
        ys = tuple(fp8_gemm_weight(xq, xsc, w, dtype, False).view(*shape[:-1], -1) for w in weights)
        xq_t, xs_t = quantize_tiles_transposed(x2)
        ctx.save_for_backward(xq_t, xs_t, *weights)
        ctx.shape = shape
        return ys if len(ys) > 1 else ys[0]

    @staticmethod
    @_no_autocast
    def backward(ctx, *dys: torch.Tensor):
        xq_t, xs_t, *weights = ctx.saved_tensors
        dxs, dws = [], []
        for dy, w in zip(dys, weights):
            dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
            gq, gs = quantize_tiles(dy2)
            dxs.append(fp8_gemm_weight(gq, gs, w, dy.dtype, True).view(ctx.shape))   # W^T (K, N) in blocks
            gq_t, gs_t = quantize_tiles_transposed(dy2)
            dws.append(fp8_gemm(gq_t, gs_t, xq_t, xs_t, out_dtype=torch.float32).to(w.dtype))
        return (_input_grad(ctx, dxs), *dws)


class FP8GroupedFunction(torch.autograd.Function):
    """y_i[rows of expert e] = x[rows of e] @ W_i[e]^T for x (M, K) sorted by expert, W_i (E, N, K), offs (E,):
    `apply(x, w_1, .., w_n, offs)`, x quantised once for all n (as FP8LinearFunction)."""

    @staticmethod
    @_forward
    def forward(ctx, x: torch.Tensor, *args: torch.Tensor):
        weights, offs = args[:-1], args[-1]
        x = _input(ctx, x)
        xq, xsc = quantize_tiles(x)
        ys = tuple(fp8_grouped_gemm_weight(xq, xsc, w, offs, x.dtype, False) for w in weights)
        ctx.save_for_backward(xq, xsc, offs, *weights)
        return ys if len(ys) > 1 else ys[0]

    @staticmethod
    @_no_autocast
    def backward(ctx, *dys: torch.Tensor):
        xq, xsc, offs, *weights = ctx.saved_tensors
        # weight gradients of every expert from the FP8 copies (see the module docstring): one grouped GEMM whose
        # groups split the reduction (token) dimension, no host synchronisation; bf16 operands on CUDA (what
        # _grouped_mm takes there), fp32 elsewhere
        dtype = torch.bfloat16 if xq.is_cuda else torch.float32
        x = dequantize_tiles(xq, xsc).to(dtype)
        dxs, dws = [], []
        for dy, w in zip(dys, weights):
            dy = dy.contiguous()
            gq, gs = quantize_tiles(dy)
            dxs.append(fp8_grouped_gemm_weight(gq, gs, w, offs, dy.dtype, True))
            dws.append(grouped_weight_grad(dequantize_tiles(gq, gs).to(dtype), x, offs).to(w.dtype))
        return (_input_grad(ctx, dxs), *dws, None)


class FP8RowwiseGroupedFunction(torch.autograd.Function):
    """The experts' grouped GEMM with row-wise scales (`kernels.fp8_rowwise`, `apply_fp8(experts="row")`): forward
    and input gradient in FP8 through torch._scaled_grouped_mm; the weight gradient, whose reduction runs over each
    expert's own tokens where row-wise scales cannot be factored out, in bf16 from the saved activation. Called as
    FP8GroupedFunction (x quantised once for n weights)."""

    @staticmethod
    @_forward
    def forward(ctx, x: torch.Tensor, *args: torch.Tensor):
        weights, offs = args[:-1], args[-1]
        x = _input(ctx, x)
        xq, xsc = quantize_rows(x)
        ys = tuple(fp8_grouped_gemm_rowwise_weight(xq, xsc, w, offs, x.dtype, False) for w in weights)  # W's rows
        ctx.save_for_backward(x, offs, *weights)
        return ys if len(ys) > 1 else ys[0]

    @staticmethod
    @_no_autocast
    def backward(ctx, *dys: torch.Tensor):
        x, offs, *weights = ctx.saved_tensors
        dtype = torch.bfloat16 if x.is_cuda else torch.float32
        xw = x.to(dtype)
        dxs, dws = [], []
        for dy, w in zip(dys, weights):
            dy = dy.contiguous()
            gq, gs = quantize_rows(dy)
            # W^T (E, K, N): one scale per input column, by the transposing quantiser (or from the step's cache)
            dxs.append(fp8_grouped_gemm_rowwise_weight(gq, gs, w, offs, dy.dtype, True))
            dws.append(grouped_weight_grad(dy.to(dtype), xw, offs).to(w.dtype))
        return (_input_grad(ctx, dxs), *dws, None)


def _compute_input(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype, as a bf16 layer would take it (autocast itself is off inside the functions)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def shared_input_linears(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """The outputs of `linears` on the same x, with x quantised once for all of them (issue 15); outputs and
    gradients bit for bit those of calling each FP8TrainLinear (see `_input_grad`)."""
    ys = FP8LinearFunction.apply(x, *[m.weight for m in linears])
    return tuple(y if m.bias is None else y + m.bias for y, m in zip(ys, linears))


class FP8TrainLinear(nn.Linear):
    """An nn.Linear whose matmul runs in FP8 in forward and backward (same parameters; no bias in V3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = FP8LinearFunction.apply(x, self.weight)
        return y if self.bias is None else y + self.bias


class FP8TrainMLP(MLP):
    """SwiGLU with FP8 linears, gate and up from one quantisation of x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.gate_proj) is not FP8TrainLinear or type(self.up_proj) is not FP8TrainLinear:
            return super().forward(x)
        gate, up = shared_input_linears(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)


class FP8TrainMLA(MLA):
    """MLA with FP8 projections; the two that read the normed hidden state (q_a or q, and kv_a) from one
    quantisation of it."""

    def down_project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.q_proj if hasattr(self, "q_proj") else self.q_a_proj
        if type(first) is not FP8TrainLinear or type(self.kv_a_proj_with_mqa) is not FP8TrainLinear:
            return super().down_project(x)
        return shared_input_linears(x, (first, self.kv_a_proj_with_mqa))


class FP8TrainExperts(Experts):
    fp8_scaling = "block"     # or "row": set by apply_fp8

    def ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.stacked_weights()
        offs = counts.cumsum(0).to(torch.int32)
        xs = _compute_input(xs)     # cast once for gate and up, as before (their input gradients summed in bf16)
        fn = FP8RowwiseGroupedFunction if self.fp8_scaling == "row" else FP8GroupedFunction
        g, u = fn.apply(xs, gate, up, offs)         # one quantisation of xs for gate and up
        return fn.apply(F.silu(g) * u, down, offs)


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
            if type(module) is MLA:
                module.__class__ = FP8TrainMLA
        elif isinstance(module, MLP):
            for child in (module.gate_proj, module.up_proj, module.down_proj):
                if type(child) is nn.Linear:
                    child.__class__ = FP8TrainLinear
            if type(module) is MLP:
                module.__class__ = FP8TrainMLP
        elif type(module) is Experts:
            module.__class__ = FP8TrainExperts
            module.fp8_scaling = experts
    return model
