"""`dsv3 train` under torchrun: plain data parallelism (replicated model, averaged gradients).

    torchrun --standalone --nproc_per_node 2 -m dsv3.cli train --config configs/tiny.toml

Every rank reads the same global micro-batches from the same data stream and keeps its slice of the rows (rank r
of W takes rows [r B/W, (r+1) B/W)), so the data order, and therefore a checkpoint's data position, is the
single-process one. After the backward passes the gradients are averaged over the ranks (each rank's loss is a
mean over its own equal-sized slice, so the average is the gradient of the global mean), the routing loads are
summed (the aux-loss-free bias update then sees the global loads, identical on every rank, spec 1.7) and the
logged losses averaged. Rank 0 alone writes the run directory (config, tokenizer, metrics, checkpoints: the usual
single-process format, so a run resumes at any world size); the others wait for it at barriers.

The sharded layouts (FSDP2, expert and pipeline parallelism) live in dsv3.parallel and are not wired into the
trainer yet.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..parallel.expert import all_reduce_flat


class DataParallel:
    def __init__(self, device: torch.device):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, window: torch.Tensor) -> torch.Tensor:
        rows = window.shape[0] // self.world
        return window[self.rank * rows:(self.rank + 1) * rows]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def average_gradients(self, params) -> None:
        if self.world > 1:
            all_reduce_flat([p.grad for p in params if p.grad is not None], dist.group.WORLD, 1.0 / self.world)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world if self.world > 1 else t


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: {}
