"""torch.distributed.checkpoint (DCP) for every layout: each rank writes only the rows it holds, and a checkpoint
loads into any other layout (world size, ep, pp, fsdp), or into one plain process.

`RowShard` presents a rank's local tensor as rows [start, start + n) of a global tensor (the description of
dsv3.parallel.materialize.owned_parameters: expert slices, FSDP shards, pipeline chunks all cut dim 0 into
contiguous rows), through DCP's checkpointable protocol (`__create_write_items__`, `__create_chunk_list__`,
`__get_tensor_shard__`, as DTensor implements it). Replicas (the dp rows of an expert slice, replicated tensors)
describe the same chunk and DCP's planner writes it once; a rank that does not hold a tensor (a pipeline rank, the
other chunks) simply has no entry for it. At load each rank asks for its own rows of whatever chunks were written.

`owned_state(modules, optimizer, ema)` names the entries: `model/<name>` (parameters and persistent buffers),
`optim/<name>/<key>` (per-parameter optimizer state: AdamW's moments, AdamWBF16's master copy, the step) and
`ema/<name>`, every name the full model's, so the entries do not depend on the layout.

The trainer's save and load around these entries (atomic commit, manifest, resume in any layout) are
dsv3.train.checkpoint's `save_sharded` / `load_sharded`.
"""

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from .materialize import Owned, owned_parameters


class RowShard(torch.Tensor):
    """A local tensor (sharing its storage) that DCP sees as rows [start, start + n) of a tensor of `full_shape`."""

    @staticmethod
    def wrap(local: torch.Tensor, start: int, full_shape: torch.Size) -> torch.Tensor:
        if start == 0 and tuple(local.shape) == tuple(full_shape):
            return local                        # whole: a plain tensor (replicas deduplicated by DCP)
        t = local.detach().as_subclass(RowShard)
        t._start, t._full, t._local = start, torch.Size(full_shape), local
        return t

    def size(self, dim: int | None = None):
        """The global size, as DCP's load planner checks it against the saved tensor's (DTensor does the same)."""
        return self._full if dim is None else self._full[dim]

    def _chunk(self) -> ChunkStorageMetadata:
        offsets = torch.Size([self._start] + [0] * (len(self._full) - 1))
        return ChunkStorageMetadata(offsets=offsets, sizes=self._local.shape)

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        chunk = self._chunk()
        return [WriteItem(index=MetadataIndex(fqn, chunk.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(
                              self._local), size=self._full))]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()]

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        return self._local


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, torch.distributed.tensor.DTensor) else t


def owned_state(modules: list[nn.Module], optimizer: torch.optim.Optimizer | None = None,
                ema: dict[str, torch.Tensor] | None = None, optimized: list[Owned] | None = None
                ) -> dict[str, torch.Tensor]:
    """The DCP entries of what this rank holds (module docstring): views of the live tensors, so `dcp.load` into
    them restores the model, optimizer state and EMA in place. The optimizer's state must exist (`init_state`).
    `optimized`: where the optimizer steps other tensors than the parameters (ZeRO-1's row shards,
    dsv3.parallel.zero.ZeroOne.owned), their places in the full tensors."""
    out = {}
    by_param: dict[int, tuple] = {}
    for o in owned_parameters(modules, buffers=True):
        if o.local.is_meta or o.name.endswith("tokens_per_expert"):      # non-persistent: zeroed every forward
            continue
        out[f"model/{o.name}"] = RowShard.wrap(o.local, o.start, o.full_shape)
        by_param[id(o.param)] = o
    names = {o.name: o for o in by_param.values()}
    by_param.update({id(o.param): o for o in optimized or []})
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                o = by_param[id(p)]
                for key, v in optimizer.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        v = _local(v)
                        per_row = v.dim() > 0 and tuple(v.shape) == tuple(o.local.shape)
                        out[f"optim/{o.name}/{key}"] = RowShard.wrap(v, o.start, o.full_shape) if per_row else v
    for name, v in (ema or {}).items():
        o = names[name]
        out[f"ema/{name}"] = RowShard.wrap(v, o.start, o.full_shape)
    return out


@torch.no_grad()
def fill_entries(entries: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's rows of whole tensors `full` (same keys as `owned_state`, e.g. a single-process checkpoint
    read whole) into `entries`, in place; a missing or mis-shaped tensor is one error naming it."""
    missing = sorted(k for k in entries if k not in full)
    if missing:
        raise KeyError(f"the checkpoint lacks {missing[:5]}")
    for k, e in entries.items():
        src = full[k]
        if isinstance(e, RowShard):
            if tuple(src.shape) != tuple(e._full):
                raise ValueError(f"{k}: the checkpoint has shape {tuple(src.shape)}, the model {tuple(e._full)}")
            e._local.copy_(src[e._start:e._start + e._local.shape[0]])
        else:
            if tuple(src.shape) != tuple(e.shape):
                raise ValueError(f"{k}: the checkpoint has shape {tuple(src.shape)}, the model {tuple(e.shape)}")
            e.copy_(src)


def init_state(optimizer: torch.optim.Optimizer) -> None:
    """Create an optimizer's state (one zero-gradient step at lr 0: no parameter moves) so that a checkpoint can be
    loaded into it; nothing when it has state already."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state
    _init_optim_state(optimizer)
