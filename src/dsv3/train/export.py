"""`dsv3 export`: a training run's checkpoint as a Hugging Face directory (config.json, safetensors shards, index,
tokenizer files) that `dsv3.load_pretrained` and `transformers.AutoModelForCausalLM` both load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..checkpoint import atomic_directory, save_pretrained
from ..model import Transformer
from .checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint
from .config import RunConfig


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    run_dir = Path(run_dir)
    if step is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoints")
        return ckpt
    for d in checkpoint_dirs(run_dir):
        if int(d.name.split("_")[1]) == step:
            return d
    raise FileNotFoundError(f"{run_dir} has no checkpoint of step {step}; have "
                            f"{[d.name for d in checkpoint_dirs(run_dir)]}")


def load_run_model(run_dir: str | Path, step: int | None = None, ema: bool = False) -> tuple[Transformer, Path]:
    """The model of a run's checkpoint (its EMA weights with `ema`), fp32 on the CPU, in eval mode."""
    ckpt = find_checkpoint(run_dir, step)
    cfg = RunConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device="cpu")
    state = load_checkpoint(ckpt, model, restore_rng=False)
    if ema:
        if state["ema"] is None:
            raise ValueError(f"{ckpt} has no EMA weights (train.ema_decay was 0)")
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state["ema"][n])
    return model.eval(), ckpt


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, ema: bool = False,
               dtype: torch.dtype | None = None) -> Path:
    """Write the checkpoint (latest, or `step`) with the run's tokenizer into out_dir, atomically."""
    run_dir = Path(run_dir)
    model, _ = load_run_model(run_dir, step, ema)
    with atomic_directory(out_dir) as tmp:
        save_pretrained(model, tmp / "model", dtype=dtype)
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        tok = run_dir / "tokenizer"
        for f in sorted(tok.iterdir()) if tok.is_dir() else []:
            shutil.copy(f, tmp / f.name)
    return Path(out_dir)
