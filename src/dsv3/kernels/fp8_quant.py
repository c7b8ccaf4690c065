"""FP8 (e4m3) quantisation for DeepSeek-V3's FP8 training recipe: PyTorch references and Triton kernels.

Activations get one scale per 1x128 tile (a row's 128 consecutive elements along the last dim), weights one per
128x128 block. Each scale comes from the tile's max-abs and is the DEQUANTISATION multiplier (like the checkpoint's
`weight_scale_inv`):

    scale = max(amax, EPS) / 448                           EPS = 1e-4 (DeepSeek's kernels clamp amax there)
    scale = 2 ** ceil(log2(max(amax, EPS) / 448))          with pow2=True (exact in the exponent, >= the plain one)
    q     = (x / scale).clamp(-448, 448).to(float8_e4m3fn),  so  x ~= float(q) * scale

All math is fp32 (x is widened first, exactly). The pow2 rounding is done on the fp32 bits (add 0x7FFFFF, clear the
mantissa: the next power of two for any positive normal float), not through log2, whose rounding could land just
below a power of two and make the scale too small. Both divisions (amax / 448 and x / scale) are the correctly
rounded IEEE ones in both implementations: `tl.math.div_rn` in Triton (its plain `/` is approximate on the GPU),
tensor / tensor in the reference (torch's CUDA `t / python_float` multiplies by the reciprocal instead), so they
agree bit for bit on every device.

  quantize_tiles(x (M, K))            -> q (M, K), scale (M, ceil(K/128))              forward activations
  quantize_tiles_transposed(x (M, K)) -> q_t (K, M), scale_t (K, ceil(M/128))          = quantize_tiles(x.T)
  quantize_blocks(w (N, K))           -> q (N, K), scale (ceil(N/128), ceil(K/128))    weights
  quantize_blocks_both(w (N, K))      -> q, scale, q.T (K, N), scale.T                  both GEMMs' weight operands

The transposed variant serves the weight gradient dW = dY^T X, whose reduction runs over tokens: dY and X are
scaled per 128 tokens of one column and stored K-major, in one pass (x.T is never materialised in high precision).
Weights need no transposed variant: the blocks are square, so quantize_blocks(w.T) is exactly (q.T, scale.T).
Edge tiles and blocks (K, M or N not multiples of 128) are partial: their scales come from the elements present.

`*_triton` kernels: fp32 in registers, masked edges (loaded as 0, which leaves amax alone), RTNE e4m3 cast after
the clamp (so it does not matter whether the hardware cast saturates):
  tiles:      grid (cdiv(M, 32), cdiv(K, 128)); a program loads 32 rows x one 128-column tile, row-wise amax.
  transposed: grid (cdiv(K, 64), cdiv(M, 128)); a program loads 128 tokens x 64 columns, amax over the tokens per
              column, and stores the tile transposed (q_t rows are columns of x) with its 64 scales; column
              tiles vary fastest, so neighbouring programs read adjacent pieces of the same 128 rows.
  blocks:     grid (cdiv(N, 128), cdiv(K, 128)); one program per 128x128 block, amax over the block (in one
              pass, or two over row chunks); quantize_blocks_both adds q.T as an FP8 transpose of the codes.
NaN and inf follow the reference: the amax reductions propagate NaN (a NaN scale, as torch's amax gives; with pow2
too: the bit rounding would turn NaN into -0.0, so NaN is kept), the clamp keeps NaN and saturates +-inf.

Dispatchers (`quantize_tiles`, ...): Triton on CUDA sm_89+ when triton imports, else the reference;
DSV3_FP8_QUANT=reference forces the reference. `dequantize_tiles` / `dequantize_blocks` are reference helpers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_setup import BLOCK, FP8_MAX, HAS_TRITON, need_triton, tl, triton, use_triton

__all__ = ["BLOCK", "EPS", "FP8_MAX", "HAS_TRITON", "dequantize_blocks", "dequantize_tiles", "quantize_blocks",
           "quantize_blocks_both", "quantize_blocks_both_reference", "quantize_blocks_reference",
           "quantize_blocks_triton", "quantize_tiles", "quantize_tiles_reference", "quantize_tiles_transposed",
           "quantize_tiles_transposed_reference", "quantize_tiles_transposed_triton", "quantize_tiles_triton"]

TILE = BLOCK  # tile length and block side
EPS = 1e-4  # amax floor: an all-zero tile gets a finite, tiny scale
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the Triton kernels'
_REF_DTYPES = _DTYPES + (torch.float64,)                     # the references' (fp64 rounds to fp32 first)
_E4M3 = torch.float8_e4m3fn


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_x(x: Tensor, name: str = "x", dtypes: tuple = _DTYPES) -> tuple[int, int]:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in dtypes:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor of dtype in {dtypes}, got shape {shape} "
                         f"dtype {getattr(x, 'dtype', None)}")
    return x.shape[0], x.shape[1]


def _check_q_scale(q: Tensor, scale: Tensor, expected: tuple[int, int], what: str) -> None:
    if tuple(scale.shape) != expected or scale.dtype != torch.float32:
        raise ValueError(f"scale must be a float32 tensor of shape {expected} ({what} of q {tuple(q.shape)}), got "
                         f"shape {tuple(scale.shape)} dtype {scale.dtype}")
    if q.device != scale.device:
        raise ValueError(f"devices differ: q {q.device}, scale {scale.device}")


def _check_q(q: Tensor) -> tuple[int, int]:
    if q.dim() != 2 or q.dtype != _E4M3:
        raise ValueError(f"q must be a 2-D float8_e4m3fn tensor, got shape {tuple(q.shape)} dtype {q.dtype}")
    return q.shape[0], q.shape[1]


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def _scales(amax: Tensor, pow2: bool) -> Tensor:
    # Divide by a tensor, not the Python float: on CUDA torch computes `t / scalar` as t * (1 / scalar), which is
    # off by one ulp for some amax; tensor / tensor is the correctly rounded division (Triton's div_rn) everywhere.
    s = amax.clamp_min(EPS) / torch.full((), FP8_MAX, dtype=amax.dtype, device=amax.device)
    if pow2:  # a NaN scale stays NaN: its bits + 0x7FFFFF wrap past the sign bit and the clear would give -0.0
        s = torch.where(s.isnan(), s, ((s.view(torch.int32) + 0x7FFFFF) & -0x800000).view(torch.float32))
    return s


def quantize_tiles_reference(x: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """1x128-tile e4m3 quantisation of x (M, K): q (M, K) float8_e4m3fn, scale (M, ceil(K/128)) fp32."""
    M, K = _check_x(x, dtypes=_REF_DTYPES)
    nt = _cdiv(K, TILE)
    xf = torch.nn.functional.pad(x.float(), (0, nt * TILE - K)).view(M, nt, TILE)  # zeros leave amax unchanged
    scale = _scales(xf.abs().amax(dim=-1), pow2)
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX)  # clamp explicitly: GPU casts need not saturate
    return q.view(M, nt * TILE)[:, :K].to(_E4M3).contiguous(), scale.contiguous()


def quantize_tiles_transposed_reference(x: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """quantize_tiles of x.T: q_t (K, M) float8_e4m3fn contiguous, scale_t (K, ceil(M/128)) fp32."""
    _check_x(x, dtypes=_REF_DTYPES)
    return quantize_tiles_reference(x.t().contiguous(), pow2)


def quantize_blocks_reference(w: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """128x128-block e4m3 quantisation of w (N, K): q (N, K), scale (ceil(N/128), ceil(K/128)) fp32.
    quantize_blocks(w.T) is (q.T, scale.T): no transposed variant needed."""
    N, K = _check_x(w, "w", _REF_DTYPES)
    nr, nc = _cdiv(N, TILE), _cdiv(K, TILE)
    wf = torch.nn.functional.pad(w.float(), (0, nc * TILE - K, 0, nr * TILE - N)).view(nr, TILE, nc, TILE)
    scale = _scales(wf.abs().amax(dim=(1, 3)), pow2)
    q = (wf / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    return q.view(nr * TILE, nc * TILE)[:N, :K].to(_E4M3).contiguous(), scale.contiguous()


def quantize_blocks_both_reference(w: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """quantize_blocks of w and of w.T: (q, scale, q.T contiguous, scale.T contiguous) (the blocks are square)."""
    q, scale = quantize_blocks_reference(w, pow2)
    return q, scale, q.t().contiguous(), scale.t().contiguous()


def _times(q: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    compute = torch.promote_types(dtype, torch.float32)  # an e4m3 value times an fp32 scale: one rounding in fp32
    return (q.to(compute) * s.to(compute)).to(dtype)


def dequantize_tiles(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """float(q (M, K)) * scale (M, ceil(K/128)) per 1x128 tile, (M, K) in dtype (the product rounded once in fp32,
    exact in fp64, then cast)."""
    M, K = _check_q(q)
    _check_q_scale(q, scale, (M, _cdiv(K, TILE)), "one per 1x128 tile")
    return _times(q, scale.repeat_interleave(TILE, 1)[:, :K], dtype)


def dequantize_blocks(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """float(q (N, K)) * scale (ceil(N/128), ceil(K/128)) per 128x128 block, (N, K) in dtype; with the checkpoint's
    `weight_scale_inv` as scale, the released format's dequantisation (spec 2.3)."""
    N, K = _check_q(q)
    _check_q_scale(q, scale, (_cdiv(N, TILE), _cdiv(K, TILE)), "one per 128x128 block")
    return _times(q, scale.repeat_interleave(TILE, 0)[:N].repeat_interleave(TILE, 1)[:, :K], dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------------

# launch shapes (benchmarks/fp8_quant_sweep.py sweeps the alternatives on the GPU)
_BLOCK_M = 32         # rows per program in the tile kernel
_BLOCK_K = 64         # columns per program in the transposed kernel
_TILES_T_WARPS = 4
_BLOCKS_CHUNK = 128   # rows per pass in the block kernel (128: the block in registers at once)

if HAS_TRITON:
    _EPS_C = tl.constexpr(EPS)
    _MAX_C = tl.constexpr(FP8_MAX)

    @triton.jit
    def _scale_of(amax, POW2: tl.constexpr):
        s = tl.math.div_rn(tl.maximum(amax, _EPS_C, propagate_nan=tl.PropagateNan.ALL), _MAX_C)
        if POW2:  # NaN stays NaN (as in `_scales`: its rounded bits would be -0.0)
            s = tl.where(s != s, s,  # noqa: PLR0124 - the NaN test
                         ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & -0x800000).to(tl.float32, bitcast=True))
        return s

    @triton.jit
    def _max_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _absmax(x, axis):
        """max |x| along axis, NaN if any element is NaN (torch's amax; the plain tl.max would skip NaNs)."""
        return tl.reduce(tl.abs(x), axis, _max_nan)

    @triton.jit
    def _quant(x, s):
        # NaN stays NaN (torch's clamp); +-inf saturate to +-448 as the reference's clamp does
        return tl.clamp(tl.math.div_rn(x, s), -_MAX_C, _MAX_C, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _tiles_kernel(X, Q, S, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                      BLOCK_M: tl.constexpr, TILE_K: tl.constexpr, POW2: tl.constexpr):
        t = tl.program_id(1)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = t * TILE_K + tl.arange(0, TILE_K)
        mask_m = offs_m < M
        mask = mask_m[:, None] & (offs_k < K)[None, :]
        rows, cols = offs_m.to(tl.int64), offs_k.to(tl.int64)  # strided views can pass M*K > 2^31 offsets
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        s = _scale_of(_absmax(x, 1), POW2)
        q = _quant(x, s[:, None])
        tl.store(Q + rows[:, None] * stride_qm + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
        tl.store(S + rows * stride_sm + t, s, mask=mask_m)

    @triton.jit
    def _tiles_t_kernel(X, QT, ST, M, K, stride_xm, stride_xk, stride_qk, stride_sk,
                        BLOCK_K: tl.constexpr, TILE_M: tl.constexpr, POW2: tl.constexpr):
        t = tl.program_id(1)
        offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_m = t * TILE_M + tl.arange(0, TILE_M)
        mask_k = offs_k < K
        mask_m = offs_m < M
        rows, cols = offs_m.to(tl.int64), offs_k.to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        s = _scale_of(_absmax(x, 0), POW2)  # per column, over this tile's 128 tokens
        q = tl.trans(_quant(x, s[None, :]))  # (BLOCK_K, TILE_M): rows of q_t are columns of x
        tl.store(QT + cols[:, None] * stride_qk + rows[None, :], q.to(QT.dtype.element_ty),
                 mask=mask_k[:, None] & mask_m[None, :])
        tl.store(ST + cols * stride_sk + t, s, mask=mask_k)

    @triton.jit
    def _blocks_kernel(W, Q, S, N, K, stride_wn, stride_wk, stride_qn, stride_sn,
                       TILE_B: tl.constexpr, CHUNK: tl.constexpr, POW2: tl.constexpr):
        # CHUNK == TILE_B: the whole block in registers, one read. CHUNK < TILE_B: two passes over row chunks
        # (amax, then the cast, whose re-read is served from L1/L2): fewer registers, more programs resident.
        bn, bk = tl.program_id(0), tl.program_id(1)
        cols = (bk * TILE_B + tl.arange(0, TILE_B)).to(tl.int64)
        mask_k = cols < K
        if CHUNK == TILE_B:
            rows = (bn * TILE_B + tl.arange(0, TILE_B)).to(tl.int64)
            mask = (rows < N)[:, None] & mask_k[None, :]
            w = tl.load(W + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0.0)
            w = w.to(tl.float32)
            s = _scale_of(_absmax(_absmax(w, 1), 0), POW2)
            q = _quant(w, s)
            tl.store(Q + rows[:, None] * stride_qn + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
        else:
            amax = tl.zeros((TILE_B,), dtype=tl.float32)
            for r0 in range(0, TILE_B, CHUNK):
                rows = (bn * TILE_B + r0 + tl.arange(0, CHUNK)).to(tl.int64)
                mask = (rows < N)[:, None] & mask_k[None, :]
                w = tl.load(W + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0.0)
                amax = _max_nan(amax, _absmax(w.to(tl.float32), 0))
            s = _scale_of(_absmax(amax, 0), POW2)
            for r0 in range(0, TILE_B, CHUNK):
                rows = (bn * TILE_B + r0 + tl.arange(0, CHUNK)).to(tl.int64)
                mask = (rows < N)[:, None] & mask_k[None, :]
                w = tl.load(W + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0.0)
                q = _quant(w.to(tl.float32), s)
                tl.store(Q + rows[:, None] * stride_qn + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
        tl.store(S + bn * stride_sn + bk, s)


def quantize_tiles_triton(x: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """1x128-tile quantisation through Triton (same contract as `quantize_tiles_reference`)."""
    need_triton("quantize_tiles_triton")
    M, K = _check_x(x)
    q = torch.empty(M, K, device=x.device, dtype=_E4M3)
    scale = torch.empty(M, _cdiv(K, TILE), device=x.device, dtype=torch.float32)
    if M and K:
        _tiles_kernel[(triton.cdiv(M, _BLOCK_M), triton.cdiv(K, TILE))](
            x, q, scale, M, K, x.stride(0), x.stride(1), q.stride(0), scale.stride(0),
            BLOCK_M=_BLOCK_M, TILE_K=TILE, POW2=bool(pow2), num_warps=4)
    return q, scale


def quantize_tiles_transposed_triton(x: Tensor, pow2: bool = False, block_k: int | None = None,
                                     num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """quantize_tiles of x.T in one pass through Triton (same contract as `quantize_tiles_transposed_reference`).
    A program loads 128 tokens x block_k columns (each row segment contiguous), takes the per-column amax over the
    tokens and stores the cast tile transposed (tl.trans through shared memory), so reads and writes are both
    coalesced; block_k / num_warps override the launch shape (benchmarks/fp8_quant_sweep.py)."""
    need_triton("quantize_tiles_transposed_triton")
    M, K = _check_x(x)
    q_t = torch.empty(K, M, device=x.device, dtype=_E4M3)
    scale_t = torch.empty(K, _cdiv(M, TILE), device=x.device, dtype=torch.float32)
    bk = block_k or _BLOCK_K
    if M and K:
        _tiles_t_kernel[(triton.cdiv(K, bk), triton.cdiv(M, TILE))](
            x, q_t, scale_t, M, K, x.stride(0), x.stride(1), q_t.stride(0), scale_t.stride(0),
            BLOCK_K=bk, TILE_M=TILE, POW2=bool(pow2), num_warps=num_warps or _TILES_T_WARPS)
    return q_t, scale_t


def quantize_blocks_triton(w: Tensor, pow2: bool = False, chunk: int | None = None,
                           num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """128x128-block quantisation through Triton (same contract as `quantize_blocks_reference`). chunk (rows per
    pass, 128 = one pass) and num_warps override the launch shape (benchmarks/fp8_quant_sweep.py)."""
    need_triton("quantize_blocks_triton")
    N, K = _check_x(w, "w")
    q = torch.empty(N, K, device=w.device, dtype=_E4M3)
    scale = torch.empty(_cdiv(N, TILE), _cdiv(K, TILE), device=w.device, dtype=torch.float32)
    chunk = chunk or _BLOCKS_CHUNK
    if chunk not in (16, 32, 64, 128):
        raise ValueError(f"chunk must be 16, 32, 64 or 128 rows, got {chunk}")
    if N and K:
        _blocks_kernel[(triton.cdiv(N, TILE), triton.cdiv(K, TILE))](
            w, q, scale, N, K, w.stride(0), w.stride(1), q.stride(0), scale.stride(0),
            TILE_B=TILE, CHUNK=chunk, POW2=bool(pow2), num_warps=num_warps or (8 if chunk == TILE else 4))
    return q, scale


def _use_triton(x: Tensor) -> bool:
    return use_triton(x, "DSV3_FP8_QUANT", fp8=True)  # Triton converts to e4m3 (fp8e4nv) only on sm_89+


def quantize_tiles(x: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """Dispatcher: Triton for CUDA tensors on sm_89+ when triton imports, else the PyTorch reference."""
    if _use_triton(x):
        return quantize_tiles_triton(x, pow2)
    return quantize_tiles_reference(x, pow2)


def quantize_tiles_transposed(x: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """Dispatcher: Triton for CUDA tensors on sm_89+ when triton imports, else the PyTorch reference."""
    if _use_triton(x):
        return quantize_tiles_transposed_triton(x, pow2)
    return quantize_tiles_transposed_reference(x, pow2)


def quantize_blocks(w: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """Dispatcher: Triton for CUDA tensors on sm_89+ when triton imports, else the PyTorch reference."""
    if _use_triton(w):
        return quantize_blocks_triton(w, pow2)
    return quantize_blocks_reference(w, pow2)


def quantize_blocks_both(w: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both orientations of the weight's blocks, (q, scale, q.T, scale.T): the forward and input-gradient GEMMs'
    operands."""
    # A 128x128 block's scale does not depend on the orientation, so q.T is the transposed codes (an FP8 copy, a
    # quarter of a bf16 read). A kernel storing both orientations from one read put q.T values in the wrong place
    # for fp32 inputs on the H200 (RESULTS.md, issue 15); this form is exact by construction.
    q, scale = quantize_blocks(w, pow2)
    return q, scale, q.t().contiguous(), scale.t().contiguous()
