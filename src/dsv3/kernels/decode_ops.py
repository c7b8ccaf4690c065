"""The inference kernels a compiled decode step calls, as `torch.library` custom ops (namespace `dsv3`).

Why: `torch.compile` of the decode layers (dsv3.infer.runner, `EngineConfig.compile_decode`) must see each Triton
kernel as one opaque node with a known output shape: dynamo then neither traces the launch code (device queries,
configuration dicts, environment switches) nor splits the graph there, and inductor keeps the operands as they
are. Each op calls its dispatcher (Triton on the GPU, the PyTorch reference elsewhere); its fake implementation
gives the output's shape and dtype. `moe_decode` is a function around two ops: the reference, or on the Triton path
the pair sort (one Triton launch, dsv3.kernels.moe_route) and the GEMM stages, with the combine left to the
compiler.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fp8_weight_gemm import fp8_grouped_linear as _fp8_grouped_linear
from .fp8_weight_gemm import fp8_linear as _fp8_linear
from .gemv import gate_logits as _gate_logits
from .gemv import gemv as _gemv
from .moe_decode import moe_decode_reference, moe_decode_sorted_triton, moe_decode_triton
from .moe_rows import moe_decode_rows_triton
from .moe_route import MOE_ROUTE_MAX_EXPERTS, sort_pairs_triton
from .moe_route import moe_route as _moe_route
from .triton_setup import use_triton

__all__ = ["fp8_grouped_linear", "fp8_linear", "gate_logits", "gemv", "moe_decode", "moe_route"]


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


@torch.library.custom_op("dsv3::gemv", mutates_args=())
def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x (M, K) @ weight (N, K).T -> (M, N): the GEMV for one row, the tiled kernel for 2..64 (dsv3.kernels.gemv)."""
    return _gemv(x, weight).contiguous()


@gemv.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("dsv3::gate_logits", mutates_args=())
def gate_logits(x: Tensor, weight: Tensor) -> Tensor:
    """The router's logits (M, E) in fp32 (x's dtype where wider) of x (M, K) and the gate weight (E, K)
    (dsv3.kernels.gemv.gate_logits)."""
    return _gate_logits(x, weight).contiguous()


@gate_logits.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))


