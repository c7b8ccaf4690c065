"""Training checkpoints: everything `--resume` needs to continue bit-exactly, written atomically.

Layout: RUN_DIR/checkpoints/step_{N:08d}/ with
  model.safetensors   parameters and persistent buffers (the routing bias included), full precision
  optimizer.pt        AdamW state
  ema.safetensors     the CPU EMA, when enabled
  rng.pt              torch CPU (and CUDA) generator states
  state.json          step, tokens, data-loader position, loss statistics, spike count
  config.json         the RunConfig of the run
A checkpoint directory exists only once complete (dsv3.checkpoint.atomic_directory): a run killed while saving
leaves the previous checkpoint as the latest. It is always the single-process format (whole expert tensors; an
expert-parallel run gathers them first, dsv3.train.data_parallel), so a run resumes at any world size and layout.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import atomic_directory

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict, state: dict, config: dict, ema_state: dict | None = None,
                    keep: int = 0) -> Path:
    """model / optimizer: the modules, or their (full, single-process) state dicts, as an expert-parallel run
    gathers them (dsv3.train.data_parallel.Layout.full_state)."""
    target = checkpoint_path(run_dir, step)
    model_state = model if isinstance(model, dict) else model.state_dict()
    optim_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    with atomic_directory(target) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        if ema_state is not None:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True, local: Callable[[dict, dict | None], tuple[dict, dict | None]] | None
                    = None) -> dict:
    """Restore model (strictly: every tensor present and of the right shape), optimizer and (for a resumed run)
    the RNG; return state.json with `ema` (a state dict or None, as saved) added. `local` maps the saved (model
    tensors, optimizer state dict) to what this process holds (an expert-parallel rank: its slices)."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no state.json)")
    tensors = load_file(str(path / "model.safetensors"))
    optim_state = (torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
                   if optimizer is not None else None)
    if local is not None:
        tensors, optim_state = local(tensors, optim_state)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, mis-shaped {wrong[:5]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])
    if optimizer is not None:
        optimizer.load_state_dict(optim_state)
    if restore_rng:
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / "state.json").read_text())
    ema = path / "ema.safetensors"
    state["ema"] = load_file(str(ema)) if ema.exists() else None
    return state
