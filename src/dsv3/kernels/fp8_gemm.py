"""FP8 x FP8 GEMMs with DeepSeek-V3's fine-grained scaling (training recipe): reference, Triton, torch._scaled_mm.

Both operands are float8_e4m3fn with fp32 dequantisation multipliers ("scales", x ~= q.float() * scale):

    a (M, K), a_scale (M, ceil(K/128)):        one scale per row per 128-wide K slice ("1x128 tiles")
    b (N, K), b_scale (ceil(N/128), ceil(K/128)): one per 128x128 block (forward / input-gradient GEMMs), or
              b_scale (N, ceil(K/128)):        1x128 tiles (weight-gradient GEMM: both operands token-major)
    c = a @ b.T  (M, N) in out_dtype (bf16, fp16 or fp32)

b_scale's shape picks the scaling (for N = 1 both readings coincide). Every scale is constant over a 128-wide K
slice, so it factors out of each 128-long partial sum, which is "promoted" to fp32 once per slice:

    c[m, n] = sum_kb  a_scale[m, kb] * b_scale_of(n, kb) * sum_{k in slice kb} float(a[m, k]) * float(b[n, k])

Grouped form (MoE experts; block-scaled b only): a (M, K) rows sorted by group, b (E, N, K), b_scale
(E, ceil(N/128), ceil(K/128)), offs (E,) int32 cumulative row ends as torch._grouped_mm takes them; rows from
offs[-1] to M belong to no group and come out as zeros.

`*_reference`: dequantise both operands to fp32 and matmul (one group at a time, with host syncs, when grouped).

`*_triton`: BLOCK_K = 128, so a K step sees one scale per row of the A tile and, for B, one scale per column of
the tile (gathered by n // 128 for blocks, by n for tiles; a few bytes next to the 128-wide fp8 tiles). Each step
is `tl.dot(a_fp8, b_fp8)` with a fresh fp32 accumulator (fp8 wgmma on Hopper, whose limited-precision
accumulation thus spans only 128 products, as in the paper) scaled by a_scale[:, None] * b_scale[None, :] and added
to the fp32 running sum. Masked loads zero the M/N/K edges, so a partial last K slice adds nothing from padding.
Dense grid: one axis over all (M tile, N tile) pairs, swizzled in groups of GROUP_M row tiles so that the programs
running together share A and B tiles through L2. Grouped: the device-side tile -> (group, first row) map of
fp8_weight_gemm (cumsum + searchsorted over an upper bound of cdiv(M, BLOCK_M) + E row tiles; extra programs
return at once): no host sync, so it captures in a CUDA graph. Triton's fp8 dot needs sm_89+.

`fp8_gemm_scaled_mm`: cuBLASLt's DeepSeek-style block scaling through torch (sm_90 only, cuBLASLt >= 12.9,
K % 128 == 0; N % 128 == 0 for block-scaled b, N % 16 == 0 for tiles: other K and N are zero-padded to these). Layouts
the kernels want (the `v2` rules of torch's ScaledBlas.cpp / _meta_registrations.py; the K-block dimension of 128x128
scales padded to a multiple of 4, see pytorch#166752, which fixed silent wrong answers when it was not):
    mat_a = a (M, K) row-major; mat_b = b.t() (K, N) column-major
    1x128 scale_a   (M, K/128)            strides (1, M):   "outer-dim-major": (K/128, M) storage, M fastest
    128x128 scale_b (L4, N/128)           strides (1, L4):  (N/128, L4) row-major storage, L4 = round_up(K/128, 4)
    1x128 scale_b   (N, K/128)            strides (1, N):   (K/128, N) storage, N fastest
`torch.nn.functional.scaled_mm` (explicit recipes) is used where it exists, else `torch._scaled_mm` (recipe
inferred from scale shapes/strides; it has no L4 padding, so block-scaled b then needs (K/128) % 4 == 0).
M is padded to a multiple of 16 (M = 1 is reported to fail in cuBLASLt; not verified here), K and N as above, and
the result sliced.

`fp8_gemm` (auto): on sm_90, cuBLASLt through `fp8_gemm_scaled_mm` above 16 rows (1.1-1.7x the Triton kernel at
V3 shapes, issue 15's measurements; padded where K or N is not a multiple of 128, e.g. lite's 10944-wide FFN and
576-wide kv_a_proj), else (and at M <= 16, where cuBLASLt's padded kernel loses) Triton on CUDA sm_89+ when triton
imports, else the reference. `fp8_grouped_gemm`: Triton, else the reference.
DSV3_FP8_GEMM=reference | scaled_mm (dense only) | triton forces a path (unset or auto: the default); other values
raise.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .fp8_quant import dequantize_blocks, dequantize_tiles
from .fp8_gemv import GEMV_MAX_M
from .fp8_weight_gemm import grouped_tile_map

from .triton_setup import BLOCK, HAS_TRITON, capability, need_triton, tl, triton

__all__ = ["HAS_TRITON", "fp8_gemm", "fp8_gemm_reference", "fp8_gemm_scaled_mm", "fp8_gemm_triton",
           "fp8_grouped_gemm", "fp8_grouped_gemm_reference", "fp8_grouped_gemm_triton"]

FP8 = torch.float8_e4m3fn
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_scale(name: str, s: Tensor, want: tuple, what: str) -> None:
    if s.dtype != torch.float32 or tuple(s.shape) != want:
        raise ValueError(f"{name} must be a float32 tensor of shape {want} ({what}), got shape {tuple(s.shape)} "
                         f"dtype {s.dtype}")


def _check(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype,
           grouped: bool) -> tuple[int, int, int, int]:
    """Validates shapes/dtypes/devices; returns (M, N, K, b_scale_rows): 128 for block-scaled b, 1 for tiles."""
    nd = 3 if grouped else 2
    if a.dim() != 2 or a.dtype != FP8:
        raise ValueError(f"a must be a 2-D float8_e4m3fn tensor (M, K), got shape {tuple(a.shape)} dtype {a.dtype}")
    if b.dim() != nd or b.dtype != FP8:
        raise ValueError(f"b must be a {nd}-D float8_e4m3fn tensor {'(E, N, K)' if grouped else '(N, K)'}, got "
                         f"shape {tuple(b.shape)} dtype {b.dtype}")
    M, K = a.shape
    N, kb = b.shape[-2], _cdiv(b.shape[-1], BLOCK)
    if b.shape[-1] != K:
        raise ValueError(f"b's K ({b.shape[-1]}) does not match a's K ({K})")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    _check_scale("a_scale", a_scale, (M, kb), "one per row per 128-wide K slice of a")
    lead = tuple(b.shape[:-2])
    block = (*lead, _cdiv(N, BLOCK), kb)
    if grouped:
        _check_scale("b_scale", b_scale, block, "one per 128x128 block of each b[e]")
        rows = BLOCK
    elif tuple(b_scale.shape) == block and b_scale.dtype == torch.float32:
        rows = BLOCK
    else:
        _check_scale("b_scale", b_scale, (N, kb), f"1x128 tiles; or {block} for 128x128 blocks")
        rows = 1
    if not (a.device == a_scale.device == b.device == b_scale.device):
        raise ValueError(f"devices differ: a {a.device}, a_scale {a_scale.device}, b {b.device}, "
                         f"b_scale {b_scale.device}")
    return M, N, K, rows


def _check_offs(offs: Tensor, E: int, a: Tensor) -> None:
    if offs.shape != (E,) or offs.is_floating_point() or offs.is_complex() or offs.dtype == torch.bool:
        raise ValueError(f"offs must be an integer tensor of shape ({E},) (cumulative row ends per group), got "
                         f"shape {tuple(offs.shape)} dtype {offs.dtype}")
    if offs.device != a.device:
        raise ValueError(f"offs is on {offs.device}, a on {a.device}")


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def _dequant(q: Tensor, s: Tensor, rows: int) -> Tensor:
    """fp32 q * s: per 1x128 tile (rows=1) or per 128x128 block (rows=128)."""
    return dequantize_tiles(q, s) if rows == 1 else dequantize_blocks(q, s)


def fp8_gemm_reference(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor,
                       out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """dequant(a) @ dequant(b).T in fp32, returned (M, N) in out_dtype; b_scale's shape picks blocks or tiles."""
    _, _, _, rows = _check(a, a_scale, b, b_scale, out_dtype, grouped=False)
    return (_dequant(a, a_scale, 1) @ _dequant(b, b_scale, rows).T).to(out_dtype)


