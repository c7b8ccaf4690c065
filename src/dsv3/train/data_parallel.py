"""`dsv3 train` under torchrun: the layout of the ranks, data parallelism with optional expert parallelism inside
(pipeline parallelism, parallel.pp > 1, is `PipelineLayout` in dsv3.train.pipeline_step, on the same interface).

    torchrun --standalone --nproc_per_node 2 -m dsv3.cli train --config configs/tiny.toml                 # dp 2
    torchrun --standalone --nproc_per_node 4 -m dsv3.cli train --config configs/tiny.toml parallel.ep=2   # dp 2 x ep 2

world = dp * ep ranks, ep = `parallel.ep` (dsv3.train.config.ParallelConfig), dp = world / ep implied. Every rank
reads the same global micro-batches from the same data stream and keeps its slice of the rows (rank r of W takes
rows [r B/W, (r+1) B/W)), so the data order, and therefore a checkpoint's data position, is the single-process one.
The routing loads are summed over the world (the aux-loss-free bias update then sees the global loads, identical on
every rank, spec 1.7) and the logged losses averaged. Rank 0 alone writes the run directory (config, tokenizer,
metrics, checkpoints); the others wait for it at barriers.

ep == 1, plain data parallelism: every rank holds the whole model and the gradients are averaged over the ranks
(each rank's loss is a mean over its own equal-sized slice, so the average is the gradient of the global mean).

ep > 1 (dsv3.parallel.parallelize, mesh (dp, ep), rank = d * ep + e): the routed experts of every MoE layer and MTP
module are sharded over the ep ranks of each row d, rank (d, e) holding experts [e E/ep, (e+1) E/ep); the MoE forward
all-to-alls the token rows within the row. Applied after apply_fp8 and before apply_recompute, compilation and the
optimizer (which then holds only the local slices). Per step: `sync_gradients_2d` (replicated gradients averaged
over the world, expert ones over the "dp" column), then clipping by the global norm `grad_norm_2d`: a local
clip_grad_norm_ would see only this rank's expert shards and clip the ranks differently. The fused-AdamW and
compiled clipping paths take the same global norm. Validation runs on every rank (the forward needs the row's
all-to-alls), each on its row slice of every validation batch, the sums all-reduced; rank 0 logs.

Checkpoints keep the single-process format, so a run resumes at any world size and layout: at save, the ranks of row
0 gather their expert slices of the parameters, of every optimizer state tensor shaped like its parameter (AdamW's
exp_avg / exp_avg_sq, AdamWBF16's master copy as well) and of the EMA into full tensors on rank 0, which writes with
`save_checkpoint` (`full_state`). At load every rank reads the full checkpoint and keeps its slice
(`local_model_state`, `local_optimizer_state`). The EMA lives on the ranks of row 0 (rank 0 alone when ep == 1),
each averaging its own slice; it is gathered like the parameters, so the checkpoint's EMA is the full model's.
Pipeline parallelism (DualPipeV, a (dp, ep) layout per pipeline position) is a trainer layout too:
dsv3.train.pipeline_step, whose checkpoints are the same single-process format.

parallel.fsdp (ZeRO-3 through FSDP2, any ep, also 1): after `parallelize` (also with ep == 1: a (dp, 1) mesh) and
after apply_recompute, `shard_data_parallel_2d` shards every parameter (experts over their dp column, the rest over
the world), so the optimizer built afterwards holds sharded state too. FSDP reduce-scatters the gradients in
backward (no `sync_gradients`); the global norm is `grad_norm_sharded` (every element on exactly one rank) and
clipping scales the local shards. The fused-AdamW clip-in-optimizer and compiled paths are off (CUDA-only and not
verified on DTensor gradients; config refuses compile_optimizer). Every rank validates its rows: the forward's
parameter all-gathers are collectives. Recompute before FSDP, as torchtitan does AC before fully_shard: recompute
wraps methods inside the FSDP units (RMSNorm/MLP forward, Experts `ffn`, MLA `_attend_naive`) while FSDP hooks
the units' __call__, and a unit's pre-backward all-gather runs before its checkpointed regions are recomputed.
Checkpoints: every DTensor of the model, optimizer and EMA state is made whole (`full_tensor`, one tensor at a
time, every rank in the same order), kept on the CPU by the ranks that write (rank 0) or send it (with ep > 1,
row 0 keeps its column's expert tensors for the usual row gather). At load every rank cuts its EP slice as above,
then its FSDP shard (`distribute_tensor(..., src_data_rank=None)`: local, no communication). The EMA lives on every
rank, each averaging its own local shards (1/world of the model in CPU memory per rank), and is gathered likewise.
With one process (world 1) fsdp is a no-op, so a FSDP run's checkpoint resumes in one plain process as configured.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..parallel.expert import ExpertParallelExperts, all_reduce_flat
from ..parallel.parallelize import (
    grad_norm_2d,
    grad_norm_sharded,
    parallelize,
    shard_data_parallel_2d,
    sync_gradients_2d,
)


class Layout:
    """The ranks of the job (one process: world 1) and the trainer's collectives over them."""

    def __init__(self, device: torch.device, ep: int = 1, fsdp: bool = False):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # the world is only known here: RunConfig.check_world validates it against ep and the micro-batch
        self.device, self.ep, self.dp = device, ep, self.world // ep
        # sharding over one process would shard nothing: a no-op, so a FSDP run resumes in one plain process
        self.fsdp = fsdp and self.world > 1
        self.mesh = None
        self.pp = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def first_row(self) -> bool:
        """Rank (0, e) of the (dp, ep) mesh, i.e. rank < ep (rank 0 alone when ep == 1): these ranks hold all experts
        between them, keep the EMA of their slices and send them to rank 0 at save; the other rows hold replicas."""
        return self.rank < self.ep

    @property
    def keeps_ema(self) -> bool:
        """Under FSDP every rank averages its own shards; otherwise row 0 does (the other rows hold replicas)."""
        return self.fsdp or self.first_row

    @property
    def partitioned(self) -> bool:
        """Whether a rank holds only a part of the model (expert slices, FSDP shards, pipeline chunks): the clipping
        norm is then `grad_norm`, a collective; checkpoints are cut to this rank's part at resume; every rank takes
        part in validation."""
        return self.ep > 1 or self.fsdp

    def describe(self) -> str:
        if self.world == 1:
            return ""
        if self.ep == 1:
            return f" x {self.world} data-parallel ranks" + (" (FSDP)" if self.fsdp else "")
        return f" x {self.world} ranks (dp {self.dp} x ep {self.ep}{', FSDP' if self.fsdp else ''})"

    def trainable(self, model: nn.Module):
        """What the optimizer holds: the whole model (a PipelineLayout: this rank's chunks)."""
        return model

    def owned(self, model: nn.Module) -> list[nn.Module]:
        """The modules this rank runs and materialises (the whole model; a PipelineLayout: its chunks)."""
        return [model]

    def holds(self, module: nn.Module) -> bool:
        """Whether this rank runs `module` (every module here; a PipelineLayout: those of its chunks)."""
        return True

    def apply(self, model: nn.Module) -> nn.Module:
        """Shard the routed experts (ep > 1; with fsdp also ep == 1, for `shard_parameters`'s (dp, ep) mesh) in
        place: after apply_fp8, before apply_recompute and the optimizer."""
        if self.ep > 1 or self.fsdp:
            parallelize(model, None, self.dp, self.ep)
            self.mesh = model.parallel_mesh
        return model

    def shard_parameters(self, model: nn.Module) -> str | None:
        """fsdp: FSDP2 over the layout (after `apply` and apply_recompute, before the optimizer); returns a line for
        the run's log saying what is sharded (from the model itself: how many parameters are DTensors, how many
        elements this rank and all ranks hold). Every rank must call it. None (nothing done) without fsdp."""
        if not self.fsdp:
            return None
        shard_data_parallel_2d(model)
        params = list(model.parameters())
        n_dt = sum(isinstance(p, DTensor) for p in params)
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
        total = self.sum(torch.tensor(local, dtype=torch.int64, device=self.device)).item()
        return (f"FSDP: {n_dt} of {len(params)} parameters sharded (DTensor); rank {self.rank} holds {local} of "
                f"{total} parameter elements")

    def ema_source(self, model: nn.Module):
        """What the CPU EMA averages: the model, or under FSDP its local shards (`_LocalShards`)."""
        return _LocalShards(model) if self.fsdp else model

    def shard(self, window: torch.Tensor) -> torch.Tensor:
        rows = window.shape[0] // self.world
        return window[self.rank * rows:(self.rank + 1) * rows]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def average_gradients(self, params) -> None:
        if self.world > 1:
            all_reduce_flat([p.grad for p in params if p.grad is not None], dist.group.WORLD, 1.0 / self.world)

    def sync_gradients(self, model: nn.Module) -> None:
        """The gradients of the mean loss over all ranks' tokens, on every rank (every rank must call it). Under
        FSDP nothing is left to do: backward reduce-scattered them (averaged over the world, experts summed over
        their column / world: the divide factor shard_data_parallel_2d sets)."""
        if self.fsdp:
            return
        if self.ep > 1:
            sync_gradients_2d(model, self.mesh)
        else:
            self.average_gradients(model.parameters())

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """The global gradient norm when ranks hold parts of the gradient (`partitioned`): float64, the same on
        every rank."""
        return grad_norm_sharded(model) if self.fsdp else grad_norm_2d(model, self.mesh)

    @staticmethod
    @torch.no_grad()
    def scale_gradients(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
        """grads *= coef (a plain 0-d tensor): on the local shards of DTensor gradients, since DTensor ops refuse a
        plain tensor operand and the coefficient is the same on every rank anyway."""
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        # also the expert loads: summing the step's accumulated loads over the world is what sync_expert_loads_2d
        # does for one forward, once per step instead of once per micro-batch
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world if self.world > 1 else t

    def agree(self, value: int) -> int:
        """The largest of the ranks' `value`s, on every rank (every rank must call it): one decision for all, e.g.
        stop after this step when any rank got a signal."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # ---- checkpoints in the single-process format -----------------------------------------------------------------
    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   ema_state: dict[str, torch.Tensor] | None) -> tuple[dict, dict, dict | None] | None:
        """(model state dict, optimizer state dict, EMA state) with every expert tensor whole, on rank 0; None on
        the other ranks. Every rank must call it (the ranks of row 0 send their slices; under FSDP every rank
        joins the all-gathers of its shards)."""
        model_sd, optim_sd = model.state_dict(), optimizer.state_dict()
        if self.fsdp:     # whole DTensors (with ep > 1: this column's expert slices, for the row gather below)
            model_sd, optim_sd, ema_state = self._unshard(model, optimizer, model_sd, optim_sd, ema_state)
        if self.ep == 1:
            return (model_sd, optim_sd, ema_state) if self.is_main else None
        if not self.first_row:           # rows d > 0 hold replicas of row 0's slices: nothing to send
            return None
        params = dict(model.named_parameters())
        index = _optimizer_index(optimizer)
        # state_dict() hands out the optimizer's own per-parameter dicts: copy before replacing entries
        state = optim_sd["state"] = dict(optim_sd["state"])
        slots: list[tuple[dict, str]] = []
        for name in expert_slices(model):
            p = params[name]
            slots.append((model_sd, name))
            i = index[id(p)]
            if i in state:
                st = state[i] = dict(state[i])
                slots += [(st, k) for k in sorted(st) if _per_element(st[k], p.shape)]
            if ema_state is not None:
                slots.append((ema_state, name))
        full = self._gather_row0([d[k] for d, k in slots])
        if full is None:
            return None
        for (d, k), t in zip(slots, full):
            d[k] = t
        return model_sd, optim_sd, ema_state

    def _unshard(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict,
                 ema_state: dict | None) -> tuple[dict, dict, dict | None]:
        """FSDP: the model and optimizer state dicts and the EMA (local shards) with every DTensor made whole over
        its mesh: one all-gather per tensor, every rank in the same order, so that only one whole tensor at a time
        is on the device. A rank keeps (on the CPU) what it writes or sends: rank 0 everything, the other ranks of
        row 0 their experts' tensors (ep > 1); the rest is dropped (None). Parameter ids, dtypes and the
        non-DTensor entries (buffers, AdamW's step) are left as they are: the single-process format."""
        experts = expert_slices(model) if self.ep > 1 else {}
        params = dict(model.named_parameters())

        def whole(t: torch.Tensor, name: str) -> torch.Tensor | None:
            if not isinstance(t, DTensor):
                return t
            full = t.full_tensor()
            return full.cpu() if self.is_main or (self.first_row and name in experts) else None

        model_sd = {k: whole(v, k) for k, v in model_sd.items()}
        index = _optimizer_index(optimizer)
        name_of = {index[id(p)]: n for n, p in params.items()}
        old = optim_sd["state"]
        new = {i: {k: whole(v, name_of[i]) for k, v in old[i].items()} for i in sorted(old)}
        optim_sd = {**optim_sd, "state": {i: new[i] for i in old}}
        if ema_state is not None:        # the EMA holds plain local shards: made DTensors like their parameters
            ema_state = {n: whole(DTensor.from_local(t.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                                     stride=p.stride()), n) if isinstance(p := params[n], DTensor)
                         else t for n, t in ema_state.items()}
        return model_sd, optim_sd, ema_state

    # ---- loading a single-process checkpoint into this rank's slices and shards ---------------------------------
    def local_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict,
                    optim_state: dict | None) -> tuple[dict, dict | None]:
        """A full checkpoint's model tensors and optimizer state cut to what this rank holds: its expert slices
        (ep > 1), then under FSDP its shards as DTensors placed like the parameters (load_checkpoint's copy_ and
        Optimizer.load_state_dict then take them as they are). Tensors of a wrong shape are left for
        load_checkpoint's check to report."""
        tensors = local_model_state(model, tensors)
        if optim_state is not None:
            optim_state = local_optimizer_state(model, optimizer, optim_state)
        if not self.fsdp:
            return tensors, optim_state
        params = dict(model.named_parameters())
        tensors = {k: _shard_like(v, params.get(k)) for k, v in tensors.items()}
        if optim_state is not None:
            index = _optimizer_index(optimizer)
            by_index = {index[id(p)]: p for p in params.values()}
            state = {i: {k: _shard_like(v, by_index.get(i)) for k, v in st.items()}
                     for i, st in optim_state["state"].items()}
            optim_state = {**optim_state, "state": state}
        return tensors, optim_state

    def local_ema(self, model: nn.Module, ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full EMA state cut like the parameters; under FSDP to plain local shards (what `ema_source` shows the
        EMA)."""
        ema = local_model_state(model, ema)
        if self.fsdp:
            params = dict(model.named_parameters())
            ema = {n: _shard_like(t, params.get(n)) for n, t in ema.items()}
            ema = {n: t.to_local() if isinstance(t, DTensor) else t for n, t in ema.items()}
        return ema

    def _gather_row0(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Each tensor's slices from the ep ranks of row 0 concatenated along dim 0 in rank order (= expert order),
        on rank 0 (CPU); None on the senders. One gather per dtype (every rank's slices have the same shapes)."""
        group = self.mesh["ep"].get_group()
        out: list = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for idx in by_dtype.values():
            flat = torch.cat([tensors[i].detach().reshape(-1).to(self.device) for i in idx])
            parts = [torch.empty_like(flat) for _ in range(self.ep)] if self.is_main else None
            dist.gather(flat, parts, dst=0, group=group)
            if self.is_main:
                sizes = [tensors[i].numel() for i in idx]
                pieces = [p.cpu().split(sizes) for p in parts]
                for j, i in enumerate(idx):
                    out[i] = torch.cat([pc[j].view(tensors[i].shape) for pc in pieces])
        return out if self.is_main else None


class _LocalShards:
    """A model seen through its parameters' local shards (plain tensors): what a CPUEma averages under FSDP, each
    rank its own part (the EMA reads only `named_parameters` and `parameters`)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_parameters(self):
        for n, p in self.model.named_parameters():
            yield n, p.to_local() if isinstance(p, DTensor) else p

    def parameters(self):
        return (p for _, p in self.named_parameters())


def _shard_like(t, p: torch.Tensor | None):
    """A whole tensor as `p`'s DTensor shard (this rank's chunk, cut locally: every rank holds the whole tensor),
    when p is a DTensor of that shape; else t unchanged (a buffer, AdamW's step, a mis-shaped entry)."""
    if not (isinstance(p, DTensor) and isinstance(t, torch.Tensor) and t.shape == p.shape):
        return t
    return distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)


def _optimizer_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(parameter) -> its index in the optimizer's state dict (the order of the parameter groups)."""
    return {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}


def _per_element(t, shape: torch.Size) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape == shape


def expert_slices(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """{parameter name: (first expert, local experts, all experts)} of every expert-parallel parameter (dim 0 is
    the expert); empty for an unsharded model."""
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, ExpertParallelExperts):
            for pname, p in m.named_parameters(recurse=False):
                out[f"{mname}.{pname}"] = (m.first_expert, p.shape[0], m.n_experts)
    return out


def local_model_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full (single-process) model or EMA state dict cut to what `model` holds: its slice of every expert
    tensor. Tensors not of the full shape are left for the loader's strict shape check to report."""
    out = dict(tensors)
    for name, (first, n, total) in expert_slices(model).items():
        t = out.get(name)
        if t is not None and t.shape[0] == total:
            out[name] = t[first:first + n].clone()
    return out


def local_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """A full optimizer state dict (parameters indexed in group order, as torch saves it) cut to `model`'s expert
    slices: every per-element state tensor of an expert parameter (AdamW moments, AdamWBF16's master copy)."""
    params = dict(model.named_parameters())
    index = _optimizer_index(optimizer)
    state = dict(state_dict["state"])
    for name, (first, n, total) in expert_slices(model).items():
        i = index[id(params[name])]
        if i not in state:
            continue
        full = torch.Size((total, *params[name].shape[1:]))
        st = dict(state[i])
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if v.shape != full:
                    raise ValueError(f"optimizer state {k!r} of {name} has shape {tuple(v.shape)}, expected the "
                                     f"full {tuple(full)}")
                st[k] = v[first:first + n].clone()
        state[i] = st
    return {**state_dict, "state": state}


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: {}
