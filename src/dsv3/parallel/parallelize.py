"""The one parallel entry point of training (torchtitan's `parallelize_*`): `parallelize(model, mesh, cfg, device)`
lays a model described on the meta device out over the job's (pp, dp, ep) DeviceMesh (dsv3.parallel.mesh) and
materialises this rank's part, in this order (each step needs the one before):
  1. FP8 (train.precision = "fp8"): swap the linear / expert classes (dsv3.fp8.training.apply_fp8);
  2. EP (parallel.ep > 1, or with fsdp): the routed experts of every MoE sharded over "ep", rank (p, d, e) holding
     experts [e E/ep, (e+1) E/ep) (dsv3.parallel.expert); the dp ranks of a column hold replicas of the same slice;
  3. pipeline split (parallel.pp > 1): the model cut into 2 pp chunks, this rank keeping chunks p and 2pp-1-p
     (DualPipeV's V, dsv3.parallel.pipeline); the other chunks stay on meta;
  4. recomputation (train.recompute): wraps methods inside the future FSDP units (dsv3.parallel.recompute);
  5. compilation (train.compile): every block one graph (`Module.compile`, resolved at the first call);
  6. FSDP2 (parallel.fsdp): `shard_data_parallel` (under a pipeline each local chunk is its own FSDP root);
  7. materialisation: each rank allocates and initialises only what it holds, to exactly the values of a
     single-process init with the same seed (dsv3.parallel.materialize).
Everything else (attention, gate, shared experts, embedding, head, norms) is replicated on the dp * ep ranks of a
pipeline position. The gradient sync, global norm and load sync of every layout are dsv3.parallel.grads's.

FSDP2 (`shard_data_parallel`) instead of replicas: the routed experts of each MoE are sharded over "dp" (their
column: the replicas of the same experts), everything else over the position (dp * ep ranks flattened: the world
when pp = 1), as torchtitan does for EP + FSDP. FSDP then does the reductions of dsv3.parallel.grads.sync_gradients
itself: it averages the non-expert gradients over the position (sum / (dp*ep)) and, with its divide factor set to
dp*ep instead of its mesh size dp, reduce-scatters the expert ones to their sum over the column / (dp*ep) (with
dp = 1 the factor stays unset and sync_gradients divides: `shard_data_parallel`). Every
parameter element then lives on exactly one rank, which `grads.grad_norm` counts as such (DTensor gradients).
Optimizer state, built afterwards, is sharded too. Recomputation comes before FSDP, as torchtitan applies AC before
fully_shard: a unit's pre-backward all-gather then runs before its checkpointed regions are recomputed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from .data import apply_data_parallel, apply_data_parallel_chunk
from .expert import ExpertParallelExperts, apply_expert_parallel
from .materialize import materialize
from .mesh import ParallelMesh
from .pipeline import Chunk, split_stages
from .recompute import apply_recompute
from .two_hop import apply_ep_dispatch


class LocalModel:
    """What this rank holds of the model, seen as one model with the full model's parameter names: `roots` is
    [model] or, under a pipeline, this rank's two chunks. What the optimizer, the EMA, the gradient sync and the
    checkpoints take."""

    def __init__(self, model: nn.Module, roots: list[nn.Module]):
        self.model, self.roots = model, roots
        self._held = {id(m) for r in roots for m in r.modules()}

    @property
    def chunks(self) -> list[Chunk] | None:
        """This rank's pipeline chunks, None without a pipeline."""
        return self.roots if self.roots[0] is not self.model else None

    def named_parameters(self):
        for r in self.roots:
            yield from r.named_parameters()

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def modules(self):
        for r in self.roots:
            yield from r.modules()

    def holds(self, module: nn.Module) -> bool:
        """Whether this rank runs `module` (e.g. an MoE layer: its loads and bias update)."""
        return id(module) in self._held


