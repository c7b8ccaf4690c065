"""EPEngine: the engine on one rank of an expert-parallel group with data-parallel attention (TR 3.4's decode
layout at small scale).

Every rank runs its own Engine: its own requests, scheduler, block manager and latent cache (DP attention: a
request's attention and cache live on one rank only). The routed experts of every MoE layer are sharded over the
group (dsv3.infer.ep_experts: physical slots placed by EPLB, the all-to-all exchange of dsv3.parallel.expert), so
each MoE layer is a collective and the ranks must run their forwards in lockstep:
  * `has_unfinished()` is collective: True on every rank while any rank has work, so every rank's driver loop
    (`generate`, a server's step loop) calls `step()` the same number of times;
  * a step runs exactly one forward on every rank; a rank with nothing scheduled runs a one-token padding row
    written to the cache's scratch block (its routing loads are not counted);
  * every `rebalance_interval` steps the group's expert loads of the window are all-reduced, every rank computes the
    same new placement (dsv3.infer.eplb) and the expert weights move between steps: no request is paused or changed.
With `two_batch_overlap` each forward runs as two overlapping micro-batches (dsv3.infer.two_batch). With one rank
the group is trivial and the outputs are the plain Engine's.

MTP speculation (spec 1.8): a step of any kind (plain, fused greedy, draft + verify) runs the main model exactly once,
so lockstep holds; the MTP module, which a rank runs as many times a step as its own batch needs (catch-up, chained
drafts), keeps its experts whole on every rank and runs alone (dsv3.infer.ep_experts.ep_moe_layers): V3's cost, one
layer's 256 experts on each rank (11.3 GB in FP8). A rank that does not speculate need not hold the module at all
(dsv3.infer.ep_load, `mtp=False`). Not supported here: speculation with `two_batch_overlap` (a speculative step's
forward is not split, a plain one's is: the ranks' collectives would differ), and CUDA graphs (the exchange reads
split sizes on the host).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from ..model import Transformer
from ..parallel.grads import sync_loads
from .config import EngineConfig, ExpertParallelConfig
from .engine import Engine
from .ep_experts import PlacedExperts, ep_moe_layers, move_experts, place_experts
from .eplb import Placement, identity_placement, rebalance_experts
from .batch import padding_row
from .two_batch import TwoBatchRunner


def initial_placement(cfg, ep_size: int, ep_config: ExpertParallelConfig) -> Placement:
    """The placement an EP group starts from: slot e holds expert e, or, with redundant slots or rebalancing, EPLB's
    for uniform loads (no loads seen yet; this also checks the layout before anything is loaded). `cfg`: the model
    config."""
    slots = cfg.n_routed_experts + ep_config.redundant_experts
    if slots % ep_size:
        raise ValueError(f"n_routed_experts + redundant_experts = {slots} must be a multiple of the EP size {ep_size}")
    layers = moe_layer_count(cfg)
    if ep_config.redundant_experts or ep_config.rebalance_interval:
        return rebalance_experts(torch.ones(layers, cfg.n_routed_experts), slots, cfg.n_group, ep_config.num_nodes,
                                 ep_size)
    return identity_placement(layers, cfg.n_routed_experts)


def moe_layer_count(cfg) -> int:
    """MoE layers an EP group places in the model `cfg` describes: the main model's (ep_moe_layers' count, without
    building it)."""
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


class EPEngine(Engine):
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None,
                 group: dist.ProcessGroup | None = None, ep_config: ExpertParallelConfig | None = None,
                 placement: Placement | None = None):
        """`model` holds every expert (a loaded checkpoint) and its experts are sharded in place over `group`, or,
        with `placement`, it holds its slots of that placement already (dsv3.infer.ep_load: each rank read only
        its own)."""
        self.group = group or dist.group.WORLD
        self.ep_config = ep = ep_config or ExpertParallelConfig()
        # no graphs and no overlap schedule: the exchange reads split sizes on the host in every MoE layer, so a step
        # syncs anyway (and every rank must run its forward in the same step() call)
        config = replace(config or EngineConfig(), cuda_graphs=False, overlap_schedule="off")
        if config.num_speculative_tokens and ep.two_batch_overlap:
            raise ValueError("ExpertParallelConfig.two_batch_overlap: not with MTP speculation "
                             "(num_speculative_tokens)")
        self.ep_size, self.ep_rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.model_config = cfg = model.config
        self.num_slots = cfg.n_routed_experts + ep.redundant_experts
        layers = len(ep_moe_layers(model))
        if placement is None:
            self.placement = initial_placement(cfg, self.ep_size, ep)
            place_experts(model, self.group, self.placement)
        else:
            placed = [m.experts for _, m in ep_moe_layers(model)]
            if placement.num_physical != self.num_slots or placement.phy2log.shape[0] != layers or \
                    not all(isinstance(m, PlacedExperts) for m in placed):
                raise ValueError(f"EPEngine: the model's experts are not placed as a placement of {layers} layers x "
                                 f"{self.num_slots} slots says")
            self.placement = placement
        super().__init__(model, tokenizer, config)
        if ep.two_batch_overlap:      # new_group is collective over the default group: every process calls it
            second = dist.new_group(dist.get_process_group_ranks(self.group))
            self.runner = TwoBatchRunner(model, self.cache, self.group, second, self.config)
        self.window_loads = torch.zeros(layers, cfg.n_routed_experts, dtype=torch.int64)
        for _, m in ep_moe_layers(model):   # the first window counts this engine's tokens only
            m.tokens_per_expert.zero_()
        self.ep_stats = {"steps": 0, "idle_steps": 0, "rebalances": 0, "moved_bytes": 0}

    def _place(self, loads: torch.Tensor) -> Placement:
        c = self.model_config
        return rebalance_experts(loads, self.num_slots, c.n_group, self.ep_config.num_nodes, self.ep_size)

    # ---- lockstep -------------------------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        """Collective: whether any rank of the group has work (then every rank must step)."""
        flag = torch.tensor([int(self._local_unfinished())], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def _local_unfinished(self) -> bool:
        """Whether this rank has work of its own."""
        return Engine.has_unfinished(self)

    def step(self):
        outputs = super().step()
        self.ep_stats["steps"] += 1
        interval = self.ep_config.rebalance_interval
        if interval and self.ep_stats["steps"] % interval == 0:
            self.rebalance()
        return outputs

    def _idle_step(self) -> None:
        """The padding forward of a rank with nothing scheduled: one token at position 0 in the scratch block."""
        moes = [m for _, m in ep_moe_layers(self.model)]
        loads = [m.tokens_per_expert.clone() for m in moes]
        self.runner.forward(self.runner.prepare([padding_row(self.cache)], graph=False))
        for m, load in zip(moes, loads):
            m.tokens_per_expert.copy_(load)
        self.ep_stats["idle_steps"] += 1

    # ---- EPLB -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rebalance(self) -> None:
        """Collective: the window's loads summed over the group, a new placement, the expert weights moved (only
        when the placement changed; `ep_rebalances` counts those)."""
        moes = [m for _, m in ep_moe_layers(self.model)]
        loads = sync_loads(torch.stack([m.tokens_per_expert for m in moes]), self.group).cpu()
        for m in moes:
            m.tokens_per_expert.zero_()
        new = self._place(loads)
        self.window_loads = loads
        if torch.equal(new.phy2log, self.placement.phy2log):      # every rank sees the same: none moves anything
            return
        self.ep_stats["moved_bytes"] += move_experts(self.model, self.placement, new)
        self.placement = new
        self.ep_stats["rebalances"] += 1

    def stats(self) -> dict:
        """The Engine's stats plus this rank's EP counters, the placement (slot -> logical expert, per MoE layer)
        and the last window's loads (tokens per logical expert, summed over the group)."""
        tbo = {}
        if isinstance(self.runner, TwoBatchRunner):
            tbo = dict(ep_tbo_steps=self.runner.steps, ep_tbo_max_concurrent=self.runner.max_concurrent)
        return super().stats() | {f"ep_{k}": v for k, v in self.ep_stats.items()} | tbo | dict(
            ep_rank=self.ep_rank, ep_size=self.ep_size, expert_placement=self.placement.phy2log.tolist(),
            expert_loads=self.window_loads.tolist())
