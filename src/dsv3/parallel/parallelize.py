"""Expert parallelism inside data parallelism (spec 5): a 2-D layout of world = dp * ep ranks, mesh (dp, ep) with
dimension names ("dp", "ep"), rank = d * ep + e. Every rank feeds its own, equally sized share of the global batch.
  * Routed experts are sharded over "ep": the ep ranks of one row d (an EP group) hold all E experts between them,
    rank (d, e) the contiguous experts [e*E/ep, (e+1)*E/ep) (`dsv3.parallel.expert.apply_expert_parallel` on the
    row's group); the dp ranks of one column e hold replicas of the same experts.
  * Everything else (attention, gate, shared experts, embedding, head, norms) is replicated on all world ranks and its
    gradients are averaged over the whole world (plain all-reduce; FSDP-sharding it over the world is not done here).

Gradients (loss = mean over all world tokens = 1/(dp*ep) * sum_{d,e} L_{d,e}, L_{d,e} the mean loss over rank
(d, e)'s own tokens, which each rank backpropagates):
  * replicated w: rank (d, e)'s local gradient is dL_{d,e}/dw, so the sum over the world divided by dp*ep;
  * expert w held by column e: the backward all-to-alls of row d bring rank (d, e) the row gradients of every rank in
    its row, so its local gradient is already sum_{e'} dL_{d,e'}/dw (as in 1-D EP). The other rows d hold replicas of
    the same experts and computed the same thing for their tokens, so the full gradient is
    1/(dp*ep) * sum_d sum_{e'} dL_{d,e'}/dw = all-reduce over the column ("dp" group), then divide by dp*ep.
  With dp == 1 this is `dsv3.parallel.expert.sync_gradients`; with ep == 1 it is plain data parallelism.

Routing-bias loads: the gate is replicated and each rank counts only its own tokens, so the loads are summed over the
whole world (`sync_expert_loads_2d`) before the bias update; then every rank applies the same update.

Sharded variant (`shard_data_parallel_2d`, after `parallelize`): FSDP2 instead of replicas. The routed experts of
each MoE are sharded over "dp" (their column: the replicas of the same experts), everything else over the whole
world (a 1-D mesh over all ranks), as torchtitan does for EP + FSDP. FSDP then does the reductions above itself: it
averages the non-expert gradients over the world (sum / (dp*ep), as above) and, with its divide factor set to
dp*ep instead of its mesh size dp, reduce-scatters the expert ones to sum over the column / (dp*ep), exactly the
sync above. Every parameter element then lives on exactly one rank, so the global gradient norm is one all-reduce
of the local shards' squared sums (`grad_norm_sharded`). Optimizer state, built afterwards, is sharded too.

Order in a training step: forward + backward of the local loss -> `sync_gradients_2d` -> (clip with `grad_norm_2d`)
-> optimizer step -> `sync_expert_loads_2d` -> bias update (`dsv3.train.balance.update_bias`).
Order of application: like `apply_expert_parallel` (after FP8, before recomputation, compilation and building the
optimizer: expert parameters are replaced by their local slices).
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from .expert import (
    ExpertParallelExperts,
    all_reduce_expert_loads,
    apply_expert_parallel,
    grad_norm,
    sync_layout_gradients,
)

DIMS = ("dp", "ep")


def parallelize(model: nn.Module, world_group_or_mesh: DeviceMesh | dist.ProcessGroup | None, dp: int, ep: int,
                device_type: str | None = None) -> nn.Module:
    """Shard `model`'s routed experts over the "ep" dimension of a (dp, ep) mesh, in place, and attach the mesh as
    `model.parallel_mesh` (what `sync_gradients_2d`, `sync_expert_loads_2d`, `grad_norm_2d` take). Returns model.

    world_group_or_mesh: a DeviceMesh of shape (dp, ep) named ("dp", "ep"), or the world group / None, in which case
    the mesh is built over all ranks (dp * ep must equal the world size). device_type: the mesh's device when it is
    built here (default: "cuda" under NCCL, else "cpu")."""
    if isinstance(world_group_or_mesh, DeviceMesh):
        mesh = world_group_or_mesh
        if tuple(mesh.shape) != (dp, ep) or tuple(mesh.mesh_dim_names or ()) != DIMS:
            raise ValueError(f"expected a mesh of shape ({dp}, {ep}) named {DIMS}, "
                             f"got {tuple(mesh.shape)} named {mesh.mesh_dim_names}")
    else:
        group = world_group_or_mesh
        if group is not None and group != dist.group.WORLD:
            # a sub-world mesh would need its own flattened group for the world-wide reductions below
            raise ValueError("pass the world group (or None) or a DeviceMesh, not a sub-group")
        if dp * ep != dist.get_world_size():
            raise ValueError(f"dp * ep = {dp} * {ep} != world size {dist.get_world_size()}")
        if device_type is None:
            device_type = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
        mesh = init_device_mesh(device_type, (dp, ep), mesh_dim_names=DIMS)
    if mesh.size() != dist.get_world_size():
        raise ValueError("the (dp, ep) mesh must span the whole world (the replicated reductions use the world group)")
    # ep group of rank (d, e) = row d; its rank in that group is e, so apply_expert_parallel gives it slice e
    apply_expert_parallel(model, mesh["ep"].get_group())
    model.parallel_mesh = mesh
    return model


def _world_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    # parallelize checked that the mesh spans the world: the world group is the flattened (dp, ep) group
    assert mesh.size() == dist.get_world_size()
    return dist.group.WORLD


@torch.no_grad()
def sync_gradients_2d(model: nn.Module, mesh: DeviceMesh) -> None:
    """After every rank's backward of the mean loss over its own (equally many) tokens, make the gradients those of
    the mean loss over all world tokens (see the module docstring): replicated ones summed over the world / (dp*ep),
    expert ones summed over the "dp" dimension / (dp*ep). Every rank must call it (collectives)."""
    dp, ep = mesh.shape
    sync_layout_gradients(model, mesh["dp"].get_group(), _world_group(mesh), dp * ep)


def sync_expert_loads_2d(model: nn.Module, mesh: DeviceMesh) -> None:
    """Sum every MoE's `tokens_per_expert` over the whole world, in place: after the forward, before the loads are
    read for the bias update, so that every rank sees the global batch's loads and the biases stay identical."""
    all_reduce_expert_loads(model, _world_group(mesh))


