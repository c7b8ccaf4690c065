"""Decode-sized unquantised projections: the weight-streaming GEMV for one row (batch-1 decode), y (1, N) = x (1, K)
@ W (N, K).T; the tiled kernel for 2..64 rows; the router's fp32 logits at one row (`gate_logits`).

Why: at batch 1 a dense projection is bound by reading W once; cuBLAS's M=1 kernels (split-K GEMVs) reached ~40%
of copy bandwidth on `lite`'s shapes (benchmarks/RESULTS.md, issue 16). The whole job is to keep enough loads in
flight: as gpt-fast's and vLLM's decode GEMVs, many programs each stream a narrow slab of W's rows. The row takes
fp8_gemv's one-row path without scales: each strip of W's rows loaded 1024 columns at a time in one wide load,
products kept per lane. On an H100 it is 1.08-1.50x bf16 cuBLAS at lite's decode shapes; a broadcast-product form
for M = 2..8 measured 1.6-13x slower than cuBLAS there and was removed (RESULTS.md eighteenth session), so two or
more rows (an MTP verify step, batch > 1) stay with cuBLAS.

Two to SKINNY_MAX_M rows (batch 2-64 decode) take the tiled kernel with split-K instead
(fp8_weight_gemm.dense_linear_triton: the FP8 weight GEMM's tiles, unscaled), where the caller asks for it
(`EngineConfig.skinny_gemm`, off until measured against cuBLAS).

`gemv_reference` is F.linear (the oracle and the CPU path); `gemv` dispatches (Triton on CUDA for M <= SKINNY_MAX_M,
DSV3_GEMV=reference forces the reference). The engine takes it for its bf16 projections (`EngineConfig.dense_gemv`,
on by default, for one row; `skinny_gemm` for 2..64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fp8_gemv import fp8_gemv
from .fp8_weight_gemm import dense_linear_triton
from .triton_setup import TRITON_DTYPES, need_triton, use_triton

__all__ = ["GEMV_MAX_M", "SKINNY_MAX_M", "gate_logits", "gate_logits_reference", "gemv", "gemv_reference",
           "gemv_triton"]

GEMV_MAX_M = 1
SKINNY_MAX_M = 64       # the tiled kernel's split-K rule and launch table cover decode-sized M up to 64


def gemv_reference(x: Tensor, weight: Tensor) -> Tensor:
    return F.linear(x, weight)


def gemv_triton(x: Tensor, weight: Tensor) -> Tensor:
    """x (M <= GEMV_MAX_M, K) @ weight (N, K).T -> (M, N) in x's dtype."""
    need_triton("gemv_triton")
    M, K = x.shape
    N = weight.shape[0]
    if M > GEMV_MAX_M or weight.shape[1] != K or weight.dtype != x.dtype:
        raise ValueError(f"gemv_triton: x (M<={GEMV_MAX_M}, K) and weight (N, K) of one dtype, got "
                         f"{tuple(x.shape)} {x.dtype}, {tuple(weight.shape)} {weight.dtype}")
    if M == 0 or N == 0:    # nothing to launch
        return x.new_zeros(M, N)
    return fp8_gemv(x.contiguous(), weight.contiguous(), None)


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """Dispatcher (module docstring): x (..., K) @ weight.T."""
    flat = x.reshape(-1, x.shape[-1])
    M = flat.shape[0]
    if M <= SKINNY_MAX_M and use_triton(x, "DSV3_GEMV") and x.dtype == weight.dtype:
        y = gemv_triton(flat, weight) if M <= GEMV_MAX_M else dense_linear_triton(flat, weight)
        return y.view(*x.shape[:-1], weight.shape[0])  # N, not -1: 0 rows are ambiguous
    return gemv_reference(x, weight)


def gate_logits_reference(x: Tensor, weight: Tensor) -> Tensor:
    """The router's logits as dsv3.model.moe.Gate.logits computes them: x (M, K) and the gate weight (E, K) in fp32
    (or x's dtype where wider), F.linear."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return F.linear(x.to(dtype), weight.to(dtype))


def gate_logits(x: Tensor, weight: Tensor) -> Tensor:
    """Dispatcher of `gate_logits_reference`: one row on CUDA through the GEMV's one-row path, which reads x and the
    weight in their own dtypes into fp32 and writes fp32 (one launch: the upcasts and cuBLAS's dot + reduce were
    three per MoE layer of a batch-1 decode step, RESULTS.md eighteenth session). Products of bf16 values are exact
    in fp32, so only the summation order differs from the reference. DSV3_GATE_GEMV=reference (or DSV3_GEMV)
    forces the reference: the A/B."""
    if (x.shape[0] <= GEMV_MAX_M and use_triton(x, "DSV3_GEMV") and use_triton(x, "DSV3_GATE_GEMV")
            and weight.dtype in TRITON_DTYPES and x.stride(-1) == 1 and weight.stride(-1) == 1):
        return fp8_gemv(x, weight, None, out_dtype=torch.float32)
    return gate_logits_reference(x, weight)
