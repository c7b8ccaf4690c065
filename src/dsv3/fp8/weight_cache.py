"""FP8 copies of the weights, quantised once per optimizer step and reused by every micro-batch (issue 15).

Why a scope and not a version key: a parameter's `_version` does not move when a Triton kernel (our one-pass AdamW)
or `p.data.copy_()` rewrites it, so a cache keyed on it alone can go stale without a sign. Here the copies live only
inside `with weight_cache(model):`, which the trainer opens around one step's micro-batch forwards and backwards and
closes before the optimizer step: nothing can change a weight inside it, and outside it nothing is cached (every
forward quantises, as without the cache). Forgetting the scope costs speed, never correctness. Inside, an entry
is also keyed on the weight's (data_ptr, _version, shape, dtype), so an in-place change made within the scope
anyway is still seen.

Lookups happen inside the FP8 GEMM custom ops (`dsv3.fp8.ops`: the op takes the high-precision weight and fetches
or makes its FP8 operand), so no cached tensor becomes a value of a compiled graph (whose memory inductor could
reuse) and compiled blocks need no guards on it. The scope is a process-wide stack, not a context variable: the
autograd engine runs CUDA backward functions on its own thread.

Memory: each cached weight costs its FP8 copies, 1 byte per parameter per orientation (half of its bf16 size each;
both orientations of a weight = its bf16 size), plus 4 bytes per scale, held until the scope closes. Without the
cache the forward orientation of a 128x128-block weight was already saved for backward (1 byte per parameter);
row-wise experts held none. So with one micro-batch per step (nothing to reuse) the cache only adds memory, and
`Trainer` opens it when a step has several micro-batches. Under FSDP (DTensor parameters) the scope caches nothing:
the unsharded weights are freed and re-gathered around every use, and full FP8 copies would undo the sharding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

__all__ = ["cached", "cached_count", "scope_open", "weight_cache"]

_SCOPES: list[dict | None] = []   # the open scopes, innermost last; None: a scope that caches nothing


def _uses_dtensor(model: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:      # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def weight_cache(model: nn.Module | None = None, enabled: bool = True) -> Iterator[None]:
    """The scope of one optimizer step's forwards and backwards (module docstring); entries are dropped at exit."""
    active = enabled and not (model is not None and _uses_dtensor(model))
    _SCOPES.append({} if active else None)
    try:
        yield
    finally:
        _SCOPES.pop()


def cached(kind: str, w: Tensor, make: Callable[[Tensor], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """make(w), or its result from earlier in the open scope for the same weight (unchanged) and kind."""
    entries = _SCOPES[-1] if _SCOPES else None
    if entries is None:
        return make(w)
    key = (kind, w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype, w.device)
    hit = entries.get(key)
    if hit is not None and hit[0] == w._version:
        return hit[1]
    out = make(w)
    entries[key] = (w._version, out, w)     # holding w keeps its storage (and so data_ptr) from being reused
    return out


def scope_open() -> bool:
    """Whether a caching scope is open (tests)."""
    return bool(_SCOPES) and _SCOPES[-1] is not None


def cached_count() -> int:
    """Entries of the innermost scope (tests)."""
    return len(_SCOPES[-1]) if scope_open() else 0
