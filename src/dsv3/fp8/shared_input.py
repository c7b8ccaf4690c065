"""FP8 linears that read one input, with the input quantised once (issue 15: "one quantisation per activation shared
by the projections that read it"): MLA's q (or q_a) and kv_a projections of the normed hidden state, and an MLP's
gate and up projections.

For x (M, K) and weights W_1..W_n (N_i, K), the recipe of dsv3.fp8.training.FP8LinearFunction for each y_i = x W_i^T,
with x's two quantisations made once for all n instead of once per projection:
    forward    1. Q_tile(x) (1x128 along K), shared by the n forward GEMMs  y_i = Q_tile(x) Q_block(W_i)^T
               2. Q_tile(x^T) (1x128 along the tokens), saved once for the n weight gradients
    backward   3. dx  = sum_i Q_tile(dy_i) Q_block(W_i)         (the input gradient of every projection, summed)
               4. dW_i = Q_tile(dy_i^T) Q_tile(x^T)^T
Each GEMM sees exactly the operands the separate FP8 linears give it, so outputs and weight gradients are
bit-identical to them; dx is their sum (the same two terms autograd would add). Bytes saved per shared input and
micro-batch: one quantisation of x in each orientation (a read of x and a write of its codes each) and one saved
Q(x^T) copy (1 byte per element) per extra projection.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .experts import no_autocast
from .ops import fp8_gemm, quantize_blocks, quantize_tiles, quantize_tiles_transposed

__all__ = ["FP8SharedInputFunction"]


class FP8SharedInputFunction(torch.autograd.Function):
    """(y_1, ..., y_n) = (x W_1^T, ..., x W_n^T) in FP8, x quantised once per orientation (module docstring)."""

    @staticmethod
    @no_autocast
    def forward(ctx, x: Tensor, n_weights: int, n_cached: int, *args: Tensor) -> tuple[Tensor, ...]:
        """args: the n weights, then for each its n_cached operands from dsv3.fp8.weight_cache ((q, scale, q_t,
        scale_t): n_cached = 4) or nothing (n_cached = 0: quantised here)."""
        weights, cached = args[:n_weights], args[n_weights:]
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        xq, xs = quantize_tiles(x2)                                                  # step 1
        outs, saved = [], []
        for i, w in enumerate(weights):
            c = cached[n_cached * i:n_cached * (i + 1)]
            wq, ws = c[:2] if n_cached else quantize_blocks(w)
            outs.append(fp8_gemm(xq, xs, wq, ws, out_dtype=dtype).view(*shape[:-1], -1))
            saved += c[2:] if n_cached else (wq, ws)         # W^T's blocks, or W's (transposed in backward)
        ctx.save_for_backward(*quantize_tiles_transposed(x2), *saved)                # step 2
        ctx.shape, ctx.n_cached, ctx.weight_dtypes = shape, n_cached, tuple(w.dtype for w in weights)
        return tuple(outs)

    @staticmethod
    @no_autocast
    def backward(ctx, *dys: Tensor):
        xq_t, xs_t, *w_saved = ctx.saved_tensors
        dx, dws = None, []
        for i, dy in enumerate(dys):
            wq, ws = w_saved[2 * i], w_saved[2 * i + 1]
            if not ctx.n_cached:      # W^T (K, N) in 128x128 blocks is W's blocks transposed
                wq, ws = wq.t().contiguous(), ws.t().contiguous()
            dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
            d = fp8_gemm(*quantize_tiles(dy2), wq, ws, out_dtype=dy.dtype)             # step 3
            dx = d if dx is None else dx + d
            dw = fp8_gemm(*quantize_tiles_transposed(dy2), xq_t, xs_t, out_dtype=torch.float32)   # step 4
            dws.append(dw.to(ctx.weight_dtypes[i]))
        return (dx.view(ctx.shape), None, None, *dws) + (None,) * (len(dys) * ctx.n_cached)
