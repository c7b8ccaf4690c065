"""Weight-only FP8 GEMMs for inference: a PyTorch reference and a Triton kernel, dense and grouped (MoE experts).

Weights are stored as in the released DeepSeek-V3 checkpoint: e4m3 values `weight` (N, K) and one fp32 multiplier
per 128x128 block, `scale_inv` (ceil(N/128), ceil(K/128)). Activations stay in bf16/fp16/fp32:

    W[n, k] = float(weight[n, k]) * scale_inv[n // 128, k // 128]
    y = x @ W.T        (fp32 accumulation, returned in x's dtype)                                   -> (M, N)

Because the scale is constant over a 128-wide slice of K for a fixed 128-row block of N, it factors out of each
128-long partial sum:  y[m, n] = sum_kb scale_inv[n // 128, kb] * sum_{k in kb} x[m, k] * float(weight[n, k]).

Grouped form (MoE): x (M, K) rows sorted by expert, weight (E, N, K), scale_inv (E, ceil(N/128), ceil(K/128)) and
`offs` (E,) int32 cumulative row ends as `torch._grouped_mm` takes them: group e owns rows offs[e-1]..offs[e]-1
(offs[-1] = 0); rows from offs[-1] to M belong to no group and come out as zeros.

`*_reference`: dequantise to fp32 and matmul (one group at a time, with host syncs, in the grouped form).

`*_triton`: BLOCK_K = 128 and BLOCK_N in {64, 128}, so each (N tile, K step) sees exactly one scale: the program
loads the e4m3 tile, converts it in registers to x's dtype (exact: e4m3 fits bf16/fp16), `tl.dot`s with fp32
accumulation and adds dot * scale to its accumulator. Grid (M tiles, N tiles), M tiles fastest so the programs that
read the same weight tile run together and share it through L2; BLOCK_M is 16 for decode-sized M (the kernel is
bound by the weight read there). The grouped kernel gets its work from a tile -> (group, first row) map built on the
device (per-group tile counts, cumsum, searchsorted) over an upper bound of cdiv(M, BLOCK_M) + E tiles; programs
past the real tile count return at once. Nothing depends on offs' values on the host, so it captures in a CUDA
graph. The e4m3 -> bf16 conversion needs sm_89+ in Triton; the dispatchers fall back to the reference below that.

Decode-sized calls (M <= GEMV_MAX_M = 16 rows, unit K strides) go to the weight-streaming GEMV of fp8_gemv.py
instead (`gemv=None`: by that bound; True/False force it; the keywords then set the GEMV's launch: block_n,
num_warps, split_k = its K slices, ku = K blocks per loop step; block_m or num_stages, which only the tiled kernel
has, select it; DSV3_FP8_GEMV=0 in the environment turns the GEMV off for an A/B). One entry point either way.

`fp8_linear`, `fp8_grouped_linear`: Triton on CUDA when triton imports, else the reference
(DSV3_FP8_GEMM=reference forces the reference).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .fp8_gemv import GEMV_MAX_M, fp8_gemv, fp8_grouped_gemv
from .triton_setup import BLOCK, HAS_TRITON, TRITON_DTYPES, need_triton, tl, triton, use_triton

__all__ = ["HAS_TRITON", "dense_linear_triton", "fp8_linear", "fp8_linear_reference", "fp8_linear_triton",
           "fp8_grouped_linear", "fp8_grouped_linear_reference", "fp8_grouped_linear_triton"]



def _check_common(x: Tensor, weight: Tensor, scale_inv: Tensor, grouped: bool) -> tuple[int, int, int]:
    nd = 3 if grouped else 2
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D float tensor (M, K), got shape {tuple(x.shape)} dtype {x.dtype}")
    if weight.dim() != nd or weight.dtype != torch.float8_e4m3fn:
        want = "(E, N, K)" if grouped else "(N, K)"
        raise ValueError(f"weight must be a {nd}-D float8_e4m3fn tensor {want}, got shape {tuple(weight.shape)} "
                         f"dtype {weight.dtype}")
    M, K = x.shape
    N = weight.shape[-2]
    if weight.shape[-1] != K:
        raise ValueError(f"weight's K ({weight.shape[-1]}) does not match x's K ({K})")
    expected = (*weight.shape[:-2], -(-N // BLOCK), -(-K // BLOCK))
    if tuple(scale_inv.shape) != expected or not scale_inv.is_floating_point():
        raise ValueError(f"scale_inv must be a float tensor of shape {expected} (one per {BLOCK}x{BLOCK} block of "
                         f"weight {tuple(weight.shape)}), got shape {tuple(scale_inv.shape)} dtype {scale_inv.dtype}")
    if not (x.device == weight.device == scale_inv.device):
        raise ValueError(f"devices differ: x {x.device}, weight {weight.device}, scale_inv {scale_inv.device}")
    return M, N, K


def _check_offs(offs: Tensor, E: int, x: Tensor) -> None:
    if offs.shape != (E,) or offs.is_floating_point() or offs.dtype == torch.bool:
        raise ValueError(f"offs must be an integer tensor of shape ({E},) (cumulative row ends per group), got "
                         f"shape {tuple(offs.shape)} dtype {offs.dtype}")
    if offs.device != x.device:
        raise ValueError(f"offs is on {offs.device}, x on {x.device}")


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def _dequant_fp32(weight: Tensor, scale_inv: Tensor) -> Tensor:
    N, K = weight.shape
    s = scale_inv.float().repeat_interleave(BLOCK, 0)[:N].repeat_interleave(BLOCK, 1)[:, :K]
    return weight.float() * s


def fp8_linear_reference(x: Tensor, weight: Tensor, scale_inv: Tensor) -> Tensor:
    """x (M, K) @ dequant(weight (N, K) e4m3, scale_inv).T in fp32, returned (M, N) in x's dtype."""
    _check_common(x, weight, scale_inv, grouped=False)
    return (x.float() @ _dequant_fp32(weight, scale_inv).T).to(x.dtype)


