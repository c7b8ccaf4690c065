"""One front end for an EP group: rank 0 takes every request and the other ranks follow (`dsv3 serve --ep N`).

`EPFront` wraps rank 0's EPEngine in the Engine interface a server drives (add_request, abort, step,
has_unfinished, stats, limits, tokenizer); the other ranks run `follow(engine)`. Each round rank 0 broadcasts one
message on a gloo control group (CPU objects, whatever the data backend is):
  * ("step", commands): the adds and aborts queued since the last step, each add tagged with the rank that serves
    it (the rank with the fewest tokens in flight, prompt + max_tokens of each request: DP attention spreads requests
    and each rank keeps its own cache, so what fills a rank is tokens, not requests);
    every rank applies its own, steps once (the EP forward is collective: idle ranks pad), and the outputs come
    back to rank 0 (gather), renamed to the front's request ids, with each rank's stats;
  * ("stats",): every rank's stats, gathered (before any step); the front reports the sums and each rank's part;
  * ("stop",): the followers return.
The front steps whenever any request it handed out is unfinished, so the group stays in lockstep without a vote.

An EP group as a prefill or decode worker of a disaggregated deployment (dsv3.infer.ep_disagg) uses the same front:
adds of prefilled requests ("decode", with their hand-off) go to a rank like any add, a prefill rank's exported
hand-offs come back with its outputs, and what a rank refuses comes back to be answered (`take_refused`).
"""

from __future__ import annotations

import datetime
import itertools
import os
import signal
from collections.abc import Callable

import torch
import torch.distributed as dist

from .config import EngineConfig, ExpertParallelConfig
from .disagg import discard_kv
from .engine import RequestOutput
from .ep_engine import EPEngine
from .sampling import SamplingParams


def _round(control: dist.ProcessGroup, message: tuple | None) -> tuple:
    box = [message]
    dist.broadcast_object_list(box, src=dist.get_global_rank(control, 0), group=control)
    return box[0]


class _Rank:
    """What every rank (rank 0 included) does with a round's message."""

    def __init__(self, engine: EPEngine, control: dist.ProcessGroup):
        self.engine, self.control = engine, control
        self.rank = dist.get_rank(control)
        self.to_front: dict[int, int] = {}        # engine request id -> front request id

    def apply(self, message: tuple) -> list | None:
        if message[0] == "step":
            refused = []
            for cmd in message[1]:
                if cmd[0] == "abort":
                    for rid, fid in self.to_front.items():
                        if fid == cmd[1]:
                            self.engine.abort(rid)
                elif cmd[2] == self.rank:      # ("add", fid, rank, ids, params) / ("decode", ..., first, params, kv)
                    try:
                        rid = self.engine.add_request(*cmd[3:]) if cmd[0] == "add" else \
                            self.engine.add_prefilled(*cmd[3:])
                    except Exception as e:     # (the front checked the request; e.g. a hand-off it cannot read)
                        refused.append((cmd[1], e))
                        continue
                    self.to_front[rid] = cmd[1]
            outs = self.engine.step()
            exported = getattr(self.engine, "exported", {})
            handles = {}
            for out in outs:
                rid = out.request_id
                out.request_id = self.to_front.pop(rid) if out.finished else self.to_front[rid]
                if rid in exported:
                    handles[out.request_id] = exported.pop(rid)
            return self._gather((outs, handles, refused, self.engine.stats()))
        if message[0] == "stats":
            return self._gather(self.engine.stats())
        return None

    def _gather(self, value):
        got = [None] * dist.get_world_size(self.control) if self.rank == 0 else None
        dist.gather_object(value, got, dst=dist.get_global_rank(self.control, 0), group=self.control)
        return got


def follow(engine: EPEngine, control: dist.ProcessGroup) -> None:
    """A rank > 0: apply rank 0's rounds until it says stop."""
    me = _Rank(engine, control)
    while True:
        try:
            message = _round(control, None)
        except RuntimeError as e:      # gloo: the connection closed, rank 0 exited without a stop
            raise RuntimeError(f"EP rank 0 is gone without releasing rank {me.rank}: {e}") from None
        if message[0] == "stop":
            return
        me.apply(message)


# the ranks' stats the front reports as sums (the rest: rank 0's, and each rank's in `ep_ranks`)
_SUMMED = ("running", "waiting", "free_blocks", "num_blocks", "preemptions", "prefix_hits", "referenced_blocks",
           "spec_steps", "spec_proposed", "spec_accepted", "kv_bytes_sent", "kv_bytes_received")


