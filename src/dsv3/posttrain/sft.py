"""`dsv3 sft`: supervised fine-tuning on chat conversations (spec 7) on the pre-training Trainer itself
(dsv3.train.trainer: checkpoints, exact resume, export, metrics, progress bar, signals), fed by `ChatBatches`
instead of the packed corpus and started from a base model's weights instead of a random initialisation.

Steps:
1. read the run file: the [sft] table and the run sections (dsv3.posttrain.config); the model is the base's;
2. load the base (a run directory or a HF directory: weights, tokenizer, chat template; dsv3.posttrain.base),
   pinned in the run's checkpoints: a resume reads the base checkpoint the run started from, not that run's latest
   (dsv3.posttrain.pinned), as the data and the model's shape were made with it;
3. encode the conversations exactly as the server does, loss only on assistant turns (dsv3.posttrain.chat_data);
   bad rows are counted, reported in the run's log and on stderr (sft.strict: the first is an error);
4. the Trainer with this batch source: each micro-batch is `train.micro_batch_size` conversations, one a row,
   right-padded to the longest (padding, not packing: packing without attention across conversations would need a
   document mask inside the model's attention, which dsv3.model does not take; right padding needs none, since a
   causal row never attends to the pads after it). The loss is the mean over the step's assistant tokens, all its
   micro-batches and ranks together (and the MTP heads' over theirs, same mask; losses.token_weights), so
   train.micro_batch_size changes memory, not the gradient; the eval loss is the same on held-out conversations.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from ..checkpoint.atomic import write_whole
from ..config import ConfigError
from ..train.config import RunConfig
from ..train.run_dir import POSTTRAIN_CONFIG, explicit_checkpoint
from ..train.step_dirs import checkpoint_dirs, last_healthy
from .base import load_base
from .chat_data import ChatExample, batch_examples, read_chat_rows
from .config import check_length, check_paths, read_posttrain_dict, section_dict, section_from_table, split_config
from .pinned import pin, resolve_pin

SAVED = POSTTRAIN_CONFIG          # the run file as read (with overrides), for --resume


class ChatBatches:
    """The Trainer's batch source for SFT: epochs of a seeded shuffle of the conversations, `next_batch(rows)` ->
    (window (B, T), targets (B, T-1) with -100 off the loss mask); the position (epoch, cursor) is the data state a
    checkpoint keeps, so a resumed run sees exactly the batches the uninterrupted one would."""

    def __init__(self, tokenizer, train: list[ChatExample], val: list[ChatExample], rows: int, val_batches: int,
                 seed: int):
        if not train:
            raise ValueError("SFT has no training conversations (every row was dropped or the files are empty)")
        self.tokenizer, self.examples, self.seed = tokenizer, train, seed
        self.pad_id = tokenizer.eos_id      # never a target (targets are -100 there): any id would do
        self.epoch, self.cursor = 0, 0
        self.order = self._order(0)
        self.digest = examples_digest(train)
        self.val = [self._batch(val[i:i + rows]) for i in range(0, len(val), rows)][:val_batches]

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(f"sft:{self.seed}:{epoch}").shuffle(order)
        return order

    def _batch(self, examples: list[ChatExample]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, targets = batch_examples(examples, self.pad_id)
        return ids, targets[:, :-1]         # targets[:, t] is ids[:, t + 1]'s, i.e. aligned with window[:, 1:]

    def next_batch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        picked = []
        while len(picked) < rows:
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._order(self.epoch)
            picked.append(self.examples[self.order[self.cursor]])
            self.cursor += 1
        return self._batch(picked)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n": len(self.examples),
                "digest": self.digest}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != len(self.examples) or state.get("seed") != self.seed:
            raise ValueError(f"the checkpoint's SFT data position is for {state.get('n')} conversations with seed "
                             f"{state.get('seed')}, this run has {len(self.examples)} with seed {self.seed}: the "
                             f"data files or sft.seed changed")
        # as many conversations, other ones (an edited file, another tokenizer or chat template): the position would
        # be a place in other data. States from before the digest load as before
        if "digest" in state and state["digest"] != self.digest:
            raise ValueError(f"the checkpoint's SFT data position is for other conversations (digest "
                             f"{state['digest']}, now {self.digest}): sft.train_files' content, sft.eval_fraction, "
                             f"or the tokenizer or chat template changed since; restore them, or start a new run "
                             f"from the checkpoint's weights (sft.init=RUN_DIR)")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = self._order(self.epoch)


def examples_digest(examples: list[ChatExample]) -> str:
    """What the data position indexes: every conversation's ids and loss mask, in order (dsv3.data's StreamDigest)."""
    from ..data.shards import StreamDigest
    digest = StreamDigest()
    for e in examples:
        digest.add_ids(e.ids)
        digest.add(bytes(e.loss_mask), len(e.loss_mask), 1)
    return digest.hexdigest()


def sft_trainer(config: str | Path | None, overrides: list[str], resume: bool | str = False, overwrite: bool = False,
                progress: bool | None = None, run_dir: str | None = None):
    """(Trainer, data report) for a run file; with `resume` and no file, the run directory's saved posttrain.json."""
    d = read_posttrain_dict("sft", config, overrides, resume, run_dir)
    return build_sft(d, resume, overwrite, progress, resumed=resumed_checkpoint(d, resume))


