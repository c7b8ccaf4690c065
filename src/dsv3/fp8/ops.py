"""The FP8 training kernels as `torch.library` custom ops (namespace `dsv3`), for the autograd functions of
`dsv3.fp8.training`.

Why: inside `torch.compile`d blocks, dynamo cannot trace `F.scaled_mm` / `torch._scaled_mm_v2` (a graph break at
every FP8 GEMM: compiled FP8 blocks ran at 0.70x of compiled BF16, RESULTS.md issue 15), and inductor may re-lay
out the operands of the grouped GEMMs it sees (`torch._grouped_mm` with a contiguous token dimension asserts on the
device unless every group is a multiple of 16 bytes). A custom op is one opaque node with fixed input strides: no
graph break, no re-layout. Each op calls the dispatcher of `dsv3.kernels` (Triton, cuBLASLt or the reference, by
device) and has a fake (meta) implementation giving its output shapes.

The `*_weight` GEMMs take the high-precision weight itself and quantise it inside the op (or fetch its FP8 copy
from the step's `weight_cache`, dsv3.fp8.weight_cache), in the orientation the GEMM needs: `transposed=False` the
forward's W (N, K), `transposed=True` the input gradient's W^T (K, N), made from W in one pass by the transposing
quantisers. So backward needs only the weight (a parameter: no memory saved for it) and no FP8 weight copy is a
value of a compiled graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import fp8_quant as _quant
from ..kernels import fp8_rowwise as _rowwise
from ..kernels.fp8_gemm import fp8_gemm as _fp8_gemm
from ..kernels.fp8_gemm import fp8_grouped_gemm as _fp8_grouped_gemm
from .weight_cache import cached, scope_open

_E4M3 = torch.float8_e4m3fn
_B = _quant.BLOCK


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dense(*ts: Tensor):
    """Outputs contiguous, as the fake implementations say (inductor plans the graph with the fake strides)."""
    out = tuple(t.contiguous() for t in ts)
    return out if len(out) > 1 else out[0]


@torch.library.custom_op("dsv3::quantize_tiles", mutates_args=())
def quantize_tiles(x: Tensor) -> tuple[Tensor, Tensor]:
    """1x128 tiles along the last dim of x (M, K): q (M, K), scale (M, ceil(K/128))."""
    return _dense(*_quant.quantize_tiles(x))


@quantize_tiles.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    M, K = x.shape
    return x.new_empty(M, K, dtype=_E4M3), x.new_empty(M, _cdiv(K, _B), dtype=torch.float32)


@torch.library.custom_op("dsv3::quantize_tiles_transposed", mutates_args=())
def quantize_tiles_transposed(x: Tensor) -> tuple[Tensor, Tensor]:
    """quantize_tiles of x.T: q_t (K, M), scale_t (K, ceil(M/128))."""
    return _dense(*_quant.quantize_tiles_transposed(x))


@quantize_tiles_transposed.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    M, K = x.shape
    return x.new_empty(K, M, dtype=_E4M3), x.new_empty(K, _cdiv(M, _B), dtype=torch.float32)


@torch.library.custom_op("dsv3::quantize_rows", mutates_args=())
def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """One scale per row (last dim) of x (M, K) or (E, M, K), any strides: q contiguous, scale x.shape[:-1]."""
    return _dense(*_rowwise.quantize_rows(x))


@quantize_rows.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=_E4M3), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("dsv3::fp8_gemm", mutates_args=())
def fp8_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a (M, K) @ b (N, K)^T with 1x128 / 128x128 (or 1x128) scales: (M, N)."""
    return _dense(_fp8_gemm(a, a_scale, b, b_scale, out_dtype))


