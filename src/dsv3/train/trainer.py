"""The pre-training loop on one device (TR 3-4, spec 1.7, 1.8, 3).

One optimizer step = `batch_size(step)` sequences in micro-batches of `micro_batch_size`:
    loss = CE(main) + lambda * mean_k CE(MTP depth k) + alpha * sum_layers L_Bal   (dsv3.train.losses; / n_micro)
then clip the global gradient norm, AdamW, the aux-loss-free bias update from the expert loads summed over all
micro-batches of the step, and the CPU EMA. A non-finite loss or gradient stops the run before the optimizer
touches the weights. A periodic checkpoint is written one step late: the next step's forward and backward vet the
weights first (its loss no spike, its gradient not zero: `_watch_for_spikes`), and it is written before that step's
update changes them. A checkpoint due during a blow-up so waits until the run is healthy again, a blow-up that ends in
NaN is never the last checkpoint (even one that a single update caused), and the stop names the last healthy
checkpoint with the command that resumes from it.

SIGINT / SIGTERM (dsv3.train.signals) stop the loop after the step in progress, all ranks after the same step: it
saves a checkpoint and raises TrainingInterrupted, whose message is the command that resumes. That save and the
final one are of the state as it is; during a spike they are marked suspect, and keep pruning leaves the last healthy
checkpoint besides them (dsv3.train.step_dirs.prune_checkpoints).

Resume is exact: the checkpoint holds weights, routing biases, AdamW moments, the EMA, the data position and the RNG
states, and the logged train and val metrics are cut back to the checkpoint's step (the events stay). It starts from
the newest healthy checkpoint (not one saved during a spike) whose files match their checksums (dsv3.train.checkpoint),
every rank verifying its share, or from the one --resume-from names (dsv3.train.run_dir.choose_checkpoint). How the
Trainer writes and reads its checkpoints is dsv3.train.checkpointing's (its base class); its data and the run
directory's first files are dsv3.train.run_data's.

Under torchrun the same loop runs on every rank in the layout of `parallel` (data parallelism, expert parallelism
inside it, optionally FSDP-sharded, DualPipeV pipeline parallelism with a (dp, ep) layout per pipeline position:
dsv3.train.data_parallel, dsv3.train.pipeline_step). The model is described on the meta device and laid out by the
one entry point dsv3.parallel.parallelize, each rank materialising only its part; the gradient sync, global norm and
load sync are dsv3.parallel.grads's, the objective and validation metrics dsv3.train.losses's, for every layout;
checkpoints are sharded, every rank writing its rows (dsv3.train.checkpoint.save_sharded).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..fp8.weight_cache import refresh_fp8_weights
from ..model import Transformer
from ..parallel.materialize import materialize
from ..parallel.parallelize import parallelize
from ..parallel.zero import ZeroOne
from . import schedule
from .balance import collect_balance_loss, moe_layers, update_bias
from .checkpoint import is_sharded
from .checkpointing import Checkpointing
from .config import RunConfig
from .data_parallel import Layout, NullLogger, refuse_ranks
from .dataset import check_corpus
from .device import compute_dtype, resolve_device
from .ema import CPUEma
from .hf_shards import check_hf_names, hf_source_error
from .init_from import (Source, check_extension, find_source, load_hf_starting_weights, load_starting_weights,
                        source_tensors)
from .losses import ValidationSums, cross_entropy, lm_losses, mtp_mean, objective, positions, token_weights
from .metrics import MetricsLogger
from .adamw_bf16 import AdamWBF16
from .optim import build_optimizer, compiled_clip_and_step, set_learning_rate
from .run_data import prepare_run_data, write_run_config
from .run_dir import check_start, choose_checkpoint, divergence_advice, lock_run_dir, release_unused_run_dir
from .signals import StopSignals, TrainingInterrupted

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "StepStats", "build_model", "compute_dtype",
           "resolve_device", "split_batch", "cross_entropy", "lm_losses"]


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped and its last checkpoint is intact."""


