"""Pipeline parallelism with DualPipeV (spec 5), on top of `torch.distributed.pipelining`.

`split_stages(model, n)` cuts a built Transformer into n sequential chunks that share the model's parameters (no
copy): chunk 0 = embedding + first layers, chunk n-1 = last layers + final norm + lm_head + the MTP modules; decoder
layers are spread as evenly as possible (earlier chunks take the remainder). Parameter names inside a chunk are the
model's own (`layers.3.mlp...`, `mtp.0...`), so checkpoints and per-parameter comparisons map one to one.

DualPipeV (the "cut-in-half" DualPipe, spec 5): with W ranks there are 2W chunks and rank r holds chunks r and
2W-1-r, a V: micro-batches go down the ranks through chunks 0..W-1 and back up through W..2W-1, so rank 0 holds both
the first chunk (embedding) and the last one (head + MTP), as in TR 3.2.3. `build_dualpipev` wraps the two local
chunks in `PipelineStage`s and builds torch's `ScheduleDualPipeV`, which needs n_microbatches >= 2W.

MTP on the last chunk: the MTP module needs Emb(t_{i+1}), and the token ids only exist at chunk 0. Rather than
sending integer ids through the pipeline (received activations get requires_grad in some torch versions, which
integer tensors refuse), chunk 0 also emits the embeddings `emb = Emb(input_ids)` as a second activation; the middle
chunks pass it on and the last chunk feeds emb[:, k:] to MTP depth k (exactly `Transformer.mtp_logits`). The
embedding's MTP gradient flows back to chunk 0 as an ordinary activation gradient, so every parameter belongs to
exactly one chunk (the schedule's `scale_grads` divides each stage's gradients once; a parameter registered in two
stages would be divided twice, and a zero-bubble weight pass could miss it). The cost is a second (B, T, D) tensor
per pipeline hop; a hand-written V schedule would keep it on rank 0, where chunk 0 and the last chunk both live.
The last chunk outputs (logits, *mtp_logits), or logits alone without MTP; the trainer's loss_fn
(dsv3.train.losses.PipelineLoss) turns that and the micro-batch's window (B, T+1) into main CE + weight * mean MTP
CE, as every layout does.

PP x EP (spec 5: V3 trains with PP16 x EP64): the job's (pp, dp, ep) mesh (dsv3.parallel.mesh.ParallelMesh),
here with dp = 1: global rank = pp_rank * ep + ep_rank. The ep ranks of one pipeline position hold the same chunks, with
every MoE layer's routed experts sharded over them (`apply_expert_parallel(model, mesh.ep_group)`, before recomputation
and before `build_dualpipev(..., group=mesh.pp_group)`), and each feeds its own rows of the batch through its own
pipeline `mesh.pp_group`; the expert all-to-alls of a chunk run among the ep ranks of its pipeline position. After
`step`, the gradients of this rank's chunks (the stages' `submod`s) are those of its own rows' mean loss; the gradient
and load syncs of dsv3.parallel.grads turn them into the whole batch's.
No collective crosses pipeline positions except the pipeline's own sends and receives.

F/B overlap (`dsv3.parallel.overlap.enable_overlap(schedule, {mesh.ep_group: mesh.ep_group_bwd})`): DualPipeV's
OVERLAP_F_B actions pair the forward of one micro-batch on one local chunk with the backward of another on the
other chunk; torch runs them one after the other, the handler runs the backward on a second thread, its expert
all-to-alls on a duplicate EP group (`ep_group_bwd`), so one's all-to-all waits overlap the other's compute.
Results are bit-identical to the sequential runtime. No speed-up is measured or claimed: on the 2-core CPU
machines both threads share the cores, and on GPU both still launch on one CUDA stream (see that module for what
does and does not overlap there). Selective recomputation (`apply_recompute`, after `apply_expert_parallel`) composes
with both: tested bit-identical, with and without the overlap.

Sequence-wise balance loss (spec 1.7): its per-layer terms live on the chunks that hold those layers, not on the last
stage that computes the loss. A chunk with `balance_loss` set (a callable taking the chunk's [(name, MoE)] and
returning the summed loss of the routing they kept, `dsv3.train.balance.collect_balance_loss`) collects it after its
decoder layers (and after each MTP module) and ties it to the hidden state there through `BalanceLossGrad` (Megatron's
MoEAuxLossAutoScaler): the hidden state passes unchanged, and in backward the aux loss receives the constant gradient
`balance_weight` (alpha / the number of micro-batches, set at step time), exactly the gradient of alpha * aux in the
mean loss. The hidden state is then a view, which torch's stage backward refuses as a stage output (it detaches
outputs in place): a middle chunk sends a copy. The detached values are summed in `balance_sum` for logging.
`dsv3 train` drives all this (dsv3.train.pipeline_step, parallel.pp).

PP x DP x EP: with dp > 1 each pipeline position holds a (dp, ep) sub-layout whose replicated gradients are
averaged over its dp * ep ranks (`position_group`) and whose expert gradients over the dp column (`dp_group`):
dsv3.parallel.grads.sync_gradients, the same for every layout.

Limitations:
  * Stage shapes are given statically (`microbatch_shape`), so torch runs no shape inference: it would run the MoE
    on meta or uninitialised tensors, and the MoE reads its expert counts on the host. Every micro-batch must have
    that shape, and with EP every ep rank must feed the same number of rows (the gradient averaging assumes it).
  * FSDP2 inside a stage (each chunk its own FSDP root, dsv3.parallel.data.apply_data_parallel_chunk) runs full
    backwards only (`_full_backward`); not with the F/B overlap.
  * Not here: the zero-bubble split of the backward inside an overlapped pair (torch's DualPipeV emits full
    backwards there; DeepSeek splits them and also partitions SMs). The global gradient norm over pp x dp x ep for
    clipping is dsv3.parallel.grads's.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV

from ..model.moe import moe_layers
from ..model.rope import rope_cos_sin
from ..model.transformer import Transformer
from .plan import stage_layers


class BalanceLossGrad(torch.autograd.Function):
    """forward(x, aux, weight) = x unchanged (a view of it); backward passes x's gradient through and gives `aux` the
    constant gradient `weight`: the gradient of (the loss x's gradient comes from) + weight * aux."""

    @staticmethod
    def forward(ctx, x, aux, weight: float):
        ctx.weight, ctx.aux = weight, (aux.shape, aux.dtype, aux.device)
        return x.view_as(x)          # a new tensor object over the same data (autograd makes a returned input one)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.aux
        aux_grad = torch.full(shape, ctx.weight, dtype=dtype, device=device)
        return grad, aux_grad, None


class _Stage(PipelineStage):
    """A PipelineStage that never sends to its own rank while warming up. torch 2.11's schedules warm the p2p links
    up by sending to both neighbouring stages, and in a V the two middle chunks (W-1 and W) live on the same rank:
    gloo has no pair to itself and fails ("Pair is not connected"). Those sends carry nothing (the real hand-over
    between two local stages never goes through the process group), so they are dropped. torch >= 2.13 warms up
    through a vote that does not call this method, so there the override is inert."""

    def _get_init_p2p_neighbors_ops(self) -> list:
        return [op for op in super()._get_init_p2p_neighbors_ops() if op.group_peer != self.group_rank]


class Chunk(nn.Module):
    """Layers [start, stop) of a Transformer, plus the embedding on the first chunk and the norm, head and MTP modules
    on the last. forward: chunk 0 takes input_ids (B, T); the others take the previous chunk's outputs."""

    def __init__(self, model: Transformer, start: int, stop: int, first: bool, last: bool, index: int = 0):
        super().__init__()
        self.config, self.first, self.last, self.index = model.config, first, last, index
        self.with_emb = len(model.mtp) > 0       # the embeddings travel with the hidden states for the MTP modules
        if first:
            self.embed_tokens = model.embed_tokens
        # ModuleDict keyed by the global layer index: parameter names stay "layers.{i}...."
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(start, stop)})
        if last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
        # the sequence-wise balance loss (module docstring): off until a trainer sets balance_loss
        self.moe_layers = moe_layers(self)
        self._layer_moes = moe_layers(self.layers)
        self._mtp_moes = [moe_layers(m) for m in self.mtp] if last else []
        self.balance_loss: Callable[[list], torch.Tensor | None] | None = None
        self.balance_weight = 0.0
        self.balance_sum: torch.Tensor | None = None

    def _with_balance_loss(self, y: torch.Tensor, moes: list) -> torch.Tensor:
        aux = self.balance_loss(moes) if self.balance_loss is not None and moes else None
        if aux is None:              # no hook, no MoE, or no routing kept (evaluation, alpha = 0)
            return y
        self.balance_sum = aux.detach() if self.balance_sum is None else self.balance_sum + aux.detach()
        return BalanceLossGrad.apply(y, aux, self.balance_weight)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None):
        if self.first:
            x = emb = self.embed_tokens(x)
        T = x.shape[1]
        cos, sin = rope_cos_sin(self.config, torch.arange(T, device=x.device))
        for layer in self.layers.values():
            x = layer(x, cos, sin)
        y = self._with_balance_loss(x, self._layer_moes)
        if not self.last:
            x = y.clone() if y is not x else x          # a stage output must not be a view (module docstring)
            # a fresh tensor, not the received buffer itself: the stage may reuse its receive buffers
            return (x, emb.clone()) if self.with_emb else x
        x = y
        h = self.norm(x)
        out, hk = [self.lm_head(h)], h
        for k, module in enumerate(self.mtp, start=1):       # Transformer.mtp_logits with emb in place of Emb(ids)
            hk = self._with_balance_loss(module(hk[:, :-1], emb[:, k:], cos[:T - k], sin[:T - k]),
                                         self._mtp_moes[k - 1])
            out.append(self.lm_head(module.shared_head.norm(hk)))
        return tuple(out) if self.with_emb else out[0]


