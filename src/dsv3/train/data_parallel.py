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

Checkpoints are sharded (dsv3.train.checkpoint.save_sharded, dsv3.parallel.dcp): every rank writes the rows it
holds, nothing is gathered, and a checkpoint resumes at any world size and layout; a single-process checkpoint is
cut to each rank's rows at resume (`load_whole_into`). The EMA lives on the ranks of row 0 (rank 0 alone when
ep == 1), each averaging its own slice. Pipeline parallelism (DualPipeV, a (dp, ep) layout per pipeline position)
is a trainer layout too: dsv3.train.pipeline_step.

parallel.fsdp (ZeRO-3 through FSDP2, any ep, also 1): after `parallelize` (also with ep == 1: a (dp, 1) mesh) and
after apply_recompute, `shard_data_parallel_2d` shards every parameter (experts over their dp column, the rest over
the world), so the optimizer built afterwards holds sharded state too. FSDP reduce-scatters the gradients in
backward (no `sync_gradients`); the global norm is `grad_norm_sharded` (every element on exactly one rank) and
clipping scales the local shards. The fused-AdamW clip-in-optimizer and compiled paths are off (CUDA-only and not
verified on DTensor gradients; config refuses compile_optimizer). Every rank validates its rows: the forward's
parameter all-gathers are collectives. Recompute before FSDP, as torchtitan does AC before fully_shard: recompute
wraps methods inside the FSDP units (RMSNorm/MLP forward, Experts `ffn`, MLA `_attend_naive`) while FSDP hooks
the units' __call__, and a unit's pre-backward all-gather runs before its checkpointed regions are recomputed.
The EMA lives on every rank, each averaging its own local shards (1/world of the model in CPU memory per rank).
With one process (world 1) fsdp is a no-op, so a FSDP run's checkpoint resumes in one plain process as configured.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

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
        between them and keep the EMA of their slices; the other rows hold replicas."""
        return self.rank < self.ep

    @property
    def keeps_ema(self) -> bool:
        """Under FSDP every rank averages its own shards; otherwise row 0 does (the other rows hold replicas)."""
        return self.fsdp or self.first_row

    @property
    def partitioned(self) -> bool:
        """Whether a rank holds only a part of the model (expert slices, FSDP shards, pipeline chunks): the clipping
        norm is then `grad_norm`, a collective, and every rank takes part in validation."""
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

    def parallelize(self, cfg, device: torch.device) -> tuple[nn.Module, str | None]:
        """The training model of `cfg` laid out over this job's ranks, the one place the trainer builds it, in this
        order (each step needs the one before; torchtitan's order):
          1. describe the model on the meta device (nothing allocated; dsv3.train.trainer.build_model);
          2. FP8 (train.precision=fp8): swap the linear / expert classes in place;
          3. expert parallelism and the pipeline split (`apply`): expert slices, this rank's chunks;
          4. selective recomputation (train.recompute): wraps methods inside the future FSDP units;
          5. FSDP2 (parallel.fsdp, `shard_parameters`): DTensor shards, experts over their dp column;
          6. materialise what this rank owns (dsv3.parallel.materialize): its chunks, slices and shards only,
             initialised to the single-process values.
        Compilation (train.compile, CUDA) wraps the blocks afterwards, in the trainer. Returns (model, a log line
        on FSDP's sharding or None). Every rank must call it (FSDP's count is a collective)."""
        from ..parallel.materialize import materialize
        from ..parallel.two_hop import apply_ep_dispatch
        from .recompute import apply_recompute
        from .trainer import build_model
        model = build_model(cfg, "meta")
        if cfg.train.precision == "fp8":
            from ..fp8.training import apply_fp8
            apply_fp8(model, experts=cfg.train.fp8_experts, linears=cfg.train.fp8_linears)
        self.apply(model)
        apply_ep_dispatch(model, cfg.parallel)          # 3b. parallel.ep_dispatch = "two_hop" (dsv3.parallel.two_hop)
        if cfg.train.recompute:
            apply_recompute(model)
        note = self.shard_parameters(model)
        materialize(self.owned(model), device, cfg.train.seed, cfg.model.init_std)
        return model, note

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


def expert_slices(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """{parameter name: (first expert, local experts, all experts)} of every expert-parallel parameter (dim 0 is
    the expert); empty for an unsharded model."""
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, ExpertParallelExperts):
            for pname, p in m.named_parameters(recurse=False):
                out[f"{mname}.{pname}"] = (m.first_expert, p.shape[0], m.n_experts)
    return out


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: {}