@torch.library.custom_op("dsv3::moe_route", mutates_args=())
def moe_route(logits: Tensor, bias: Tensor, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
              route_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gate logits (T, E) -> routed weights (T, K), expert ids (T, K) int64, load counts (E,) int32
    (dsv3.kernels.moe_route: one Triton launch on the GPU instead of ~15 small kernels)."""
    return tuple(t.contiguous() for t in _moe_route(logits, bias, top_k, n_group, topk_group, norm_topk_prob,
                                                     route_scale))


@moe_route.register_fake
def _(logits: Tensor, bias: Tensor, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
      route_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    T, E = logits.shape
    return (logits.new_empty(T, top_k), logits.new_empty(T, top_k, dtype=torch.int64),
            logits.new_empty(E, dtype=torch.int32))


@torch.library.custom_op("dsv3::moe_decode_reference", mutates_args=())
def _moe_decode_reference(x: Tensor, weights: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor,
                          down_proj: Tensor, gate_scale: Tensor | None = None, up_scale: Tensor | None = None,
                          down_scale: Tensor | None = None, shared_gate: Tensor | None = None,
                          shared_up: Tensor | None = None, shared_down: Tensor | None = None,
                          shared_gate_scale: Tensor | None = None, shared_up_scale: Tensor | None = None,
                          shared_down_scale: Tensor | None = None) -> Tensor:
    """The fused MoE's PyTorch reference (host syncs: opaque to the compiler) -> (T, D) in x's dtype; the shared
    experts included when their tensors are given."""
    return moe_decode_reference(x, weights, idx, gate_proj, up_proj, down_proj, gate_scale, up_scale, down_scale,
                                shared_gate, shared_up, shared_down, shared_gate_scale, shared_up_scale,
                                shared_down_scale).contiguous()


@_moe_decode_reference.register_fake
def _(x: Tensor, weights: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor,
      gate_scale: Tensor | None = None, up_scale: Tensor | None = None, down_scale: Tensor | None = None,
      shared_gate: Tensor | None = None, shared_up: Tensor | None = None, shared_down: Tensor | None = None,
      shared_gate_scale: Tensor | None = None, shared_up_scale: Tensor | None = None,
      shared_down_scale: Tensor | None = None) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("dsv3::moe_decode_sorted", mutates_args=())
def _moe_decode_sorted(x: Tensor, tw: Tensor, pairs: Tensor, offs: Tensor, tile_e: Tensor, tile_row: Tensor,
                       gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor, gate_scale: Tensor | None,
                       up_scale: Tensor | None, down_scale: Tensor | None, block_m: int) -> Tensor:
    """The fused MoE's two Triton GEMM stages on sorted pairs -> (T*K, D) fp32 weighted rows (kernels.moe_decode)."""
    return moe_decode_sorted_triton(x, tw, pairs, offs, tile_e, tile_row, gate_proj, up_proj, down_proj,
                                    gate_scale, up_scale, down_scale, block_m=block_m)


@_moe_decode_sorted.register_fake
def _(x: Tensor, tw: Tensor, pairs: Tensor, offs: Tensor, tile_e: Tensor, tile_row: Tensor, gate_proj: Tensor,
      up_proj: Tensor, down_proj: Tensor, gate_scale: Tensor | None, up_scale: Tensor | None,
      down_scale: Tensor | None, block_m: int) -> Tensor:
    return x.new_empty(tw.numel(), x.shape[1], dtype=torch.float32)


@torch.library.custom_op("dsv3::moe_decode_rows", mutates_args=())
def _moe_decode_rows(x: Tensor, tw: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor,
                     gate_scale: Tensor | None, up_scale: Tensor | None, down_scale: Tensor | None,
                     shared_gate: Tensor | None = None, shared_up: Tensor | None = None,
                     shared_down: Tensor | None = None, shared_gate_scale: Tensor | None = None,
                     shared_up_scale: Tensor | None = None, shared_down_scale: Tensor | None = None) -> Tensor:
    """The fused MoE's GEMV form of its two stages at batch 1 -> (T*K, D) fp32 weighted rows (kernels.moe_rows);
    with the shared experts' tensors (T*(K+1), D): each token's shared row after its K routed ones."""
    return moe_decode_rows_triton(x, tw, idx, gate_proj, up_proj, down_proj, gate_scale, up_scale, down_scale,
                                  shared_gate, shared_up, shared_down, shared_gate_scale, shared_up_scale,
                                  shared_down_scale)


@_moe_decode_rows.register_fake
def _(x: Tensor, tw: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor,
      gate_scale: Tensor | None, up_scale: Tensor | None, down_scale: Tensor | None,
      shared_gate: Tensor | None = None, shared_up: Tensor | None = None, shared_down: Tensor | None = None,
      shared_gate_scale: Tensor | None = None, shared_up_scale: Tensor | None = None,
      shared_down_scale: Tensor | None = None) -> Tensor:
    pairs = tw.numel() + (tw.shape[0] if shared_gate is not None else 0)
    return x.new_empty(pairs, x.shape[1], dtype=torch.float32)


@torch.library.custom_op("dsv3::moe_sort_pairs", mutates_args=())
def _moe_sort_pairs(idx: Tensor, n_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused MoE's step 1 in one Triton launch (dsv3.kernels.moe_route.sort_pairs_triton)."""
    return sort_pairs_triton(idx, n_experts, block_m)


@_moe_sort_pairs.register_fake
def _(idx: Tensor, n_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    P = idx.numel()
    n_tiles = -(-P // block_m) + min(n_experts, P)
    new = lambda n: idx.new_empty(n, dtype=torch.int32)     # noqa: E731
    return new(P), new(n_experts), new(n_tiles), new(n_tiles)


def moe_decode(x: Tensor, weights: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor,
               gate_scale: Tensor | None = None, up_scale: Tensor | None = None,
               down_scale: Tensor | None = None, shared_gate: Tensor | None = None,
               shared_up: Tensor | None = None, shared_down: Tensor | None = None,
               shared_gate_scale: Tensor | None = None, shared_up_scale: Tensor | None = None,
               shared_down_scale: Tensor | None = None) -> Tensor:
    """The fused MoE of decode-sized batches (dsv3.kernels.moe_decode) -> (T, D) in x's dtype. On the Triton path
    two opaque ops: the pair sort (`dsv3::moe_sort_pairs`, one launch: as torch ops it was ~17 small kernels per
    layer eagerly and still the bulk of the ~11 routing kernels per layer compiled, scans and scatters that inductor
    does not fuse: RESULTS.md, issue 16) and the two GEMM stages; at batch 1 one, their GEMV form
    (`dsv3::moe_decode_rows`, no sort), which also runs the shared experts when their tensors are given (one more
    pair per token). The combine after them is plain tensor ops that a compiled decode layer fuses with what
    follows (the shared experts' add, where they run apart)."""
    args = (x, weights, idx, gate_proj, up_proj, down_proj, gate_scale, up_scale, down_scale, shared_gate, shared_up,
            shared_down, shared_gate_scale, shared_up_scale, shared_down_scale)
    if not use_triton(x, "DSV3_MOE_DECODE", fp8=gate_proj.dtype == torch.float8_e4m3fn):
        return _moe_decode_reference(*args)

    def gemms(*args, block_m: int, **_default_launch) -> Tensor:    # the op derives the rest of the launch itself
        return _moe_decode_sorted(*args, block_m)

    # step 1 as one launch where the experts fit one program (instead of ~10 small kernels per layer)
    sort = _moe_sort_pairs if gate_proj.shape[0] <= MOE_ROUTE_MAX_EXPERTS else None
    return moe_decode_triton(*args, gemms=gemms, sort=sort, rows=_moe_decode_rows)