def _full_backward(chunk: nn.Module):
    """The stage's `dw_builder` for a chunk under FSDP2: its backward is then always a full one (inputs and weights
    together, in the I action) and the W action a no-op. torch's split backward (`stage_backward_input` /
    `stage_backward_weight`) finds the weights to defer through `chunk.parameters()`, which under FSDP are the
    sharded DTensors, not the gathered tensors the graph used: their gradients would be lost or misplaced. The
    zero-bubble split is thus given up under FSDP (the V schedule is kept); None (the split) otherwise."""
    return (lambda: _no_weight_pass) if isinstance(chunk, FSDPModule) else None


def _no_weight_pass() -> None:
    """The W action of a chunk whose I action ran the full backward (_full_backward)."""


def split_stages(model: Transformer, n_chunks: int) -> list[Chunk]:
    """n_chunks sequential chunks of `model` sharing its parameters; layers split as evenly as possible."""
    n_layers = len(model.layers)
    if not 1 <= n_chunks <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {n_chunks} chunks of at least one layer")
    return [Chunk(model, layers[0], layers[-1] + 1, first=c == 0, last=c == n_chunks - 1, index=c)
            for c, layers in enumerate(stage_layers(model.config, n_chunks))]


def _example_io(chunk: Chunk, b: int, t: int, dtype: torch.dtype, logits_dtype: torch.dtype | None = None
                ) -> tuple[tuple, tuple]:
    """Meta-device example inputs and outputs of a chunk for a (b, t) micro-batch (static stage shapes). Under
    autocast the hidden states keep the parameters' dtype (residual adds promote) but the head's logits come out in
    the autocast dtype: `logits_dtype` (some torch versions validate the last stage's outputs against these)."""
    # Float examples require grad: torch 2.13 takes requires_grad from them to decide which received activations
    # become autograd leaves and which outputs get a gradient back (with False the backward of a middle stage fails).
    cfg, meta = chunk.config, torch.device("meta")
    act = lambda: torch.empty(b, t, cfg.hidden_size, dtype=dtype, device=meta, requires_grad=True)
    hidden = (act(), act()) if chunk.with_emb else (act(),)
    inputs = (torch.empty(b, t, dtype=torch.long, device=meta),) if chunk.first else hidden
    if not chunk.last:
        return inputs, hidden
    logits = [torch.empty(b, t - k, cfg.vocab_size, dtype=logits_dtype or dtype, device=meta, requires_grad=True)
              for k in range(len(chunk.mtp) + 1)]
    return inputs, tuple(logits) if chunk.with_emb else (logits[0],)