def fp8_grouped_linear_reference(x: Tensor, weight: Tensor, scale_inv: Tensor, offs: Tensor) -> Tensor:
    """Per group e: rows offs[e-1]..offs[e]-1 of x times dequant(weight[e]).T (fp32 math); rows of no group are 0.
    Returns (M, N) in x's dtype."""
    M, N, _ = _check_common(x, weight, scale_inv, grouped=True)
    E = weight.shape[0]
    _check_offs(offs, E, x)
    ends = offs.tolist()
    if any(b < a for a, b in zip([0] + ends, ends)) or (E and ends[-1] > M):
        raise ValueError(f"offs must be non-decreasing, from 0 up to at most M={M}, got {ends}")
    out = x.new_zeros(M, N)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = (x[start:end].float() @ _dequant_fp32(weight[e], scale_inv[e]).T).to(x.dtype)
        start = end
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _fp8_tile(X, W, S, offs_m, mask_m, n0, N, K, kb0, kb1,
                  stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
                  SCALED: tl.constexpr):
        # K blocks kb0 .. kb1-1 (all of K, or one split-K slice); SCALED=False: W in x's dtype, S unused
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = kb0 * BLOCK_K + tl.arange(0, BLOCK_K)
        x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
        s_ptr = S + (n0 // BLOCK_K) * stride_sn  # BLOCK_N divides BLOCK_K: one scale row per tile
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(kb0, kb1):
            mask_k = offs_k < K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if SCALED:
                s = tl.load(s_ptr + kb * stride_sk)
                acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PREC) * s
            else:
                acc = tl.dot(x, tl.trans(w), acc=acc, input_precision=DOT_PREC)
            offs_k += BLOCK_K
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        return acc, offs_n, mask_n

    @triton.jit
    def _fp8_linear_kernel(X, W, S, Y, M, N, K, KB_PER_SPLIT,
                           stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_ys, stride_ym,
                           stride_yn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           DOT_PREC: tl.constexpr, SCALED: tl.constexpr = True):
        # split-K (program_id(2) > 0 exists only then): slice s sums K blocks [s * KB_PER_SPLIT, ...) into its own
        # fp32 plane of Y; the planes are summed after the kernel, in a fixed order (deterministic, no atomics)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        kb0 = tl.program_id(2) * KB_PER_SPLIT
        kb1 = tl.minimum(kb0 + KB_PER_SPLIT, tl.cdiv(K, BLOCK_K))
        acc, offs_n, mask_n = _fp8_tile(X, W, S, offs_m, mask_m, tl.program_id(1) * BLOCK_N, N, K, kb0, kb1,
                                        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
                                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC, SCALED)
        y_ptrs = Y + tl.program_id(2).to(tl.int64) * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym + \
            offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _fp8_grouped_kernel(X, W, S, Y, TILE_GROUP, TILE_ROW, OFFS, M, N, K, E,
                            stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
                            stride_ym, stride_yn,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            DOT_PREC: tl.constexpr):
        t = tl.program_id(0)
        g = tl.load(TILE_GROUP + t)
        if g >= E:  # past the real tile count (the grid is an upper bound)
            return
        row_end = tl.minimum(tl.load(OFFS + g), M)
        offs_m = tl.load(TILE_ROW + t) + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        g64 = g.to(tl.int64)  # E * N * K overflows int32 for V3's stacked experts
        acc, offs_n, mask_n = _fp8_tile(X, W + g64 * stride_we, S + g64 * stride_se, offs_m, mask_m,
                                        tl.program_id(1) * BLOCK_N, N, K, 0, tl.cdiv(K, BLOCK_K),
                                        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
                                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC, True)
        y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _default_config(M: int, dtype: torch.dtype, grouped: bool = False) -> dict:
    """From a sweep on one H200 (bf16, lite decode shapes, graph-replayed timing; benchmarks/
    fp8_weight_gemm_bench.py): dense decode GEMMs want narrow N tiles (more programs over a short K loop: 32 wide
    for M <= 16, 16 up to 64 rows); grouped ones keep 64-wide tiles (their grid already spans the experts). Each
    bf16 config needs <= 80 KB of shared memory, so it fits sm_89 too."""
    if dtype == torch.float32:  # twice the bytes of an x tile: fewer stages (exactness tests, not speed)
        return dict(block_m=16 if M <= 16 else 32, block_n=64, num_warps=4, num_stages=2)
    if grouped and M <= 16:
        return dict(block_m=16, block_n=64, num_warps=4, num_stages=3)
    if M <= 16:
        return dict(block_m=16, block_n=32, num_warps=4, num_stages=3)
    if M <= 64:
        return dict(block_m=32 if M <= 32 else 64, block_n=16, num_warps=4, num_stages=3)
    return dict(block_m=64, block_n=128, num_warps=8, num_stages=2)


