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

Routed experts run as one function over the SwiGLU FFN (`dsv3.fp8.experts.FP8ExpertsFunction`): the expert-sorted
rows quantised once for the gate and up GEMMs, the SwiGLU inputs stored in FP8 and its output recomputed in backward
(TR 3.3.4), with the report's block scaling or, by `apply_fp8(model, experts="row")`, row-wise scales
(dsv3.kernels.fp8_rowwise: on Hopper the only fast FP8 grouped GEMM, at the cost of coarser scaling, FP8 MMA
accumulation and a bf16 weight gradient; the trade-off and its measured cost: RESULTS.md, issue 15).

Projections that read one input quantise it once (`FP8TrainMLA`: q / q_a and kv_a; `FP8TrainMLP`: gate and up;
dsv3.fp8.shared_input), bit-identical to separate FP8 linears.

`apply_fp8` changes classes in place (`nn.Linear` -> `FP8TrainLinear`, `MLA` / `MLP` -> `FP8TrainMLA` / `FP8TrainMLP`,
`Experts` -> `FP8TrainExperts`): the
parameters, their names and the state dict stay the same, so optimisers, checkpoints and export are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.fp8_quant import quantize_blocks_both
from .experts import RECIPES, FP8ExpertsFunction, no_autocast, quantize_expert_weight, quantize_expert_weight_t
from .ops import fp8_gemm, quantize_blocks, quantize_tiles, quantize_tiles_transposed
from .shared_input import FP8SharedInputFunction
from ..model.layers import MLP
from ..model.mla import MLA
from ..model.moe import Experts
from .weight_cache import check_fresh


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    @no_autocast
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
    @no_autocast
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


_N_CACHED = {"both": 4, "backward": 2}     # tensors cached per weight, by dsv3.fp8.weight_cache's orientations


