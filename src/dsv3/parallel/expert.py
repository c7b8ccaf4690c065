"""Expert parallelism (spec 5: V3 trains with 64-way EP and no TP): the routed experts of every MoE layer are sharded
over an EP process group, rank r holding the contiguous experts [r*E/ep, (r+1)*E/ep). Everything else (attention,
gate, shared experts, embedding, head, norms) is replicated, and every rank routes its own tokens.

Applied from outside, the model stays free of torch.distributed: `apply_expert_parallel(model, group)` slices each
`Experts` module's stacked parameters in place and switches its class to `ExpertParallelExperts`, whose forward is
`Experts.forward` with an all-to-all dispatch before the grouped GEMM and an all-to-all combine after it:
  1. sort the (token, k) pairs by global expert, as Experts.forward does: the rows for rank 0 come first, then 1, ...
  2. exchange the per-expert counts (E int64, one small all-to-all): they give the uneven split sizes of both
     directions and, on the receiver, how many of the rows from each source go to each local expert;
  3. dispatch the rows (all_to_all_single, uneven splits), group them by local expert, grouped GEMM, ungroup;
  4. combine: the reverse all-to-all, un-permute to (token, k) order, weight by the gate and sum over k.
No token is dropped and there is no capacity factor (TR 2.1.2): split sizes are exact, read on the host.
Both row all-to-alls are autograd functions whose backward is the reverse all-to-all, so every rank must run the
same forward and backward sequence of MoE layers (it does: the model is identical on every rank).

Training with EP: the gradient sync (an expert's local gradient already sums its EP row's rows), the global
gradient norm and the expert-load sync are dsv3.parallel.grads's, one each for every layout.

Node-limited routing (TR 2.1.2, spec 5): the gate's group-limited top-k keeps each token's experts inside
`topk_group` of the `n_group` expert groups. With contiguous expert slices and the ranks of one node adjacent in the
EP group, a node holds the contiguous experts of its ranks; when every group lies within one node (the report: 256
experts in 8 groups of 32, EP64 over 8 nodes of 8 GPUs, one group per node) a token's rows reach at most
`topk_group` nodes, so group-limited routing is node-limited routing. `node_limit(cfg, ep, ranks_per_node)` says the
bound a layout gives and `expert_node` where each expert lives.

Order: apply after FP8 (`apply_fp8`, whose expert `ffn` is kept) and before recomputation, compilation and the
optimizer (parameters are replaced). On a meta-device model only the local slice is materialised by `to_empty`.
State dicts hold the local slice; `first_expert` says where it starts.
"""

import contextlib
import functools
import threading

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import Experts, MoE, _DispatchRows, _PermuteRows, expert_order
from .fp8_comm import send_fp8

_STACKED = ("gate_proj", "up_proj", "down_proj")


class _AllToAll(torch.autograd.Function):
    """Rows of x to the ranks of `group` by split sizes (host ints, uneven); the backward sends the row gradients
    back the reverse way. (torch.distributed.nn.functional's equivalent is deprecated.)"""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x, out_splits, in_splits, group):
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=thread_group(group))
    return out


