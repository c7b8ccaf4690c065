"""The Trainer's checkpoint side (a base class of dsv3.train.trainer.Trainer): what a run checkpoint holds, how the
Trainer writes it and how a resumed run reads it back. The file formats are dsv3.train.checkpoint's; when a save
happens (one step late, once the next step vetted the weights) is the training loop's.

A checkpoint holds the weights (routing biases included), the AdamW moments, the EMA, the RNG states and the state of
the run (step, tokens, spikes, the loss's running mean, the data position): resume is exact.
    one process   the single-file format (model.safetensors, optimizer.pt, ...), unless checkpoint.format="sharded"
    torchrun      the sharded format: every rank writes the rows it holds (DCP entries: dsv3.parallel.dcp), nothing
                  gathered; with checkpoint.async_save written in the background over a gloo group of its own and
                  committed by finish_checkpoint once every rank's writes finished
On resume a sharded checkpoint (any layout wrote it) is read by every rank for its own rows; a single-file one
under torchrun likewise (load_whole_into); in one process whole. The final save and a signal's (_save_now,
_stop_if_asked) are of the state as it is, marked suspect during a spike; what stands after an abort: abort_note.

Reads from the Trainer: cfg, run_dir, layout, model, local, optimizer, zero, ema, loader, logger and the counters
step, tokens, spikes, loss_ema, spiking, command.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint import CheckpointException

from ..parallel.dcp import init_state as init_optimizer_state, owned_state
from .checkpoint import (
    CheckpointWriteError,
    PendingSave,
    checkpoint_dirs,
    checkpoint_group,
    checkpoint_path,
    is_sharded,
    last_healthy,
    latest_checkpoint,
    load_checkpoint,
    load_sharded,
    load_whole_into,
    rng_state,
    save_checkpoint,
    save_sharded,
)
from .data_parallel import is_collective_timeout
from .run_dir import resume_advice, set_aside_newer, write_failure
from .signals import StopSignals, TrainingInterrupted


class Checkpointing:
    """save / finish_checkpoint / the resume of a Trainer (module docstring)."""

    def _init_checkpointing(self) -> None:
        """How the run's checkpoints are written, none pending (before any resume reads one)."""
        cfg = self.cfg
        self.spiking = False           # the last step's loss was a spike: checkpoints wait
        self.pending: dict | None = None   # a due checkpoint's state (_snapshot), waiting for the next step to vet it
        # under torchrun every rank writes its own rows (the sharded format); one process writes single files
        self.sharded_checkpoints = cfg.checkpoint.format == "sharded" or self.layout.world > 1
        # checkpoint.async_save: a sharded save's shards are written in the background, over a gloo group of their
        # own; `in_flight` is that save until finish_checkpoint commits it
        self.async_save = self.sharded_checkpoints and cfg.checkpoint.async_save
        self.checkpoint_group = checkpoint_group() if self.async_save else None
        self.in_flight: PendingSave | None = None
        self.went_back_to: Path | None = None   # a resume's checkpoint, until run() sets the newer ones aside
        # the models a post-training run is built from besides its own checkpoints, by name (SFT's base, GRPO's
        # reference, a teacher): in every checkpoint's state.json, so that a resume reads those (posttrain.pinned)
        self.pins: dict[str, dict] = {}

    def _resume_from(self, ckpt: Path) -> None:
        """Weights, optimizer state, EMA, data position and counters from `ckpt` (verified by rank 0 in
        choose_checkpoint)."""
        self.went_back_to = ckpt
        ema_read = []                   # whether the sharded readers found an EMA to load in place

        def entries(with_ema: bool = True) -> dict[str, torch.Tensor]:
            ema_read.append(with_ema)
            return self._sharded_entries(with_ema)
        if is_sharded(ckpt):            # any layout wrote it: every rank reads its own rows
            state = load_sharded(ckpt, entries)
        elif self.layout.world > 1:     # a single process wrote it: every rank keeps its rows of it
            state = load_whole_into(ckpt, entries)
        else:
            state = load_checkpoint(ckpt, self.model, self.optimizer, verify=False)
        self.step, self.tokens, self.spikes = state["step"], state["tokens"], state["spikes"]
        self.loss_ema = state["loss_ema"]
        self.loader.load_state_dict(state["loader"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None and not any(ema_read):
            # a checkpoint without an EMA (train.ema_decay was 0; a resume may change train.*): the average starts
            # at the resumed weights, not at the initialisation the EMA was built from
            self.ema.reset()

    def _set_aside_newer(self) -> None:
        """Before a resumed run trains: the checkpoints newer than the one it resumed from are another history of
        the steps it is about to save, set aside into checkpoints/rewound/ (dsv3.train.run_dir.set_aside_newer),
        never overwritten or pruned. Here, not at the resume: a Trainer built and never run moves nothing."""
        if self.went_back_to is not None:
            note, self.went_back_to = set_aside_newer(self.run_dir, self.went_back_to, self.layout), None
            if note:
                self.logger.log_event(self.step, note)

    def _sharded_entries(self, with_ema: bool = True) -> dict[str, torch.Tensor]:
        """This rank's model, optimizer state and EMA as sharded-checkpoint entries (views of the live tensors)."""
        init_optimizer_state(self.optimizer)
        ema = self.ema.entries() if self.ema is not None and with_ema else {}
        return owned_state(self.local.roots, self.optimizer,
                           optimized=self.zero.owned() if self.zero is not None else None) | ema

    def _snapshot(self) -> dict:
        """Everything a checkpoint holds besides the weights, optimizer state and EMA, as of the end of this step
        (the weights and optimizer state stay as they are until the next step's update)."""
        return {"step": self.step, "rng": rng_state(), "state": {
            "tokens": self.tokens, "spikes": self.spikes, "loss_ema": self.loss_ema,
            "loader": self.loader.state_dict(), **self.pins}}

    def save(self, snapshot: dict | None = None, wait: bool = False, suspect: bool = False) -> Path:
        """Write the checkpoint of the step that `snapshot` was taken at (default: now), before the weights have
        changed since: under torchrun the sharded format, every rank writing the rows it holds (every rank must
        call this); in one process the single-file format. With checkpoint.async_save a sharded save is committed
        later (finish_checkpoint) unless `wait`: the path returned is a checkpoint only then. A write that fails (a
        full disk, an I/O error, lost permissions) raises CheckpointWriteError, one line; the save left nothing.
        suspect: the state of a loss spike (a signal's or the final save while the run spikes), marked so in
        state.json: keep pruning then leaves the last healthy checkpoint besides it (prune_checkpoints)."""
        snap = snapshot or self._snapshot()
        if suspect:
            snap["state"]["suspect"] = True
        with self._naming_write_errors(checkpoint_path(self.run_dir, snap["step"])):
            return self._save(snap, wait)

    @contextmanager
    def _naming_write_errors(self, target: Path):
        """A failed write as one line naming the checkpoint, the cause and what to do (write_failure). Torch and
        safetensors report a full disk in their own words (RuntimeError "unexpected pos", SafetensorError) and DCP
        as a CheckpointException, a BaseException that would escape every handler; a collective timeout stays
        itself (dsv3.cli names parallel.timeout_minutes for it)."""
        try:
            yield
        except (OSError, RuntimeError, SafetensorError, CheckpointException) as e:
            if is_collective_timeout(e):
                raise
            raise CheckpointWriteError(write_failure(target, e, self.layout.world, self.command)) from e

    def _save(self, snap: dict, wait: bool) -> Path:
        if self.sharded_checkpoints:         # every rank writes its own rows; nothing is gathered
            self.finish_checkpoint()
            pending = save_sharded(self.run_dir, snap["step"], self._sharded_entries(), snap["state"],
                                   self.cfg.to_dict(), self.cfg.checkpoint.keep, rng=snap["rng"],
                                   background=self.async_save, group=self.checkpoint_group)
            if not self.async_save:
                self.logger.log_event(snap["step"], f"checkpoint {pending.name} (sharded)")
                return pending
            self.in_flight = pending
            if wait:
                self.finish_checkpoint()
            return pending.target
        path = save_checkpoint(self.run_dir, snap["step"], self.model, self.optimizer, snap["state"],
                               self.cfg.to_dict(), self.ema.state_dict() if self.ema is not None else None,
                               self.cfg.checkpoint.keep, rng=snap["rng"])
        self.logger.log_event(snap["step"], f"checkpoint {path.name}")
        return path

    def suspect_note(self, path: Path) -> str:
        """For a save made during a loss spike: which healthy checkpoint stands besides it."""
        healthy = last_healthy([d for d in checkpoint_dirs(self.run_dir) if d.name < path.name])
        return (f"{path.name} was saved during a loss spike; the last healthy checkpoint "
                f"{healthy.name if healthy else '(none)'} is kept besides it (checkpoint.keep="
                f"{self.cfg.checkpoint.keep})")

    def finish_checkpoint(self) -> None:
        """Commit the sharded save in flight, if any, once every rank's writes finished (a collective)."""
        if self.in_flight is not None:
            pending, self.in_flight = self.in_flight, None
            with self._naming_write_errors(pending.target):
                path = pending.commit()
            self.logger.log_event(pending.state["step"], f"checkpoint {path.name} (sharded, in the background)")

    def _stop_if_asked(self, stop: StopSignals, saved: Path | None) -> None:
        """After a step: if any rank got SIGINT / SIGTERM, every rank saves (unless this step just did) and stops."""
        signum = self.layout.agree(stop.received)
        if not signum:
            return
        path, self.pending = saved or self._save_now(), None
        name = signal.Signals(signum).name
        self.logger.log_event(self.step, f"stopped by {name}")
        spike = f" ({self.suspect_note(path)})" if self.spiking else ""
        raise TrainingInterrupted(signum, f"stopped by {name} after step {self.step}; saved {path}{spike}. "
                                          f"{resume_advice(self.run_dir, path, self.layout.world, self.command)}")

    def _save_now(self) -> Path:
        """The final or a signal's save: of the state as it is, marked suspect while the run spikes (no later step
        vets it), so that keep pruning leaves the last healthy checkpoint beside it."""
        path = self.save(wait=True, suspect=self.spiking)
        if self.spiking:
            self.logger.log_event(self.step, self.suspect_note(path))
        return path

    def abort_note(self) -> str:
        """After a second signal's abort (no save): the checkpoint that stands, and how to resume from it."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return "no checkpoint was written yet: nothing to resume"
        return f"the last checkpoint is {ckpt}. {resume_advice(self.run_dir, ckpt, self.layout.world, self.command)}"