def build_sft(d: dict, resume: bool | str = False, overwrite: bool = False, progress: bool | None = None,
              saved: dict | None = None, make_trainer=None, init_key: str = "sft.init", *, resumed: Path | None,
              resolved_base: tuple[dict | None, int | None] | None = None):
    """Steps 1-4 for a run dict with an [sft] table. `saved`: what posttrain.json keeps for --resume (default d);
    `make_trainer(cfg, **kwargs)`: a Trainer subclass (logit distillation: dsv3.posttrain.distill); `init_key`: the
    config key that named the base, for errors (distill's is distill.init); `resumed`: resumed_checkpoint's;
    `resolved_base`: the base's resolve_pin, if the caller resolved it already (distill: before its teacher loads)."""
    from ..train import Trainer
    make_trainer = make_trainer or Trainer
    # step 1-2: the [sft] table, then the base model it names
    section = section_from_table("sft", d["sft"])
    check_paths("sft", section)
    if saved is None:            # distill checks its own table's epochs (it builds this one)
        check_length("sft", d, section.epochs)
    if "model" in d:
        raise ConfigError("invalid sft config: [model] comes from sft.init; remove it")
    # on resume the base pinned in the run's checkpoint (the base run's checkpoint of the start even if that run
    # trained on; refused if gone, or if a Hugging Face base was rewritten: dsv3.posttrain.pinned); else (a fresh
    # start, or a run from before pins) what sft.init holds now
    pinned, step = resolved_base or resolve_pin(resumed, "base", init_key, section.init, "base model")
    base = load_base(section.init, section.ema, step=step)
    base_pin = pin(section.init, base.checkpoint, pinned)   # before the Trainer reads a Hugging Face base's weights
    _, cfg = split_config("sft", d, base.model_config.to_dict())
    # step 3: conversations (at most data.seq_len + 1 tokens), the eval split. A row of n tokens is a window of n:
    # the model reads its first n - 1 (the last is only a target; losses.lm_losses), as pre-training's seq_len + 1
    # windows give seq_len inputs, so seq_len + 1 tokens fit data.seq_len (<= max_position_embeddings: config)
    max_len = cfg.data.seq_len + 1
    train, report = read_chat_rows(section.train_files, base.tokenizer, max_len, _template(base), section.strict)
    if not train:                # said with why each row was dropped (ChatBatches' own error cannot say it)
        raise ValueError(f"sft.train_files: no conversation to train on: {report.summary()}")
    if section.eval_files:
        val, val_report = read_chat_rows(section.eval_files, base.tokenizer, max_len, _template(base),
                                         section.strict)
        if not val:              # named files that hold nothing: not a run without its eval loss, said nowhere
            raise ValueError(f"sft.eval_files: no conversation to evaluate on: {val_report.summary()}")
    else:
        n_val = held_out(cfg, section.eval_fraction, len(train), resume)
        order = list(range(len(train)))
        random.Random(f"sft-split:{section.seed}").shuffle(order)
        val, train = [train[i] for i in order[:n_val]], [train[i] for i in order[n_val:]]
        val_report = None
    if section.epochs:
        steps = max(1, math.ceil(section.epochs * len(train) / cfg.train.batch_size))
        _, cfg = split_config("sft", d, base.model_config.to_dict(), train={"steps": steps})
    source = ChatBatches(base.tokenizer, train, val, cfg.train.micro_batch_size, cfg.log.val_batches, section.seed)
    # step 4: the pre-training Trainer on this source, from the base's weights
    trainer = make_trainer(cfg, resume=resume, progress=progress, overwrite=overwrite, source=source,
                           init_state=base.weights)
    if type(trainer) is Trainer:
        trainer.command = "sft"
    trainer.pins["base"] = base_pin
    lines = [f"SFT from {section.init}: train data {report.summary()}"] + (
        [f"eval data {val_report.summary()}"] if val_report else [f"eval: {len(val)} held-out conversations"])
    if trainer.layout.is_main:
        write_whole(trainer.run_dir / SAVED, json.dumps(saved or d, indent=1))
        write_whole(trainer.run_dir / "sft_data.json", json.dumps(
            {"train": report.kept, "train_dropped": dict(report.bad), "first_bad": report.examples,
             "reasoning_not_trained": report.reasoning_dropped,
             "eval": len(val), "config": section_dict(section)}, indent=1))
        if not resume:
            for line in lines:
                trainer.logger.log_event(0, line)
    return trainer, lines


def resumed_checkpoint(d: dict, resume: bool | str) -> Path | None:
    """The checkpoint a resume of the run will read (the Trainer's choose_checkpoint settles it, verified, once the
    base has made the data; every checkpoint of a run pins the same models, so the newest healthy one, or the one
    --resume-from names, tells which): where SFT's, GRPO's and distill's pins are read before any model loads; None
    for a fresh start or a resume the Trainer will refuse."""
    if not resume:
        return None
    run_dir = Path(RunConfig.from_dict({k: d[k] for k in ("run_dir",) if k in d}).run_dir)
    ckpt = explicit_checkpoint(run_dir, resume) if isinstance(resume, str) else last_healthy(checkpoint_dirs(run_dir))
    return ckpt if isinstance(ckpt, Path) else None


def held_out(cfg, eval_fraction: float, n: int, resume: bool) -> int:
    """How many training conversations the eval loss takes (sft.eval_fraction of them): none when no eval runs
    (log.val_interval or log.val_batches 0; the post-training default interval is 0), as those would be neither
    trained on nor scored. A resume keeps its run's split (sft_data.json's count: runs split by the earlier rule
    resume as they were)."""
    if resume:
        try:
            recorded = json.loads((Path(cfg.run_dir) / "sft_data.json").read_text())["eval"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
        if isinstance(recorded, int) and 0 <= recorded < n:
            return recorded
    if not (cfg.log.val_interval and cfg.log.val_batches):
        return 0
    return int(n * eval_fraction)


def _template(base):
    from ..data.chat import ChatTemplate
    return ChatTemplate(base.template)

