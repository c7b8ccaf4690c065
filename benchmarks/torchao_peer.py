"""torchao's FP8 training on the dsv3 model: the issue-15 peer on the same lite-8L step (`train_lite8l.py --torchao`).

The same modules that `dsv3.fp8.training.apply_fp8` runs in FP8, swapped to torchao 0.18's prototypes instead:
- linears (MLA projections, dense and shared FFNs): `Float8BlockwiseLinear`, the report's 1x128 activation /
  128x128 weight scaling through `torch._scaled_mm` (its `use_triton=False` default, the faster of its two GEMMs in
  the issue's table). It takes only widths that are multiples of 128; the others (lite's kv_a 576, the dense FFN's
  10944) stay BF16, where dsv3 pads them: counted in what `apply_torchao` returns;
- routed experts: torchao's row-wise FP8 grouped GEMM (`_to_fp8_rowwise_then_scaled_grouped_mm`, what its
  `MoETrainingConfig` runs: `torch._scaled_grouped_mm`; the token groups padded to 16 rows here, as torchtitan does:
  torchao 0.18's own padding asserts) for the three GEMMs of each expert's SwiGLU, forward and backward.
Both keep the module's own weight Parameters (`Float8BlockwiseLinear.from_float` reuses the weight; the experts get
a new `ffn` only), so the Trainer's optimizer, built before, still holds every parameter: nothing else changes.
Apply after `Trainer(...)` and before the first step (compiled blocks trace at their first call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.layers import MLP
from dsv3.model.mla import MLA
from dsv3.model.moe import Experts


class TorchaoExperts(Experts):
    """The routed experts with torchao's FP8 row-wise grouped GEMM (same parameters, same routing)."""

    def ffn(self, xs, counts):
        from torchao.prototype.moe_training.fp8_grouped_mm import (
            _to_fp8_rowwise_then_scaled_grouped_mm as mm,
        )

        gate, up, down = (w.to(xs.dtype) for w in self.stacked_weights())
        # torchao 0.18 asserts pad_token_groups_for_grouped_mm=False (its own padding "is not yet supported") and
        # `_scaled_grouped_mm` wants groups of a multiple of 16 rows: pad them here, as torchtitan's permute does
        # (static sizes, no host sync: M + 15 E rows, each row moved to its group's padded start)
        E, M = counts.numel(), xs.shape[0]
        padded = (counts + 15) // 16 * 16
        start, start_pad = counts.cumsum(0) - counts, padded.cumsum(0) - padded
        group = torch.repeat_interleave(torch.arange(E, device=xs.device), counts, output_size=M)
        dest = torch.arange(M, device=xs.device) - start[group] + start_pad[group]
        xp = xs.new_zeros(M + 15 * E, xs.shape[1]).index_copy(0, dest, xs)
        offs = padded.cumsum(0).to(torch.int32)
        # B_t (E, K, N) column-major per group: the (E, N, K) weight's transposed view, as torchao asks
        h = F.silu(mm(xp, gate.transpose(-2, -1), offs, pad_token_groups_for_grouped_mm=False)) \
            * mm(xp, up.transpose(-2, -1), offs, pad_token_groups_for_grouped_mm=False)
        return mm(h, down.transpose(-2, -1), offs, pad_token_groups_for_grouped_mm=False)[dest]


def apply_torchao(model: nn.Module, linears: bool = True, experts: bool = True) -> dict[str, int]:
    """Swap in torchao's FP8 modules, in place. Returns how many linears / expert modules were swapped and how many
    linears stayed BF16 (a width not a multiple of 128)."""
    from torchao.prototype.blockwise_fp8_training.linear import Float8BlockwiseLinear

    n = {"linears_fp8": 0, "linears_kept_bf16": 0, "experts_fp8": 0}
    for module in list(model.modules()):
        if linears and isinstance(module, (MLA, MLP)):
            for name, child in list(module.named_children()):
                if type(child) is not nn.Linear:
                    continue
                if child.bias is None and child.in_features % 128 == 0 and child.out_features % 128 == 0:
                    setattr(module, name, Float8BlockwiseLinear.from_float(child))
                    n["linears_fp8"] += 1
                else:
                    n["linears_kept_bf16"] += 1
        elif experts and type(module) is Experts:
            module.__class__ = TorchaoExperts
            n["experts_fp8"] += 1
    return n
