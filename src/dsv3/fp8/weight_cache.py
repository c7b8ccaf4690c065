"""FP8 operands of the weights, quantised once per optimizer step and reused by every micro-batch (issue 15).

Without the cache every forward quantises its weights (and backward transposes the codes), once per micro-batch:
at lite-8L's B4 the expert-weight quantisers cost as much GPU time as the FP8 GEMMs save (RESULTS.md, issue 15).
`refresh_fp8_weights(model)` computes, for every FP8 module (`dsv3.fp8.training`), the operands of both GEMMs that
read its weight: the forward's (W) and the input gradient's (W^T):
    dense linears     quantize_blocks_both(W)              128x128 blocks; W^T = the transposed codes (exact)
    block experts     the stacked blocks of W, transposed  dsv3.fp8.experts.quantize_expert_weight(_t), as the
    row-wise experts  quantize_rows(W), quantize_rows(W^T) uncached FP8ExpertsFunction computes them
and stores them on the module (`fp8_cache`), where the autograd functions take them as inputs: the same values the
uncached path computes, so losses and gradients are bit-identical. Under torch.compile the cached tensors are
module attributes read in the traced forward, i.e. graph inputs (never constants), refreshed in place so the
compiled graphs keep their guards (no recompilation, no per-layer graph break).

Staleness: the trainer calls `refresh_fp8_weights` right after every optimizer step and once at start (after a
load or resume). The refresh records each weight's `_version`; an eager forward whose weight moved since (an
in-place update, `load_state_dict`) raises instead of using old codes. The check is cheap (an int compare) and is
skipped inside compiled code; a write that does not move `_version` (a Triton kernel, `p.data.copy_`) is not seen,
which is why the refresh is explicit.

Orientations: "both" (above) or "backward", W^T's operands only, at half the memory: each forward quantises W again
(the fast orientation: the row kernel / the blocks, >= 80% of copy bandwidth), once per micro-batch. With the
activations saved in FP8 (dsv3.fp8.experts) this is what brings FP8's peak to about BF16's at lite-8L
(benchmarks/fp8_saved_bytes.py; RESULTS.md, issue 15).

Memory held ("both"): 2 bytes per cached parameter (1 per orientation) plus the scales (fp32: 2 per 128x128 block; for
row-wise experts one per row of W and one per column), for the whole step. Without the cache, a block weight's
forward codes were already saved for backward (1 byte per parameter per micro-batch in flight) and row-wise experts
held none; so the trainer caches only when a step has several micro-batches (with one there is nothing to reuse).
Weights that are DTensors (FSDP: gathered around each use) or on the meta device (another pipeline stage's) are
not cached.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ORIENTATIONS", "cache_bytes", "check_fresh", "drop_fp8_weights", "refresh_fp8_weights"]


def _cacheable(w: Tensor) -> bool:
    if w.is_meta:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:      # pragma: no cover - torch without distributed
        return True
    return not isinstance(w, DTensor)


def _store(old: tuple[Tensor, ...] | None, new: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """new, written into old's tensors where they match (the objects compiled graphs read stay the same)."""
    if old is None or len(old) != len(new) or any(a.shape != b.shape or a.dtype != b.dtype or a.device != b.device
                                                  for a, b in zip(old, new)):
        return new
    for a, b in zip(old, new):
        a.copy_(b)
    return old


ORIENTATIONS = ("both", "backward")


@torch.no_grad()
def refresh_fp8_weights(model: nn.Module, orientations: str = "both") -> int:
    """Quantise every FP8 module's weights now and record their versions; returns the number of modules cached.
    orientations: "both" GEMM operands, or "backward" (W^T only: each forward quantises W again; module docstring).
    Call after each optimizer step and once before the first forward."""
    from .training import FP8TrainExperts, FP8TrainLinear
    if orientations not in ORIENTATIONS:
        raise ValueError(f"orientations must be one of {ORIENTATIONS}, got {orientations!r}")
    n = 0
    for module in model.modules():
        if isinstance(module, (FP8TrainLinear, FP8TrainExperts)):
            weights = module.fp8_weights()
            if weights is None or not all(_cacheable(w) for w in weights):
                module.fp8_cache = None
                continue
            module.fp8_cache = tuple(_store(old, module.fp8_quantize(w, orientations)) for old, w in
                                     zip(module.fp8_cache or (None,) * len(weights), weights))
            module.fp8_versions = tuple(w._version for w in weights)
            n += 1
    return n


def drop_fp8_weights(model: nn.Module) -> None:
    """Forget every cached operand: each forward quantises its weights again."""
    for module in model.modules():
        if getattr(module, "fp8_cache", None) is not None:
            module.fp8_cache = None


def check_fresh(module: nn.Module, weights: tuple[Tensor, ...]) -> None:
    """Raise if a weight changed in place since the module's cache was refreshed (eager forwards only)."""
    if tuple(w._version for w in weights) != module.fp8_versions:
        raise RuntimeError(f"{type(module).__name__}: a weight changed after its FP8 copies were made (stale cache): "
                           f"call dsv3.fp8.weight_cache.refresh_fp8_weights(model) after updating the weights, or "
                           f"drop_fp8_weights(model)")


def cache_bytes(model: nn.Module) -> int:
    """Bytes held by the cached operands (codes and scales) of every module."""
    return sum(t.numel() * t.element_size() for m in model.modules() if getattr(m, "fp8_cache", None) is not None
               for group in m.fp8_cache for t in group)
