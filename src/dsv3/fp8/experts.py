"""The routed experts' SwiGLU FFN in FP8 as one autograd function, storing its activations for backward in FP8
(TR 3.3.4, "low-precision storage"; issue 15: FP8 peak memory no higher than BF16's).

For x (M, D) sorted by expert, gate / up (E, I, D), down (E, D, I), offs (E,) (torch._grouped_mm's group ends):
    forward   1. Q(x)                          once, shared by the gate and up GEMMs (one quantisation per activation)
              2. g = Q(x) Wg^T,  u = Q(x) Wu^T  FP8 grouped GEMMs
              3. h = silu(g) * u,  y = Q(h) Wd^T
              4. saved for backward: Q(x) (codes + scales) and g, u in FP8 1x128 tiles: the report caches "the inputs
                 of the SwiGLU operator and recompute[s] its output in the backward pass ... stored in FP8 with our
                 fine-grained quantization method" (TR 3.3.4 (2)); plus the weights (parameters, no extra memory) or
                 the cached W^T operands (dsv3.fp8.weight_cache)
    backward  1. g', u' = the dequantised SwiGLU inputs;  h' = silu(g') * u'  (recomputed)
              2. dh = Q(dy) Wd                 input gradient of down;  dWd = dy^T h' per expert
              3. du = dh * silu(g'),  dg = dh * u' * silu'(g')
              4. dx = Q(dg) Wg + Q(du) Wu;     dWg = dg^T x', dWu = du^T x' per expert, x' = dequantised Q(x)
Nothing of x's precision and size is kept: a BF16 step saves x, g, u (and silu(g), h unless compiled away) in BF16,
this one x, g, u in E4M3 (1 byte) plus fp32 scales. The weight gradients are one `torch._grouped_mm` each over the
token-split groups, in bf16 on CUDA (fp32 on the CPU), from the FP8 values of the activations (their dequantised
codes: the operands an FP8 weight-gradient GEMM would read) and the output gradient.

Three recipes (`apply_fp8(experts=...)`, `train.fp8_experts`):
    block          the report's: activations in 1x128 tiles, weights in 128x128 blocks (`kernels.fp8_gemm`'s grouped
                   GEMM); the weight gradients read the dequantised 1x128 tiles of the gradients too
    row            one scale per token and per weight row through torch._scaled_grouped_mm (`kernels.fp8_rowwise`):
                   faster on Hopper, coarser, FP8 MMA accumulation; the weight gradients in bf16 from the output
                   gradients in bf16
    row-fp8-wgrad  row, and the weight gradients in FP8 too (`kernels.fp8_grouped_wgrad`, torchao's scaling: one
                   scale per expert and column of each operand, the 2-D x 2-D _scaled_grouped_mm over the tokens);
                   backward step 4's x' quantised once for both dWg and dWu
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.fp8_quant import BLOCK
from .ops import fp8_grouped_gemm, fp8_grouped_gemm_rowwise, fp8_grouped_wgrad_rowwise, grouped_weight_grad, \
    quantize_blocks, quantize_cols_grouped, quantize_rows, quantize_tiles

__all__ = ["RECIPES", "FP8ExpertsFunction", "no_autocast", "quantize_expert_weight", "quantize_expert_weight_t"]

# recipe: (scaling of the forward and input-gradient GEMMs, weight gradients in FP8)
RECIPES = {"block": ("block", False), "row": ("row", False), "row-fp8-wgrad": ("row", True)}


def no_autocast(fn):
    """The quantised GEMMs choose their own dtypes; autocast cannot handle fp8 tensors (torch.stack of e4m3 fails
    in its dtype promotion), so it is off inside the FP8 autograd functions."""
    def wrapper(ctx, *args):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(ctx, *args)
    return wrapper


# ---- operands ------------------------------------------------------------------------------------------------------

def _stacked_blocks(weight: Tensor) -> tuple[Tensor, Tensor]:
    """128x128 blocks of each expert's (N, K) matrix: one call on the (E*N, K) stack when N is a multiple of 128
    (no block straddles two experts), else one per expert."""
    E, N, K = weight.shape
    if N % BLOCK == 0:
        q, s = quantize_blocks(weight.reshape(E * N, K))
        return q.view(E, N, K), s.view(E, N // BLOCK, -1)
    pairs = [quantize_blocks(w) for w in weight]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def quantize_expert_weight(weight: Tensor, scaling: str) -> tuple[Tensor, Tensor]:
    """The forward GEMM's operand of a stacked expert weight W (E, N, K): rows of W (scales (E, N)) or its blocks."""
    return quantize_rows(weight) if scaling == "row" else _stacked_blocks(weight)