def build_dualpipev(model: Transformer, rank: int, world: int, loss_fn, n_microbatches: int,
                    microbatch_shape: tuple[int, int], group=None, device: torch.device | str = "cpu",
                    scale_grads: bool = True):
    """(schedule, [stage for chunk rank, stage for chunk 2*world-1-rank]) for DualPipeV on `world` pipeline ranks.

    `model` is the full model on every rank (only the local chunks' parameters are used and get gradients; a real
    run would build only those, e.g. on the meta device, and free the rest). `loss_fn(output, target)` runs on the
    last stage (e.g. dsv3.train.losses.PipelineLoss); `microbatch_shape` = (micro-batch size, T) of the input ids. Rank
    0 calls `schedule.step(input_ids, target=windows, losses=losses)` (it holds the first and the last chunk), the
    others `schedule.step()`; input_ids must be contiguous (torch 2.11 checks each micro-batch's strides against the
    static shapes: pass `window[:, :-1].contiguous()`, not the slice). With scale_grads the gradients are averaged over
    micro-batches, i.e. those of the mean loss. rank and world are this rank's place in the pipeline process group
    `group` (default: the default group); with expert parallelism see dsv3.parallel.mesh.ParallelMesh and the module
    docstring.
    """
    if group is not None and dist.is_initialized() and (dist.get_rank(group), dist.get_world_size(group)) != \
            (rank, world):
        raise ValueError(f"rank {rank} of {world} does not match the pipeline group: rank {dist.get_rank(group)} "
                         f"of {dist.get_world_size(group)}")
    _check_microbatches(n_microbatches, world)
    chunks = split_stages(model, 2 * world)
    return dualpipev_schedule([chunks[rank], chunks[2 * world - 1 - rank]], world, loss_fn, n_microbatches,
                              microbatch_shape, model.embed_tokens.weight.dtype, group, device, scale_grads)


