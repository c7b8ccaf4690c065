"""`dsv3 train` with pipeline parallelism (parallel.pp > 1): DualPipeV (dsv3.parallel.pipeline) over pp ranks, each
pipeline position a (dp, ep) layout of its own.

    torchrun --standalone --nproc_per_node 4 -m dsv3.cli train --config configs/tiny.toml model.num_hidden_layers=4 \\
        parallel.pp=2 parallel.ep=2 parallel.overlap=true

Ranks: world = pp * dp * ep, global rank = (p * dp + d) * ep + e (`pipeline_mesh`). The model is cut into 2 * pp
chunks; rank (p, d, e) holds chunks p and 2pp-1-p (rank p = 0 the embedding and the head + MTP), with every routed
expert of them sharded over its ep group (experts [e E/ep, (e+1) E/ep)). Only its two chunks are materialised, run,
get gradients and are in its optimizer and EMA; the rest of the model stays on the meta device.

One optimizer step (`PipelineRunner.forward_backward`): every rank reads the step's micro-batches from the same data
stream and keeps its share of each (rank (d, e) rows [j r, (j+1) r) of every micro-batch, j = d * ep + e, r =
micro_batch_size / (dp * ep)), as Layout does; the shares of all micro-batches are concatenated and fed to one
`schedule.step` as n = n_micro * r / m DualPipeV micro-batches of m rows (`RunConfig.pipeline_microbatch`: the
largest m that keeps n >= 2 * pp at the smallest step; one schedule per n, built on first use, around the same
chunks). Gradients are plain sums over the pipeline micro-batches (scale_grads=False) of:
  * the last stage's loss (main CE + lambda(step) * mean MTP CE) / n, lambda set at step time (`_StepLoss`),
  * alpha / n times each chunk's sequence-wise balance loss, fed by `BalanceLossGrad` on the chunk that holds the
    layers (dsv3.parallel.pipeline),
i.e. the gradient of this rank's rows' mean of the trainer's loss. `sync_gradients` then makes it the whole batch's
within the pipeline position (replicated parameters averaged over its dp * ep ranks, expert slices summed over the
dp column / (dp * ep): dsv3.parallel.parallelize's 2-D sync on the position's groups); `grad_norm` is the norm of
the whole model's gradient over all ranks (each parameter counted once: replicated ones on rank (p, 0, 0), expert
slices on the ranks (p, 0, e)); clipping and the optimizer step then touch only the local chunks. The expert loads
are counted by each rank's own MoE layers, put in a (layers, E) table and summed over the world: every rank gets
every layer's global loads (logged on rank 0) and updates the biases of its own layers. The logged losses: main and
MTP CE from the last stage, the balance loss from every chunk, summed over the world / (dp * ep).

Validation (`PipelineRunner.evaluate`): no schedule; each validation batch's shares go through the chunks in order
with blocking p2p sends and receives along the pipeline (down the ranks, back up), every ep group running its MoE
all-to-alls together; rank p = 0 computes the metrics of its rows, summed over the world / (dp * ep).

Construction and checkpoints: the model is described on the meta device and a rank materialises only its two chunks
(`owned`; the other layers stay on meta: dsv3.parallel.materialize); checkpoints are sharded, each rank writing the
rows of its chunks (dsv3.train.checkpoint.save_sharded), and resume in any layout.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.expert import _expert_params, apply_expert_parallel, sync_layout_gradients
from ..parallel.overlap import enable_overlap
from ..parallel.pipeline import Chunk, dualpipev_schedule, pipeline_mesh, split_stages
from .balance import collect_balance_loss
from .config import RunConfig
from .data_parallel import Layout


class LocalChunks:
    """This rank's chunks seen as one model, parameters named as in the full model: what its optimizer and EMA
    hold and what it saves."""

    def __init__(self, chunks: list[Chunk]):
        self.chunks = chunks

    def named_parameters(self):
        for c in self.chunks:
            yield from c.named_parameters()

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def modules(self):
        for c in self.chunks:
            yield from c.modules()


class PipelineLayout(Layout):
    """The ranks of a pp > 1 run and the trainer's collectives over them (the Layout interface)."""

    def __init__(self, device: torch.device, cfg: RunConfig):
        super().__init__(device, cfg.parallel.ep)           # the process group; the config refuses fsdp with pp
        self.pp, self.overlap = cfg.parallel.pp, cfg.parallel.overlap
        self.dp = cfg.check_world(self.world)               # before any group is built on a wrong world
        self.replicas = self.dp * self.ep                   # ranks that share every micro-batch's rows
        self.mesh = pipeline_mesh(self.pp, self.ep, self.dp)
        self.share = self.mesh.dp_rank * self.ep + self.mesh.ep_rank
        self.rows = cfg.pipeline_microbatch(self.dp)        # rows of one DualPipeV micro-batch
        self.local: LocalChunks | None = None

    @property
    def first_row(self) -> bool:
        """dp row 0 of this pipeline position: between them its ep ranks hold the position's chunks whole, keep their
        EMA and send them to rank 0 at save; the other rows hold replicas."""
        return self.mesh.dp_rank == 0

    @property
    def keeps_ema(self) -> bool:
        return self.first_row

    @property
    def partitioned(self) -> bool:
        return True

    def describe(self) -> str:
        how = "DualPipeV" + (" with F/B overlap" if self.overlap else "")
        return f" x {self.world} ranks (pp {self.pp} x dp {self.dp} x ep {self.ep}, {how})"

    def apply(self, model: nn.Module) -> nn.Module:
        """Shard the experts over the ep group (ep > 1) and cut the model into its chunks, keeping this rank's two,
        with the balance loss hooked in: after apply_fp8, before apply_recompute and the optimizer."""
        if self.ep > 1:
            apply_expert_parallel(model, self.mesh.ep_group)
        chunks = split_stages(model, 2 * self.pp)
        p = self.mesh.pp_rank
        self.local = LocalChunks([chunks[p], chunks[2 * self.pp - 1 - p]])
        for c in self.local.chunks:
            c.balance_loss = collect_balance_loss
        self._held = {id(m) for c in self.local.chunks for _, m in c.moe_layers}
        return model

    def trainable(self, model: nn.Module) -> LocalChunks:
        return self.local

    def ema_source(self, model: nn.Module) -> LocalChunks:
        return self.local

    def owned(self, model: nn.Module) -> list[nn.Module]:
        return list(self.local.chunks)

    def holds(self, module: nn.Module) -> bool:
        return id(module) in self._held

    def shard(self, window: torch.Tensor) -> torch.Tensor:
        rows = window.shape[0] // self.replicas
        return window[self.share * rows:(self.share + 1) * rows]

    @torch.no_grad()
    def sync_gradients(self, model: nn.Module) -> None:
        """The gradients of the local chunks, from this rank's rows' mean loss to the whole batch's (see the module
        docstring). Every rank of the pipeline position must call it."""
        n = self.replicas
        if n == 1:
            return
        sync_layout_gradients(self.local, self.mesh.dp_group, self.mesh.position_group, n)

    @torch.no_grad()
    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """The L2 norm of the whole model's gradient after `sync_gradients`, the same on every rank (float64)."""
        experts = _expert_params(self.local)
        sq = torch.zeros(2, dtype=torch.float64, device=self.device)       # replicated, expert
        for p in self.local.parameters():
            if p.grad is not None:
                sq[int(id(p) in experts)] += p.grad.double().square().sum()
        # the replicated parameters of a position are counted on its rank (d, e) = (0, 0), the expert slices on
        # dp row 0 (the other rows hold the same gradients after the sync)
        total = sq[0] * float(self.share == 0) + sq[1] * float(self.first_row)
        dist.all_reduce(total)
        return total.sqrt()


