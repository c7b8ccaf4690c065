"""Decode-time fusion of the dense projections that share an input: one GEMM where the model runs two.

Why: at batch 1 every dense projection is an M=1 GEMV that streams its weight once, and cuBLAS's split-K GEMVs
reach ~40% of copy bandwidth on `lite`'s shapes (benchmarks/RESULTS.md, issue 16); two GEMVs over the same x cost
two launches, two partial waves and two split-K reductions. Concatenated along N they are one launch over the
bytes of both (gpt-fast's fused wqkv, vLLM's QKVParallelLinear / MergedColumnParallelLinear). Pairs:
  * MLA: q_proj (q_a_proj with a q LoRA) and kv_a_proj_with_mqa, both of the block's normed x (spec 1.3);
  * MLP (the dense layers and the shared experts): gate_proj and up_proj (SwiGLU, spec 1.6).

How, without a second copy of the weights and with the model plain (dsv3.model):
  1. the pair's weights are concatenated into one tensor, held by the parent as a non-persistent buffer
     (`fused_weight`, and `fused_scale_inv` for FP8 block weights: dsv3.infer.fp8_weights), and each projection's
     own weight becomes a view into it: state dicts, `Engine.load_weights`' in-place copies and an optimizer's
     in-place steps (an engine on a trainer's model, dsv3.posttrain) all write through to the fused tensor;
  2. the parent's class becomes FusedMLA / FusedMLP (subclasses: isinstance, the modules' names and the state
     dict keys are unchanged), whose projection step runs the one GEMM and splits it;
  3. only without autograd (the engine runs under inference mode): with gradients on, the module's own forward
     runs, so training sees its parameters as before.
FP8 pairs fuse only when the first projection's N is a multiple of the 128-row scale block (the second's scale rows
then start on a block row); BF16/FP32 pairs always. A pair that does not fuse (biases, mixed types) keeps the
module's forward. `fuse_projections(model, False)` restores the plain classes (the views stay: same values).
If something re-points a weight (model.to(dtype), load_state_dict(assign=True)) the link breaks: calling
fuse_projections again (the engine does on load_weights) finds that and fuses afresh.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.decode_ops import fp8_linear, gemv
from ..kernels.gemv import GEMV_MAX_M, SKINNY_MAX_M
from ..model.layers import MLP
from ..model.mla import MLA
from .fp8_weights import FP8Linear

__all__ = ["FusedMLA", "FusedMLP", "GemvLinear", "fuse_projections"]

FP8_BLOCK = 128     # rows of one weight_scale_inv block (spec 2.3)


def _fused_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ fused_weight.T -> (..., N_a + N_b): one GEMM (the weight-only FP8 op for FP8 blocks)."""
    scale = getattr(module, "fused_scale_inv", None)
    lead, n = x.shape[:-1], module.fused_weight.shape[0]   # n, not -1: a 0-token batch's view would be ambiguous
    if scale is None:
        if _triton_rows(module, x):
            return gemv(x.reshape(-1, x.shape[-1]), module.fused_weight).view(*lead, n)
        return F.linear(x, module.fused_weight)
    return fp8_linear(x.reshape(-1, x.shape[-1]), module.fused_weight, scale).view(*lead, n)


class FusedMLA(MLA):
    """MLA whose q / kv_a projections run as one GEMM without autograd (module docstring)."""

    def project_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled():
            return super().project_inputs(x)
        first, second = _pair(self)
        q, kv = _fused_linear(self, x).split([first.out_features, second.out_features], dim=-1)
        return q, kv


class FusedMLP(MLP):
    """SwiGLU whose gate / up projections run as one GEMM without autograd (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        gate, up = _fused_linear(self, x).split([self.gate_proj.out_features, self.up_proj.out_features], dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _triton_rows(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether this call's row count is in the module's `gemv_rows` (lo, hi): the calls dsv3.kernels.gemv's
    dispatcher takes (one row: the GEMV, EngineConfig.dense_gemv; 2..SKINNY_MAX_M: the tiled kernel, skinny_gemm)."""
    lo, hi = module.gemv_rows
    return lo <= x.numel() // x.shape[-1] <= hi


def _gemv_rows(gemv: bool, skinny: bool) -> tuple[int, int]:
    return (1 if gemv else GEMV_MAX_M + 1, SKINNY_MAX_M if skinny else GEMV_MAX_M if gemv else 0)