def _check_microbatches(n_microbatches: int, world: int) -> None:
    if n_microbatches < 2 * world:
        raise ValueError(f"DualPipeV needs n_microbatches >= 2 * world = {2 * world}, got {n_microbatches}")


def dualpipev_schedule(chunks: list[Chunk], world: int, loss_fn, n_microbatches: int,
                       microbatch_shape: tuple[int, int], dtype: torch.dtype, group=None,
                       device: torch.device | str = "cpu", scale_grads: bool = True,
                       logits_dtype: torch.dtype | None = None):
    """`build_dualpipev` on this rank's two chunks of an existing `split_stages` (chunk r and 2*world-1-r, in that
    order), with activations of `dtype`: new stages and a new schedule around the same chunks, e.g. one per number of
    micro-batches."""
    _check_microbatches(n_microbatches, world)
    n_chunks = 2 * world
    stages = []
    for chunk in chunks:
        idx = chunk.index
        inputs, outputs = _example_io(chunk, *microbatch_shape, dtype, logits_dtype)
        stages.append(_Stage(chunk, idx, n_chunks, torch.device(device), input_args=inputs,
                             output_args=outputs, group=group, dw_builder=_full_backward(chunk)))
    schedule = ScheduleDualPipeV(stages, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    return schedule, stages
