"""The FP8 training kernels as `torch.library` custom ops (namespace `dsv3`), for the autograd functions of
`dsv3.fp8.training`.

Why: inside `torch.compile`d blocks, dynamo cannot trace `F.scaled_mm` / `torch._scaled_mm_v2` (a graph break at
every FP8 GEMM: compiled FP8 blocks ran at 0.70x of compiled BF16, RESULTS.md issue 15), and inductor may re-lay
out the operands of the grouped GEMMs it sees (`torch._grouped_mm` with a contiguous token dimension asserts on the
device unless every group is a multiple of 16 bytes). A custom op is one opaque node with fixed input strides: no
graph break, no re-layout. Each op calls the dispatcher of `dsv3.kernels` (Triton, cuBLASLt or the reference, by
device) and has a fake (meta) implementation giving its output shapes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import fp8_grouped_wgrad as _wgrad
from ..kernels import fp8_quant as _quant
from ..kernels import fp8_rowwise as _rowwise
from ..kernels.fp8_gemm import fp8_gemm as _fp8_gemm
from ..kernels.fp8_gemm import fp8_grouped_gemm as _fp8_grouped_gemm

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


@torch.library.custom_op("dsv3::quantize_blocks", mutates_args=())
def quantize_blocks(w: Tensor) -> tuple[Tensor, Tensor]:
    """128x128 blocks of w (N, K): q (N, K), scale (ceil(N/128), ceil(K/128))."""
    return _dense(*_quant.quantize_blocks(w))


@quantize_blocks.register_fake
def _(w: Tensor) -> tuple[Tensor, Tensor]:
    N, K = w.shape
    return w.new_empty(N, K, dtype=_E4M3), w.new_empty(_cdiv(N, _B), _cdiv(K, _B), dtype=torch.float32)


@torch.library.custom_op("dsv3::quantize_rows", mutates_args=())
def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """One scale per row (last dim) of x (M, K) or (E, M, K), any strides: q contiguous, scale x.shape[:-1]."""
    return _dense(*_rowwise.quantize_rows(x))


@quantize_rows.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=_E4M3), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("dsv3::quantize_cols_grouped", mutates_args=())
def quantize_cols_grouped(x: Tensor, offs: Tensor, row_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per expert group and column of x (M, K) (or of E4M3 codes times their row_scale), transposed into the padded
    token layout: q_t (K, M_pad), scale (E, K) (kernels.fp8_grouped_wgrad)."""
    return _dense(*_wgrad.quantize_cols_grouped(x, offs, row_scale))


@quantize_cols_grouped.register_fake
def _(x: Tensor, offs: Tensor, row_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    (M, K), E = x.shape, offs.shape[0]
    return (x.new_empty(K, _wgrad.padded_tokens(M, E), dtype=_E4M3), x.new_empty(E, K, dtype=torch.float32))


@torch.library.custom_op("dsv3::fp8_grouped_wgrad_rowwise", mutates_args=())
def fp8_grouped_wgrad_rowwise(a_t: Tensor, a_scale: Tensor, b_t: Tensor, b_scale: Tensor, offs: Tensor,
                              out_dtype: torch.dtype) -> Tensor:
    """dW[e] = dY_e^T X_e from quantize_cols_grouped of dY (a) and X (b): (E, N, K)."""
    return _dense(_wgrad.fp8_grouped_wgrad_rowwise(a_t, a_scale, b_t, b_scale, offs, out_dtype))


@fp8_grouped_wgrad_rowwise.register_fake
def _(a_t: Tensor, a_scale: Tensor, b_t: Tensor, b_scale: Tensor, offs: Tensor, out_dtype: torch.dtype) -> Tensor:
    return a_t.new_empty(offs.shape[0], a_t.shape[0], b_t.shape[0], dtype=out_dtype)


@torch.library.custom_op("dsv3::fp8_gemm", mutates_args=())
def fp8_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a (M, K) @ b (N, K)^T with 1x128 / 128x128 (or 1x128) scales: (M, N)."""
    return _dense(_fp8_gemm(a, a_scale, b, b_scale, out_dtype))


@fp8_gemm.register_fake
def _(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


@torch.library.custom_op("dsv3::fp8_grouped_gemm", mutates_args=())
def fp8_grouped_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, offs: Tensor,
                     out_dtype: torch.dtype) -> Tensor:
    """Block-scaled grouped GEMM: a (M, K) rows sorted by group, b (E, N, K): (M, N)."""
    return _dense(_fp8_grouped_gemm(a, a_scale, b, b_scale, offs, out_dtype))


@fp8_grouped_gemm.register_fake
def _(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, offs: Tensor, out_dtype: torch.dtype) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


@torch.library.custom_op("dsv3::fp8_grouped_gemm_rowwise", mutates_args=())
def fp8_grouped_gemm_rowwise(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, offs: Tensor,
                             out_dtype: torch.dtype) -> Tensor:
    """Row-wise scaled grouped GEMM: a (M, K), b (E, N, K), scales (M,) and (E, N): (M, N)."""
    return _dense(_rowwise.fp8_grouped_gemm_rowwise(a, a_scale, b, b_scale, offs, out_dtype))


@fp8_grouped_gemm_rowwise.register_fake
def _(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, offs: Tensor, out_dtype: torch.dtype) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


@torch.library.custom_op("dsv3::grouped_weight_grad", mutates_args=())
def grouped_weight_grad(dy: Tensor, x: Tensor, offs: Tensor) -> Tensor:
    """dW[e] = dy[rows of e]^T @ x[rows of e] for dy (M, N), x (M, K) sorted by expert: (E, N, K), one
    torch._grouped_mm whose groups split the token dimension, with both operands row-major (see the module
    docstring: the layout inductor might otherwise choose makes CUTLASS assert)."""
    return torch._grouped_mm(dy.contiguous().t(), x.contiguous(), offs=offs)


@grouped_weight_grad.register_fake
def _(dy: Tensor, x: Tensor, offs: Tensor) -> Tensor:
    return dy.new_empty(offs.shape[0], dy.shape[1], x.shape[1])
