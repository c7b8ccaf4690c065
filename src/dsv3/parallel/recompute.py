"""Selective recomputation (TR 3.2.3), applied to a built model from outside: the backward pass recomputes every
RMSNorm, the MLA up-projections (kv_b_proj expanding the latent c_kv into per-head keys and values, then the
attention that consumes them) and the SwiGLU of dense, shared and routed experts, instead of keeping their
activations. What stays saved is the small stuff: block inputs, the latent c_kv + k_pe, and the expert inputs.

The forward values are bit-identical with and without recomputation; only memory and time change. Routing runs
outside every checkpointed region, so the per-expert load counts are never double counted.

Routed experts: an `Experts` module names the method to checkpoint in `recompute_region`. The plain one recomputes
its whole forward (row permutation + SwiGLU, keeping only its input); an expert-parallel one recomputes only the
local SwiGLU (`ffn`): recomputing its forward would repeat the dispatch and combine all-to-alls in the backward pass,
the communication DualPipe works to hide, for the price of keeping the dispatched rows.
"""

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.layers import MLP, RMSNorm
from ..model.mla import MLA
from ..model.moe import Experts


def _checkpointed(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return run


def apply_recompute(model: nn.Module) -> int:
    """Wrap the recomputed parts of `model` in place; returns how many were wrapped. Idempotent."""
    n = 0
    for m in model.modules():
        if getattr(m, "_recompute", False):
            continue
        if isinstance(m, Experts):
            setattr(m, m.recompute_region, _checkpointed(getattr(m, m.recompute_region)))
        elif isinstance(m, (RMSNorm, MLP)):
            m.forward = _checkpointed(m.forward)
        elif isinstance(m, MLA):
            m._attend_naive = _checkpointed(m._attend_naive)
        else:
            continue
        m._recompute = True
        n += 1
    return n


def saved_activation_bytes(fn: Callable[[], object]) -> int:
    """Bytes autograd keeps for the backward of what fn() computes: the activation memory recomputation trades away,
    measured the same way on any device."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