def build_model(cfg: RunConfig, device: torch.device | str) -> Transformer:
    """The model of `cfg`: fp32 master weights, or bf16 with train.dtype=bf16-params (the routing bias stays fp32
    either way). On the meta device (device="meta") it is only described, for a layout to cut before each rank
    materialises its own part (dsv3.parallel.materialize); elsewhere it is materialised whole with the same
    seeded N(0, init_std^2) init (TR 4.2), so a single process holds exactly the values every layout's ranks hold."""
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    if cfg.train.dtype == "bf16-params":
        model.to(torch.bfloat16)
    if torch.device(device).type != "meta":
        materialize([model], device, cfg.train.seed, cfg.model.init_std)
    return model


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch source's micro-batch: a window (pre-training), or (window, targets) with a loss mask (SFT)."""
    return batch if isinstance(batch, tuple) else (batch, None)


@dataclass
class StepStats:
    loss: float
    main_loss: float
    mtp_loss: float | None
    aux_loss: float
    grad_norm: float
    tokens: int


class Trainer(Checkpointing):
    command = "train"    # the dsv3 subcommand that runs this trainer: its resume / restart advice names it
    def __init__(self, cfg: RunConfig, resume: bool | str = False, progress: bool | None = None,
                 overwrite: bool = False, source=None, init_state: dict | Path | None = None):
        """resume: continue from the newest healthy valid checkpoint, or from the one named (a str: --resume-from's
        step, step directory or path; dsv3.train.run_dir.choose_checkpoint); overwrite: start afresh in a run
        directory that holds an earlier run (deleting its outputs); neither: the directory must not hold one
        (dsv3.train.run_dir).
        source: a batch source in place of the pre-training corpus (SFT: dsv3.posttrain.sft.ChatBatches): its
        `tokenizer`, `next_batch(rows)` -> window or (window, targets), `val` batches, `state_dict` /
        `load_state_dict` (the data position, in checkpoints). init_state: the starting weights (a fine-tune's
        base model), or the Hugging Face directory each rank reads its rows of, in place of the random
        initialisation; a resumed run's checkpoint replaces them.

        Built in this order: 1. every check that can refuse the run, before a file is written; 2. the process
        group and mesh; 3. the data (and, on rank 0, the run directory's first files: dsv3.train.run_data);
        4. the model laid out over the mesh, its starting weights, optimizer and EMA; 5. the checkpoint side and a
        resume's state (dsv3.train.checkpointing); 6. what each step uses (loss, FP8 weight cache, pipeline,
        clipping); 7. the log."""
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        init_source = self._validate_start(resume, overwrite, source)                      # 1.
        self.layout = Layout(self.device, cfg)     # 2. the process group and the mesh; validates the layout
        # rank 0 claims the run directory before anything is written there: a second run at once is refused
        self.run_lock = lock_run_dir(self.run_dir, self.layout, resume, overwrite, cfg)
        try:
            ckpt, skipped = choose_checkpoint(self.run_dir, self.layout, resume if isinstance(resume, str) else None,
                                              self.command) if resume else (None, [])
            self.dtype = compute_dtype(cfg.train.dtype, self.device)
            show = cfg.log.progress if progress is None else progress
            data = prepare_run_data(cfg, self.layout, source, resume, overwrite, progress=show)  # 3.
            self.tokenizer, self.shards, self.loader, self.val = data.tokenizer, data.shards, data.loader, data.val
            shard_note = self._build_model(init_state, init_source)                              # 4.
            self.step, self.tokens, self.spikes, self.loss_ema = 0, 0, 0, None                  # 5.
            self._init_checkpointing()
            if resume:
                self._resume_from(ckpt)
                if self.layout.is_main:
                    write_run_config(cfg)      # the resume's overrides, now that its checkpoint has loaded
            self._prepare_steps()                                                                # 6.
            self.layout.apply_timeout()         # parallel.timeout_minutes on the groups made since the mesh
            self.logger = MetricsLogger(self.run_dir, cfg.train.steps, tensorboard=cfg.log.tensorboard, progress=show,
                                        start_step=self.step) if self.layout.is_main else NullLogger()   # 7.
            if resume:
                self.logger.truncate_after(self.step)
                for note in skipped:
                    self.logger.log_event(self.step, note)
                self.logger.log_event(self.step, f"resumed from {ckpt}" + (
                    " (the newest valid checkpoint)" if skipped and not isinstance(resume, str) else ""))
            for note in data.notes + ([shard_note] if shard_note else []):
                self.logger.log_event(self.step, note)
        except BaseException:
            # a start refused or stopped before it wrote anything (its corpus, a Ctrl-C while tokenising): the
            # directory the lock made goes with it, not left holding only the lock file
            release_unused_run_dir(self.run_dir, self.run_lock)
            raise

    def _validate_start(self, resume: bool, overwrite: bool, source) -> Source | None:
        """Everything that can refuse the run, before a file is written; sets the device. Returns train.init_from's
        source (a fresh start's), checked to fit the model."""
        cfg = self.cfg
        self.device = resolve_device(cfg.train.device)
        if cfg.train.cuda_graphs and self.device.type != "cuda":
            raise ConfigError(f"train.cuda_graphs needs a CUDA device; train.device={cfg.train.device!r} is "
                              f"{self.device.type} here (pass train.cuda_graphs=false)")
        check_start(self.run_dir, resume, overwrite, cfg)
        if source is None:
            check_corpus(cfg.data, cfg.run_dir)
            if cfg.log.val_batches and cfg.data.val_fraction == 0:
                raise ConfigError(f"invalid run config: log.val_batches={cfg.log.val_batches} needs validation "
                                  f"documents, but data.val_fraction=0 sends none; set log.val_batches=0 or raise "
                                  f"data.val_fraction")
        if source is not None and cfg.parallel.pp > 1:
            raise ConfigError("parallel.pp > 1 trains only on the pre-training corpus (a batch source with a loss "
                              "mask does not go through DualPipeV); use parallel.pp=1")
        if type(self)._forward_backward is not Trainer._forward_backward:
            refuse_ranks(self.command)
        init_source = None
        if cfg.train.init_from and not resume:     # a resumed run's checkpoint holds the weights already
            init_source = find_source(cfg.train.init_from)
            check_extension(cfg.model, cfg.data.seq_len, init_source)
            if init_source.checkpoint is None:     # a Hugging Face directory: its tensors are the model's
                try:
                    check_hf_names(init_source.path, cfg.model)
                except CheckpointError as e:
                    raise ConfigError(hf_source_error(f"train.init_from={cfg.train.init_from!r}", e)) from None
        return init_source

    def _build_model(self, init_state: dict | None, init_source: Source | None) -> str | None:
        """The model laid out over the mesh with its starting weights, the MoE layers, optimizer and EMA. Returns the
        layout's FSDP note for the log (or None)."""
        cfg = self.cfg
        # the one parallel entry point (dsv3.parallel.parallelize): the model described on the meta device, laid
        # out over the mesh in one documented order (FP8 -> EP -> pipeline split -> recomputation -> compile ->
        # FSDP2); each rank allocates and initialises only its own part (its chunks, expert slices and FSDP shards)
        self.model = build_model(cfg, "meta")
        self.local = parallelize(self.model, self.layout.mesh, cfg, self.device)
        shard_note = self.layout.fsdp_note(self.local)
        self.param_counts = build_model(cfg, "meta").num_params()     # of the whole model, not this rank's part
        roots = self.local.roots
        if isinstance(init_state, Path):                             # a fine-tune's base: a Hugging Face directory
            load_hf_starting_weights(roots, init_state, cfg.model, f"the base model {init_state}")
        elif init_state is not None:                                 # a fine-tune's base: a run's weights
            load_starting_weights(roots, init_state, "the base model")
        elif init_source is not None and init_source.checkpoint is None:
            load_hf_starting_weights(roots, init_source.path, cfg.model, f"train.init_from={str(init_source.path)!r}")
        elif init_source is not None:           # a dsv3 run's checkpoint: a sharded one read rank by rank
            ckpt = init_source.checkpoint
            load_starting_weights(roots, ckpt if is_sharded(ckpt) else source_tensors(init_source),
                                  cfg.train.init_from)
        self.layers = moe_layers(self.model)
        # ZeRO-1 (parallel.zero1): the optimizer steps only this rank's rows of each replicated parameter and the
        # replicas all-gather the updated rows (dsv3.parallel.zero)
        self.zero = ZeroOne(self.local, self.layout.mesh) if self.layout.zero1 else None
        self.optimizer = build_optimizer(self.zero or self.local, cfg.optim,
                                         compiled=cfg.train.compile_optimizer)
        self.compiled_step = compiled_clip_and_step(self.optimizer) if cfg.train.compile_optimizer else None
        # rank 0 alone logs validation; the EMA is shared out over every rank, each averaging ~1/world of the
        # model on its CPU (dsv3.train.ema; a collective)
        ema_group = torch.distributed.group.WORLD if self.layout.world > 1 else None
        self.ema = CPUEma(self.local.roots, cfg.train.ema_decay, ema_group) if cfg.train.ema_decay > 0 else None
        return shard_note

    def _prepare_steps(self) -> None:
        """What every step uses, made once the weights are final (after any load): the loss, the FP8 weight cache,
        the pipeline runner and where the clipping happens."""
        cfg = self.cfg
        # with train.compile (the blocks were compiled by parallelize) the loss fuses the fp32 upcast into
        # log-softmax instead of materialising fp32 logits
        self.ce = torch.compile(cross_entropy) if cfg.train.compile else cross_entropy
        # FP8 weights quantised once per optimizer step for all its micro-batches (dsv3.fp8.weight_cache): made
        # here (after any load), refreshed right after every optimizer step; with one micro-batch nothing to reuse
        self.fp8_cache = cfg.train.precision == "fp8" and cfg.train.batch_size > cfg.train.micro_batch_size
        if self.fp8_cache:
            refresh_fp8_weights(self.model, cfg.train.fp8_weight_cache)
        self.pipeline = None
        if self.local.chunks is not None:
            from .pipeline_step import PipelineRunner
            self.pipeline = PipelineRunner(self.layout, self.local, self.layers, cfg.data.seq_len, self.ce,
                                           self.autocast)
        # fused AdamW and AdamWBF16 divide the gradients by `grad_scale` inside their kernels: clipping there saves a
        # pass over every gradient (on CPU, train_step scales the gradients). Under expert and pipeline parallelism
        # this path and compiled_step stay enabled: both take the global gradient norm that train_step computes.
        # Under FSDP both are off (compile_optimizer is refused by the config): neither is verified with DTensor
        # gradients, and the clipping is then train_step's scaling of the local shards
        self.clip_in_optimizer = (self.device.type == "cuda" and self.compiled_step is None and not self.layout.fsdp
                                  and (isinstance(self.optimizer, AdamWBF16)
                                       or (isinstance(self.optimizer, torch.optim.AdamW)
                                           and bool(self.optimizer.defaults.get("fused")))))

    def autocast(self):
        enabled = self.dtype != torch.float32 and self.cfg.train.dtype != "bf16-params"
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def _new_graph_step(self) -> None:
        """train.cuda_graphs: a forward starts a new replay of the blocks' graphs. Their outputs live in the graphs'
        memory until the next replay overwrites them; each micro-batch reads what it needs (loss, loads, routing)
        before the next one starts, which this mark tells torch."""
        if self.cfg.train.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _stable_gradients(self) -> None:
        """Zeroed .grad buffers of our own before a step of several micro-batches under train.cuda_graphs. A first
        backward into no .grad takes the graph's output tensor as the gradient, and that memory is the graphs' to
        overwrite at the next micro-batch's replay; into a buffer the gradient is added instead. One micro-batch
        needs none: its gradients are read (clipping, the update) before the next replay, then set to None. A step
        of several holds the gradients from its first backward on anyway, so the buffers add no peak memory."""
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def _forward_backward(self, n_micro: int, lam: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's micro-batches forward and backward (gradient accumulation), gradients synced over the ranks;
        returns (loads (layers, E) summed over the step and the ranks, [total, main, mtp, aux] means)."""
        cfg = self.cfg
        loads = torch.zeros(len(self.layers), cfg.model.n_routed_experts, dtype=torch.int64, device=self.device)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)   # total, main, mtp, aux
        batches = [split_batch(self.loader.next_batch(cfg.train.micro_batch_size)) for _ in range(n_micro)]
        for (window, targets), weight in zip(batches, self._token_weights(batches)):
            self.step_tokens += positions(window)
            window = self.layout.shard(window).to(self.device, non_blocking=True)
            if targets is not None:
                targets = self.layout.shard(targets).to(self.device, non_blocking=True)
            for _, m in self.layers:
                m.tokens_per_expert.zero_()
            self._new_graph_step()
            with self.autocast():
                main, mtp, _, _ = lm_losses(self.model, window, self.ce, targets)
                aux = collect_balance_loss(self.layers)
                aux = aux if aux is not None else main.new_zeros(())
                w_main, w_mtp = weight          # each CE at its step-wide token mean (losses.token_weights)
                terms = (main * w_main, mtp_mean([ce * w for ce, w in zip(mtp, w_mtp)], main), aux / n_micro)
                loss = objective(*terms, lam, alpha)
            loss.backward()
            if self.layers:
                loads += torch.stack([m.tokens_per_expert for _, m in self.layers])
            sums += torch.stack([loss, *terms]).detach().double()
        self.layout.sync_gradients(self.local)
        return self.layout.sync_loads(loads), self.layout.mean(sums)

    def _token_weights(self, batches: list[tuple[torch.Tensor, torch.Tensor | None]]
                       ) -> list[tuple[float, list[float]]]:
        """dsv3.train.losses.token_weights for this rank's rows of the step's micro-batches."""
        return token_weights([t for _, t in batches], self.layout.shard, self.layout.replicas, len(self.model.mtp))

    # ---- one optimizer step -------------------------------------------------------------------------------------
    def train_step(self) -> tuple[StepStats, torch.Tensor]:
        cfg, step = self.cfg, self.step
        lr = schedule.learning_rate(step, cfg)
        set_learning_rate(self.optimizer, lr)
        n_micro = schedule.batch_size(step, cfg) // cfg.train.micro_batch_size
        lam, alpha = schedule.mtp_weight(step, cfg), cfg.balance.seq_aux_alpha
        self.model.train()
        for _, m in self.layers:
            m.keep_routing = alpha > 0
        self.step_tokens = 0              # positions the step trains on, counted by _forward_backward
        if cfg.train.cuda_graphs and n_micro > 1:
            self._stable_gradients()
        if self.pipeline is not None:     # the whole step through DualPipeV; gradients synced, sums reduced
            windows = [self.loader.next_batch(cfg.train.micro_batch_size) for _ in range(n_micro)]
            self.step_tokens = sum(map(positions, windows))
            loads, sums = self.pipeline.forward_backward(windows, lam, alpha)
        else:
            loads, sums = self._forward_backward(n_micro, lam, alpha)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # the norm of the whole gradient, each element counted once over the ranks (dsv3.parallel.grads, one
        # function for every layout); then one coefficient, applied inside the fused or compiled update where there
        # is one
        grad_norm = self.layout.grad_norm(self.local).float()
        coef = (cfg.optim.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)
        if self.clip_in_optimizer:               # fused AdamW divides the gradients by grad_scale in its kernel
            self.optimizer.grad_scale = (grad_norm / cfg.optim.grad_clip).clamp(min=1.0).float()
        elif self.compiled_step is None:
            self.layout.scale_gradients(grads, coef)
        total, main_v, mtp_v, aux_v = sums.tolist()
        if not (math.isfinite(total) and math.isfinite(grad_norm.item())):
            self._clear_gradients()
            self.finish_checkpoint()             # the save in flight holds vetted weights: the advice names it
            msg = (f"step {step + 1}: non-finite {'loss' if not math.isfinite(total) else 'gradient norm'} "
                   f"(loss {total}, grad norm {grad_norm.item()}); stopping. "
                   f"{divergence_advice(self.run_dir, self.layout.world, cfg.optim.lr, self.command)}")
            self.logger.log_event(step + 1, msg, echo=False)     # the CLI's "stopped:" line says it once
            raise TrainingDiverged(msg)
        self._watch_for_spikes(total, grad_norm.item())
        if self.pending is not None and not self.spiking:   # this step's loss vetted the weights it was computed on
            self.save(self.pending)
            self.pending = None
        if self.zero is not None:
            self.zero.attach_grads()             # the optimizer's rows of the (clipped) gradients
        if self.compiled_step is not None:
            self.compiled_step(grads, coef)
        else:
            self.optimizer.step()
        if self.zero is not None:
            self.zero.gather()                   # every replica gets every rank's updated rows
        if self.fp8_cache:
            # the next step's FP8 weight operands, from the updated weights
            refresh_fp8_weights(self.model, cfg.train.fp8_weight_cache)
        self._clear_gradients()
        own = [i for i, (_, m) in enumerate(self.layers) if self.local.holds(m)]   # pp > 1: this rank's layers
        update_bias([self.layers[i] for i in own], loads[own], schedule.bias_update_speed(step, cfg))
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        tokens = self.step_tokens
        self.tokens += tokens
        stats = StepStats(total, main_v, mtp_v if len(self.model.mtp) else None, aux_v, grad_norm.item(), tokens)
        return stats, loads

    def _clear_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.zero is not None:                # the optimizer's are views of the parameters' gradients
            for p in self.local.parameters():
                p.grad = None

    def interval_metrics(self) -> dict:
        """Extra fields of the train record a subclass adds (GRPO: rewards, KL, clip fraction, ...), since the last
        record."""
        return {}

    def _watch_for_spikes(self, total: float, grad_norm: float) -> None:
        """Flag a spike: the loss above train.spike_ratio x its running mean, or a gradient of exactly zero (a model
        that blew up saturates, e.g. uniform logits, and learns nothing more while its loss looks calm). The running
        mean takes a spike in only up to that line, so one huge spike does not lift it over the blow-up that follows.
        Every rank sees the same loss and norm (reduced), so every rank takes the same checkpoint decisions."""
        line = None if self.loss_ema is None else self.cfg.train.spike_ratio * self.loss_ema
        self.spiking = (line is not None and total > line) or grad_norm == 0
        if self.spiking:
            self.spikes += 1
            self.logger.log_event(self.step + 1, f"loss spike: {total:.4f} vs running {self.loss_ema:.4f}"
                                  if grad_norm else f"gradient norm 0 at loss {total:.4f}: the model stopped learning")
        self.loss_ema = total if line is None else 0.95 * self.loss_ema + 0.05 * min(total, line)

    # ---- validation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """Main-token loss, MTP loss, and the MTP head's next-next-token accuracy: against the data (`mtp_acc`) and
        against the main model's own greedy choice one step later (`mtp_agree`, the acceptance rate of greedy
        speculative decoding with the MTP head as the draft).

        Rank 0 alone validates, on whole batches, unless the experts are sharded (ep > 1: the MoE forward then
        all-to-alls within the EP row) or the parameters are (fsdp: the forward all-gathers them): every rank then
        validates its rows of every batch (as in training) and the sums are all-reduced; every rank returns the
        same numbers. The sharded losses are then the single process's: each rank's CEs weighted by its share of the
        batch's loss tokens (losses.token_weights: with a loss mask, SFT, the ranks' rows hold different numbers),
        and a batch whose rows do not divide over the ranks (a batch source's last one) split unevenly, no row
        dropped (Layout.shard_any)."""
        if self.pipeline is not None and self.val:      # every rank: the forward runs through the pipeline
            return self.pipeline.evaluate(self.val, self.ce)
        sharded = self.layout.partitioned
        if not self.val or not (self.layout.is_main or sharded):
            return {}
        self.model.eval()
        for _, m in self.layers:
            m.keep_routing = False
        sums = ValidationSums(self.device)
        for batch in self.val:
            window, targets = split_batch(batch)
            if sharded:
                # this rank's CEs are means over its own loss tokens: weighted by c R / C (c of the batch's C loss
                # tokens here, R ranks), their sum over the ranks / R is the whole batch's token mean. Unweighted,
                # rows with more loss tokens counted less, and a rank without rows added a NaN mean
                whole = window[:, 1:] if targets is None else targets
                w_main, w_mtp = token_weights([whole], self.layout.shard_any, self.layout.replicas,
                                              len(self.model.mtp))[0]
                window, targets = self.layout.shard_any(window), self.layout.shard_any(whole)
            window = window.to(self.device)
            if targets is not None:
                targets = targets.to(self.device)
            self._new_graph_step()
            with self.autocast():
                main, mtp, logits, mtp_logits = lm_losses(self.model, window, self.ce, targets)
            if sharded:       # (a weight of 0: no loss token here, the CE is 0/0)
                main = main * w_main if w_main else main.new_zeros(())
                mtp = [ce * w if w else ce.new_zeros(()) for ce, w in zip(mtp, w_mtp)]
            sums.add(window, main, mtp, logits, mtp_logits)
        if sharded:   # the weighted losses and the counts summed over the ranks
            self.layout.sum(sums.tensor)
        if self.layout.fsdp:
            self.model.reshard()    # the root stays gathered after a no_grad forward (dsv3.parallel.data): free it
        return sums.metrics(len(self.val), self.layout.world if sharded else 1)

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self, stop: StopSignals | None = None) -> dict:
        """Train to train.steps. `stop` (installed by the caller: signal handlers are the process's) ends the run
        early, with a checkpoint, by raising TrainingInterrupted."""
        cfg, log = self.cfg, self.cfg.log
        interval_loads = torch.zeros(len(self.layers), cfg.model.n_routed_experts, dtype=torch.int64,
                                     device=self.device)
        acc = {"loss": 0.0, "main_loss": 0.0, "mtp_loss": 0.0, "aux_loss": 0.0, "grad_norm": 0.0, "n": 0, "tok": 0}
        t0, last_val = time.perf_counter(), {}
        try:
            self._set_aside_newer()
            while self.step < cfg.train.steps:
                stats, loads = self.train_step()
                interval_loads += loads
                for k in ("loss", "main_loss", "aux_loss", "grad_norm"):
                    acc[k] += getattr(stats, k)
                acc["mtp_loss"] += stats.mtp_loss or 0.0
                acc["n"] += 1
                acc["tok"] += stats.tokens
                step, done = self.step, self.step == cfg.train.steps
                if step % log.interval == 0 or done:
                    dt = time.perf_counter() - t0
                    n = acc["n"]
                    mean = interval_loads.double().mean(-1, keepdim=True).clamp_min(1e-12)
                    self.logger.log_train(
                        step, loss=acc["loss"] / n, main_loss=acc["main_loss"] / n,
                        mtp_loss=acc["mtp_loss"] / n if stats.mtp_loss is not None else None,
                        aux_loss=acc["aux_loss"] / n, grad_norm=acc["grad_norm"] / n,
                        lr=schedule.learning_rate(step - 1, cfg), batch_size=schedule.batch_size(step - 1, cfg),
                        tokens=self.tokens, tok_per_s=acc["tok"] / dt, mtp_weight=schedule.mtp_weight(step - 1, cfg),
                        bias_update_speed=schedule.bias_update_speed(step - 1, cfg), spikes=self.spikes,
                        expert_load=(interval_loads.double() / mean).cpu().tolist(),
                        moe_layers=[name for name, _ in self.layers], **self.interval_metrics())
                    interval_loads.zero_()
                    acc = dict.fromkeys(acc, 0.0)
                    acc["n"] = acc["tok"] = 0
                    t0 = time.perf_counter()
                if log.val_interval and (step % log.val_interval == 0 or done):
                    last_val = self.evaluate()
                    if last_val:
                        self.logger.log_val(step, **last_val)
                    t0 = time.perf_counter()
                # a due checkpoint is written during the next step, once its loss vetted these weights (train_step);
                # one still pending here was refused by a spike and waits for this step's state to be vetted instead.
                # The final one and a signal's are written at once
                saved, on_time = None, bool(cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0)
                if done:
                    saved, self.pending = self._save_now(), None
                    t0 = time.perf_counter()
                elif on_time or self.pending is not None:
                    if self.pending is not None:
                        self.logger.log_event(step, f"checkpoint of step {self.pending['step']} not written: the "
                                                    f"loss spiked on its weights; it waits for a healthy step")
                    self.pending = self._snapshot()
                if stop is not None and not done:
                    self._stop_if_asked(stop, saved)
            self.finish_checkpoint()
        finally:
            if self.ema is not None:
                self.ema.wait()
            self.logger.close()
        return {"step": self.step, "tokens": self.tokens, "spikes": self.spikes, **last_val}
