"""`dsv3 serve --ep N` under torchrun: N processes, one HTTP front end.

    torchrun --standalone --nproc-per-node 2 -m dsv3.cli serve --model DIR --ep 2 \
        [--redundant-experts 2 --rebalance-interval 64 --two-batch-overlap]

Every process loads its share of the model (from a Hugging Face directory only the tensors outside the routed
experts and its slots' experts, FP8 block weights with `--fp8`: dsv3.infer.ep_load; a training run whole, each rank
then keeping its slots) and builds an EPEngine (dsv3.infer.ep_engine); rank 0 serves HTTP with `EPFront` as its
engine (requests spread over the ranks by load) and the other ranks follow it (dsv3.infer.ep_driver) until it
stops.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import torch

from ..infer.config import EngineConfig, ExpertParallelConfig
from ..infer.ep_driver import ep_front
from .async_engine import AsyncEngine


def ep_config_from_args(args) -> ExpertParallelConfig:
    """The ExpertParallelConfig of `dsv3 serve --ep N`'s flags (a front end's and a disaggregated worker's)."""
    return ExpertParallelConfig(redundant_experts=args.redundant_experts, rebalance_interval=args.rebalance_interval,
                                num_nodes=args.ep_nodes, two_batch_overlap=args.two_batch_overlap)


class EPAsyncEngine(AsyncEngine):
    """AsyncEngine over rank 0's EPFront whose shutdown (the server's lifespan end, after draining) also releases the
    follower ranks."""

    def _stop_backend(self) -> None:
        super()._stop_backend()
        self.engine.close()


def ep_serving_front(args, config: EngineConfig, load: Callable[..., tuple], threads: int,
                     device: str) -> EPAsyncEngine | None:
    """`dsv3 serve --ep N`'s engine from its flags (see ep_front) on `device` ("cpu" or "cuda": one GPU per rank),
    stepped with `threads` torch threads; None on a follower rank once rank 0 has stopped."""
    torch.set_num_threads(threads)
    front = ep_front(load, config, ep_config_from_args(args), args.ep, device)
    if front is None:
        return None
    # torchrun forwards SIGTERM to every rank: uvicorn drains, the lifespan end releases the followers, and the
    # signal uvicorn re-raises afterwards ends rank 0 with status 0 (a death by signal would read as a failure)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return EPAsyncEngine(front, args.max_pending)
