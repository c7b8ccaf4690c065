"""`dsv3 train` under torchrun: the ranks of the job and the trainer's collectives over them (`Layout`), for every
layout at once: data parallelism, expert parallelism inside it, FSDP2, and DualPipeV pipeline parallelism with a
(dp, ep) layout at every pipeline position; one process is the world of one rank.

    torchrun --standalone --nproc_per_node 2 -m dsv3.cli train --config configs/tiny.toml                 # dp 2
    torchrun --standalone --nproc_per_node 4 -m dsv3.cli train --config configs/tiny.toml parallel.ep=2   # dp 2 x ep 2

world = pp * dp * ep ranks (dsv3.train.config.ParallelConfig; dp = world / (pp * ep) implied), one DeviceMesh
(dsv3.parallel.mesh.ParallelMesh), global rank = (p * dp + d) * ep + e. The model is laid out by the one entry point
dsv3.parallel.parallelize.parallelize (FP8 -> EP -> pipeline split -> recomputation -> compile -> FSDP2 -> this
rank's part materialised); the gradient sync, the global gradient norm and the load sync are dsv3.parallel.grads's,
one function each for every layout; the losses and validation metrics are dsv3.train.losses's.

Every rank reads the same global micro-batches from the same data stream and keeps its share of the rows (rank
(p, d, e) rows [j r, (j+1) r), j = d * ep + e, r = B / (dp * ep)), so the data order, and therefore a checkpoint's
data position, is the single-process one. The routing loads are summed over the world (the aux-loss-free bias
update then sees the global loads, identical on every rank, spec 1.7) and the logged losses averaged. Rank 0 alone
writes the run directory (config, tokenizer, metrics, checkpoints); the others wait for it at barriers.

Checkpoints are sharded (dsv3.train.checkpoint.save_sharded, dsv3.parallel.dcp): every rank writes the rows it
holds, nothing is gathered, and a checkpoint resumes at any world size and layout; a single-process checkpoint is
cut to each rank's rows at resume (`load_whole_into`). The EMA is shared out over every rank, each averaging ~1/world
of the model (its share of the rows it holds; under FSDP its own shards) in CPU memory (dsv3.train.ema). With one
process (world 1) fsdp is a no-op, so a FSDP run's checkpoint resumes in one plain process as configured. The
fused-AdamW clip-in-optimizer and compiled-optimizer paths are off under FSDP (CUDA-only and not verified on DTensor
gradients; the config refuses compile_optimizer with fsdp).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..config import ConfigError
from ..parallel import grads
from ..parallel.mesh import ParallelMesh


class Layout:
    """The ranks of the job (one process: world 1, no mesh), which rows of every batch this rank feeds, and the
    trainer's collectives over them."""

    def __init__(self, device: torch.device, cfg):
        """cfg: the RunConfig; its layout is validated against the world (RunConfig.check_world) before any group
        is built."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.timeout = timedelta(minutes=cfg.parallel.timeout_minutes)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=self.timeout)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        par = cfg.parallel
        self.device, self.pp, self.ep = device, par.pp, par.ep
        self.dp = cfg.check_world(self.world)
        # sharding over one process would shard nothing: a no-op, so a FSDP run resumes in one plain process
        self.fsdp = par.fsdp and self.world > 1
        self.zero1 = par.zero1 and self.world > 1             # dsv3.parallel.zero; the config refuses it with fsdp
        self.overlap = par.overlap and self.pp > 1
        self.mesh = ParallelMesh(self.pp, self.dp, self.ep, device.type, self.overlap) if self.world > 1 else None
        self.replicas = self.dp * self.ep                     # ranks that share every micro-batch's rows
        self.share = self.mesh.share if self.mesh is not None else 0
        self.rows = cfg.pipeline_microbatch(self.dp) if self.pp > 1 else None   # rows of a DualPipeV micro-batch
        self.apply_timeout()

    def apply_timeout(self) -> None:
        """parallel.timeout_minutes on every process group of this rank. init_process_group's timeout is the
        default group's only: the mesh's groups, the checkpoint writer's and DualPipe's take torch's defaults (30 min
        gloo, 10 min NCCL) when made, so the Trainer calls this again once it has made them all. torchtitan sets its
        step timeout the same way (through the same private setter)."""
        if not dist.is_initialized():
            return
        c10d = dist.distributed_c10d
        for group in list(c10d._world.pg_map):
            if not c10d._rank_not_in_group(group):
                c10d._set_pg_timeout(self.timeout, group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def partitioned(self) -> bool:
        """Whether a rank holds only a part of the model (expert slices, FSDP shards, pipeline chunks): every rank
        then takes part in validation (its forward runs collectives)."""
        return self.ep > 1 or self.fsdp or self.pp > 1

    def describe(self) -> str:
        if self.world == 1:
            return ""
        if self.pp > 1:
            how = "DualPipeV" + (" with F/B overlap" if self.overlap else "") + (", FSDP" if self.fsdp else "") + \
                (", ZeRO-1" if self.zero1 else "")
            return f" x {self.world} ranks (pp {self.pp} x dp {self.dp} x ep {self.ep}, {how})"
        if self.zero1:
            return f" x {self.world} ranks (dp {self.dp} x ep {self.ep}, ZeRO-1)"
        if self.ep == 1:
            return f" x {self.world} data-parallel ranks" + (" (FSDP)" if self.fsdp else "")
        return f" x {self.world} ranks (dp {self.dp} x ep {self.ep}{', FSDP' if self.fsdp else ''})"

    def fsdp_note(self, local) -> str | None:
        """Under FSDP, a line for the run's log saying what is sharded (from what this rank holds, `local`: how many
        parameters are DTensors, how many elements this rank and all ranks hold); None otherwise. Every rank must
        call it."""
        if not self.fsdp:
            return None
        params = list(local.parameters())
        n_dt = sum(isinstance(p, DTensor) for p in params)
        held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
        total = self.sum(torch.tensor(held, dtype=torch.int64, device=self.device)).item()
        return (f"FSDP: {n_dt} of {len(params)} parameters sharded (DTensor); rank {self.rank} holds {held} of "
                f"{total} parameter elements")

    def shard(self, window: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a micro-batch read whole."""
        rows = window.shape[0] // self.replicas
        return window[self.share * rows:(self.share + 1) * rows]

    def shard_any(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch of any size (a validation batch of a batch source, e.g. SFT's last, shorter
        one): rows [j n / R, (j + 1) n / R) of its n rows for share j of R, none for some ranks when n < R; the
        rows of `shard` when R divides n. No row is dropped."""
        n = batch.shape[0]
        return batch[self.share * n // self.replicas:(self.share + 1) * n // self.replicas]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sync_gradients(self, local) -> None:
        """The gradients of the step's mean loss on every rank (dsv3.parallel.grads; every rank must call it)."""
        grads.sync_gradients(local, self.mesh)

    def grad_norm(self, local) -> torch.Tensor:
        """The global gradient norm, each element counted once (dsv3.parallel.grads): float64, the same on every
        rank (every rank must call it)."""
        return grads.grad_norm(local, self.mesh)

    def sync_loads(self, loads: torch.Tensor) -> torch.Tensor:
        """The (MoE layers, E) loads table summed over all ranks (dsv3.parallel.grads)."""
        return grads.sync_loads(loads)

    @staticmethod
    @torch.no_grad()
    def scale_gradients(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
        """grads *= coef (a plain 0-d tensor): on the local shards of DTensor gradients, since DTensor ops refuse a
        plain tensor operand and the coefficient is the same on every rank anyway."""
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
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

    def from_rank_0(self, obj):
        """Rank 0's `obj` (any picklable value) on every rank (every rank must call it)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def first_error(self, message: str) -> str:
        """The lowest rank's non-empty `message` ("" when none has one), on every rank (every rank must call it):
        one decision, and one reason rank 0 can give, for a check that the ranks share out."""
        if self.world == 1:
            return message
        every = [None] * self.world
        dist.all_gather_object(every, message)
        return next((m for m in every if m), "")


def is_collective_timeout(e: BaseException) -> bool:
    """Whether `e` is a collective that gave up waiting for another rank (gloo: "Timed out waiting 60000ms for recv
    operation"; NCCL's watchdog: "... collective operation timeout ..."; the store: "... timed out ...")."""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("timed out" in text or "operation timeout" in text)


def timeout_message(e: BaseException) -> str:
    """The one line for a collective timeout: what it means, the setting that bounds it, what to do."""
    first = str(e).strip().split("\n")[0][:200]
    return (f"a collective waited longer than parallel.timeout_minutes for another rank, which hung, died (see its "
            f"own error) or was still busy (rank 0 alone building the token cache, verifying or committing a large "
            f"checkpoint); if it was only slow, raise parallel.timeout_minutes and resume ({first})")


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: {}


def refuse_ranks(command: str) -> None:
    """For a trainer whose step replaces `Trainer._forward_backward` (GRPO, logit distillation): that step neither
    splits its batch over the ranks nor syncs gradients, so under torchrun every rank would train on the whole batch
    and an expert-parallel rank would receive each token's expert gradient once per rank. Refused in one line."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError(f"dsv3 {command} runs in one process (its step is not split over ranks): run it without "
                          f"torchrun")