class EPFront:
    def __init__(self, engine: EPEngine, control: dist.ProcessGroup):
        self.engine, self.control = engine, control
        self.limits, self.tokenizer = engine.limits, engine.tokenizer
        self.role = getattr(engine, "role", None)          # a disaggregated worker's ("prefill" / "decode")
        self.me = _Rank(engine, control)
        self._ids = itertools.count()
        self._commands: list[tuple] = []
        self.owner: dict[int, int] = {}                      # front request id -> rank, until finished
        self.tokens = [0] * dist.get_world_size(control)     # per rank: prompt + max_tokens of its requests
        self._cost: dict[int, int] = {}
        self.exported: dict = {}                             # a prefill group's hand-offs, by front request id
        self.step_request_ids: list[int] = []                # the requests the last step ran (all in flight)
        self._refused: list[tuple[int, Exception]] = []
        self._per_rank: list[dict] | None = None             # the ranks' stats after the last step
        self.broken = False                                  # a step failed: the group is out of step

    def check_request(self, prompt, params: SamplingParams) -> list[int]:
        return self.engine.check_request(prompt, params)

    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        params = params or SamplingParams()
        ids = self.check_request(prompt, params)
        return self._queue("add", len(ids) + params.max_tokens, ids, params)

    def add_prefilled(self, prompt_ids: list[int], first: RequestOutput, params: SamplingParams, handle) -> int:
        """A decode group's: a request a prefill worker ran, checked here (DecodeEngine.check_prefilled; refused: its
        hand-off discarded) and imported by the rank it goes to."""
        try:
            ids = self.engine.check_prefilled(prompt_ids, params, handle)
        except ValueError:
            discard_kv(handle)
            raise
        return self._queue("decode", len(ids) + params.max_tokens, ids, first, params, handle)

    def _queue(self, kind: str, cost: int, *args) -> int:
        fid, rank = next(self._ids), min(range(len(self.tokens)), key=self.tokens.__getitem__)
        self._commands.append((kind, fid, rank, *args))
        self.owner[fid], self._cost[fid] = rank, cost
        self.tokens[rank] += cost
        return fid

    def _done(self, fid: int) -> None:
        self.tokens[self.owner.pop(fid)] -= self._cost.pop(fid)

    def abort(self, request_id: int) -> None:
        if request_id in self.owner:
            self._commands.append(("abort", request_id))

    def has_unfinished(self) -> bool:
        return bool(self.owner)

    def step(self) -> list[RequestOutput]:
        """One lockstep step of the group. A step that raises (a rank gone, a forward that failed on this rank)
        leaves the ranks out of step (some may wait in a collective for ever): the front is `broken` from then on,
        and its loops end instead of stepping again (dsv3.serve.engine_loop, dsv3.infer.disagg.serve_worker)."""
        if self.broken:
            raise RuntimeError("this EP group stopped stepping after a failure; restart the group")
        message = ("step", self._commands)
        self._commands = []
        self.step_request_ids = list(self.owner)
        try:
            per_rank = self.me.apply(_round(self.control, message))
        except Exception:
            self.broken = True
            raise
        outputs = [o for outs, *_ in per_rank for o in outs]
        for _, handles, refused, _ in per_rank:
            self.exported |= handles
            self._refused += refused
            for fid, _ in refused:
                self._done(fid)
        self._per_rank = [stats for *_, stats in per_rank]
        for out in outputs:
            if out.finished:
                self._done(out.request_id)
        return outputs

    def take_refused(self) -> list[tuple[int, Exception]]:
        """(front request id, exception) of the requests their ranks refused since the last call."""
        refused, self._refused = self._refused, []
        return refused

    def stats(self) -> dict:
        """The sums over the ranks (as of the last step; gathered now before the first; rank 0's alone once the
        group is broken)."""
        per_rank = self._per_rank or ([self.engine.stats()] if self.broken else
                                      self.me.apply(_round(self.control, ("stats",))))
        total = {k: sum(s[k] for s in per_rank) for k in _SUMMED if k in per_rank[0]}
        total["cache_usage"] = 1 - total["free_blocks"] / total["num_blocks"]
        first = per_rank[0]
        return first | total | dict(unfinished=self.has_unfinished(), ep_ranks=per_rank)

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None) -> list:
        """Run prompts to completion over the group (offline use and tests); outputs in prompt order."""
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        final = {}
        while self.has_unfinished():
            final.update({o.request_id: o for o in self.step() if o.finished})
        return [final[i] for i in ids]

    def close(self) -> None:
        """Release the followers (they return from `follow`); a follower already gone is not an error here."""
        try:
            _round(self.control, ("stop",))
        except (RuntimeError, OSError) as e:
            print(f"EP front: could not release every follower rank ({e})", flush=True)


def init_ep_group(ep: int, device: str = "cuda") -> str:
    """Join the torchrun group: NCCL with one GPU per rank where `device` (`--device`) is CUDA, gloo on the CPU;
    returns this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world != ep:
        raise ValueError(f"--ep {ep} runs under torchrun with {ep} processes (torchrun --nproc-per-node {ep} -m "
                         f"dsv3.cli serve ...); WORLD_SIZE is {world or 'unset'}")
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"--ep {ep} on CUDA needs one GPU per process on each node; this one has "
                             f"{torch.cuda.device_count()} (--device cpu serves over gloo)")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    else:
        device = "cpu"
    if not dist.is_initialized():
        # followers wait in a broadcast for as long as rank 0's server is idle
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(days=365))
    return device


def ep_front(load: Callable[[str, ExpertParallelConfig], tuple], config: EngineConfig,
             ep_config: ExpertParallelConfig, ep: int, device: str = "cuda",
             engine_class: Callable[..., EPEngine] = EPEngine) -> EPFront | None:
    """Rank 0: the front end to serve (its `close()` releases the others). Other ranks: follow rank 0 and return
    None once it says stop; they ignore SIGINT/SIGTERM (torchrun forwards them to every rank), so the front drains
    its requests and stops them. `load(device, ep_config)` gives (model, tokenizer, placement): the model whole
    (placement None) or holding its slots of `placement` already (dsv3.infer.ep_load); `device` as in
    init_ep_group; `engine_class`: EPEngine or a disaggregated worker's (dsv3.infer.ep_disagg)."""
    device = init_ep_group(ep, device)
    model, tokenizer, placement = load(device, ep_config)
    engine = engine_class(model, tokenizer, config, ep_config=ep_config, placement=placement)
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))
    if dist.get_rank() == 0:
        return EPFront(engine, control)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    follow(engine, control)
    dist.destroy_process_group()
    return None
