"""Data parallelism with FSDP2 (spec 5: ZeRO over the data-parallel ranks): every parameter is sharded over a 1-D
DeviceMesh (dim 0 of each tensor, one slice per rank) as a DTensor, all-gathered just before the unit that uses it
runs and freed after; gradients are reduce-scattered (averaged over the mesh) in backward. An optimizer built after
`apply_data_parallel` sees only the local shards, so its state (AdamW's two moments) is sharded too.

Units, in this order (fully_shard must see children before their parent, which takes what is left):
  * each decoder block and each MTP module: one all-gather / reduce-scatter per block, so only one block's full
    parameters live at a time and communication overlaps the neighbouring block's compute (an MTP module's
    `shared_head.norm`, which `mtp_logits` calls outside the module's forward, is a tiny unit of its own);
  * the root, which keeps what no block owns: the embedding, the final norm and the head. The root is sharded with
    reshard_after_forward=False, whatever the blocks use: `dsv3.train.trainer.lm_losses` calls `hidden_states`,
    then `lm_head` and `mtp_logits` (which use `embed_tokens` and `lm_head` again) outside any root forward, so
    the root's parameters must stay gathered from `hidden_states` until the backward (FSDP2 reshards the root in
    its final backward callback, after every use has accumulated its gradient).
  * `hidden_states` is registered as an FSDP forward method: it is the root's entry point in training (lm_losses
    never calls `forward`), and the first root call is where FSDP2 finds its root and gathers the root's parameters.
    `mtp_logits` is deliberately not registered: its input `hidden` requires grad, so FSDP2 would run the root's
    post-backward (reduce-scatter + reshard) as soon as the MTP branch's gradient reached it, before the main
    branch's embedding and head gradients exist (tried: the backward then fails on freed parameter storage).

Buffers stay plain, replicated tensors: `e_score_correction_bias` (routing bias) and `tokens_per_expert` (loads).
Each rank counts only its own tokens' loads, so before the aux-loss-free bias update the trainer sums the loads
over the ranks (dsv3.parallel.grads.sync_loads); then every rank applies the same update and the biases stay
identical.

Gradient semantics: FSDP2 averages gradients over the mesh, so with every rank backpropagating the mean loss over its
own (equally many) tokens, the result is the gradient of the mean over the whole global batch.

With expert parallelism: `dsv3.parallel.parallelize.shard_data_parallel` shards the experts over their dp column
and then calls this on the position mesh for the rest. The global gradient norm for clipping counts each DTensor
gradient's local shard once (dsv3.parallel.grads.grad_norm). Not handled here: mixed precision policies.
`fully_shard` is imported from torch.distributed.fsdp, its public path since
torch 2.6 (valid on 2.11 and 2.13). After a forward under no_grad (evaluation) the root stays gathered until
the next backward: call `model.reshard()` if memory matters (state_dict() reshards it by itself).
"""

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method



def apply_data_parallel(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` (a dsv3 Transformer) over the 1-D `mesh` with FSDP2, in place; returns it (its class becomes an
    FSDP subclass). Apply after everything that replaces parameters and before building the optimizer.
    reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3; backward gathers them
    again) or keep them until the backward (ZeRO-2 style: less communication, more memory)."""
    if mesh.ndim != 1:
        raise ValueError(f"apply_data_parallel expects a 1-D mesh, got {mesh.ndim} dimensions")
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for module in model.mtp:
        # mtp_logits applies shared_head.norm to the module's output outside the module's forward: its own unit,
        # else it would meet the module's parameters already resharded (DTensors)
        fully_shard(module.shared_head.norm, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # the root: embedding, final norm, head (see the module docstring for why it is never resharded after forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def apply_data_parallel_chunk(chunk: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    """`apply_data_parallel` for one DualPipeV chunk (dsv3.parallel.pipeline.Chunk), its own FSDP2 root as torch's
    pipelining expects (the stage calls the chunk's forward; its REDUCE_GRAD action reduce-scatters the gradients
    the chunk accumulated unsharded over the step's micro-batches): its decoder blocks and MTP modules are units
    (an MTP module's `shared_head.norm` one of its own, as above), the chunk the root that keeps the embedding or
    the final norm and head. Returns chunk."""
    if mesh.ndim != 1:
        raise ValueError(f"apply_data_parallel_chunk expects a 1-D mesh, got {mesh.ndim} dimensions")
    for block in chunk.layers.values():
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for module in (chunk.mtp if chunk.last else []):
        fully_shard(module.shared_head.norm, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(chunk, mesh=mesh, reshard_after_forward=False)
    return chunk
