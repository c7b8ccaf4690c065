"""`dsv3 train` with pipeline parallelism (parallel.pp > 1): DualPipeV (dsv3.parallel.pipeline) over pp ranks, each
pipeline position a (dp, ep) layout of its own.

    torchrun --standalone --nproc_per_node 4 -m dsv3.cli train --config configs/tiny.toml model.num_hidden_layers=4 \\
        parallel.pp=2 parallel.ep=2 parallel.overlap=true

Ranks: world = pp * dp * ep, global rank = (p * dp + d) * ep + e (dsv3.parallel.mesh.ParallelMesh). The model is
cut into 2 * pp chunks; rank (p, d, e) holds chunks p and 2pp-1-p (rank p = 0 the embedding and the head + MTP),
with every routed expert of them sharded over its ep group (experts [e E/ep, (e+1) E/ep)). Only its two chunks are
materialised, run, get gradients and are in its optimizer and EMA; the rest of the model stays on the meta device.
With parallel.fsdp each chunk is sharded over the position (FSDP2, its own root; dsv3.parallel.parallelize), with
parallel.zero1 its optimizer state over its replicas (dsv3.parallel.zero).

One optimizer step (`PipelineRunner.forward_backward`): every rank reads the step's micro-batches from the same data
stream and keeps its share of each (rank (d, e) rows [j r, (j+1) r) of every micro-batch, j = d * ep + e, r =
micro_batch_size / (dp * ep)), as Layout does; the shares of all micro-batches are concatenated and fed to one
`schedule.step` as n = n_micro * r / m DualPipeV micro-batches of m rows (`RunConfig.pipeline_microbatch`: the
largest m that keeps n >= 2 * pp at the smallest step; one schedule per n, built on first use, around the same
chunks). Gradients are plain sums over the pipeline micro-batches (scale_grads=False) of:
  * the last stage's loss (main CE + lambda(step) * mean MTP CE) / n, lambda set at step time
    (dsv3.train.losses.PipelineLoss, the trainer's objective on the last stage's output),
  * alpha / n times each chunk's sequence-wise balance loss, fed by `BalanceLossGrad` on the chunk that holds the
    layers (dsv3.parallel.pipeline),
i.e. the gradient of this rank's rows' mean of the trainer's loss. The gradient sync, the global norm and the load
sync are dsv3.parallel.grads's, as in every layout: the sync makes the local chunks' gradients the whole batch's
within the pipeline position, the norm counts every element of the whole model once over all ranks; clipping and
the optimizer step then touch only the local chunks. The expert loads are counted by each rank's own MoE layers,
put in a (layers, E) table and summed over the world: every rank gets every layer's global loads (logged on rank 0)
and updates the biases of its own layers. The logged losses: main and
MTP CE from the last stage, the balance loss from every chunk, summed over the world / (dp * ep).

Validation (`PipelineRunner.evaluate`): no schedule; each validation batch's shares go through the chunks in order
with blocking p2p sends and receives along the pipeline (down the ranks, back up), every ep group running its MoE
all-to-alls together; rank p = 0 computes the metrics of its rows, summed over the world / (dp * ep).

Construction and checkpoints: the model is described on the meta device and dsv3.parallel.parallelize keeps and
materialises only this rank's two chunks (`LocalModel.chunks`; the other layers stay on meta); checkpoints are
sharded, each rank writing the rows of its chunks (dsv3.train.checkpoint.save_sharded), and resume in any layout.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from ..parallel.overlap import enable_overlap
from ..parallel.parallelize import LocalModel
from ..parallel.pipeline import dualpipev_schedule
from .balance import collect_balance_loss
from .data_parallel import Layout
from .losses import PipelineLoss, ValidationSums, output_losses, split_output


def _under(context, fn):
    def run(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)
    return run


class PipelineRunner:
    """The forward/backward of a training step and validation through this rank's chunks (module docstring)."""

    def __init__(self, layout: Layout, local: LocalModel, layers: list, seq_len: int, ce, autocast):
        self.layout, self.local, self.model, self.layers, self.seq_len = layout, local, local.model, layers, seq_len
        self.loss = PipelineLoss(ce)        # the CE casts the logits to fp32 itself: no autocast needed there
        self.dtype = self.model.embed_tokens.weight.dtype
        dev = layout.device.type
        with autocast():          # the head's logits come out in the autocast dtype, the hidden states do not
            self.logits_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.dtype
        self._current: tuple | None = None     # (n, schedule, step kwargs, overlap handler)
        # autocast around the chunks' forwards only, as the trainer has it around the forward only: the schedule
        # interleaves forwards and backwards inside one step() (recomputation restores the forward's autocast itself)
        for c in local.chunks:
            c.forward = _under(autocast, c.forward)
            c.balance_loss = collect_balance_loss      # each chunk feeds its layers' term into its own backward

    def _schedule(self, n: int):
        """The DualPipeV schedule for n micro-batches (new stages around the same chunks). Only the current one is
        kept: the batch ramp only grows n, and every schedule holds receive buffers (and an overlap thread)."""
        if self._current is None or self._current[0] != n:
            if self._current is not None and self._current[3] is not None:
                self._current[3].close()
            L = self.layout
            schedule, _ = dualpipev_schedule(self.local.chunks, L.pp, self.loss, n, (L.rows, self.seq_len), self.dtype,
                                             group=L.mesh.pp_group, device=L.device, scale_grads=False,
                                             logits_dtype=self.logits_dtype)
            handler = None
            if L.overlap:
                handler = enable_overlap(schedule, {L.mesh.ep_group: L.mesh.ep_group_bwd} if L.ep > 1 else {})
            quiet = "return_outputs" in inspect.signature(schedule.step).parameters
            self._current = (n, schedule, {"return_outputs": False} if quiet else {}, handler)
        return self._current[1:]

    def forward_backward(self, windows: list[torch.Tensor], lam: float, alpha: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the step's micro-batches (whole windows, as read) through the pipeline and sync the gradients; returns
        (global loads (layers, E), [total, main, mtp, aux] means), the same on every rank."""
        L, device = self.layout, self.layout.device
        batch = torch.cat([L.shard(w) for w in windows]).to(device, non_blocking=True)
        n = batch.shape[0] // L.rows
        schedule, kwargs, _ = self._schedule(n)
        self.loss.lam, self.loss.n, self.loss.sums = lam, n, None
        for c in self.local.chunks:
            c.balance_weight, c.balance_sum = alpha / n, None
        for _, m in self.layers:       # (keep_routing is the trainer's, set for the step)
            m.tokens_per_expert.zero_()
        if L.mesh.pp_rank == 0:
            schedule.step(batch[:, :-1].contiguous(), target=batch, **kwargs)
        else:
            schedule.step(**kwargs)
        L.sync_gradients(self.local)
        loads = torch.zeros(len(self.layers), self.model.config.n_routed_experts, dtype=torch.int64, device=device)
        for i, (_, m) in enumerate(self.layers):
            if self.local.holds(m):
                loads[i] = m.tokens_per_expert
        L.sync_loads(loads)
        sums = torch.zeros(3, dtype=torch.float64, device=device)          # main, mtp, aux: sums over micro-batches
        if self.loss.sums is not None:
            sums[:2] = self.loss.sums
        for c in self.local.chunks:
            if c.balance_sum is not None:
                sums[2] += c.balance_sum.double()
        dist.all_reduce(sums)
        main, mtp, aux = sums / (n * L.replicas)
        return loads, torch.stack([main + lam * mtp + alpha * aux, main, mtp, aux])

    # ---- validation ---------------------------------------------------------------------------------------------
    def _p2p(self, op, tensors: list[torch.Tensor], pp_rank: int) -> None:
        peer = dist.get_global_rank(self.layout.mesh.pp_group, pp_rank)
        for t in tensors:
            op(t, peer, group=self.layout.mesh.pp_group)

    def _recv(self, pp_rank: int, b: int, t: int, with_emb: bool) -> list[torch.Tensor]:
        acts = [torch.empty(b, t, self.model.config.hidden_size, dtype=self.dtype, device=self.layout.device)
                for _ in range(1 + with_emb)]
        self._p2p(dist.recv, acts, pp_rank)
        return acts

    def _send(self, act, pp_rank: int) -> None:
        acts = list(act) if isinstance(act, tuple) else [act]
        self._p2p(dist.send, [a.to(self.dtype).contiguous() for a in acts], pp_rank)

    def _forward(self, ids: torch.Tensor):
        """The last chunk's output for ids on pipeline rank 0, None on the others: chunk p, then chunk 2pp-1-p, the
        activations received from and sent to the neighbours in the V's order (a blocking chain, no cycle)."""
        L = self.layout
        p, last = L.mesh.pp_rank, L.pp - 1
        down, up = self.local.chunks
        b, t = ids.shape
        act = down(ids) if p == 0 else down(*self._recv(p - 1, b, t, down.with_emb))
        if p < last:                       # else chunk pp-1 feeds chunk pp on the same rank
            self._send(act, p + 1)
            act = self._recv(p + 1, b, t, up.with_emb)
        act = up(*(act if isinstance(act, (tuple, list)) else (act,)))
        if p > 0:
            self._send(act, p - 1)
            return None
        return act

    @torch.no_grad()
    def evaluate(self, val: list[torch.Tensor], ce) -> dict[str, float | None]:
        """Trainer.evaluate's metrics through the pipeline (every rank must call it; every rank returns them)."""
        L = self.layout
        self.model.eval()
        for _, m in self.layers:
            m.keep_routing = False
        sums = ValidationSums(L.device)
        for window in val:
            window = L.shard(window).to(L.device)
            out = self._forward(window[:, :-1])
            if out is None:
                continue
            main, mtp = output_losses(out, window, ce)
            sums.add(window, main, mtp, *split_output(out))
        dist.all_reduce(sums.tensor)
        for c in self.local.chunks:
            if isinstance(c, FSDPModule):
                c.reshard()          # a chunk root stays gathered after a no_grad forward (dsv3.parallel.data)
        return sums.metrics(len(val), L.replicas)