class GemvLinear(nn.Linear):
    """nn.Linear whose decode-sized calls (rows in `gemv_rows`, no autograd) go through the Triton kernels of
    dsv3.kernels.gemv: every other dense projection with `EngineConfig.dense_gemv` / `skinny_gemm` (o_proj,
    down_proj, the head, unfused pairs)."""

    gemv_rows = (1, GEMV_MAX_M)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not _triton_rows(self, x):
            return super().forward(x)
        y = gemv(x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _pair(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    if isinstance(module, MLA):
        return (module.q_proj if hasattr(module, "q_proj") else module.q_a_proj), module.kv_a_proj_with_mqa
    return module.gate_proj, module.up_proj


def _names(a: nn.Module) -> tuple[str, ...]:
    return ("weight", "weight_scale_inv") if type(a) is FP8Linear else ("weight",)


def _linked(module: nn.Module) -> bool:
    """Whether both projections' tensors still are the views into the fused ones."""
    a, b = _pair(module)
    fused = [getattr(module, "fused_weight", None), getattr(module, "fused_scale_inv", None)][:len(_names(a))]
    if any(t is None for t in fused) or (type(a) is not FP8Linear and hasattr(module, "fused_scale_inv")):
        return False
    for name, cat in zip(_names(a), fused):
        ta, tb = getattr(a, name), getattr(b, name)
        if (ta.data_ptr() != cat.data_ptr() or tb.data_ptr() != cat[ta.shape[0]:].data_ptr()
                or ta.shape[0] + tb.shape[0] != cat.shape[0] or ta.dtype != cat.dtype or ta.device != cat.device):
            return False
    return True


def _fusable(a: nn.Module, b: nn.Module) -> bool:
    # a pair made GemvLinear by an earlier call with `gemv` (fuse_projections visits the parent first) is still a
    # plain pair: refusing it would unfuse every pair on the engine's re-link (load_weights)
    kind = {nn.Linear: nn.Linear, GemvLinear: nn.Linear, FP8Linear: FP8Linear}
    if kind.get(type(a)) is None or kind.get(type(a)) is not kind.get(type(b)) or a.in_features != b.in_features:
        return False
    if a.bias is not None or b.bias is not None:
        return False
    if type(a) is FP8Linear:
        return a.out_features % FP8_BLOCK == 0
    return a.weight.dtype == b.weight.dtype and a.weight.device == b.weight.device


@torch.no_grad()
def _fuse(module: nn.Module) -> None:
    """Step 1: concatenate the pair's tensors into the parent's buffers, the projections' tensors views into them."""
    a, b = _pair(module)
    for buffer in ("fused_weight", "fused_scale_inv"):     # a former fusion's (the pair may have changed type)
        module._buffers.pop(buffer, None)
    for name, buffer in zip(_names(a), ("fused_weight", "fused_scale_inv")):
        ta, tb = getattr(a, name), getattr(b, name)
        cat = torch.cat([ta.detach(), tb.detach()])
        n = ta.shape[0]
        if isinstance(ta, nn.Parameter):
            ta.data, tb.data = cat[:n], cat[n:]       # the same Parameter objects: optimizers keep theirs
        else:
            a._buffers[name], b._buffers[name] = cat[:n], cat[n:]
        module.register_buffer(buffer, cat, persistent=False)


def fuse_projections(model: nn.Module, on: bool = True, gemv: bool = False, skinny: bool = False) -> int:
    """Fuse (on) or unfuse every MLA / MLP of `model` in place (module docstring); returns how many are fused.
    `gemv`: the BF16 pairs and every other plain nn.Linear, for one-token calls (GEMV_MAX_M), through the
    weight-streaming GEMV (dsv3.kernels.gemv, EngineConfig.dense_gemv) instead of cuBLAS; `skinny`: their calls of
    2..SKINNY_MAX_M rows through the tiled kernel (EngineConfig.skinny_gemm); neither restores nn.Linear."""
    fused, rows = 0, _gemv_rows(gemv, skinny)
    for module in model.modules():
        if type(module) in (nn.Linear, GemvLinear):
            module.__class__ = GemvLinear if gemv or skinny else nn.Linear
            if gemv or skinny:
                module.gemv_rows = rows
            else:
                module.__dict__.pop("gemv_rows", None)
            continue
        base, cls = (MLA, FusedMLA) if isinstance(module, MLA) else (MLP, FusedMLP) if isinstance(module, MLP) \
            else (None, None)
        if base is None or type(module) not in (base, cls):      # other subclasses keep their own forward
            continue
        if not on or not _fusable(*_pair(module)):
            module.__class__ = base
            continue
        if type(module) is not cls or not _linked(module):
            _fuse(module)
            module.__class__ = cls
        module.gemv_rows = rows
        fused += 1
    return fused
