"""Weight-streaming GEMV for decode-sized dense projections: y (M, N) = x (M, K) @ W (N, K).T, M <= GEMV_MAX_M.

Why: at batch 1 a dense projection is bound by reading W once; cuBLAS's M=1 kernels (split-K GEMVs) reached ~40%
of copy bandwidth on `lite`'s shapes (benchmarks/RESULTS.md, issue 16). The whole job is to keep enough loads in
flight: as gpt-fast's and vLLM's decode GEMVs, many programs each stream a narrow slab of W's rows.

One row (M = 1) takes fp8_gemv's one-row path without scales: each 4-row strip of W loaded 1024 columns at a time
in one wide load, products kept per lane (the FP8 form read cold weights 1.5-1.7x faster than bf16 cuBLAS on an
H100, RESULTS.md sixteenth session; this bf16 form is timed by benchmarks/gemv_probe.py). M >= 2, one program per
(N tile, K slice):
  1. the program's BLOCK_N rows of W over its K slice, BLOCK_K columns at a time, and the same columns of x;
  2. acc (BM, BLOCK_N) += sum over k of x[m, k] * W[n, k], in fp32 (a broadcast product, no tensor cores: M is tiny);
  3. one K slice: store acc in x's dtype; several (too few N tiles to fill the GPU): fp32 atomic adds into a zeroed
     buffer, cast after.

`gemv_reference` is F.linear (the oracle and the CPU path); `gemv` dispatches (Triton on CUDA for M <= GEMV_MAX_M,
DSV3_GEMV=reference forces the reference). It is opt-in (`EngineConfig.dense_gemv`) until measured on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fp8_gemv import fp8_gemv
from .triton_setup import need_triton, tl, triton, use_triton

__all__ = ["GEMV_MAX_M", "gemv", "gemv_reference", "gemv_triton"]

GEMV_MAX_M = 8


def gemv_reference(x: Tensor, weight: Tensor) -> Tensor:
    return F.linear(x, weight)


if triton is not None:

    @triton.jit
    def _gemv_kernel(X, W, Y, M, N, K, K_PER_SPLIT, stride_xm, stride_wn, stride_ym,
                     BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_lo = tl.program_id(1) * K_PER_SPLIT
        m = tl.arange(0, BM)
        acc = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BLOCK_K):             # 1.
            k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(W + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                        mask=(n[:, None] < N) & (k[None, :] < K), other=0.0).to(tl.float32)
            x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K),
                        other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)                       # 2.
        ptrs = Y + m[:, None] * stride_ym + n[None, :]
        mask = (m[:, None] < M) & (n[None, :] < N)
        if ATOMIC:                                                                      # 3.
            tl.atomic_add(ptrs, acc, mask=mask)
        else:
            tl.store(ptrs, acc.to(Y.dtype.element_ty), mask=mask)


def _launch(M: int, N: int, K: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, K splits, warps): narrow N tiles, and K slices until ~2 programs per SM (CPU: 1 split)."""
    block_n = 16
    block_k = 512 if M == 1 else 256 if M <= 2 else 128
    tiles = -(-N // block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    splits = max(1, min(-(-K // (2 * block_k)), -(-2 * sms // tiles)))
    return block_n, block_k, splits, 4


def gemv_triton(x: Tensor, weight: Tensor, *, splits: int | None = None) -> Tensor:
    """x (M, K) @ weight (N, K).T -> (M, N) in x's dtype, M <= GEMV_MAX_M; `splits` overrides the K slices."""
    need_triton("gemv_triton")
    M, K = x.shape
    N = weight.shape[0]
    if M > GEMV_MAX_M or weight.shape[1] != K or weight.dtype != x.dtype:
        raise ValueError(f"gemv_triton: x (M<={GEMV_MAX_M}, K) and weight (N, K) of one dtype, got "
                         f"{tuple(x.shape)} {x.dtype}, {tuple(weight.shape)} {weight.dtype}")
    if M == 0 or N == 0:    # nothing to launch (a 0-row batch would make BM = 0: tl.arange(0, 0))
        return x.new_zeros(M, N)
    x, weight = x.contiguous(), weight.contiguous()
    if M == 1 and splits is None:   # one row: fp8_gemv's wide-load strips, unscaled (benchmarks/gemv_probe.py)
        return fp8_gemv(x, weight, None)
    block_n, block_k, split, warps = _launch(M, N, K, x.device)
    split = splits or split
    k_per = -(-K // (split * block_k)) * block_k
    split = -(-K // k_per)
    y = (torch.zeros if split > 1 else torch.empty)(M, N, dtype=torch.float32 if split > 1 else x.dtype,
                                                   device=x.device)
    _gemv_kernel[(-(-N // block_n), split)](x, weight, y, M, N, K, k_per, x.stride(0), weight.stride(0),
                                            y.stride(0), BM=triton.next_power_of_2(M), BLOCK_N=block_n,
                                            BLOCK_K=block_k, ATOMIC=split > 1, num_warps=warps)
    return y.to(x.dtype)


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """Dispatcher (module docstring): x (..., K) @ weight.T."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= GEMV_MAX_M and use_triton(x, "DSV3_GEMV") and x.dtype == weight.dtype:
        return gemv_triton(flat, weight).view(*x.shape[:-1], weight.shape[0])  # N, not -1: 0 rows are ambiguous
    return gemv_reference(x, weight)
