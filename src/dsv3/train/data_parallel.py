"""`dsv3 train` under torchrun: the layout of the ranks, data parallelism with optional expert parallelism inside.

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
Pipeline parallelism is not a trainer layout (dsv3.parallel.pipeline).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.expert import ExpertParallelExperts, all_reduce_flat
from ..parallel.parallelize import grad_norm_2d, parallelize, sync_gradients_2d


class Layout:
    """The ranks of the job (one process: world 1) and the trainer's collectives over them."""

    def __init__(self, device: torch.device, ep: int = 1):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # the world is only known here: RunConfig.check_world validates it against ep and the micro-batch
        self.device, self.ep, self.dp = device, ep, self.world // ep
        self.mesh = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def first_row(self) -> bool:
        """Rank (0, e) of the (dp, ep) mesh, i.e. rank < ep (rank 0 alone when ep == 1): these ranks hold all experts
        between them, keep the EMA of their slices and send them to rank 0 at save; the other rows hold replicas."""
        return self.rank < self.ep

    def describe(self) -> str:
        if self.world == 1:
            return ""
        if self.ep == 1:
            return f" x {self.world} data-parallel ranks"
        return f" x {self.world} ranks (dp {self.dp} x ep {self.ep})"

    def apply(self, model: nn.Module) -> nn.Module:
        """Shard the routed experts (ep > 1) in place: after apply_fp8, before apply_recompute and the optimizer."""
        if self.ep > 1:
            parallelize(model, None, self.dp, self.ep)
            self.mesh = model.parallel_mesh
        return model

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
        """The gradients of the mean loss over all ranks' tokens, on every rank (every rank must call it)."""
        if self.mesh is not None:
            sync_gradients_2d(model, self.mesh)
        else:
            self.average_gradients(model.parameters())

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """The global gradient norm under expert parallelism (float64, the same on every rank)."""
        return grad_norm_2d(model, self.mesh)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        # also the expert loads: summing the step's accumulated loads over the world is what sync_expert_loads_2d
        # does for one forward, once per step instead of once per micro-batch
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world if self.world > 1 else t

    # ---- checkpoints in the single-process format -----------------------------------------------------------------
    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   ema_state: dict[str, torch.Tensor] | None) -> tuple[dict, dict, dict | None] | None:
        """(model state dict, optimizer state dict, EMA state) with every expert tensor whole, on rank 0; None on
        the other ranks. Every rank must call it (the ranks of row 0 send their slices)."""
        if self.mesh is None:
            return (model.state_dict(), optimizer.state_dict(), ema_state) if self.is_main else None
        if not self.first_row:           # rows d > 0 hold replicas of row 0's slices: nothing to send
            return None
        params = dict(model.named_parameters())
        index = _optimizer_index(optimizer)
        model_sd, optim_sd = model.state_dict(), optimizer.state_dict()
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