def fp8_grouped_gemm_reference(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, offs: Tensor,
                               out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Per group e: rows offs[e-1]..offs[e]-1 of a times b[e].T (fp32 math); rows of no group are 0."""
    M, N, _, _ = _check(a, a_scale, b, b_scale, out_dtype, grouped=True)
    E = b.shape[0]
    _check_offs(offs, E, a)
    ends = offs.tolist()
    if any(y < x for x, y in zip([0] + ends, ends)) or (E and ends[-1] > M):
        raise ValueError(f"offs must be non-decreasing, from 0 up to at most M={M}, got {ends}")
    out = torch.zeros(M, N, device=a.device, dtype=out_dtype)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = fp8_gemm_reference(a[start:end], a_scale[start:end], b[e], b_scale[e], out_dtype)
        start = end
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _scaled_tile(A, SA, B, SB, offs_m, mask_m, n0, N, K, stride_am, stride_ak, stride_sam, stride_sak,
                     stride_bn, stride_bk, stride_sbn, stride_sbk,
                     SB_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = B + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk  # (BLOCK_K, BLOCK_N)
        sa_ptrs = SA + offs_m.to(tl.int64) * stride_sam
        sb_ptrs = SB + (offs_n // SB_ROWS) * stride_sbn  # per column: its block row (SB_ROWS=128) or its own row
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(tl.cdiv(K, BLOCK_K)):
            mask_k = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            sa = tl.load(sa_ptrs + kb * stride_sak, mask=mask_m, other=0.0)
            sb = tl.load(sb_ptrs + kb * stride_sbk, mask=mask_n, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]  # promotion to fp32 once per 128-wide K slice
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        return acc, offs_n, mask_n

    @triton.jit
    def _fp8_gemm_kernel(A, SA, B, SB, C, M, N, K, stride_am, stride_ak, stride_sam, stride_sak,
                         stride_bn, stride_bk, stride_sbn, stride_sbk, stride_cm, stride_cn,
                         SB_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # swizzle: consecutive programs walk GROUP_M row tiles down one column of N tiles, then the next column
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        acc, offs_n, mask_n = _scaled_tile(A, SA, B, SB, offs_m, mask_m, pid_n * BLOCK_N, N, K,
                                           stride_am, stride_ak, stride_sam, stride_sak, stride_bn, stride_bk,
                                           stride_sbn, stride_sbk, SB_ROWS, BLOCK_M, BLOCK_N, BLOCK_K)
        c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _fp8_grouped_gemm_kernel(A, SA, B, SB, C, TILE_GROUP, TILE_ROW, OFFS, M, N, K, E,
                                 stride_am, stride_ak, stride_sam, stride_sak, stride_be, stride_bn, stride_bk,
                                 stride_sbe, stride_sbn, stride_sbk, stride_cm, stride_cn,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        t = tl.program_id(0)  # row tiles fastest: the programs sharing one expert's B tile run together
        g = tl.load(TILE_GROUP + t)
        if g >= E:  # past the real tile count (the grid is an upper bound)
            return
        row_end = tl.minimum(tl.load(OFFS + g), M)
        offs_m = tl.load(TILE_ROW + t) + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        g64 = g.to(tl.int64)  # E * N * K overflows int32 for V3's stacked experts
        acc, offs_n, mask_n = _scaled_tile(A, SA, B + g64 * stride_be, SB + g64 * stride_sbe, offs_m, mask_m,
                                           tl.program_id(1) * BLOCK_N, N, K, stride_am, stride_ak, stride_sam,
                                           stride_sak, stride_bn, stride_bk, stride_sbn, stride_sbk,
                                           128, BLOCK_M, BLOCK_N, BLOCK_K)
        c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _big_smem(device: torch.device) -> bool:
    return capability(device) >= (9, 0)


def _config(M: int, device: torch.device, block_m: int | None, block_n: int | None, num_warps: int | None,
            num_stages: int | None) -> dict:
    """Untuned starting points (no sweep yet; benchmark before trusting them). fp8 tiles are 1 byte/element, so
    one 128x128 A + B stage is 32 KB: four stages fit sm_90's 227 KB, sm_89 (~100 KB) gets two."""
    if M <= 16:  # decode: bound by the B read; narrow N tiles give more programs
        cfg = dict(block_m=16, block_n=64, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = dict(block_m=64, block_n=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(block_m=128, block_n=128, num_warps=8, num_stages=4 if _big_smem(device) else 2)
    for key, val in dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages).items():
        if val is not None:
            cfg[key] = val
    for key in ("block_m", "block_n"):
        v = cfg[key]
        if not (16 <= v <= 256 and v & (v - 1) == 0):
            raise ValueError(f"{key} must be a power of two in 16..256 (tl.dot tile), got {v}")
    return cfg


def fp8_gemm_triton(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype = torch.bfloat16,
                    *, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None) -> Tensor:
    """FP8 GEMM through Triton (same contract as `fp8_gemm_reference`); keyword-only launch overrides."""
    need_triton("fp8_gemm_triton")
    M, N, K, rows = _check(a, a_scale, b, b_scale, out_dtype, grouped=False)
    cfg = _config(M, a.device, block_m, block_n, num_warps, num_stages)
    out = torch.empty(M, N, device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    grid = (triton.cdiv(M, cfg["block_m"]) * triton.cdiv(N, cfg["block_n"]),)
    _fp8_gemm_kernel[grid](
        a, a_scale, b, b_scale, out, M, N, K, a.stride(0), a.stride(1), a_scale.stride(0), a_scale.stride(1),
        b.stride(0), b.stride(1), b_scale.stride(0), b_scale.stride(1), out.stride(0), out.stride(1),
        SB_ROWS=rows, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=BLOCK, GROUP_M=8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def fp8_grouped_gemm_triton(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, offs: Tensor,
                            out_dtype: torch.dtype = torch.bfloat16, *, block_m: int | None = None,
                            block_n: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None) -> Tensor:
    """Grouped FP8 GEMM through Triton (contract of `fp8_grouped_gemm_reference`, except that offs' values are not
    validated: that would need them on the host). No host sync: graph-capturable."""
    need_triton("fp8_grouped_gemm_triton")
    M, N, K, _ = _check(a, a_scale, b, b_scale, out_dtype, grouped=True)
    E = b.shape[0]
    _check_offs(offs, E, a)
    # row tiles never span two groups: size them for the mean group (a shape, not offs' values: no sync)
    cfg = _config(_cdiv(M, max(E, 1)), a.device, block_m, block_n, num_warps, num_stages)
    out = torch.zeros(M, N, device=a.device, dtype=out_dtype)  # rows past offs[-1] are never written
    if M == 0 or N == 0 or E == 0:
        return out
    tile_group, tile_row = grouped_tile_map(offs, M, cfg["block_m"])
    grid = (tile_group.shape[0], triton.cdiv(N, cfg["block_n"]))
    _fp8_grouped_gemm_kernel[grid](
        a, a_scale, b, b_scale, out, tile_group, tile_row, offs.to(torch.int32), M, N, K, E,
        a.stride(0), a.stride(1), a_scale.stride(0), a_scale.stride(1), b.stride(0), b.stride(1), b.stride(2),
        b_scale.stride(0), b_scale.stride(1), b_scale.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=BLOCK,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


# ----------------------------------------------------------------------------------------------------------------
# torch._scaled_mm (cuBLASLt)
# ----------------------------------------------------------------------------------------------------------------

_V2 = hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")


def _pad_fp8(x: Tensor, rows: int, cols: int) -> Tensor:
    """x (r, c) e4m3 zero-padded to (rows, cols), contiguous (through uint8: fills of fp8 tensors are not supported
    everywhere). Zeros add nothing to a product, so padding K or N is exact."""
    if tuple(x.shape) == (rows, cols):
        return x.contiguous()
    pad = torch.zeros(rows, cols, dtype=torch.uint8, device=x.device)
    pad[:x.shape[0], :x.shape[1]] = x.view(torch.uint8)
    return pad.view(FP8)


def _k_major(scale: Tensor, rows: int) -> Tensor:
    """scale (r, kb) fp32 as (rows, kb) with strides (1, rows), zero rows appended: the K-block-major layout of 1x128
    scales. No copy when it is laid out so already and r == rows; one when only the layout differs (a host launch
    and a kernel per operand and GEMM otherwise: at lite's widths these small GEMMs are bound by such overheads)."""
    r, kb = scale.shape
    if r == rows and scale.stride() == (1, rows):
        return scale
    out = torch.empty_strided((rows, kb), (1, rows), dtype=torch.float32, device=scale.device)
    if r == rows:
        return out.copy_(scale)
    out[r:] = 0
    out[:r] = scale
    return out


def _scaled_mm_operands(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, rows: int,
                        v2: bool = _V2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mat_a, mat_b, scale_a, scale_b) laid out as cuBLASLt wants them (module docstring): M padded to 16, K to 128
    and N to 128 (blocks) or 16 (tiles) with zeros; the scales already have one entry per partial tile or block.
    Operands already so are used as they are (no copy)."""
    M, K = a.shape
    N, kb = b.shape[0], _cdiv(K, BLOCK)
    n_align = BLOCK if rows > 1 else 16             # N's padding: blocks of 128, else tiles of 16
    Mp, Kp, Np = _cdiv(max(M, 1), 16) * 16, kb * BLOCK, _cdiv(N, n_align) * n_align
    mat_a, mat_b = _pad_fp8(a, Mp, Kp), _pad_fp8(b, Np, Kp)
    scale_a = _k_major(a_scale, Mp)                 # (Mp, kb), strides (1, Mp)
    if rows == 1:
        scale_b = _k_major(b_scale, Np)             # (Np, kb), strides (1, Np)
        scale_b = scale_b if v2 else scale_b.T      # v1 takes the (kb, Np) view itself
    elif v2:
        L4 = _cdiv(kb, 4) * 4
        if L4 == kb:
            scale_b = b_scale.contiguous().T        # (kb, N/128), strides (1, kb)
        else:
            scale_b = torch.zeros(b_scale.shape[0], L4, dtype=torch.float32, device=a.device)
            scale_b[:, :kb] = b_scale
            scale_b = scale_b.T  # (L4, N/128), strides (1, L4)
    else:
        if kb % 4:
            raise ValueError(f"this torch has no F.scaled_mm; torch._scaled_mm with 128x128 scales needs "
                             f"(K/128) % 4 == 0 (cuBLASLt's padded layout), got K={K}")
        scale_b = b_scale.contiguous().T  # (kb, N/128), strides (1, kb)
    return mat_a, mat_b.T, scale_a, scale_b


def fp8_gemm_scaled_mm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor,
                       out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """FP8 GEMM through torch's cuBLASLt block-scaled path (same contract as `fp8_gemm_reference`); CUDA sm_90
    only. Operands whose K or N cuBLASLt does not take (K % 128, N % 128 for block-scaled b, N % 16 for tiles) are
    zero-padded (an FP8 copy of the operand: cheap next to the GEMM) and the result sliced."""
    M, N, K, rows = _check(a, a_scale, b, b_scale, out_dtype, grouped=False)
    if not a.is_cuda:
        raise RuntimeError(f"fp8_gemm_scaled_mm runs cuBLASLt's block-scaled FP8 GEMM: it needs CUDA tensors on "
                           f"an sm_90 GPU, got device {a.device} (use fp8_gemm or fp8_gemm_reference)")
    cap = capability(a.device)
    if cap[0] != 9:
        raise RuntimeError(f"torch's DeepSeek-style (1x128 / 128x128) FP8 scaling runs only on sm_90, got sm_"
                           f"{cap[0]}{cap[1]} (use fp8_gemm_triton)")
    if M == 0 or N == 0:
        return torch.zeros(M, N, device=a.device, dtype=out_dtype)
    mat_a, mat_b, scale_a, scale_b = _scaled_mm_operands(a, a_scale, b, b_scale, rows)
    if _V2:
        st = F.ScalingType
        out = F.scaled_mm(mat_a, mat_b, scale_a, st.BlockWise1x128, scale_b,
                          st.BlockWise128x128 if rows > 1 else st.BlockWise1x128, output_dtype=out_dtype)
    else:
        out = torch._scaled_mm(mat_a, mat_b, scale_a, scale_b, out_dtype=out_dtype)
    return out[:M, :N]


# ----------------------------------------------------------------------------------------------------------------
# Dispatchers
# ----------------------------------------------------------------------------------------------------------------

_MODES = ("", "auto", "triton", "reference", "scaled_mm")


def _mode() -> str:
    mode = os.environ.get("DSV3_FP8_GEMM", "")
    if mode not in _MODES:
        raise ValueError(f"DSV3_FP8_GEMM must be one of {_MODES[1:]} (or unset), got {mode!r}")
    return mode


def _triton_usable(a: Tensor) -> bool:
    # a is e4m3, which use_triton's dtype rule does not cover: Triton's fp8 (fp8e4nv) dot needs a CUDA sm_89+ GPU
    return HAS_TRITON and a.is_cuda and capability(a.device) >= (8, 9)


def _scaled_mm_fits(a: Tensor, M: int, N: int, K: int, rows: int) -> bool:
    """cuBLASLt's block-scaled FP8 GEMM runs these operands (sm_90; any K and N, padded) and is the faster path:
    above GEMV_MAX_M rows. At M <= 16 (padded to 16 for cuBLASLt) the Triton kernel was 0.8-7.8x cuBLASLt on an
    H100 at lite and V3 widths, faster in 39 of 45 cases, within 2% in 4 more (RESULTS.md, fourteenth session)."""
    return a.is_cuda and capability(a.device)[0] == 9 and M > GEMV_MAX_M


def fp8_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Dispatcher: cuBLASLt where it fits on sm_90, else Triton on CUDA sm_89+ when triton imports, else the
    reference (module docstring; DSV3_FP8_GEMM overrides)."""
    mode = _mode()
    M, N, K, rows = _check(a, a_scale, b, b_scale, out_dtype, grouped=False)
    if mode == "scaled_mm" or (mode in ("", "auto") and _scaled_mm_fits(a, M, N, K, rows)):
        return fp8_gemm_scaled_mm(a, a_scale, b, b_scale, out_dtype)
    if mode == "triton" or (mode != "reference" and _triton_usable(a)):
        return fp8_gemm_triton(a, a_scale, b, b_scale, out_dtype)
    return fp8_gemm_reference(a, a_scale, b, b_scale, out_dtype)


def fp8_grouped_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, offs: Tensor,
                     out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Dispatcher: Triton on CUDA sm_89+ when triton imports, else the reference (DSV3_FP8_GEMM=reference forces
    the reference; scaled_mm has no grouped form here and means the default)."""
    mode = _mode()
    if mode == "triton" or (mode != "reference" and _triton_usable(a)):
        return fp8_grouped_gemm_triton(a, a_scale, b, b_scale, offs, out_dtype)
    return fp8_grouped_gemm_reference(a, a_scale, b, b_scale, offs, out_dtype)
