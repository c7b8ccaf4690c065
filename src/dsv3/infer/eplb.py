"""Expert-parallel load balancing (EPLB, TR 3.4 "redundant experts"): from observed expert loads, which logical
expert each physical expert slot of each GPU holds.

Serving with expert parallelism, a GPU's MoE time is set by the busiest of its experts' token counts, and routing
is skewed (a few experts take several times the mean). The report duplicates the heaviest experts ("redundant
experts", 32 extra slots in prefill) and places the copies so every GPU carries about the same load; a token sent to
a duplicated expert goes to any one of its replicas (same weights, same output). Written from the report and the
documented description of deepseek-ai/EPLB (its README's two policies and its example; the function returns the
same maps as its `rebalance_experts`):

Hierarchical policy (when the node count divides the group count, e.g. prefill), for each MoE layer:
  1. pack the expert groups to nodes: each node gets groups_per_node whole groups and node loads are balanced, so
     group-limited routing stays node-limited (TR 2.1.2);
  2. inside each node, replicate: slots beyond the node's logical experts go one at a time to the expert whose load
     per replica is then largest;
  3. inside each node, pack the physical experts (each carrying load / its replica count) to the node's GPUs, the
     same number on each, balancing the GPU loads.
Global policy (otherwise, e.g. decode with a large EP): the same with one group and one node, i.e. replicate over
all experts and pack the replicas to all GPUs.

Balanced packing (steps 1 and 3) is the greedy heuristic: items in decreasing weight, each into the lightest pack
that still has room (first such pack on a tie); an item's rank in its pack is the order it arrived in. Replication
(step 2) picks the first expert with the largest load per replica. Slots are numbered node-major, then GPU, then
rank in the GPU's pack.

Output (`Placement`): phy2log (layers, P), the logical expert of each physical slot; log2phy (layers, E, max
replicas), the slots of each expert in replica order, -1 padded; logcnt (layers, E), replicas per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    phy2log: torch.Tensor      # (layers, P) int64
    log2phy: torch.Tensor      # (layers, E, max replicas) int64, -1 where an expert has fewer replicas
    logcnt: torch.Tensor       # (layers, E) int64

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[1]

    def gpu_loads(self, loads: torch.Tensor, num_gpus: int) -> torch.Tensor:
        """(layers, num_gpus): each GPU's load when every expert's load is split evenly over its replicas."""
        per_replica = loads.double() / self.logcnt
        return per_replica.gather(1, self.phy2log).view(loads.shape[0], num_gpus, -1).sum(-1)


def identity_placement(num_layers: int, num_experts: int) -> Placement:
    """No redundancy: slot e holds expert e (the contiguous sharding of dsv3.parallel.expert)."""
    ar = torch.arange(num_experts)
    return Placement(ar.repeat(num_layers, 1), ar.view(1, -1, 1).repeat(num_layers, 1, 1),
                     torch.ones(num_layers, num_experts, dtype=torch.int64))


def balanced_packing(weights: list[float], num_packs: int) -> tuple[list[int], list[int]]:
    """Items -> (pack of each item, its rank in the pack); every pack gets len(weights) / num_packs items."""
    n = len(weights)
    if n % num_packs:
        raise ValueError(f"{n} items do not split evenly into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    pack_of, rank_of = [0] * n, [0] * n
    load, filled = [0.0] * num_packs, [0] * num_packs
    # heaviest first; ties in the order torch's (unstable) descending sort gives, as deepseek-ai/EPLB has them
    for item in torch.tensor(weights, dtype=torch.float32).sort(descending=True).indices.tolist():
        pack = min((p for p in range(num_packs) if filled[p] < per_pack), key=lambda p: load[p])
        pack_of[item], rank_of[item] = pack, filled[pack]
        load[pack] += weights[item]
        filled[pack] += 1
    return pack_of, rank_of


def replicate(weights: list[float], num_slots: int) -> tuple[list[int], list[int], list[int]]:
    """Experts -> slots: slot e < E holds expert e, each further slot the expert with the largest load per replica.
    Returns (expert of each slot, replica rank of each slot, replicas of each expert)."""
    E = len(weights)
    if num_slots < E:
        raise ValueError(f"{num_slots} physical slots cannot hold {E} experts")
    expert, rank, count = list(range(E)), [0] * E, [1] * E
    for _ in range(E, num_slots):
        e = max(range(E), key=lambda i: weights[i] / count[i])      # first maximum on a tie
        expert.append(e)
        rank.append(count[e])
        count[e] += 1
    return expert, rank, count


def _place_layer(load: list[float], num_slots: int, num_groups: int, num_nodes: int,
                 num_gpus: int) -> tuple[list[int], list[int], list[int]]:
    """One layer, hierarchical: (phy2log, replica rank of each slot, logcnt)."""
    E = len(load)
    group_size, slots_per_node = E // num_groups, num_slots // num_nodes
    gpus_per_node, slots_per_gpu = num_gpus // num_nodes, num_slots // num_gpus
    # 1. groups to nodes; node n lists its groups in the order they were packed
    group_load = [sum(load[g * group_size:(g + 1) * group_size]) for g in range(num_groups)]
    node_of, rank_in_node = balanced_packing(group_load, num_nodes)
    groups_per_node = num_groups // num_nodes
    node_groups = [[0] * groups_per_node for _ in range(num_nodes)]
    for g in range(num_groups):
        node_groups[node_of[g]][rank_in_node[g]] = g
    phy2log, phyrank, logcnt = [0] * num_slots, [0] * num_slots, [0] * E
    for node, groups in enumerate(node_groups):
        experts = [g * group_size + j for g in groups for j in range(group_size)]     # the node's logical experts
        # 2. replicate inside the node
        slot_expert, slot_rank, count = replicate([load[e] for e in experts], slots_per_node)
        for i, e in enumerate(experts):
            logcnt[e] = count[i]
        # 3. the node's replicas to its GPUs, each carrying its expert's load / replicas
        share = [load[experts[i]] / count[i] for i in slot_expert]
        gpu_of, rank_on_gpu = balanced_packing(share, gpus_per_node)
        for s in range(slots_per_node):
            slot = node * slots_per_node + gpu_of[s] * slots_per_gpu + rank_on_gpu[s]
            phy2log[slot], phyrank[slot] = experts[slot_expert[s]], slot_rank[s]
    return phy2log, phyrank, logcnt


def rebalance_experts(loads: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> Placement:
    """Loads (layers, E) -> Placement over `num_replicas` physical slots, num_replicas / num_gpus per GPU.
    Hierarchical when num_nodes divides num_groups, global otherwise (see the module docstring)."""
    layers, E = loads.shape
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"{E} experts do not split into {num_groups} groups")
    if num_nodes < 1 or num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if num_replicas % num_gpus or num_replicas < E:
        raise ValueError(f"num_replicas={num_replicas} must be a multiple of num_gpus={num_gpus} and >= {E} experts")
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1                                   # the global policy
    rows = [_place_layer(row, num_replicas, num_groups, num_nodes, num_gpus) for row in loads.double().tolist()]
    phy2log = torch.tensor([r[0] for r in rows], dtype=torch.int64).view(layers, num_replicas)
    phyrank = torch.tensor([r[1] for r in rows], dtype=torch.int64).view(layers, num_replicas)
    logcnt = torch.tensor([r[2] for r in rows], dtype=torch.int64).view(layers, E)
    log2phy = torch.full((layers, E, int(logcnt.max())), -1, dtype=torch.int64)
    layer = torch.arange(layers)[:, None].expand(-1, num_replicas)
    log2phy[layer, phy2log, phyrank] = torch.arange(num_replicas).expand(layers, -1)
    return Placement(phy2log, log2phy, logcnt)


def balance_ratio(gpu_loads: torch.Tensor) -> torch.Tensor:
    """max / mean load per GPU, per layer (1.0 is perfect balance)."""
    return gpu_loads.max(-1).values / gpu_loads.mean(-1)
