"""The inference kernels a compiled decode step calls, as `torch.library` custom ops (namespace `dsv3`).

Why: `torch.compile` of the decode layers (dsv3.infer.runner, `EngineConfig.compile_decode`) must see each Triton
kernel as one opaque node with a known output shape: dynamo then neither traces the launch code (device queries,
configuration dicts, environment switches) nor splits the graph there, and inductor keeps the operands as they
are. Each op calls its dispatcher (Triton on the GPU, the PyTorch reference elsewhere); its fake implementation
gives the output's shape and dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fp8_weight_gemm import fp8_grouped_linear as _fp8_grouped_linear
from .fp8_weight_gemm import fp8_linear as _fp8_linear
from .moe_decode import moe_decode as _moe_decode

__all__ = ["fp8_grouped_linear", "fp8_linear", "moe_decode"]


@torch.library.custom_op("dsv3::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, weight: Tensor, scale_inv: Tensor) -> Tensor:
    """x (M, K) @ dequant(weight (N, K) e4m3, scale_inv).T -> (M, N) in x's dtype (dsv3.kernels.fp8_weight_gemm)."""
    return _fp8_linear(x, weight, scale_inv).contiguous()


@fp8_linear.register_fake
def _(x: Tensor, weight: Tensor, scale_inv: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("dsv3::fp8_grouped_linear", mutates_args=())
def fp8_grouped_linear(x: Tensor, weight: Tensor, scale_inv: Tensor, offs: Tensor) -> Tensor:
    """Grouped weight-only FP8 linear over expert-sorted rows -> (M, N) in x's dtype."""
    return _fp8_grouped_linear(x, weight, scale_inv, offs).contiguous()


@fp8_grouped_linear.register_fake
def _(x: Tensor, weight: Tensor, scale_inv: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("dsv3::moe_decode", mutates_args=())
def moe_decode(x: Tensor, weights: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor,
               gate_scale: Tensor | None = None, up_scale: Tensor | None = None,
               down_scale: Tensor | None = None) -> Tensor:
    """The fused MoE of decode-sized batches (dsv3.kernels.moe_decode) -> (T, D) in x's dtype."""
    return _moe_decode(x, weights, idx, gate_proj, up_proj, down_proj, gate_scale, up_scale, down_scale).contiguous()


@moe_decode.register_fake
def _(x: Tensor, weights: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor,
      gate_scale: Tensor | None = None, up_scale: Tensor | None = None, down_scale: Tensor | None = None) -> Tensor:
    return x.new_empty(x.shape)
