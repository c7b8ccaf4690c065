"""`dsv3 export`: a training run's checkpoint as a Hugging Face directory (config.json, safetensors shards, index,
tokenizer files) that `dsv3.load_pretrained` and `transformers.AutoModelForCausalLM` both load.

An export never deletes what it did not write. It goes to a new directory (built aside and renamed into place), an
empty one, or, with `overwrite`, over an earlier export; every export holds a marker, `.dsv3-export.json`, listing
the files it wrote, so a later one recognises it and replaces exactly those. Refused: the run directory itself, a
directory containing it, a place inside its checkpoints, any other non-empty directory, and an earlier export that
has gained files of someone else's. An existing directory is filled in place (file by file, the marker listing old
and new files while it happens, config.json removed first and written last so that a half-replaced directory never
loads), so a shell standing in it keeps its directory.

A sharded checkpoint (a torchrun run's, dsv3.train.checkpoint.save_sharded) is exported streamed: the model is only
described on the meta device and each tensor is read from the checkpoint when its shard is written (`_Streamed`),
so the process holds one tensor and one output shard at a time, never the whole model; the files are those a
single-process export of the same weights writes, byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from ..checkpoint import CheckpointError, atomic_directory, save_pretrained
from ..model import Transformer
from .checkpoint import (
    checkpoint_dirs,
    is_sharded,
    latest_checkpoint,
    load_checkpoint,
    load_sharded,
    newest_valid_checkpoint,
    sharded_keys,
    verify_checkpoint,
)
from .config import RunConfig

MARKER = ".dsv3-export.json"


def _ours(name: str) -> bool:
    """The marker, its temporary copy, the staging directory and what a killed export left of them."""
    return name.lstrip(".").startswith("dsv3-export")


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
    """The model of a run's checkpoint (its EMA weights with `ema`), fp32 on the CPU, in eval mode. A damaged
    latest checkpoint is an error naming the file and the newest one that verifies."""
    ckpt = find_checkpoint(run_dir, step)
    try:
        state, model = _load(ckpt)
    except CheckpointError as e:
        good, _ = newest_valid_checkpoint(run_dir) if step is None else (None, [])
        hint = f"; the newest valid checkpoint is {good.name} (step {int(good.name[5:])})" if good else ""
        raise CheckpointError(f"{e}{hint}") from None
    if ema:
        if state["ema"] is None:
            raise ValueError(f"{ckpt} has no EMA weights (train.ema_decay was 0)")
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state["ema"][n])
    return model.eval(), ckpt


def _meta_model(ckpt: Path) -> Transformer:
    try:        # read before the checkpoint is verified: a damaged one is named as verify_checkpoint names it
        cfg = RunConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    with torch.device("meta"):
        return Transformer(cfg.model)


def _load(ckpt: Path) -> tuple[dict, Transformer]:
    model = _meta_model(ckpt)
    model.to_empty(device="cpu")
    if not is_sharded(ckpt):
        return load_checkpoint(ckpt, model, restore_rng=False), model
    # the whole model in this process (its EMA, when saved, into a second copy of the parameters)
    verify_checkpoint(ckpt)
    has_ema = any(k.startswith("ema/") for k in sharded_keys(ckpt))
    ema = {n: torch.empty_like(p) for n, p in model.named_parameters()} if has_ema else None
    state = load_sharded(ckpt, lambda _: {**{f"model/{k}": v for k, v in model.state_dict().items()},
                                          **{f"ema/{k}": v for k, v in (ema or {}).items()}}, restore_rng=False)
    state["ema"] = ema
    return state, model


class _Streamed:
    """Our tensors of a sharded checkpoint read one at a time (the model's buffers and its parameters, or their
    EMA), in the dtype of the meta model; the last one is kept, so the rows of a stacked expert tensor are one
    read."""

    def __init__(self, ckpt: Path, model: Transformer, ema: bool):
        self.ckpt, self.ema = ckpt, ema
        self.meta = model.state_dict()
        self.params = {n for n, _ in model.named_parameters()}
        self.name, self.tensor = None, None
        self.peak_bytes = 0                 # the largest tensor held: what the stream costs besides one shard

    def __getitem__(self, name: str) -> torch.Tensor:
        if name != self.name:
            self.name, self.tensor = None, None
            m = self.meta[name]
            t = torch.empty(m.shape, dtype=m.dtype)
            key = f"{'ema' if self.ema and name in self.params else 'model'}/{name}"
            dcp.load({key: t}, checkpoint_id=str(self.ckpt), no_dist=True)
            self.name, self.tensor = name, t
            self.peak_bytes = max(self.peak_bytes, t.numel() * t.element_size())
        return self.tensor


def export_sharded(ckpt: Path, out: Path, ema: bool = False, dtype: torch.dtype | None = None,
                   max_shard_size: int | str = "5GB") -> None:
    """A sharded checkpoint as a HF directory at `out`, streamed (module docstring)."""
    verify_checkpoint(ckpt)
    if ema and not any(k.startswith("ema/") for k in sharded_keys(ckpt)):
        raise ValueError(f"{ckpt} has no EMA weights (train.ema_decay was 0)")
    model = _meta_model(ckpt)
    save_pretrained(model, out, max_shard_size=max_shard_size, dtype=dtype, tensors=_Streamed(ckpt, model, ema))


def check_destination(run_dir: Path, out: Path, overwrite: bool) -> list[str] | None:
    """Where an export may go: None for a new directory, else the files of the earlier export there (or [] for an
    empty directory) that the new one replaces. Raises FileExistsError for anywhere else."""
    src, dst = run_dir.resolve(), out.resolve()
    if dst == src or src.is_relative_to(dst):
        raise FileExistsError(f"{out} is or contains the run directory {run_dir}; export to another directory")
    if dst.is_relative_to(src / "checkpoints"):
        raise FileExistsError(f"{out} is inside the run's checkpoints; export to another directory")
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return []
    if MARKER not in entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(f"{out} is a non-empty directory ({shown}) and not a dsv3 export; export to a new or "
                              f"empty directory")
    try:
        marker = json.loads((out / MARKER).read_text())
        # plain names only: a hand-edited marker must not point the replacement outside out_dir
        files = [f for f in marker["files"] if isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..")]
    except (ValueError, KeyError, TypeError):
        raise FileExistsError(f"{out / MARKER} is unreadable, so what {out} holds is unknown; export to a new or "
                              f"empty directory") from None
    if not overwrite:
        raise FileExistsError(f"{out} holds an export (of {marker.get('checkpoint')}); pass --overwrite to "
                              f"replace it")
    foreign = [e for e in entries if e not in files and not _ours(e)]
    if foreign:
        raise FileExistsError(f"{out} holds files the earlier export did not write ({', '.join(foreign[:5])}); "
                              f"move them away first (an export only replaces its own files)")
    return files


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, ema: bool = False,
               dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint (latest, or `step`) with the run's tokenizer into out_dir (see the module docstring
    for where that may be)."""
    run_dir, out = Path(run_dir), Path(out_dir)
    old = check_destination(run_dir, out, overwrite)
    ckpt = find_checkpoint(run_dir, step)
    model = None if is_sharded(ckpt) else load_run_model(run_dir, step, ema)[0]
    marker = {"format": "dsv3 export", "run": str(run_dir.resolve()), "checkpoint": ckpt.name, "ema": ema}

    def write(tmp: Path) -> list[str]:
        if model is None:
            export_sharded(ckpt, tmp / "model", ema, dtype)
        else:
            save_pretrained(model, tmp / "model", dtype=dtype)
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        tok = run_dir / "tokenizer"
        for f in sorted(tok.iterdir()) if tok.is_dir() else []:
            shutil.copy(f, tmp / f.name)
        return sorted(p.name for p in tmp.iterdir())

    if old is None:
        with atomic_directory(out) as tmp:
            _write_marker(tmp, {**marker, "files": write(tmp)})
        return out
    for p in out.iterdir():                             # what a killed export left
        if _ours(p.name) and p.is_dir():
            shutil.rmtree(p)
    stage = out / ".dsv3-export.new"
    with atomic_directory(stage) as tmp:
        new = write(tmp)
    # while files move, the marker lists old and new, so a kill here leaves a directory --overwrite can replace
    _write_marker(out, {**marker, "files": sorted(set(old) | set(new))})
    # config.json is what makes the directory a model to every loader: it leaves first and comes back last, so a
    # kill between two files leaves no directory that loads the old export's weights with the new one's files
    (out / "config.json").unlink(missing_ok=True)
    for name in new:
        if name != "config.json":
            os.replace(stage / name, out / name)
    for name in set(old) - set(new):
        (out / name).unlink(missing_ok=True)
    os.replace(stage / "config.json", out / "config.json")
    _write_marker(out, {**marker, "files": new})
    stage.rmdir()
    return out


def _write_marker(directory: Path, marker: dict) -> None:
    tmp = directory / ".dsv3-export.json.tmp"
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, directory / MARKER)
