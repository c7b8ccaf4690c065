"""An expert-parallel group as a prefill or decode worker of a disaggregated deployment (TR 3.4: prefill and decode
run as separate groups, each with its own expert parallelism):

    torchrun --nproc-per-node 4 -m dsv3.cli serve --model DIR --ep 4 --role prefill --pd-listen 127.0.0.1:7001
    torchrun --nproc-per-node 4 -m dsv3.cli serve --model DIR --ep 4 --role decode --pd-listen 127.0.0.1:7002
    dsv3 serve --model DIR --role router --prefill 127.0.0.1:7001 --decode 127.0.0.1:7002

Each rank runs the role's engine over its EPEngine (`EPPrefillEngine`, `EPDecodeEngine`: the role's behaviour, the
EP group's experts, lockstep and rebalancing); rank 0 serves the router's connection (dsv3.infer.disagg's worker
loop) with the group's EPFront (dsv3.infer.ep_driver) as its engine, which spreads requests over the ranks. A
prefilled request's hand-off is written by the rank that prefilled it and read by the decode rank it goes to: in
shared memory (both groups on one machine), or inline through the router (`--pd-handoff inline`: any machines).
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable

import torch

from .config import EngineConfig, ExpertParallelConfig
from .disagg import DecodeEngine, PrefillEngine, check_listen_address, open_listener, parse_address, serve_worker
from .ep_driver import ep_front
from .ep_engine import EPEngine


class EPPrefillEngine(PrefillEngine, EPEngine):
    """A prefill group's rank: PrefillEngine's requests (each ends at its first token, its latents exported) over the
    EP group's forward."""


class EPDecodeEngine(DecodeEngine, EPEngine):
    """A decode group's rank: DecodeEngine's imports over the EP group's forward; a rank with only imports waiting
    has work (the group's collective `has_unfinished` counts them)."""

    def _local_unfinished(self) -> bool:
        return super()._local_unfinished() or bool(self._imports)


def run_ep_worker(role: str, load: Callable[..., tuple], config: EngineConfig, ep_config: ExpertParallelConfig,
                  ep: int, address: str, key: str | None = None, threads: int | None = None,
                  device: str = "cuda", handoff: str = "shm") -> None:
    """`dsv3 serve --ep N --role prefill|decode` under torchrun: rank 0 listens at `address` until a router says stop
    (or SIGTERM), then releases the other ranks, which follow it until then (dsv3.infer.ep_driver.ep_front: `load`,
    `device`; `handoff`: a prefill group's, PrefillEngine's)."""
    check_listen_address(parse_address(address)[0], key)          # before anything is loaded
    if threads:
        torch.set_num_threads(threads)
    engine_class = functools.partial(EPPrefillEngine, handoff=handoff) if role == "prefill" else EPDecodeEngine
    front = ep_front(load, config, ep_config, ep, device, engine_class=engine_class)
    if front is None:                        # a follower: rank 0 has stopped
        return
    # torchrun forwards SIGTERM to every rank: the followers ignore it, rank 0 leaves its loop and releases them
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with open_listener(address, key) as listener:
            print(f"{role} worker (EP group of {ep}) listening on {address}", flush=True)
            serve_worker(front, listener)
    finally:
        front.close()
