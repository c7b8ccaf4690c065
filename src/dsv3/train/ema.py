"""An exponential moving average of the parameters, kept in CPU memory (TR 3.2.3): it costs no accelerator
memory, and the update runs on a background thread so the training step does not wait for it.

Sharded (TR 3.2.3 keeps it "without incurring additional memory or time overhead"): no rank, and no process, holds
a copy of the whole model. Given the modules a rank holds (the model, or its pipeline chunks; expert slices and
FSDP shards as rows of the full tensors, dsv3.parallel.materialize.owned_parameters) and the ranks to share with,
  1. every rank names each tensor it holds by (parameter name, first row, rows), its *chunk*;
  2. one all-gather of those names tells each rank how many ranks hold the same chunk (replicas: the data-parallel
     copies of a replicated tensor or of an expert slice) and its index i among them;
  3. the R replicas split the chunk's rows evenly, rank i averaging rows [i n / R, (i + 1) n / R).
So every element of the model is averaged on exactly one rank, and a rank keeps about 1/world of the model (FSDP
shards, held once already, are kept whole). The averaged rows are named by the full model's parameter names and
rows (`entries`: dsv3.parallel.dcp RowShards, `ema/<name>`), so a sharded checkpoint holds the whole EMA, written
without a gather, and resumes or exports at any layout. Without a group (one process) a rank averages everything it
holds.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..parallel.dcp import RowShard
from ..parallel.materialize import owned_parameters


@dataclass(frozen=True)
class EmaPart:
    """Rows [lo, hi) of this rank's local tensor of `name`, whose local row 0 is row `start` of the full tensor."""
    name: str
    lo: int
    hi: int
    start: int
    full_shape: torch.Size


class CPUEma:
    """The EMA of the parameters of `model` (a module, a list of modules: the rows this rank holds; or any object
    with `named_parameters`, averaged whole) on the CPU in fp32, shared out over `group` (a collective: every rank of
    the group constructs it, in the same order as its other collectives)."""

    def __init__(self, model, decay: float, group: dist.ProcessGroup | None = None):
        self.decay, self.source = decay, model
        self.parts = _split_replicas(_chunks(model), group)
        local = _local_parameters(model)
        self.shadow = {p.name: local[p.name][p.lo:p.hi].detach().to("cpu", torch.float32, copy=True)
                       for p in self.parts}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self._pending: Future | None = None

    @property
    def numel(self) -> int:
        """Elements this rank keeps (4 bytes each)."""
        return sum(v.numel() for v in self.shadow.values())

    def update(self, model=None) -> None:
        """Snapshot this rank's rows of the parameters now (of `model`, default the constructor's: the same
        parameters, e.g. re-read after FSDP re-registered them); fold them into the average in the background."""
        self.wait()
        local = _local_parameters(self.source if model is None else model)
        pinned = torch.cuda.is_available() and any(t.is_cuda for t in local.values())
        snap = {p.name: local[p.name][p.lo:p.hi].detach().to("cpu", copy=True, non_blocking=pinned)
                for p in self.parts}
        event = None
        if pinned:
            event = torch.cuda.Event()
            event.record()
        self._pending = self._pool.submit(self._fold, snap, event)

    def _fold(self, snap: dict, event) -> None:
        if event is not None:
            event.synchronize()
        for n, v in snap.items():
            self.shadow[n].lerp_(v.float(), 1 - self.decay)

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def reset(self) -> None:
        """Restart the average at the parameters as they are now (this rank's rows; e.g. a resumed run whose
        checkpoint holds no EMA)."""
        self.wait()
        local = _local_parameters(self.source)
        for p in self.parts:
            self.shadow[p.name].copy_(local[p.name][p.lo:p.hi].detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{name: this rank's rows}: whole tensors in one process (the single-file checkpoint's ema.safetensors)."""
        self.wait()
        return dict(self.shadow)

    def entries(self) -> dict[str, torch.Tensor]:
        """This rank's rows as sharded-checkpoint entries `ema/<name>` (views of the average: dcp.load and
        fill_entries restore it in place); a rank whose share of a tensor is empty has no entry for it."""
        self.wait()
        return {f"ema/{p.name}": RowShard.wrap(self.shadow[p.name], p.start + p.lo, p.full_shape)
                for p in self.parts if p.hi > p.lo}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.wait()
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for n, v in self.shadow.items():
            if tuple(state[n].shape) != tuple(v.shape):
                raise ValueError(f"EMA state of {n} has shape {tuple(state[n].shape)}, this rank keeps "
                                 f"{tuple(v.shape)}")
            v.copy_(state[n])

    def copy_to(self, model: nn.Module) -> None:
        """Write the average into `model`'s parameters (those this rank averages: all of them in one process)."""
        self.wait()
        local = _local_parameters(model)
        with torch.no_grad():
            for p in self.parts:
                local[p.name][p.lo:p.hi].copy_(self.shadow[p.name])


