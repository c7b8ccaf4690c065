"""Sharded construction: a model built on the meta device, laid out (expert slices, pipeline chunks, FSDP shards)
while still on meta, then materialised rank by rank, each rank allocating and initialising only what it owns.

Why the values match one process exactly. The single-process init draws N(0, std^2) (TR 4.2) from one global
generator in module order, so a rank could only reproduce its slice by drawing the whole model. Here every full
parameter is instead cut along dim 0 into blocks of rows, each block drawn from its own generator seeded by
(seed, parameter name, block): a routed expert is one block (its row of the stacked `(E, ...)` tensor), any other
tensor a block of `ROWS` rows. A rank then draws exactly the blocks that overlap its rows, so per-rank work and
transient memory are those of its own part (plus one block), and the values depend on the seed and the parameter's
name only: the same on one process, on any layout, and on any device (they are drawn on the CPU). The rules are
`Transformer.init_weights`'s: ones for RMSNorm weights, zeros for biases and buffers, N(0, std^2) for the rest.

What a rank owns (`owned_parameters`), for every parameter of the modules it runs (the whole model, or its pipeline
chunks): its rows [start, start + local rows) of the full tensor, after
  1. expert parallelism (`ExpertParallelExperts`): experts [first_expert, first_expert + E/ep);
  2. FSDP2 (a DTensor sharded on dim 0 over its mesh): its chunk of those rows (DTensor's own offset computation).
The same description serves loading an HF checkpoint slice by slice (dsv3.train.hf_shards), wrapping the local
tensors as global ones for torch.distributed.checkpoint (dsv3.parallel.dcp) and the streamed export.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..model.layers import RMSNorm
from ..model.moe import Experts
from .expert import ExpertParallelExperts

ROWS = 256      # rows per generator block of a non-expert tensor


@dataclass
class Owned:
    """One parameter (or buffer) as a rank holds it: `local` (a plain tensor: the DTensor's local shard) is rows
    [start, start + local.shape[0]) of the full tensor of `full_shape`; `init` is "normal", "ones" or "zeros";
    `block` the rows per generator block (1 for stacked experts)."""
    name: str
    local: torch.Tensor
    full_shape: torch.Size
    start: int
    init: str
    block: int
    param: torch.Tensor          # the module's own tensor (a DTensor under FSDP)

    @property
    def whole(self) -> bool:
        return self.start == 0 and tuple(self.local.shape) == tuple(self.full_shape)


def owned_parameters(modules: Iterable[nn.Module], buffers: bool = False) -> Iterator[Owned]:
    """What a rank holds of each parameter (and, with `buffers`, each buffer) of `modules` (module names as in the
    full model: the model itself, or pipeline chunks), in a stable order; a tensor shared by two modules once."""
    seen: set[int] = set()
    for root in modules:
        for mname, module in root.named_modules():
            prefix = f"{mname}." if mname else ""
            items = [(n, p, True) for n, p in module.named_parameters(recurse=False)]
            if buffers:
                items += [(n, b, False) for n, b in module.named_buffers(recurse=False)]
            for pname, p, is_param in items:
                if id(p) in seen or p is None:
                    continue
                seen.add(id(p))
                yield _owned(prefix + pname, pname, p, module, is_param)


def _owned(name: str, pname: str, p: torch.Tensor, module: nn.Module, is_param: bool) -> Owned:
    local, shape, start = p, p.shape, 0
    if isinstance(p, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        local = p._local_tensor
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if any(offset[1:]):
            raise NotImplementedError(f"{name}: only dim-0 sharding is supported, got offset {offset}")
        start = offset[0] if len(offset) else 0
    expert = isinstance(module, Experts) and is_param
    if isinstance(module, ExpertParallelExperts) and is_param:
        start += module.first_expert
        shape = torch.Size((module.n_experts, *shape[1:]))
    if not is_param or pname == "bias":
        init = "zeros"
    elif isinstance(module, RMSNorm):
        init = "ones"
    else:
        init = "normal"
    return Owned(name, local, torch.Size(shape), start, init, 1 if expert else ROWS, p)


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_rows(o: Owned, seed: int, std: float, start: int | None = None, stop: int | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [start, stop) (default: the rank's own) of the full tensor `o` describes, as the init defines them, on
    the CPU in `dtype`."""
    start = o.start if start is None else start
    stop = start + o.local.shape[0] if stop is None else stop
    if o.init != "normal" or len(o.full_shape) == 0:
        fill = torch.ones if o.init == "ones" else torch.zeros
        return fill((stop - start, *o.full_shape[1:]) if len(o.full_shape) else (), dtype=dtype)
    rows, b = o.full_shape[0], o.block
    pieces = []
    for blk in range(start // b, -(-stop // b)):
        lo, hi = blk * b, min((blk + 1) * b, rows)
        g = torch.Generator().manual_seed(block_seed(seed, o.name, blk))
        t = torch.empty((hi - lo, *o.full_shape[1:])).normal_(0.0, std, generator=g)
        pieces.append(t[max(start, lo) - lo:min(stop, hi) - lo])
    return torch.cat(pieces).to(dtype) if pieces else torch.empty((0, *o.full_shape[1:]), dtype=dtype)


@torch.no_grad()
def materialize(modules: Iterable[nn.Module], device: torch.device | str, seed: int, std: float) -> None:
    """Allocate `modules` (built on meta and laid out) on `device` and initialise every parameter and buffer they
    hold to its rows of the seeded init (module docstring). Only these modules are allocated: a pipeline rank passes
    its chunks, and the rest of the model stays on meta."""
    modules = list(modules)
    for m in modules:
        m.to_empty(device=device)
    for o in owned_parameters(modules, buffers=True):
        o.local.copy_(init_rows(o, seed, std, dtype=o.local.dtype))


def local_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the parameters this rank holds (local shards, expert slices; meta tensors count nothing)."""
    return sum(o.local.numel() * o.local.element_size() for o in owned_parameters(modules)
               if not o.local.is_meta)
