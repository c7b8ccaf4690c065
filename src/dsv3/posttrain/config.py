"""Post-training run files: a `[sft]` or `[grpo]` table beside the run sections of dsv3.train.config (train, optim,
log, checkpoint, ...), validated by the same rules (`setting` / `check_fields`: a wrong value is one line naming
`section.key`) when the file is read, before anything is written.

The model is the base's (`sft.init` / `grpo.init`: a run directory or a Hugging Face directory), so a `[model]`
table is refused. Unset optimizer keys take the V3 SFT shape (spec 7: cosine decay from 5e-6 to 1e-6, no constant
phase) instead of the pre-training one; a file's own [optim] keys win.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..train.config import (FRACTION, SEED, SECTIONS, Flag, Int, Invalid, OneOf, Real, RunConfig, Text,
                            apply_overrides, check_fields, read_config_file, setting)
from ..train.run_dir import POSTTRAIN_CONFIG

# spec 7 (SFT): lr 5e-6 cosine-decayed to 1e-6 over the run; as fractions of the run so any length has the shape
SFT_OPTIM = dict(lr=5e-6, warmup=0.0, constant_until=0.0, decay_until=1.0, min_lr_ratio=0.2, final_at=1.0,
                 final_lr_ratio=0.2, weight_decay=0.0)
# RL: a constant small learning rate, no warm-up (the GRPO paper: 1e-6 constant)
GRPO_OPTIM = dict(lr=1e-6, warmup=0.0, constant_until=1.0, decay_until=1.0, final_at=1.0, weight_decay=0.0)


@dataclass(frozen=True)
class Files:
    """A list of record files, possibly empty (`required`: at least one)."""
    required: bool

    @property
    def allowed(self) -> str:
        return f"a list of {'one or more' if self.required else 'zero or more'} .jsonl / .parquet paths"

    def clean(self, v: Any) -> list:
        if not isinstance(v, list) or (self.required and not v):
            raise Invalid
        return [Text("a path").clean(x) for x in v]


POSTTRAIN_DEFAULTS = {"balance": dict(seq_aux_alpha=0.0), "log": dict(val_interval=0)}


@dataclass
class SFTConfig:
    init: str = setting("", Text("a training run directory or a Hugging Face model directory"))
    ema: bool = setting(False, Flag())                       # start from the run's EMA weights
    train_files: list = setting([], Files(required=True))    # {'messages': [...]} rows
    eval_files: list = setting([], Files(required=False))
    # without eval_files: this share of the training conversations is held out for the eval loss
    eval_fraction: float = setting(0.05, Real(0, 0.5))
    # > 0: train.steps = ceil(epochs * conversations / train.batch_size) (V3's SFT: 2 epochs)
    epochs: float = setting(0.0, Real(0))
    strict: bool = setting(False, Flag())                    # the first bad row is an error, not a dropped row
    seed: int = setting(0, SEED)                             # shuffling and the eval split


@dataclass
class GRPOConfig:
    init: str = setting("", Text("a training run directory or a Hugging Face model directory"))
    ema: bool = setting(False, Flag())
    task: str = setting("arithmetic", OneOf(("arithmetic", "countdown", "code")))    # dsv3.posttrain.tasks
    # code: the problems ({prompt, tests} or HumanEval rows), rewarded by running them in dsv3.verify.sandbox
    task_file: str = setting("", Text("a .jsonl / .parquet file of code problems", nonempty=False))
    code_timeout_s: float = setting(5.0, Real(0, 60, lo_open=True))     # wall-clock limit of one program's run
    code_memory_mb: int = setting(512, Int(64, 16384))                 # its RLIMIT_AS
    code_workers: int = setting(2, Int(1, 64))                         # programs run at once
    digits: int = setting(2, Int(1, 9))                      # arithmetic operands' digits
    ops: str = setting("+-*", OneOf(("+-*",), r"[+*-]{1,3}", "a subset of '+-*'"))    # arithmetic operators
    train_prompts: int = setting(2000, Int(1))               # drawn from the train split of the task
    prompts_per_step: int = setting(8, Int(1))
    group_size: int = setting(8, Int(2))                     # G responses per prompt
    updates_per_batch: int = setting(1, Int(1))              # mu: policy updates on one batch of rollouts
    max_new_tokens: int = setting(64, Int(1))
    temperature: float = setting(1.0, Real(0, lo_open=True))
    top_p: float = setting(1.0, Real(0, 1, lo_open=True))
    # advantages and loss (dsv3.posttrain.grpo_loss)
    scale_std: bool = setting(True, Flag())                  # false: Dr. GRPO
    aggregation: str = setting("token", OneOf(("token", "sequence")))
    eps_low: float = setting(0.2, Real(0, 1))
    eps_high: float = setting(0.28, Real(0))                 # > eps_low: DAPO's clip-higher
    beta: float = setting(0.0, Real(0))                      # KL weight; 0 loads no reference model
    kl_estimator: str = setting("k3", OneOf(("k1", "k3")))
    dynamic_sampling: bool = setting(True, Flag())           # drop groups whose rewards are all equal
    overlong_filter: bool = setting(True, Flag())            # truncated responses carry no loss
    # reward = correct_weight * correct + format_weight * format + length_weight * DAPO length penalty
    #          + language_weight * language consistency
    correct_weight: float = setting(1.0, Real(0))
    format_weight: float = setting(0.1, Real(0))
    length_weight: float = setting(0.0, Real(0))
    length_cache: int = setting(16, Int(1))                  # the penalty ramps over the last length_cache tokens
    language_weight: float = setting(0.0, Real(0))
    seed: int = setting(0, SEED)


@dataclass
class DistillConfig:
    teacher: str = setting("", Text("the teacher: a training run directory or a Hugging Face model directory"))
    init: str = setting("", Text("the student: a training run directory or a Hugging Face model directory"))
    ema: bool = setting(False, Flag())                       # the student's run's EMA weights
    # sequence: SFT on the teacher's verified samples; logit: also forward KL on the teacher's top-k per token
    mode: str = setting("sequence", OneOf(("sequence", "logit")))
    # conversations to train on; empty: generated by the teacher (rejection sampling against the task verifier)
    train_files: list = setting([], Files(required=False))
    task: str = setting("arithmetic", OneOf(("arithmetic", "countdown")))
    digits: int = setting(2, Int(1, 9))
    ops: str = setting("+-*", OneOf(("+-*",), r"[+*-]{1,3}", "a subset of '+-*'"))
    prompts: int = setting(1000, Int(1))                    # train-split problems the teacher answers
    samples: int = setting(4, Int(1))                       # tries per problem; the first verified one is kept
    temperature: float = setting(1.0, Real(0))
    max_new_tokens: int = setting(64, Int(1))
    top_k: int = setting(16, Int(1))                        # logit mode: teacher logits kept per position
    kd_weight: float = setting(0.5, FRACTION)               # loss = (1 - w) CE + w KL_topk
    kd_temperature: float = setting(1.0, Real(0, lo_open=True))
    eval_fraction: float = setting(0.05, Real(0, 0.5))
    epochs: float = setting(0.0, Real(0))
    seed: int = setting(0, SEED)


KINDS = {"sft": (SFTConfig, SFT_OPTIM), "grpo": (GRPOConfig, GRPO_OPTIM), "distill": (DistillConfig, SFT_OPTIM)}


def section_from_table(kind: str, table: Any):
    cls = KINDS[kind][0]
    if not isinstance(table, dict):
        raise ConfigError(f"invalid {kind} config: [{kind}] must be a table")
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(table) - known)
    if bad:
        raise ConfigError(f"invalid {kind} config: unknown keys {bad} in [{kind}]; known: {sorted(known)}")
    section = cls(**table)
    check_fields(kind, section)
    if not section.init:
        raise ConfigError(f"invalid {kind} config: {kind}.init is required (a run directory or a HF directory)")
    if kind == "grpo" and (section.task == "code") != bool(section.task_file):
        raise ConfigError("invalid grpo config: grpo.task_file " + ("is required with grpo.task='code' (the code "
                          "problems)" if section.task == "code" else f"applies to grpo.task='code' only (the task "
                          f"is {section.task!r})"))
    return section


def check_paths(kind: str, section) -> None:
    """The models and files a table names exist and are what they must be (one line naming `kind.key`), so a typo
    is found when the file is read, not after a base model was loaded or a run directory made."""
    for key in ("init", "teacher"):
        path = getattr(section, key, "")
        if path and not Path(path).is_dir():
            raise ConfigError(f"invalid {kind} config: {kind}.{key}: {path} is not a directory (a training run or a "
                              f"Hugging Face model directory)")
    for key in ("train_files", "eval_files", "task_file"):
        value = getattr(section, key, None)
        for f in [value] if isinstance(value, str) else value or []:
            if not f:
                continue
            if Path(f).suffix not in (".jsonl", ".parquet"):
                raise ConfigError(f"invalid {kind} config: {kind}.{key}: {f} is not a .jsonl or .parquet file")
            if not Path(f).is_file():
                raise ConfigError(f"invalid {kind} config: {kind}.{key}: {f} does not exist")


def read_posttrain_dict(kind: str, path: str | Path | None, overrides: list[str], resume: bool | str = False,
                        run_dir: str | None = None) -> dict:
    """The TOML file (or a saved posttrain.json) with `section.key=value` overrides applied; `run_dir` (--run-dir)
    is one more override, and with `resume` and no file the run directory's saved posttrain.json is the file."""
    overrides = list(overrides) + ([f"run_dir={json.dumps(run_dir)}"] if run_dir else [])
    if path is None and resume and run_dir:
        path = Path(run_dir) / POSTTRAIN_CONFIG
    d = apply_overrides(read_config_file(path, kind), overrides)
    if kind not in d:
        raise ConfigError(f"invalid {kind} config: no [{kind}] table (it names the starting model: {kind}.init)")
    for name in SECTIONS:     # RunConfig's rule, said before the commands read d[name] as a table (train = 5)
        if not isinstance(d.get(name, {}), dict):
            raise ConfigError(f"invalid {kind} config: [{name}] must be a table")
    return d


