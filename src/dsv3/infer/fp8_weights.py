"""Serving with weights kept in the released FP8 block format (spec 2.3): e4m3 values + one fp32 `weight_scale_inv`
per 128x128 block, for every attention and FFN projection and every expert; half the bytes of bf16.

`quantize_weights(model)` swaps those modules in place, from outside the model. Their matmuls read the e4m3
weights directly (dsv3.kernels.fp8_weight_gemm: weight-only FP8, activations stay bf16, fp32 accumulation, one scale
per 128-wide K slice): a Triton kernel on the GPU, streaming half the bytes of bf16 in decode, and a
dequantise-then-matmul reference elsewhere. The experts use its grouped form over the same expert-sorted rows and
offsets as `torch._grouped_mm`, with no host synchronisation, so FP8 decode steps capture in CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..fp8 import BLOCK, dequantize_blocks, quantize_blocks
from ..kernels.decode_ops import fp8_grouped_linear, fp8_linear   # custom ops: opaque to torch.compile
from ..model.mla import MLA
from ..model.layers import MLP
from ..model.moe import Experts


def _blocks(w: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_blocks of w; on the meta device only the shapes (a layout that dsv3.infer.ep_load fills: quantising
    V3's 45K expert matrices on meta would take minutes)."""
    if w.is_meta:
        scales = tuple(-(-n // BLOCK) for n in w.shape[-2:])
        return (torch.empty(w.shape, dtype=torch.float8_e4m3fn, device="meta"),
                torch.empty(*w.shape[:-2], *scales, dtype=torch.float32, device="meta"))
    return quantize_blocks(w, pow2)


class FP8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, pow2: bool = False):
        super().__init__()
        q, s = _blocks(linear.weight.detach(), pow2)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale_inv", s)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale_inv)
        y = y.view(*x.shape[:-1], self.out_features)     # not -1: a 0-token batch's view would be ambiguous
        return y if self.bias is None else y + self.bias


def _quantize_stacked(w: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if w.is_meta:
        return _blocks(w, pow2)
    pairs = [quantize_blocks(m, pow2) for m in w.detach()]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


class FP8Experts(Experts):
    """Stacked experts, each expert's matrices block-quantised like the checkpoint's per-expert tensors."""

    def __init__(self, experts: Experts, pow2: bool = False):
        nn.Module.__init__(self)
        self._dtype = experts.gate_proj.dtype
        for name in ("gate_proj", "up_proj", "down_proj"):
            q, s = _quantize_stacked(getattr(experts, name), pow2)
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale_inv", s)

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def deq(name: str) -> torch.Tensor:
            q, s = getattr(self, name), getattr(self, f"{name}_scale_inv")
            return torch.stack([dequantize_blocks(q[e], s[e], self._dtype) for e in range(q.shape[0])])
        return deq("gate_proj"), deq("up_proj"), deq("down_proj")

    def ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)

        def gemm(x: torch.Tensor, name: str) -> torch.Tensor:
            return fp8_grouped_linear(x, getattr(self, name), getattr(self, f"{name}_scale_inv"), offs)
        return gemm(F.silu(gemm(xs, "gate_proj")) * gemm(xs, "up_proj"), "down_proj")


_ATTN = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def quantize_weights(model: nn.Module) -> nn.Module:
    """Store every projection the released checkpoints keep in FP8 (attention, dense/shared FFN, experts) as FP8, in
    place. Embeddings, norms, the router and the head stay in their dtype, as in the release. The absorbed MLA form
    reads kv_b_proj's weight directly, so that one stays dequantised (it is 2% of a layer). A model whose checkpoint
    has power-of-two scales (V3.1's ue8m0) gets them again: its released codes exactly, not a second rounding."""
    pow2 = model.config.ue8m0_scales if hasattr(model, "config") else False
    for module in list(model.modules()):
        if isinstance(module, MLA):
            for name in _ATTN:
                if hasattr(module, name) and name != "kv_b_proj":
                    setattr(module, name, FP8Linear(getattr(module, name), pow2))
        elif isinstance(module, MLP):
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(module, name, FP8Linear(getattr(module, name), pow2))
        for name, child in list(module.named_children()):
            if type(child) is Experts:
                setattr(module, name, FP8Experts(child, pow2))
    return model
