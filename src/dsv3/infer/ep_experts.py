"""Routed experts for serving with expert parallelism: physical expert slots placed by EPLB, moved between steps.

Each rank of the EP group holds `slots_per_rank` physical slots, slot s of the group being rank s // slots_per_rank's
local slot s % slots_per_rank. A placement (dsv3.infer.eplb.Placement, one row per MoE layer of the main model; the
MTP module's experts are not sharded, `ep_moe_layers`) says which logical expert each slot holds; a heavy expert may
hold several slots (redundant experts, TR 3.4). The forward is
dsv3.parallel.expert's all-to-all dispatch / grouped GEMM / combine, run over the *physical* slots:
  1. each (token, k) pair's logical expert becomes one of its replicas: replica (pair index mod replica count), a
     fixed rule that spreads a heavy expert's pairs over its copies (all copies hold the same weights, so which one
     serves a pair changes no output);
  2. counts per physical slot, then `ExpertParallelExperts.forward` with the P slots as its experts.
`move_experts` applies a new placement: every slot's new expert comes from the rank holding that expert's first
replica in the old placement, in one all-to-all of expert weights (no rank ever needs all experts); all ranks
compute the same placement from the same all-reduced loads, so nothing else is exchanged.
FP8 block-weight experts (dsv3.infer.fp8_weights.FP8Experts) are placed and moved the same way, their codes and
block scales together (as bytes: one exchange per layer whatever the dtypes).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import Experts, MoE, moe_layers
from ..parallel.expert import ExpertParallelExperts
from .eplb import Placement

_STACKED = ("gate_proj", "up_proj", "down_proj")


def stacked_names(m: Experts) -> tuple[str, ...]:
    """The (slot, ...) tensors of an experts module: the three matrices, and their block scales for FP8 experts."""
    return _STACKED + tuple(f"{n}_scale_inv" for n in _STACKED if hasattr(m, f"{n}_scale_inv"))


class PlacedExperts(ExpertParallelExperts):
    """ExpertParallelExperts over physical slots; forward takes logical expert ids and logical counts."""

    log2phy: torch.Tensor     # (E, max replicas) this layer's slots of each logical expert, -1 padded
    logcnt: torch.Tensor      # (E,) replicas per logical expert
    placement_row: torch.Tensor   # (P,) the logical expert of each slot of the group

    def local_experts(self) -> list[int]:
        """The logical expert each of this rank's slots holds."""
        S = self.gate_proj.shape[0]
        return self.placement_row[self.first_expert:self.first_expert + S].tolist()

    def _no_rows(self, rows: torch.Tensor) -> torch.Tensor:
        # serving runs no backward: the training form's touch of every local weight (FP8 experts would dequantise
        # them all) is not needed
        return rows.clone()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        flat = idx.flatten()
        # 1. a replica for every (token, k) pair
        replica = torch.arange(flat.numel(), device=flat.device) % self.logcnt[flat]
        phys = self.log2phy[flat, replica].view_as(idx)
        # 2. the exchange over the P physical slots
        phys_counts = torch.bincount(phys.flatten(), minlength=self.n_experts)
        return super().forward(x, weights, phys, phys_counts)