def split_config(kind: str, d: dict, model_config: dict, **train_overrides) -> tuple[Any, RunConfig]:
    """(the [kind] section, the RunConfig of the rest) with the base's model and the post-training defaults under
    the file's own keys. `train_overrides` (section -> keys) are set last (e.g. steps computed from epochs)."""
    d = json.loads(json.dumps(d))
    section = section_from_table(kind, d.pop(kind))
    others = sorted(set(KINDS) - {kind} & set(d))
    if others:
        raise ConfigError(f"invalid {kind} config: a [{kind}] run file has no [{others[0]}] table")
    if "model" in d and d["model"] != model_config:
        raise ConfigError(f"invalid {kind} config: [model] comes from {kind}.init ({section.init}); remove it")
    d["model"] = model_config
    defaults_of = {**POSTTRAIN_DEFAULTS, "optim": KINDS[kind][1]}
    if kind == "grpo":   # no bias update from rollout rows (right-padded: the pads' routing would count as load)
        defaults_of["balance"] = {**defaults_of["balance"], "bias_update_speed": 0.0}
    for name, defaults in defaults_of.items():
        d[name] = {**defaults, **d.get(name, {})}
    for name, keys in train_overrides.items():
        d[name] = {**d.get(name, {}), **keys}
    return section, RunConfig.from_dict(d)


def check_length(kind: str, d: dict, epochs: float) -> None:
    """`{kind}.epochs` > 0 sets train.steps: refuse a run dict that sets train.steps too (the file or an override),
    which would otherwise be replaced without a word."""
    steps = d.get("train", {}).get("steps")
    if epochs and steps is not None:
        raise ConfigError(f"invalid {kind} config: train.steps={steps} and {kind}.epochs={epochs:g} both set the "
                          f"run's length; pass {kind}.epochs=0 to count train.steps, or drop train.steps")


def section_dict(section) -> dict:
    return dataclasses.asdict(section)


__all__ = ["SFTConfig", "GRPOConfig", "DistillConfig", "read_posttrain_dict", "section_from_table", "split_config",
           "section_dict", "check_paths", "check_length"]