def parallelize(model: nn.Module, mesh: ParallelMesh | None, cfg, device: torch.device | str) -> LocalModel:
    """Lay `model` (built on the meta device) out over `mesh` (None: one process) as `cfg` (a RunConfig: its
    `parallel` section, train.precision / fp8_experts / recompute / compile / seed, model.init_std) says, in the
    module docstring's order, and materialise this rank's part on `device`. Every rank must call it (FSDP and the
    expert groups are collectives). Returns what this rank holds."""
    par, train = cfg.parallel, cfg.train
    fsdp = par.fsdp and mesh is not None
    if train.precision == "fp8":                                          # 1. FP8
        from ..fp8.training import apply_fp8
        apply_fp8(model, experts=train.fp8_experts, linears=train.fp8_linears)
    if mesh is not None and (mesh.ep > 1 or fsdp):                        # 2. EP (fsdp: the dp column's slices)
        # fp8_dispatch only where rows travel (ep > 1: "a no-op with ep == 1", ParallelConfig): under FSDP with
        # ep == 1 the experts are ExpertParallelExperts over a group of one, and FP8 would only quantise their inputs
        apply_expert_parallel(model, mesh.ep_group, fp8_dispatch=par.fp8_dispatch and mesh.ep > 1)
        apply_ep_dispatch(model, par)                                     #    parallel.ep_dispatch = "two_hop"
    roots: list[nn.Module] = [model]
    if par.pp > 1:                                                        # 3. this rank's two pipeline chunks
        chunks = split_stages(model, 2 * par.pp)
        roots = [chunks[mesh.pp_rank], chunks[2 * par.pp - 1 - mesh.pp_rank]]
    if train.recompute:                                                   # 4. recomputation
        apply_recompute(model)
    if train.compile:                                                     # 5. compilation (resolved at first call)
        mode = "reduce-overhead" if train.cuda_graphs else None           #    (+ CUDA graphs: the Trainer marks steps)
        for block in list(model.layers) + list(model.mtp):
            block.compile(mode=mode)
    if fsdp:                                                              # 6. FSDP2
        shard_data_parallel(model, mesh, chunks=roots if par.pp > 1 else None)
    materialize(roots, device, train.seed, cfg.model.init_std)           # 7. this rank's part only
    return LocalModel(model, roots)



def shard_data_parallel(model: nn.Module, mesh: ParallelMesh, reshard_after_forward: bool = True,
                        chunks: list[Chunk] | None = None) -> nn.Module:
    """FSDP2 on a model whose experts are sharded over "ep" (module docstring): experts over "dp" with the divide
    factor of the sync, the rest over the position (dsv3.parallel.data.apply_data_parallel's units and root; under a
    pipeline, `chunks`: this rank's chunks, each its own root, apply_data_parallel_chunk). Apply after recomputation
    and before building the optimizer. Every rank must call it. Returns model."""
    dp, ep = mesh.dp, mesh.ep
    held = [model] if chunks is None else chunks
    for m in (m for r in held for m in r.modules()):
        if isinstance(m, ExpertParallelExperts):
            fully_shard(m, mesh=mesh["dp"], reshard_after_forward=reshard_after_forward)
            if dp > 1:
                m.set_gradient_divide_factor(float(dp * ep))
            # dp == 1: a column of one rank, whose "reduce-scatter" is a local copy that torch divides by a set
            # factor inconsistently across versions (2.13 with the sum reduction forced below, i.e. on gloo: twice,
            # so dp 1 x ep 2 got half the expert gradients; some older versions not at all). Unset, no version
            # divides, and dsv3.parallel.grads.sync_gradients applies the 1 / (dp*ep) itself
            # a rank whose EP row sent these experts no rows must still join the column's reduce-scatter: its
            # experts get zero gradients (ExpertParallelExperts._no_rows keeps them in the graph); newer torch can
            # also be told so directly
            if hasattr(m, "set_reduce_scatter_unused_params"):
                m.set_reduce_scatter_unused_params(True, recurse=False)
    if chunks is None:
        apply_data_parallel(model, mesh.position, reshard_after_forward)  # the rest, averaged over the position
    else:
        for c in chunks:
            apply_data_parallel_chunk(c, mesh.position, reshard_after_forward)
    if dist.get_backend() == "gloo":
        # FSDP2 reduce-scatters fp32/bf16 gradients with AVG, or with NCCL's PREMUL_SUM where the divide factor
        # differs from the mesh size (the experts: dp*ep over dp), which gloo lacks: plain sums divided afterwards
        for m in (m for r in held for m in r.modules()):
            if isinstance(m, FSDPModule):
                m.set_force_sum_reduction_for_comms(True)
    return model