def _config(M: int, dtype: torch.dtype, block_m: int | None, block_n: int | None, grouped: bool = False) -> dict:
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton kernels take x in {TRITON_DTYPES}, got {dtype} (use the reference)")
    cfg = _default_config(M, dtype, grouped)
    if block_m is not None:
        cfg["block_m"] = block_m
    if block_n is not None:
        cfg["block_n"] = block_n
    if cfg["block_n"] not in (16, 32, 64, 128) or cfg["block_m"] < 16 or cfg["block_m"] & (cfg["block_m"] - 1):
        raise ValueError(f"block_n must divide {BLOCK} (16..128) and block_m be a power of two >= 16, got {cfg}")
    return cfg


def grouped_tile_map(offs: Tensor, M: int, block_m: int) -> tuple[Tensor, Tensor]:
    """For each of the cdiv(M, block_m) + E candidate tiles (an upper bound: sum_e ceil(c_e / b) < M / b + E): its
    group (E for tiles past the real ones) and first row, as int32 device tensors; torch ops only, no host sync."""
    E = offs.shape[0]
    ends = offs.to(torch.int64)
    starts = torch.nn.functional.pad(ends[:-1], (1, 0))
    tiles = ((ends - starts).clamp_min(0) + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 0)
    t = torch.arange(-(-M // block_m) + E, device=offs.device)
    group = torch.searchsorted(cum, t, right=True)
    g = group.clamp_max(E - 1)
    row = starts[g] + (t - (cum[g] - tiles[g])) * block_m
    return group.to(torch.int32), row.to(torch.int32)


def _split_k(M: int, N: int, K: int, cfg: dict, device: torch.device) -> int:
    """K slices for a decode-sized GEMM: without them a (1, N) output has only N / block_n programs, each a long K
    loop, too few to keep HBM busy (the sweep in RESULTS.md: 0.35-0.85x bf16 cuBLAS at M=1..64). Enough slices for
    ~2 programs per SM, at least 2 K blocks per slice."""
    if M > 64 or device.type != "cuda":
        return 1
    programs = -(-M // cfg["block_m"]) * -(-N // cfg["block_n"])
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    kblocks = -(-K // BLOCK)
    return max(1, min(kblocks // 2, -(-2 * sms // programs)))


def fp8_linear_triton(x: Tensor, weight: Tensor, scale_inv: Tensor, *, block_m: int | None = None,
                      block_n: int | None = None, num_warps: int | None = None,
                      num_stages: int | None = None, split_k: int | None = None, gemv: bool | None = None,
                      ku: int | None = None) -> Tensor:
    """Weight-only FP8 linear through Triton (same contract as `fp8_linear_reference`); the keyword-only arguments
    override the default launch configuration (split_k: K slices summed in fp32 after the kernel; None = by shape;
    gemv: module docstring)."""
    need_triton("fp8_linear_triton")
    M, N, K = _check_common(x, weight, scale_inv, grouped=False)
    if _take_gemv(gemv, M, x, weight, block_m, num_stages):
        return fp8_gemv(x, weight, scale_inv, block_n=block_n, ku=ku, split=split_k, num_warps=num_warps)
    return _linear_launch(x, weight, scale_inv, _config(M, x.dtype, block_m, block_n), split_k, num_warps,
                          num_stages)


def _linear_launch(x: Tensor, weight: Tensor, scale_inv: Tensor | None, cfg: dict, split_k: int | None,
                   num_warps: int | None, num_stages: int | None) -> Tensor:
    """The tiled kernel over (M tiles, N tiles, K slices); scale_inv None: an unscaled weight in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    kblocks = -(-K // BLOCK)
    split = max(1, min(split_k if split_k is not None else _split_k(M, N, K, cfg, x.device), kblocks))
    per = -(-kblocks // split)
    split = -(-kblocks // per)                      # no empty slice
    y = out.unsqueeze(0) if split == 1 else torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    scaled = scale_inv is not None
    s = scale_inv.float() if scaled else weight     # (not read unscaled)
    grid = (triton.cdiv(M, cfg["block_m"]), triton.cdiv(N, cfg["block_n"]), split)
    _fp8_linear_kernel[grid](
        x, weight, s, y, M, N, K, per,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), s.stride(0) if scaled else 0,
        s.stride(1) if scaled else 0, y.stride(0), y.stride(1), y.stride(2),
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=BLOCK,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32", SCALED=scaled,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out if split == 1 else y.sum(0).to(x.dtype)


def dense_linear_triton(x: Tensor, weight: Tensor, *, block_m: int | None = None, block_n: int | None = None,
                        num_warps: int | None = None, num_stages: int | None = None,
                        split_k: int | None = None) -> Tensor:
    """x (M, K) @ weight (N, K).T for a weight in x's dtype (bf16 decode projections at 2..64 rows): the FP8
    kernel's tiles unscaled, split-K by shape as there, fp32 accumulation, x's dtype out. Why: cuBLAS's kernels
    for a few rows leave most SMs idle on lite's projections (~0.7 TB/s of weights at 32 rows, RESULTS.md);
    the reference is F.linear (kernels.gemv.gemv_reference)."""
    need_triton("dense_linear_triton")
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.dtype != x.dtype:
        raise ValueError(f"dense_linear_triton: x (M, K) and weight (N, K) of one dtype, got {tuple(x.shape)} "
                         f"{x.dtype}, {tuple(weight.shape)} {weight.dtype}")
    return _linear_launch(x, weight, None, _config(x.shape[0], x.dtype, block_m, block_n), split_k, num_warps,
                          num_stages)


def fp8_grouped_linear_triton(x: Tensor, weight: Tensor, scale_inv: Tensor, offs: Tensor, *,
                              block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                              num_stages: int | None = None, split_k: int | None = None, gemv: bool | None = None,
                              ku: int | None = None) -> Tensor:
    """Grouped weight-only FP8 linear through Triton (same contract as `fp8_grouped_linear_reference`, except that
    offs is not validated: that would need its values on the host). Graph-capturable. split_k and ku apply to the
    GEMV only (module docstring)."""
    need_triton("fp8_grouped_linear_triton")
    M, N, K = _check_common(x, weight, scale_inv, grouped=True)
    E = weight.shape[0]
    _check_offs(offs, E, x)
    if _take_gemv(gemv, M, x, weight, block_m, num_stages):
        return fp8_grouped_gemv(x, weight, scale_inv, offs, block_n=block_n, ku=ku, split=split_k,
                                num_warps=num_warps)
    # row tiles never span two groups: size them for the mean group (a shape, not offs' values: no sync)
    cfg = _config(-(-M // max(E, 1)), x.dtype, block_m, block_n, grouped=True)
    # rows past offs[-1] are never written by a tile
    out = torch.zeros(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0 or E == 0:
        return out
    scale_inv = scale_inv.float()
    tile_group, tile_row = grouped_tile_map(offs, M, cfg["block_m"])
    grid = (tile_group.shape[0], triton.cdiv(N, cfg["block_n"]))
    _fp8_grouped_kernel[grid](
        x, weight, scale_inv, out, tile_group, tile_row, offs.to(torch.int32), M, N, K, E,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        scale_inv.stride(0), scale_inv.stride(1), scale_inv.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=BLOCK,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out


def _take_gemv(gemv: bool | None, M: int, x: Tensor, weight: Tensor, block_m: int | None,
               num_stages: int | None) -> bool:
    """gemv=None: the GEMV where it fits, unless a tiled-kernel-only keyword (block_m, num_stages) or
    DSV3_FP8_GEMV=0 asks for the tiled kernel."""
    if gemv is None and (block_m is not None or num_stages is not None or os.environ.get("DSV3_FP8_GEMV") == "0"):
        return False
    fits = M <= GEMV_MAX_M and x.stride(1) == 1 and weight.stride(-1) == 1 and x.dtype in TRITON_DTYPES
    if gemv and not fits:
        raise ValueError(f"gemv=True needs M <= {GEMV_MAX_M} rows and unit K strides, got x {tuple(x.shape)} "
                         f"stride {x.stride()}, weight stride {weight.stride()}")
    return fits if gemv is None else gemv


def _use_triton(x: Tensor) -> bool:
    return use_triton(x, "DSV3_FP8_GEMM", fp8=True)  # Triton converts e4m3 (fp8e4nv) only on sm_89+


def fp8_linear(x: Tensor, weight: Tensor, scale_inv: Tensor) -> Tensor:
    """Dispatcher: the Triton kernel for CUDA tensors when triton imports (sm_89+), else the PyTorch reference."""
    if _use_triton(x):
        return fp8_linear_triton(x, weight, scale_inv)
    return fp8_linear_reference(x, weight, scale_inv)


def fp8_grouped_linear(x: Tensor, weight: Tensor, scale_inv: Tensor, offs: Tensor) -> Tensor:
    """Dispatcher: the Triton kernel for CUDA tensors when triton imports (sm_89+), else the PyTorch reference."""
    if _use_triton(x):
        return fp8_grouped_linear_triton(x, weight, scale_inv, offs)
    return fp8_grouped_linear_reference(x, weight, scale_inv, offs)