def ep_moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(name, MoE) of the layers an EP group shards: the main model's, in moe_layers order. The MTP module's experts
    stay whole on every rank: speculation runs that module on each rank alone, as many times a step as the rank's own
    batch needs (catch-up, chained drafts), so its MoE layer cannot be a collective (dsv3.infer.ep_engine)."""
    return [(name, m) for name, m in moe_layers(model) if not name.startswith("mtp.")]


def _layers(model: nn.Module) -> list[Experts]:
    return [m.experts for _, m in ep_moe_layers(model)]


@functools.cache
def _placed_class(cls: type) -> type:
    """PlacedExperts for plain experts; for FP8 experts a subclass that keeps their `ffn` (grouped FP8 GEMMs)."""
    return PlacedExperts if cls is Experts else type(f"Placed{cls.__name__}", (PlacedExperts, cls), {})


def place_experts(model: nn.Module, group: dist.ProcessGroup, placement: Placement,
                  device: torch.device | str | None = None) -> nn.Module:
    """Shard the model's routed experts over `group` as `placement` says (rows: ep_moe_layers order), in place: each
    rank keeps the experts of its slots. Every rank must hold every expert's weights when this runs (a freshly
    loaded model), or the model is on the meta device (dsv3.infer.ep_load fills its slots then). Plain or FP8
    block-weight experts. `device`: where the maps live (default: the experts' device; give it for a meta model)."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = _layers(model)
    P = placement.num_physical
    if placement.phy2log.shape[0] != len(layers) or P % ep:
        raise ValueError(f"a placement of {placement.phy2log.shape[0]} layers x {P} slots does not fit "
                         f"{len(layers)} MoE layers on {ep} ranks")
    S = P // ep
    for i, m in enumerate(layers):
        if isinstance(m, ExpertParallelExperts) or not isinstance(m, Experts):
            raise TypeError(f"place_experts needs unsharded Experts modules, got {type(m).__name__}")
        mine = placement.phy2log[i, rank * S:(rank + 1) * S]
        for name in stacked_names(m):
            p = getattr(m, name)
            w = p.detach()
            if w.element_size() == 1 and w.is_floating_point():    # e4m3 codes: rows picked as bytes
                t = w.view(torch.uint8)[mine.to(w.device)].view(w.dtype)
            else:
                t = w[mine.to(w.device)].clone()
            setattr(m, name, nn.Parameter(t, requires_grad=False) if isinstance(p, nn.Parameter) else t)
        m.__class__ = _placed_class(type(m))
        m.group, m.ep_size, m.n_experts, m.first_expert = group, ep, P, rank * S
        _set_maps(m, placement, i, device)
    return model


def _set_maps(m: PlacedExperts, placement: Placement, layer: int, device: torch.device | str | None = None) -> None:
    device = device or m.gate_proj.device
    m.log2phy = placement.log2phy[layer].to(device)
    m.logcnt = placement.logcnt[layer].to(device)
    m.placement_row = placement.phy2log[layer].clone()


@torch.no_grad()
def move_experts(model: nn.Module, old: Placement, new: Placement) -> int:
    """Re-place the experts of every layer from `old` to `new` (same slot count) with one all-to-all of weights per
    layer; returns the bytes this rank received. Collective: every rank of the group calls it with the same maps."""
    received = 0
    for i, m in enumerate(_layers(model)):
        group, ep, P = m.group, m.ep_size, m.n_experts
        rank, S = dist.get_rank(group), P // ep
        src_slot = old.log2phy[i, new.phy2log[i], 0]                  # (P,) where each new slot's expert is now
        src_rank = src_slot // S
        # rows I send, by destination rank, in the order of the destination's slots
        sends = [[int(src_slot[s]) - rank * S for s in range(d * S, (d + 1) * S) if src_rank[s] == rank]
                 for d in range(ep)]
        recv_counts = [int((src_rank[rank * S:(rank + 1) * S] == r).sum()) for r in range(ep)]
        stacked = [getattr(m, name) for name in stacked_names(m)]
        # one row of bytes per slot: FP8 codes and their fp32 scales travel together
        flat = torch.cat([w.detach().flatten(1).view(torch.uint8) for w in stacked], 1)     # (S, row bytes)
        out = flat.new_empty(S, flat.shape[1])
        send = flat[torch.tensor([j for d in sends for j in d], dtype=torch.long, device=flat.device)]
        dist.all_to_all_single(out, send, recv_counts, [len(d) for d in sends], group=group)
        # arrivals come grouped by source rank; my slots read them back in slot order
        mine = src_rank[rank * S:(rank + 1) * S].tolist()
        order = sorted(range(S), key=lambda s: mine[s])                  # stable: slot order within a source
        rows = torch.empty_like(out)
        rows[torch.tensor(order, dtype=torch.long, device=out.device)] = out
        received += out.numel() * out.element_size()
        offset = 0
        for w in stacked:
            n = w[0].numel() * w.element_size()
            w.copy_(rows[:, offset:offset + n].contiguous().view(w.dtype).view_as(w))
            offset += n
        _set_maps(m, new, i)
    return received