class _QuantizedAllToAll(torch.autograd.Function):
    """`_AllToAll` with either direction in FP8 (spec 4, low-precision communication): `send` / `send_back` move
    rows with fixed split sizes; `fp8` / `fp8_back` say which of the two carries E4M3 + 1x128 tile scales."""

    @staticmethod
    def forward(ctx, x, send, send_back, fp8, fp8_back):
        ctx.send_back, ctx.fp8_back = send_back, fp8_back
        return send_fp8(x, send) if fp8 else send(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        return (send_fp8(grad, ctx.send_back) if ctx.fp8_back else ctx.send_back(grad)), None, None, None, None


def exchange_rows(x, out_splits, in_splits, group, fp8: bool = False, fp8_back: bool = False) -> torch.Tensor:
    """Rows of x to the ranks of `group` (uneven host split sizes), the gradient back the reverse way; `fp8` /
    `fp8_back`: that direction in E4M3 (the dispatch forward and the combine backward, TR 3.3.4)."""
    if not (fp8 or fp8_back):
        return _AllToAll.apply(x, out_splits, in_splits, group)
    send = functools.partial(_all_to_all, out_splits=out_splits, in_splits=in_splits, group=group)
    send_back = functools.partial(_all_to_all, out_splits=in_splits, in_splits=out_splits, group=group)
    return _QuantizedAllToAll.apply(x, send, send_back, fp8, fp8_back)


_thread = threading.local()


def thread_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """The group the calling thread's EP collectives use for `group`: `group` itself unless the thread has mapped it
    (`_thread.groups`, set by dsv3.parallel.overlap, which runs a backward in a second thread on a duplicate group).
    Resolved when the collective is issued, so a backward or a recomputed forward follows the thread running it."""
    groups = getattr(_thread, "groups", None)
    return groups.get(group, group) if groups else group


@contextlib.contextmanager
def thread_groups(groups: dict | None):
    """Within the block, the calling thread's EP collectives use groups[g] instead of g (see thread_group): the public
    form of what dsv3.parallel.overlap sets, for a serving thread that runs a second micro-batch (dsv3.infer)."""
    old = getattr(_thread, "groups", None)
    _thread.groups = groups
    try:
        yield
    finally:
        _thread.groups = old


class ExpertParallelExperts(Experts):
    """Experts holding E/ep of the E routed experts; forward(x, weights, idx, counts) takes global expert ids and
    global counts (E,) and returns the same (N, D) as the unsharded Experts on this rank's tokens."""

    recompute_region = "ffn"     # recomputing forward would repeat both all-to-alls in the backward pass
    group: dist.ProcessGroup
    ep_size: int
    n_experts: int      # E, global
    first_expert: int   # global id of local expert 0
    fp8_dispatch: bool = False   # dispatch (and the combine's backward) in FP8: dsv3.parallel.fp8_comm

    def local_experts(self) -> list[int]:
        """The global expert each local row holds (dsv3.checkpoint.fill reads only those)."""
        return list(range(self.first_expert, self.first_expert + self.gate_proj.shape[0]))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        K = idx.shape[1]
        # 1. (token, k) pairs sorted by global expert: consecutive blocks of rows for ranks 0, 1, ...
        order, inverse = expert_order(idx.flatten(), counts)
        xs = _DispatchRows.apply(x, order, inverse, K)                                    # (N*K, D)
        y = self.exchange(xs, counts, self.group)                                          # steps 2-4
        y = _PermuteRows.apply(y, inverse, order).unflatten(0, (-1, K))                 # (N, K, D) token order
        return (y * weights[..., None]).sum(1).to(x.dtype)

    def exchange(self, xs: torch.Tensor, counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        """Steps 2-4 over `group` (the EP group; dsv3.parallel.two_hop: the ranks of one node): rows xs (M, D)
        sorted by expert, counts (n*L,) rows per expert of the group's n ranks (L experts each) -> the experts'
        outputs (M, D), in the same order."""
        L = self.n_experts // self.ep_size
        n = counts.numel() // L
        # 2. recv[s, e]: rows source s sends to local expert e (counts split evenly: L experts per rank)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts.contiguous(), group=thread_group(group))
        recv = recv.view(n, L)
        splits = torch.cat([counts.view(n, L).sum(1), recv.sum(1)]).tolist()          # one host sync for both
        send_splits, recv_splits = splits[:n], splits[n:]
        # 3. dispatch; rows arrive by source, each source's rows by local expert: regroup by local expert
        rows = exchange_rows(xs, recv_splits, send_splits, group, fp8=self.fp8_dispatch)
        local_idx = torch.arange(L, device=counts.device).repeat(n).repeat_interleave(recv.flatten())
        local_counts = recv.sum(0)
        order2, inverse2 = expert_order(local_idx, local_counts)
        rows = _PermuteRows.apply(rows, order2, inverse2)
        y = self.ffn(rows, local_counts) if rows.shape[0] else self._no_rows(rows)
        y = _PermuteRows.apply(y, inverse2, order2)                                     # back to arrival order
        # 4. combine: every row returns to its sender, in the sender's expert order
        return exchange_rows(y, send_splits, recv_splits, group, fp8_back=self.fp8_dispatch)

    def _no_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The (0, D) output of a rank that received no rows. It must stay in the autograd graph (else this rank
        would skip the backward all-to-alls the others wait in) and have the dtype the other ranks send (the
        autocast dtype, as `ffn`); the grouped GEMM itself fails on zero rows in backward."""
        dtype = torch.get_autocast_dtype(rows.device.type) if torch.is_autocast_enabled(rows.device.type) \
            else rows.dtype
        # the local experts stay in the graph too, so their gradients are zeros rather than missing: FSDP2 on a
        # torch without set_reduce_scatter_unused_params would otherwise skip this rank's reduce-scatter. One element
        # each (its backward writes a dense zero gradient; a whole-tensor sum's would be a stride-0 expand, which
        # later in-place accumulation refuses)
        touch = sum(w.reshape(-1)[:1].sum() for w in self.stacked_weights())
        return rows.to(dtype) * 0 + (touch * 0).to(dtype)


@functools.cache
def _ep_class(cls: type) -> type:
    """The EP class for an Experts class: a subclass of it (e.g. FP8TrainExperts) keeps its own `ffn`."""
    if cls is Experts:
        return ExpertParallelExperts
    return type(f"ExpertParallel{cls.__name__}", (ExpertParallelExperts, cls), {})


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup, fp8_dispatch: bool = False) -> nn.Module:
    """Shard every routed-expert module of `model` (main layers and MTP) over `group`, in place. `fp8_dispatch`:
    rows go to the experts in E4M3 with 1x128 power-of-2 tile scales and their gradients come back the same way,
    the combine and the dispatch's backward stay in the activations' dtype (TR 3.3.4). Returns model."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    modules = [m for m in model.modules() if isinstance(m, Experts) and not isinstance(m, ExpertParallelExperts)]
    for m in modules:     # check everything before changing anything
        E = m.gate_proj.shape[0]
        if E % ep:
            raise ValueError(f"expert parallelism needs n_routed_experts % ep == 0, got {E} experts for ep={ep}")
        if not all(isinstance(getattr(m, n), nn.Parameter) for n in _STACKED):
            raise TypeError(f"{type(m).__name__} does not keep its experts as parameters {_STACKED}")
        if "forward" in m.__dict__:
            raise RuntimeError("apply expert parallelism before wrapping Experts.forward (e.g. apply_recompute)")
    for m in modules:
        E = m.gate_proj.shape[0]
        L = E // ep
        for name in _STACKED:
            p = getattr(m, name)
            setattr(m, name, nn.Parameter(p.detach()[rank * L:(rank + 1) * L].clone(), requires_grad=p.requires_grad))
        m.__class__ = _ep_class(type(m))
        m.group, m.ep_size, m.n_experts, m.first_expert = group, ep, E, rank * L
        m.fp8_dispatch = fp8_dispatch
    return model


@torch.no_grad()
def all_reduce_expert_loads(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Sum every MoE's `tokens_per_expert` over `group`, in place, through the one load sync
    (dsv3.parallel.grads.sync_loads): for a module-level caller (the EP inference engine); the trainer sums its
    step's (layers, E) table directly."""
    from .grads import sync_loads      # grads imports this module
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        return
    loads = sync_loads(torch.stack([m.tokens_per_expert for m in moes]), group)
    for m, load in zip(moes, loads):
        m.tokens_per_expert.copy_(load)


def expert_node(expert: int | torch.Tensor, n_experts: int, ep: int, ranks_per_node: int) -> int | torch.Tensor:
    """The node holding global `expert` (int or tensor of ids): EP rank r holds experts [r*E/ep, (r+1)*E/ep) and
    nodes hold ranks_per_node adjacent EP ranks."""
    return expert // (n_experts // ep) // ranks_per_node


def node_limit(cfg, ep: int, ranks_per_node: int) -> int:
    """The most nodes one token's routed experts can span in this layout: topk_group when every expert group lies
    within one node (group-limited routing is then node-limited), else num_experts_per_tok (or the node count)."""
    E, G = cfg.n_routed_experts, cfg.n_group
    if E % ep or ep % ranks_per_node:
        raise ValueError(f"{E} experts over ep={ep} ranks in nodes of {ranks_per_node}: each must divide the next")
    nodes = ep // ranks_per_node
    per_group = E // G
    aligned = G > 1 and all(expert_node(g * per_group, E, ep, ranks_per_node)
                            == expert_node((g + 1) * per_group - 1, E, ep, ranks_per_node) for g in range(G))
    return min(cfg.topk_group if aligned else cfg.num_experts_per_tok, nodes)