def _roots(model) -> list | None:
    roots = list(model) if isinstance(model, (list, tuple)) else [model]
    return roots if all(isinstance(r, nn.Module) for r in roots) else None


def _local_parameters(model) -> dict[str, torch.Tensor]:
    """{full-model name: the tensor this rank holds} (a DTensor's local shard)."""
    roots = _roots(model)
    pairs = ((n, p) for r in roots for n, p in r.named_parameters()) if roots else model.named_parameters()
    return {n: p.to_local() if isinstance(p, DTensor) else p for n, p in pairs}


def _chunks(model) -> list[EmaPart]:
    """Step 1: every tensor this rank holds as all of its local rows, placed in the full tensor."""
    roots = _roots(model)
    if roots is None:            # an object with named_parameters only: its tensors, whole
        return [EmaPart(n, 0, p.shape[0], 0, p.shape) for n, p in _local_parameters(model).items()]
    return [EmaPart(o.name, 0, o.local.shape[0], o.start, o.full_shape) for o in owned_parameters(roots)]


def _key(p: EmaPart) -> int:
    digest = hashlib.blake2b(f"{p.name}/{p.start}/{p.hi}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2          # >= 0: -1 pads


def _split_replicas(chunks: list[EmaPart], group: dist.ProcessGroup | None) -> list[EmaPart]:
    """Steps 2 and 3: each chunk's rows shared out among the ranks of `group` that hold the same chunk."""
    if group is None or dist.get_world_size(group) == 1:
        return chunks
    if any(len(p.full_shape) == 0 for p in chunks):
        raise NotImplementedError("a sharded EMA of a 0-d parameter")
    world, me = dist.get_world_size(group), dist.get_rank(group)
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend(group)) else None
    n = torch.tensor([len(chunks)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
    keys = torch.full((int(n),), -1, dtype=torch.int64, device=device)
    keys[:len(chunks)] = torch.tensor([_key(p) for p in chunks], dtype=torch.int64)
    every = [torch.empty_like(keys) for _ in range(world)]
    dist.all_gather(every, keys, group=group)
    every, keys = [e.cpu() for e in every], keys.cpu()
    # the (key, rank) pairs sorted by key, ranks ascending within a key (stable sort of the rank-major list): a
    # chunk's holders are one run of the sorted keys and this rank's index is its place in that run
    flat = torch.cat(every)
    sorted_keys, order = flat.sort(stable=True)
    place = torch.empty_like(order)
    place[order] = torch.arange(flat.numel())
    mine = keys[:len(chunks)]
    first = torch.searchsorted(sorted_keys, mine)
    count = torch.searchsorted(sorted_keys, mine, right=True) - first
    index = place[me * int(n):me * int(n) + len(chunks)] - first
    return [EmaPart(p.name, p.hi * i // R, p.hi * (i + 1) // R, p.start, p.full_shape)
            for p, R, i in zip(chunks, count.tolist(), index.tolist())]