@fp8_gemm.register_fake
def _(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


@torch.library.custom_op("dsv3::grouped_weight_grad", mutates_args=())
def grouped_weight_grad(dy: Tensor, x: Tensor, offs: Tensor) -> Tensor:
    """dW[e] = dy[rows of e]^T @ x[rows of e] for dy (M, N), x (M, K) sorted by expert: (E, N, K), one
    torch._grouped_mm whose groups split the token dimension, with both operands row-major (see the module
    docstring: the layout inductor might otherwise choose makes CUTLASS assert)."""
    return torch._grouped_mm(dy.contiguous().t(), x.contiguous(), offs=offs)


@grouped_weight_grad.register_fake
def _(dy: Tensor, x: Tensor, offs: Tensor) -> Tensor:
    return dy.new_empty(offs.shape[0], dy.shape[1], x.shape[1])


# ---- GEMMs that take the weight (quantised here, or from the step's cache) -------------------------------------

def _blocks_of(w: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
    """128x128 blocks of W (N, K), or of W^T as a contiguous (K, N); inside a cache scope both from one read."""
    if transposed or scope_open():
        both = cached("blocks", w, _quant.quantize_blocks_both)
        return both[2:] if transposed else both[:2]
    return _quant.quantize_blocks(w)


def _stacked_blocks_both(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Blocks of each expert's W[e] (E, N, K) and of W[e]^T: one call on the (E*N, K) stack when N is a multiple of
    128 (no block straddles two experts), else one per expert; the transposes as contiguous copies."""
    E, N, K = w.shape
    if N % _B == 0:
        q, s = _quant.quantize_blocks(w.reshape(E * N, K))
        q, s = q.view(E, N, K), s.view(E, N // _B, -1)
    else:
        pairs = [_quant.quantize_blocks(we) for we in w]
        q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return q, s, q.transpose(1, 2).contiguous(), s.transpose(1, 2).contiguous()


def _stacked_blocks_of(w: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
    both = cached("stacked_blocks", w, _stacked_blocks_both)
    return both[2:] if transposed else both[:2]


def _rows_of(w: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
    """Row-wise scales of W (E, N, K) or of W^T (E, K, N) contiguous; inside a cache scope both from one pair of
    reads."""
    if scope_open():
        both = cached("rows", w, _rowwise.quantize_rows_both)
        return both[2:] if transposed else both[:2]
    return _rowwise.quantize_rows(w.transpose(-1, -2) if transposed else w)


def _out_features(w: Tensor, transposed: bool) -> int:
    return w.shape[-1] if transposed else w.shape[-2]


@torch.library.custom_op("dsv3::fp8_gemm_weight", mutates_args=())
def fp8_gemm_weight(a: Tensor, a_scale: Tensor, w: Tensor, out_dtype: torch.dtype, transposed: bool) -> Tensor:
    """a (M, K') in 1x128 tiles times W^T (forward, K' = K) or times W (transposed, K' = N), W (N, K) in 128x128
    blocks: (M, N) or (M, K)."""
    q, s = _blocks_of(w, transposed)
    return _dense(_fp8_gemm(a, a_scale, q, s, out_dtype))


@fp8_gemm_weight.register_fake
def _(a: Tensor, a_scale: Tensor, w: Tensor, out_dtype: torch.dtype, transposed: bool) -> Tensor:
    return a.new_empty(a.shape[0], _out_features(w, transposed), dtype=out_dtype)


@torch.library.custom_op("dsv3::fp8_grouped_gemm_weight", mutates_args=())
def fp8_grouped_gemm_weight(a: Tensor, a_scale: Tensor, w: Tensor, offs: Tensor, out_dtype: torch.dtype,
                            transposed: bool) -> Tensor:
    """The block-scaled grouped GEMM with W (E, N, K): rows of group e times W[e]^T, or times W[e] (transposed)."""
    q, s = _stacked_blocks_of(w, transposed)
    return _dense(_fp8_grouped_gemm(a, a_scale, q, s, offs, out_dtype))


@fp8_grouped_gemm_weight.register_fake
def _(a: Tensor, a_scale: Tensor, w: Tensor, offs: Tensor, out_dtype: torch.dtype, transposed: bool) -> Tensor:
    return a.new_empty(a.shape[0], _out_features(w, transposed), dtype=out_dtype)


@torch.library.custom_op("dsv3::fp8_grouped_gemm_rowwise_weight", mutates_args=())
def fp8_grouped_gemm_rowwise_weight(a: Tensor, a_scale: Tensor, w: Tensor, offs: Tensor, out_dtype: torch.dtype,
                                    transposed: bool) -> Tensor:
    """The row-wise scaled grouped GEMM with W (E, N, K): a (M,) scales; W's rows, or W^T's (one scale per column
    of W) for the input gradient."""
    q, s = _rows_of(w, transposed)
    return _dense(_rowwise.fp8_grouped_gemm_rowwise(a, a_scale, q, s, offs, out_dtype))


@fp8_grouped_gemm_rowwise_weight.register_fake
def _(a: Tensor, a_scale: Tensor, w: Tensor, offs: Tensor, out_dtype: torch.dtype, transposed: bool) -> Tensor:
    return a.new_empty(a.shape[0], _out_features(w, transposed), dtype=out_dtype)