def grad_norm_2d(model: nn.Module, mesh: DeviceMesh) -> torch.Tensor:
    """The global gradient L2 norm after `sync_gradients_2d` (for clipping), the same on every rank: after the sync
    the dp replicas of an expert hold the same gradient, so summing the expert shards over one row (the "ep" group)
    counts every expert once; replicated gradients are counted once."""
    return grad_norm(model, mesh["ep"].get_group())


def shard_data_parallel_2d(model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 on a model `parallelize` has laid out (see the module docstring): experts over "dp" with the divide
    factor of the 2-D sync, the rest over the whole world (dsv3.parallel.data.apply_data_parallel's units and root).
    Replaces `sync_gradients_2d` (FSDP reduces in backward) and `grad_norm_2d` (use `grad_norm_sharded`); the loads
    are still summed with `sync_expert_loads_2d`. Apply before building the optimizer. Returns model."""
    from .data import apply_data_parallel
    mesh = model.parallel_mesh
    dp, ep = mesh.shape
    for m in model.modules():
        if isinstance(m, ExpertParallelExperts):
            fully_shard(m, mesh=mesh["dp"], reshard_after_forward=reshard_after_forward)
            m.set_gradient_divide_factor(float(dp * ep))
            # a rank whose EP row sent these experts no rows must still join the column's reduce-scatter: its
            # experts get zero gradients (ExpertParallelExperts._no_rows keeps them in the graph); newer torch can
            # also be told so directly
            if hasattr(m, "set_reduce_scatter_unused_params"):
                m.set_reduce_scatter_unused_params(True, recurse=False)
    world = init_device_mesh(mesh.device_type, (dp * ep,), mesh_dim_names=("world",))
    apply_data_parallel(model, world, reshard_after_forward)       # the non-expert rest, averaged over the world
    if dist.get_backend() == "gloo":
        # FSDP2 reduce-scatters fp32/bf16 gradients with AVG, or with NCCL's PREMUL_SUM where the divide factor
        # differs from the mesh size (the experts: dp*ep over dp), which gloo lacks: plain sums divided afterwards
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_force_sum_reduction_for_comms(True)
    model.parallel_mesh = mesh
    return model


@torch.no_grad()
def grad_norm_sharded(model: nn.Module) -> torch.Tensor:
    """The global gradient L2 norm when every gradient element lives on exactly one rank (FSDP over the world and
    over "dp" for the experts): one all-reduce of the local squared sums. The same on every rank."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sq = torch.stack([g.double().pow(2).sum() for g in local]).sum() if local else torch.zeros((), dtype=torch.float64)
    dist.all_reduce(sq)
    return sq.sqrt()