def quantize_expert_weight_t(weight: Tensor, scaling: str) -> tuple[Tensor, Tensor]:
    """The input gradient's operand, W^T (E, K, N): rows of W^T (one scale per column of W, read in place: the
    transposing quantiser) or the transposed block codes (a 128x128 block's scale does not depend on the
    orientation, so this equals quantising W^T)."""
    if scaling == "row":
        return quantize_rows(weight.transpose(1, 2))
    q, s = _stacked_blocks(weight)
    return q.transpose(1, 2).contiguous(), s.transpose(1, 2).contiguous()


def _quantize_act(x: Tensor, scaling: str) -> tuple[Tensor, Tensor]:
    return quantize_rows(x) if scaling == "row" else quantize_tiles(x)


def _dequantize(q: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    """float(q) * scale in fp32, cast once to dtype: rows (s (M,)) or 1x128 tiles (s (M, ceil(K/128))); the same
    products as kernels.fp8_quant.dequantize_tiles, by broadcasting instead of a repeated (M, K) scale."""
    M, K = q.shape
    if s.dim() == 1:
        return (q.float() * s[:, None]).to(dtype)
    if K % BLOCK == 0:
        return (q.float().view(M, -1, BLOCK) * s[..., None]).view(M, K).to(dtype)
    return (q.float() * s.repeat_interleave(BLOCK, 1)[:, :K]).to(dtype)


def _gemm(xq: Tensor, xs: Tensor, w: tuple[Tensor, Tensor], offs: Tensor, scaling: str, dtype: torch.dtype) -> Tensor:
    fn = fp8_grouped_gemm_rowwise if scaling == "row" else fp8_grouped_gemm
    return fn(xq, xs, w[0], w[1], offs, out_dtype=dtype)


# ---- the function --------------------------------------------------------------------------------------------------

class FP8ExpertsFunction(torch.autograd.Function):
    """y = down(silu(gate(x)) * up(x)) per expert, every GEMM in FP8, activations saved in FP8 (module docstring)."""

    @staticmethod
    @no_autocast
    def forward(ctx, x: Tensor, gate: Tensor, up: Tensor, down: Tensor, offs: Tensor, recipe: str,
                *cached: Tensor) -> Tensor:
        """recipe: a key of RECIPES. cached: for gate, up and down in turn, (q, scale, q_t, scale_t) from
        dsv3.fp8.weight_cache (12 tensors), or nothing (quantised here and, for W^T, in backward)."""
        scaling, fp8_wgrad = RECIPES[recipe]
        weights, dtype = (gate, up, down), x.dtype
        w_fwd = [tuple(cached[4 * i:4 * i + 2]) if cached else quantize_expert_weight(w, scaling)
                 for i, w in enumerate(weights)]
        xq, xs = _quantize_act(x, scaling)                               # step 1
        g = _gemm(xq, xs, w_fwd[0], offs, scaling, dtype)                # step 2
        u = _gemm(xq, xs, w_fwd[1], offs, scaling, dtype)
        hq, hs = _quantize_act(F.silu(g) * u, scaling)                   # step 3
        y = _gemm(hq, hs, w_fwd[2], offs, scaling, dtype)
        w_bwd = [t for i in range(3) for t in cached[4 * i + 2:4 * i + 4]] if cached else list(weights)
        ctx.save_for_backward(xq, xs, *quantize_tiles(g), *quantize_tiles(u), offs, *w_bwd)     # step 4
        # len(), not bool(cached): torch 2.11's dynamo cannot trace bool() of a tuple (a graph break per MoE layer)
        ctx.scaling, ctx.cached, ctx.fp8_wgrad = scaling, len(cached) > 0, fp8_wgrad
        ctx.weight_dtypes = tuple(w.dtype for w in weights)
        return y

    @staticmethod
    @no_autocast
    def backward(ctx, dy: Tensor):
        xq, xs, gq, gs, uq, us, offs, *w_bwd = ctx.saved_tensors
        scaling, dtype = ctx.scaling, dy.dtype
        if ctx.cached:
            w_t = [(w_bwd[2 * i], w_bwd[2 * i + 1]) for i in range(3)]
        else:
            w_t = [quantize_expert_weight_t(w, scaling) for w in w_bwd]
        wdtype = torch.bfloat16 if dy.is_cuda else torch.float32     # what _grouped_mm takes on CUDA

        def wgrad_operand(d: Tensor, q: Tensor, s: Tensor) -> Tensor:
            # the report's weight gradient reads the FP8 output gradient; the row-wise recipe the bf16 one
            return d.to(wdtype) if scaling == "row" else _dequantize(q, s, wdtype)

        g, u = _dequantize(gq, gs, torch.float32), _dequantize(uq, us, torch.float32)   # step 1
        sig = torch.sigmoid(g)
        silu = g * sig
        dy = dy.contiguous()
        dyq, dys = _quantize_act(dy, scaling)                                            # step 2
        dh = _gemm(dyq, dys, w_t[2], offs, scaling, dtype).float()    # in dtype, as a BF16 step's (less memory)
        if ctx.fp8_wgrad:
            d_down = fp8_grouped_wgrad_rowwise(*quantize_cols_grouped(dy, offs),
                                               *quantize_cols_grouped(silu * u, offs), offs, wdtype)  # from fp32
        else:
            d_down = grouped_weight_grad(wgrad_operand(dy, dyq, dys), (silu * u).to(wdtype), offs)
        du = (dh * silu).to(dtype)                                                       # step 3
        dg = (dh * u * sig * (1 + g * (1 - sig))).to(dtype)
        dgq, dgs = _quantize_act(dg, scaling)                                            # step 4
        duq, dus = _quantize_act(du, scaling)
        dx = _gemm(dgq, dgs, w_t[0], offs, scaling, dtype) + _gemm(duq, dus, w_t[1], offs, scaling, dtype)
        if ctx.fp8_wgrad:       # every dW = dY^T X in FP8; x' quantised once for gate and up, from its saved codes
            xc = quantize_cols_grouped(xq, offs, xs)
            d_gate, d_up = (fp8_grouped_wgrad_rowwise(*quantize_cols_grouped(d, offs), *xc, offs, wdtype)
                            for d in (dg, du))
            return _grads(ctx, dx, d_gate, d_up, d_down)
        x = _dequantize(xq, xs, wdtype)
        d_gate = grouped_weight_grad(wgrad_operand(dg, dgq, dgs), x, offs)
        d_up = grouped_weight_grad(wgrad_operand(du, duq, dus), x, offs)
        return _grads(ctx, dx, d_gate, d_up, d_down)


def _grads(ctx, dx: Tensor, *weight_grads: Tensor) -> tuple:
    """backward's return: dx, the weights' gradients in their dtypes, None for offs, recipe and the cache."""
    grads = tuple(d.to(t) for d, t in zip(weight_grads, ctx.weight_dtypes))
    return (dx, *grads, None, None) + (None,) * (12 if ctx.cached else 0)