def _cached_args(module: nn.Module, weights: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The module's FP8 operands per weight for the autograd functions, (q, scale, q_t, scale_t): from its cache
    (dsv3.fp8.weight_cache; checked fresh in eager), the forward pair quantised now where only W^T is cached; or
    empties (no cache: the functions quantise)."""
    cache = module.fp8_cache
    if cache is None:
        return ((),) * len(weights)
    if not torch.compiler.is_compiling():      # an int compare per weight; compiled graphs do not guard on it
        check_fresh(module, weights)
    # (detached: the functions take the operands as inputs without a gradient; the weight's comes from their backward)
    return tuple(c if len(c) == 4 else (*module.fp8_quantize_forward(w.detach()), *c) for w, c in zip(weights, cache))


class FP8TrainLinear(nn.Linear):
    """An nn.Linear whose matmul runs in FP8 in forward and backward (same parameters; no bias in V3)."""

    fp8_cache = None          # W's FP8 operands, set by dsv3.fp8.weight_cache.refresh_fp8_weights

    def fp8_weights(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,)

    def fp8_quantize(self, w: torch.Tensor, orientations: str = "both") -> tuple[torch.Tensor, ...]:
        """The cached operands (dsv3.fp8.weight_cache): W's blocks and W^T's, or W^T's only ("backward")."""
        with torch.autocast(w.device.type, enabled=False):
            return quantize_blocks_both(w)[4 - _N_CACHED[orientations]:]

    def fp8_quantize_forward(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(w.device.type, enabled=False):
            return quantize_blocks(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):     # activations in the autocast dtype, as a bf16 linear's
            x = x.to(torch.get_autocast_dtype(x.device.type))
        (cached,) = _cached_args(self, (self.weight,))
        y = FP8LinearFunction.apply(x, self.weight, *cached)
        return y if self.bias is None else y + self.bias


class FP8TrainExperts(Experts):
    fp8_recipe = "block"      # a key of dsv3.fp8.experts.RECIPES, set by apply_fp8: the scaling, FP8 weight gradients
    fp8_cache = None          # gate, up, down's FP8 operands, set by dsv3.fp8.weight_cache.refresh_fp8_weights

    @property
    def fp8_scaling(self) -> str:
        """"block" or "row": the scaling of the forward and input-gradient operands (and so of the cached ones), the
        recipe's (one source of truth: read, never set)."""
        return RECIPES[self.fp8_recipe][0]

    def fp8_weights(self) -> tuple[torch.Tensor, ...] | None:
        weights = self.stacked_weights()        # cached only where they are the parameters themselves
        return weights if all(isinstance(w, nn.Parameter) for w in weights) else None

    def fp8_quantize(self, w: torch.Tensor, orientations: str = "both") -> tuple[torch.Tensor, ...]:
        """The cached operands (dsv3.fp8.weight_cache): W's and W^T's, or W^T's only ("backward")."""
        with torch.autocast(w.device.type, enabled=False):
            fwd = quantize_expert_weight(w, self.fp8_scaling) if orientations == "both" else ()
            return (*fwd, *quantize_expert_weight_t(w, self.fp8_scaling))

    def fp8_quantize_forward(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(w.device.type, enabled=False):
            return quantize_expert_weight(w, self.fp8_scaling)

    def ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate, up, down = weights = self.stacked_weights()
        c_gate, c_up, c_down = _cached_args(self, weights)
        offs = counts.cumsum(0).to(torch.int32)
        if torch.is_autocast_enabled(xs.device.type):
            xs = xs.to(torch.get_autocast_dtype(xs.device.type))
        return FP8ExpertsFunction.apply(xs, gate, up, down, offs, self.fp8_recipe, *c_gate, *c_up, *c_down)


def shared_input_linears(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """The linears' outputs for one input x: FP8SharedInputFunction (x quantised once) where every one of them is an
    FP8TrainLinear, else each linear on its own (one left in its precision, e.g. by apply_fp8(linears=False))."""
    if not all(type(m) is FP8TrainLinear for m in linears):
        return tuple(m(x) for m in linears)
    if torch.is_autocast_enabled(x.device.type):          # as FP8TrainLinear.forward
        x = x.to(torch.get_autocast_dtype(x.device.type))
    cached = [c for m in linears for c in _cached_args(m, (m.weight,))]
    n_cached = len(cached[0])
    outs = FP8SharedInputFunction.apply(x, len(linears), n_cached, *(m.weight for m in linears),
                                        *(t for c in cached for t in c))
    return tuple(y if m.bias is None else y + m.bias for y, m in zip(outs, linears))


class FP8TrainMLA(MLA):
    """MLA whose q (or q_a) and kv_a projections, both reading the block's normed input, quantise it once."""

    def project_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.q_proj if hasattr(self, "q_proj") else self.q_a_proj
        return shared_input_linears(x, (first, self.kv_a_proj_with_mqa))


class FP8TrainMLP(MLP):
    """SwiGLU MLP (dense FFN, shared experts) whose gate and up projections quantise their input once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = shared_input_linears(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(g) * u)


_MLA_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def apply_fp8(model: nn.Module, experts: str = "block", linears: bool = True) -> nn.Module:
    """Run the MLA projections, dense / shared FFNs and routed experts in FP8, in place; the embedding, head,
    router, norms and attention core keep their precision (TR 3.3.1). `experts`: "block" (the report's 1x128 /
    128x128 scaling, all three GEMMs), "row" (row-wise scales, bf16 weight gradients) or "row-fp8-wgrad" (row, the
    weight gradients in FP8 too; dsv3.fp8.experts.RECIPES). `linears=False`
    leaves the MLA projections and dense / shared FFNs in their precision: only the routed experts, most of an MoE
    step's GEMM FLOPs, run in FP8 (at small widths the quantisation of a dense GEMM's operands can cost more than
    FP8 saves; RESULTS.md, issue 15). Returns the model."""
    if experts not in RECIPES:
        raise ValueError(f"apply_fp8: experts must be one of {', '.join(RECIPES)}, got {experts!r}")
    for module in model.modules():
        if not linears and isinstance(module, (MLA, MLP)):
            continue
        if isinstance(module, MLA):
            for name in _MLA_LINEARS:
                child = getattr(module, name, None)
                if type(child) is nn.Linear:
                    child.__class__ = FP8TrainLinear
            if type(module) is MLA:          # one quantisation of the shared input (other subclasses keep theirs)
                module.__class__ = FP8TrainMLA
        elif isinstance(module, MLP):
            for child in (module.gate_proj, module.up_proj, module.down_proj):
                if type(child) is nn.Linear:
                    child.__class__ = FP8TrainLinear
            if type(module) is MLP:
                module.__class__ = FP8TrainMLP
        elif type(module) is Experts:
            module.__class__ = FP8TrainExperts
            module.fp8_recipe = experts
    return model
