"""Node-limited two-hop dispatch (TR 3.2.2, spec 5): a token's rows cross the inter-node link once per node, then
fan out inside the node.

The flat dispatch (dsv3.parallel.expert) sends one row per (token, expert) pair straight to the expert's rank, so a
token whose K experts sit on several GPUs of one remote node crosses the slow inter-node link (IB) several times.
The report's kernels instead send it over IB once, to the GPU with the same in-node index on the target node, which
forwards it over NVLink to the GPUs holding its experts; group-limited routing (`n_group` / `topk_group`, with every
expert group inside one node: dsv3.parallel.expert.node_limit) bounds the nodes a token reaches to M = topk_group
(4 in V3), so a token costs at most M rows on IB instead of up to K = 8.

Layout. An EP group of ep ranks spans ep / G nodes of G adjacent EP ranks (EP rank r is on node r // G, in-node
index r % G), so node b holds the contiguous experts [b G L, (b + 1) G L), L = E / ep per rank. Two sub-groups per
rank: its *node group* (the EP ranks with its in-node index, one per node: the IB hop) and its *local group* (the G
EP ranks of its node: the NVLink hop). One forward, on the rank of a token (N tokens, K experts each):
  1. for every token, the set of nodes holding its experts; one row per (token, node), node-major, each with its K
     expert ids (those on other nodes masked to -1) and K gate weights;
  2. hop 1 (node group): the rows and their ids + weights go to this rank's peer on every target node (the row for
     the own node stays here: the all-to-all's self part is a local copy);
  3. hop 2 (local group): the peer makes one pair per (row, expert on its node) and runs the flat exchange inside the
     node (ExpertParallelExperts.exchange: dispatch, grouped GEMM, combine);
  4. the peer sums its pairs' outputs weighted by the gate weights: one row per (token, node);
  5. hop 1 reversed: that row goes back over IB once, and the token's rank sums its nodes' rows.
Every exchange is an autograd all-to-all whose backward runs the reverse exchange, so the backward crosses the node
boundary exactly as often as the forward; the gate weights travel with the rows and receive their gradients back the
same way. Rows return in the FFN's output dtype (bf16 under autocast: the report's BF16 combine); the final sum over
nodes is in the gate weights' precision, as the flat path's sum over k.

`apply_two_hop(model, ranks_per_node)` switches every `ExpertParallelExperts` module (after `apply_expert_parallel`,
before recomputation, FSDP and the optimizer) to `TwoHopExperts` and builds the sub-groups: collective over the whole
world. `apply_ep_dispatch(model, cfg.parallel)` does it when `parallel.ep_dispatch = "two_hop"` (the trainer's
hook). The sub-groups are plain process groups: DualPipe's overlapped backward thread (which maps the EP group to a
duplicate) is not supported with two_hop and the config refuses the combination.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import expert_order
from .expert import ExpertParallelExperts, _AllToAll, exchange_rows, thread_group


class TwoHopExperts(ExpertParallelExperts):
    """ExpertParallelExperts whose dispatch and combine cross the node boundary once per (token, node)."""

    node_group: dist.ProcessGroup      # the EP ranks with this rank's in-node index, one per node (IB)
    local_group: dist.ProcessGroup     # the EP ranks of this rank's node (NVLink)
    n_nodes: int
    node_size: int                     # G: EP ranks per node

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        N, K = idx.shape
        per_node = self.node_size * (self.n_experts // self.ep_size)                 # experts per node
        # 1. one row per (token, node its experts reach), node-major; each carries its experts on that node
        node = idx // per_node                                                          # (N, K)
        need = torch.zeros(N, self.n_nodes, dtype=torch.bool, device=idx.device)
        need.scatter_(1, node, True)
        dest, tok = need.t().nonzero(as_tuple=True)                                    # sorted by node, then token
        ids = torch.where(node[tok] == dest[:, None], idx[tok], -1)                    # (S, K) -1: another node
        meta = torch.cat([weights[tok], ids.to(weights.dtype)], 1)                      # ids exact as floats (< 2^24)
        # 2. hop 1: per-node row counts, then the rows and their ids + weights, to the peer on each node
        send = need.sum(0)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=thread_group(self.node_group))
        splits = torch.cat([send, recv]).tolist()
        send_splits, recv_splits = splits[:self.n_nodes], splits[self.n_nodes:]
        # the rows in FP8 with parallel.fp8_dispatch (their in-node hop re-quantises the same 1x128 tiles to the
        # same values: power-of-2 scales make the round trip idempotent)
        rows = exchange_rows(x[tok], recv_splits, send_splits, self.node_group, fp8=self.fp8_dispatch)  # (R, D)
        meta = _AllToAll.apply(meta, recv_splits, send_splits, self.node_group)
        w, ids = meta[:, :K], meta[:, K:].detach().long()
        # 3. hop 2: one pair per (row, expert on this node), sorted by expert, exchanged inside the node
        row, k = (ids >= 0).nonzero(as_tuple=True)
        slot = ids[row, k] % per_node                                                   # expert index in the node
        local_counts = torch.bincount(slot, minlength=per_node)
        order, inverse = expert_order(slot, local_counts)
        y = self.exchange(rows[row[order]], local_counts, self.local_group)[inverse]   # (P, D) pair order
        # 4. weighted sum per row on the peer (the gate weights' precision), back in the FFN's dtype
        wy = y * w[row, k, None]
        part = wy.new_zeros(rows.shape[0], wy.shape[1]).index_add(0, row, wy).to(y.dtype)
        # 5. hop 1 reversed: one row per (token, node) back across the boundary, summed per token
        back = exchange_rows(part, send_splits, recv_splits, self.node_group, fp8_back=self.fp8_dispatch)  # (S, D)
        out = wy.new_zeros(N, back.shape[1]).index_add(0, tok, back.to(wy.dtype))
        return out.to(x.dtype)


@functools.cache
def _two_hop_class(cls: type) -> type:
    """The two-hop class for an EP class: a subclass keeps its own `ffn` (e.g. FP8 training experts)."""
    return TwoHopExperts if cls is ExpertParallelExperts else type(f"TwoHop{cls.__name__}", (TwoHopExperts, cls), {})


def node_layout(ep_ranks: list[int], ranks_per_node: int) -> tuple[int, list[list[int]], list[list[int]]]:
    """(G, node groups, local groups) of an EP group whose global ranks are `ep_ranks` (EP rank order), on nodes of
    `ranks_per_node` consecutive global ranks: G EP ranks per node, adjacent in EP order; node group l = the ranks
    with in-node index l, one per node; local group b = the ranks of node b. A clear error when the nodes hold
    different numbers of the group's ranks."""
    nodes: dict[int, list[int]] = {}
    for r in ep_ranks:
        nodes.setdefault(r // ranks_per_node, []).append(r)
    members = list(nodes.values())
    G = len(members[0])
    if any(len(m) != G for m in members) or [r for m in members for r in m] != list(ep_ranks):
        raise ValueError(f"two-hop dispatch needs the same number of EP ranks on every node: EP group {ep_ranks} on "
                         f"nodes of {ranks_per_node} ranks gives {[len(m) for m in members]}")
    return G, [[m[l] for m in members] for l in range(G)], members


def apply_two_hop(model: nn.Module, ranks_per_node: int) -> nn.Module:
    """Switch every ExpertParallelExperts module of `model` to the two-hop dispatch, nodes being `ranks_per_node`
    consecutive global ranks. Every rank of the world must call it (it creates process groups). Returns model."""
    modules = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
    mine = sorted({tuple(dist.get_process_group_ranks(m.group)) for m in modules})
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    built = {}
    # new_group is collective over the world: every rank creates every group, in one order
    for ep_ranks in sorted({g for gs in every for g in gs}):
        G, node_groups, local_groups = node_layout(list(ep_ranks), ranks_per_node)
        subgroups = {tuple(g): dist.new_group(g) for g in node_groups + local_groups}
        built[ep_ranks] = G, node_groups, local_groups, subgroups
    me = dist.get_rank()
    for m in modules:
        ep_ranks = tuple(dist.get_process_group_ranks(m.group))
        G, node_groups, local_groups, subgroups = built[ep_ranks]
        m.__class__ = _two_hop_class(type(m))
        m.node_size, m.n_nodes = G, len(ep_ranks) // G
        m.node_group = subgroups[next(tuple(g) for g in node_groups if me in g)]
        m.local_group = subgroups[next(tuple(g) for g in local_groups if me in g)]
    return model


def resolve_ranks_per_node(configured: int) -> int:
    """`parallel.ranks_per_node`, 0 meaning torchrun's LOCAL_WORLD_SIZE (the processes of this node)."""
    return configured or int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))


def apply_ep_dispatch(model: nn.Module, parallel) -> nn.Module:
    """The EP dispatch `parallel.ep_dispatch` selects ("flat": nothing to do; "two_hop": `apply_two_hop`), after the
    expert sharding. A no-op without expert parallelism (ep == 1, e.g. a run resumed in one process)."""
    if parallel.ep_dispatch == "two_hop" and parallel.ep > 1:
        apply_two_hop(model, resolve_ranks_per_node(parallel.ranks_per_node))
    return model

