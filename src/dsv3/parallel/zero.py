"""ZeRO-1 (spec 5: V3 trains with "PP16 x EP64 x ZeRO-1 DP"): the optimizer state of replicated parameters sharded
over their replicas, for layouts that keep the parameters themselves replicated (any (pp, dp, ep) layout without
FSDP, DualPipeV's included).

Which ranks hold the same parameter (dsv3.parallel.mesh): a non-expert parameter of a pipeline position is held by
its dp * ep ranks (`position_group`), an expert slice by its dp column (`dp_group`). For every parameter p held by R
such ranks, rank i of the group (its group rank) owns rows [i n / R, (i + 1) n / R) of p's n local rows (dim 0, as
the EMA shares out its rows, dsv3.train.ema; an expert slice is split by whole experts). One step (`ZeroOne`):
  1. the gradients are synced as in every layout (dsv3.parallel.grads.sync_gradients: an all-reduce, so each
     replica holds the whole gradient; the global norm and clipping stay grads.grad_norm's, unchanged);
  2. the optimizer (built over `ZeroOne.parameters()`: views of this rank's rows of each parameter, sharing the
     parameter's storage) steps its rows only, with the rows of the gradient (`attach_grads`), so its state (AdamW's
     two moments, AdamWBF16's master copy) exists for those rows only: 1/R of the replicated state;
  3. `gather` all-gathers the updated rows within each group (one flat collective per group and dtype), after which
     every replica holds the same updated parameters again.
AdamW is elementwise, so each element's update is the arithmetic one process does on it: the result equals the
unsharded optimizer's bit for bit (tests/test_parallel_zero.py; through `dsv3 train`: tests/test_train_zero1.py).

Memory per rank: parameters as replicated (a pipeline rank's chunks, expert slices) + optimizer state / (their
replicas), i.e. for pp x dp x ep about params / pp (non-expert) + params / (pp ep) (experts) + 2 params / world.
This does not meet params + state <= (whole / world) x 1.2: the parameters stay replicated over dp (and the
non-expert ones over ep). The layout that meets it is FSDP2 (parallel.fsdp, also under pp: ZeRO-3), measured in
tests/test_parallel_construct.py; ZeRO-1 trades that memory for one all-gather of the parameters per step instead
of FSDP's per-block gathers in every forward and backward.

The optimizer's entries in a sharded checkpoint are named and placed as in every layout (`owned`: this rank's rows
of the full tensors, dsv3.parallel.dcp.owned_state), so a ZeRO-1 checkpoint resumes in any layout and vice versa.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .grads import expert_parameters
from .materialize import Owned, owned_parameters
from .mesh import ParallelMesh


@dataclass
class _Part:
    """Rows [lo, ...) of `param` owned here (`shard`: their view, None when empty) and every group rank's (lo, hi)."""
    param: nn.Parameter
    shard: nn.Parameter | None
    lo: int
    bounds: list[tuple[int, int]]
    owned: Owned


class ZeroOne:
    """The optimizer-state sharding of what a rank holds (`local`: dsv3.parallel.parallelize.LocalModel) over its
    replicas in `mesh` (module docstring). Every rank must construct it; `gather` is a collective."""

    def __init__(self, local, mesh: ParallelMesh):
        experts = expert_parameters(local)
        self.groups: dict[str, tuple[dist.ProcessGroup, list[_Part]]] = {
            "dp": (mesh.dp_group, []), "position": (mesh.position_group, [])}
        for o in owned_parameters(local.roots):
            p = o.param
            if isinstance(p, DTensor):
                raise ValueError(f"{o.name} is FSDP-sharded: ZeRO-1 applies to replicated parameters only")
            if not p.requires_grad:
                continue
            if p.dim() == 0:
                raise NotImplementedError(f"ZeRO-1 of the 0-d parameter {o.name}")
            group, parts = self.groups["dp" if id(p) in experts else "position"]
            R, i, n = dist.get_world_size(group), dist.get_rank(group), p.shape[0]
            bounds = [(n * j // R, n * (j + 1) // R) for j in range(R)]
            lo, hi = bounds[i]
            # a view of the parameter's own storage: the optimizer's in-place update writes the parameter's rows
            shard = nn.Parameter(p.detach()[lo:hi]) if hi > lo else None
            parts.append(_Part(p, shard, lo, bounds, o))

    def _parts(self) -> Iterator[_Part]:
        for _, parts in self.groups.values():
            yield from parts

    def parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer steps: this rank's rows of every parameter (views)."""
        return (part.shard for part in self._parts() if part.shard is not None)

    def owned(self) -> list[Owned]:
        """The optimizer's parameters placed in the full tensors (for the checkpoint entries, dsv3.parallel.dcp)."""
        return [replace(part.owned, local=part.shard, start=part.owned.start + part.lo, param=part.shard)
                for part in self._parts() if part.shard is not None]

    def attach_grads(self) -> None:
        """Step 2: each shard's gradient is its rows of the parameter's (synced) gradient, a view (clipping's
        in-place scaling of the whole gradient reaches it)."""
        for part in self._parts():
            if part.shard is not None:
                g = part.param.grad
                part.shard.grad = None if g is None else g[part.lo:part.lo + part.shard.shape[0]]

    @torch.no_grad()
    def gather(self) -> None:
        """Step 3: every replica gets every rank's updated rows (one all-gather per group and dtype, padded to the
        largest rank's rows)."""
        for group, parts in self.groups.values():
            by_dtype: dict[torch.dtype, list[_Part]] = {}
            for part in parts:
                by_dtype.setdefault(part.param.dtype, []).append(part)
            for ps in by_dtype.values():
                _all_gather_rows(ps, group)


def _all_gather_rows(parts: list[_Part], group: dist.ProcessGroup) -> None:
    R, me = dist.get_world_size(group), dist.get_rank(group)
    if R == 1:
        return
    row = [p.param[0].numel() for p in parts]
    sizes = [sum((b[j][1] - b[j][0]) * r for b, r in zip((p.bounds for p in parts), row)) for j in range(R)]
    ref = parts[0].param
    mine = torch.zeros(max(sizes), dtype=ref.dtype, device=ref.device)
    mine[:sizes[me]].copy_(torch.cat([p.param.detach()[p.bounds[me][0]:p.bounds[me][1]].flatten() for p in parts]))
    every = [torch.empty_like(mine) for _ in range(R)]
    dist.all_gather(every, mine, group=group)
    for j, flat in enumerate(every):
        if j == me:
            continue
        off = 0
        for p in parts:
            lo, hi = p.bounds[j]
            n = (hi - lo) * p.param[0].numel()
            p.param.detach()[lo:hi].copy_(flat[off:off + n].view(hi - lo, *p.param.shape[1:]))
            off += n
