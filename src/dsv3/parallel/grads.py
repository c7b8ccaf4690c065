"""The collectives of a training step, once for every layout (one process, DP, EP inside DP, FSDP2, a pipeline
position): the gradient sync, the global gradient norm that clipping uses, and the expert-load sync of the
aux-loss-free bias update. Each takes the ParallelMesh (dsv3.parallel.mesh), or None for one process.

Every rank backpropagates the mean loss over its own, equally many tokens; the loss of the step is the mean over the
n = dp * ep ranks of a pipeline position (the ranks that split its batch): L = 1/n sum_j L_j. Then (spec 5):
  * a replicated parameter's local gradient is dL_j/dw: the gradient of L is the sum over the position / n;
  * an expert slice held by rank (d, e): the backward all-to-alls of its ep row already brought it the gradients of
    every rank of the row, sum_{e'} dL_{d,e'}/dw, and the dp rows hold replicas of the same slice that computed the
    same for their tokens: the sum over its "dp" column / n;
  * a DTensor (FSDP2) gradient was reduce-scattered in the backward with these divide factors
    (dsv3.parallel.parallelize): nothing is left to do, except for an expert slice sharded over a dp column of one
    rank (dp = 1), which FSDP leaves undivided (its local sum over the ep row): divided by n here.
After the sync a gradient element lives on several ranks (the replicas) or, under FSDP, on exactly one. The global
norm counts each element once: a DTensor's local shard on its rank, an expert slice on dp row 0 of its column, a
replicated parameter on the position's share 0; the counted squares are summed over the world (the pipeline
positions hold different chunks).

Loads: each rank counts only its own tokens on the MoE layers it holds, into a (MoE layers, E) table (zeros on the
layers it does not hold); summed over the world, every rank holds the global batch's loads of every layer and
applies the same bias update (spec 1.7) to its layers; rank 0 logs them all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..kernels.grad_norm import sum_of_squares
from .expert import ExpertParallelExperts
from .mesh import ParallelMesh


def expert_parameters(model) -> set[int]:
    """ids of the expert-parallel parameters of `model` (anything with `modules()`): the routed-expert slices."""
    return {id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}


def _replicas(mesh: ParallelMesh | None) -> int:
    return 1 if mesh is None else mesh.dp * mesh.ep


@torch.no_grad()
def sync_gradients(model, mesh: ParallelMesh | None) -> None:
    """Make every rank's gradients those of the step's mean loss (module docstring): replicated ones summed over
    the position / n, expert slices over their dp column / n, FSDP's DTensors left as the backward reduced them.
    `model`: what this rank trains (a model, or a pipeline rank's chunks). Every rank must call it."""
    n = _replicas(mesh)
    if n == 1:
        return
    experts = expert_parameters(model)
    expert_grads, replicated, lone_columns = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if isinstance(p, DTensor):
            # FSDP2 reduced it; an expert slice's column of one rank was left undivided (parallelize)
            if id(p) in experts and p.device_mesh.size() == 1 and p.grad is not None:
                lone_columns.append(p.grad.to_local())
            continue
        if id(p) in experts:
            if p.grad is None:     # an expert that received no rows: zeros, as the unsharded run has; still summed
                p.grad = torch.zeros_like(p)
            expert_grads.append(p.grad)
        elif p.grad is not None:
            replicated.append(p.grad)
    all_reduce_flat(expert_grads, mesh.dp_group, 1.0 / n)
    all_reduce_flat(replicated, mesh.position_group, 1.0 / n)
    if lone_columns:
        torch._foreach_mul_(lone_columns, 1.0 / n)


def all_reduce_flat(grads: list[torch.Tensor], group, scale: float) -> None:
    """Sum `grads` over `group` and multiply by `scale`, in place: one flat collective per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for gs in by_dtype.values():
        flat = torch.cat([g.flatten() for g in gs])
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)          # sum, then scale: gloo has no ReduceOp.AVG
        for g, f in zip(gs, flat.mul_(scale).split([g.numel() for g in gs])):
            g.copy_(f.view_as(g))


@torch.no_grad()
def grad_norm(model, mesh: ParallelMesh | None) -> torch.Tensor:
    """The L2 norm of the whole model's gradient after `sync_gradients`, each element counted once (module
    docstring): float64, the same on every rank (every rank must call it when there is a mesh)."""
    experts = expert_parameters(model)
    first_row = mesh is None or mesh.dp_rank == 0
    first_share = mesh is None or mesh.share == 0
    counted = []
    for p in model.parameters():
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            counted.append(p.grad.to_local())          # FSDP: this rank's shard is held nowhere else
        elif first_row if id(p) in experts else first_share:
            counted.append(p.grad)
    device = next(iter(model.parameters())).device if mesh is None else _device(mesh)
    sq = torch.zeros((), dtype=torch.float64, device=device)
    if counted:
        # one pass over every gradient on CUDA (dsv3.kernels.grad_norm), per-tensor fp64 norms elsewhere
        sq = sq + sum_of_squares(counted).to(device)
    if mesh is not None:
        dist.all_reduce(sq)
    return sq.sqrt()


def _device(mesh: ParallelMesh) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if mesh.device_mesh.device_type == "cuda" \
        else torch.device("cpu")


@torch.no_grad()
def sync_loads(loads: torch.Tensor, group=None) -> torch.Tensor:
    """Sum a (MoE layers, E) table of per-expert token counts over `group` (default: the world), in place; returns
    it. Each rank counted its own tokens on the layers it holds (zeros elsewhere): afterwards every rank holds the
    global batch's loads of every layer. No-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads, group=group)
    return loads