class _StepLoss:
    """The last stage's loss_fn: (main CE + lam * mean MTP CE) / n for the step's n micro-batches (lam and n set at
    step time), recording the detached CE values."""

    def __init__(self, ce):
        self.ce, self.lam, self.n, self.sums = ce, 0.0, 1, None

    def __call__(self, output, window: torch.Tensor) -> torch.Tensor:
        logits, *mtp = (output,) if isinstance(output, torch.Tensor) else output
        main = self.ce(logits, window[:, 1:])
        mtp_loss = torch.stack([self.ce(lg, window[:, k + 1:]) for k, lg in enumerate(mtp, 1)]).mean() if mtp \
            else main.new_zeros(())
        values = torch.stack([main.detach(), mtp_loss.detach()]).double()
        self.sums = values if self.sums is None else self.sums + values
        return (main + self.lam * mtp_loss) / self.n


def _under(context, fn):
    def run(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)
    return run


class PipelineRunner:
    """The forward/backward of a training step and validation under a PipelineLayout (see the module docstring)."""

    def __init__(self, layout: PipelineLayout, model: nn.Module, layers: list, seq_len: int, ce, autocast):
        self.layout, self.model, self.layers, self.seq_len = layout, model, layers, seq_len
        self.loss = _StepLoss(ce)           # the CE casts the logits to fp32 itself: no autocast needed there
        self.dtype = model.embed_tokens.weight.dtype
        dev = layout.device.type
        with autocast():          # the head's logits come out in the autocast dtype, the hidden states do not
            self.logits_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.dtype
        self._current: tuple | None = None     # (n, schedule, step kwargs, overlap handler)
        # autocast around the chunks' forwards only, as the trainer has it around the forward only: the schedule
        # interleaves forwards and backwards inside one step() (recomputation restores the forward's autocast itself)
        for c in layout.local.chunks:
            c.forward = _under(autocast, c.forward)

    def _schedule(self, n: int):
        """The DualPipeV schedule for n micro-batches (new stages around the same chunks). Only the current one is
        kept: the batch ramp only grows n, and every schedule holds receive buffers (and an overlap thread)."""
        if self._current is None or self._current[0] != n:
            if self._current is not None and self._current[3] is not None:
                self._current[3].close()
            L = self.layout
            schedule, _ = dualpipev_schedule(L.local.chunks, L.pp, self.loss, n, (L.rows, self.seq_len), self.dtype,
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
        for c in L.local.chunks:
            c.balance_weight, c.balance_sum = alpha / n, None
        for _, m in self.layers:       # (keep_routing is the trainer's, set for the step)
            m.tokens_per_expert.zero_()
        if L.mesh.pp_rank == 0:
            schedule.step(batch[:, :-1].contiguous(), target=batch, **kwargs)
        else:
            schedule.step(**kwargs)
        L.sync_gradients(self.model)
        loads = torch.zeros(len(self.layers), self.model.config.n_routed_experts, dtype=torch.int64, device=device)
        for i, (_, m) in enumerate(self.layers):
            if L.holds(m):
                loads[i] = m.tokens_per_expert
        dist.all_reduce(loads)
        sums = torch.zeros(3, dtype=torch.float64, device=device)          # main, mtp, aux: sums over micro-batches
        if self.loss.sums is not None:
            sums[:2] = self.loss.sums
        for c in L.local.chunks:
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
        down, up = L.local.chunks
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
        sums = torch.zeros(5, dtype=torch.float64, device=L.device)        # main, mtp, hit, agree, n_mtp
        for window in val:
            window = L.shard(window).to(L.device)
            out = self._forward(window[:, :-1])
            if out is None:
                continue
            logits, *mtp_logits = (out,) if isinstance(out, torch.Tensor) else out
            sums[0] += ce(logits, window[:, 1:]).double()
            if mtp_logits:
                sums[1] += ce(mtp_logits[0], window[:, 2:]).double()
                draft = mtp_logits[0].argmax(-1)                         # (B, T-1): guesses of token i+2
                sums[2] += (draft == window[:, 2:]).sum()
                sums[3] += (draft == logits[:, 1:].argmax(-1)).sum()
                sums[4] += draft.numel()
        dist.all_reduce(sums)
        n, n_mtp = len(val), int(sums[4])
        main, mtp = (sums[:2] / L.replicas).tolist()
        return {"val_loss": main / n, "val_mtp_loss": mtp / n if n_mtp else None,
                "val_mtp_acc": sums[2].item() / n_mtp if n_mtp else None,
                "val_mtp_agree": sums[3].item() / n_mtp if n_mtp else None}
