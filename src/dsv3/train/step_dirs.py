"""A run's checkpoints/ directory: the step directories' names, finding them, and `checkpoint.keep` pruning.

A step directory (step_{N:08d}) is a complete checkpoint (dsv3.train.checkpoint writes it atomically); pruning
deletes the older ones, only the files a save wrote, the manifest last, and never the last healthy one while
every kept one was saved during a loss spike.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..checkpoint.atomic import remove_leftovers


_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
# what a save writes besides the manifest (the sharded format: these but the first two and ema, plus its shards)
SAVED_FILES = ("model.safetensors", "optimizer.pt", "ema.safetensors", "rng.pt", "state.json", "config.json")


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


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[1])


def remove_unfinished_saves(run_dir: str | Path) -> list[str]:
    """The `.step_N.tmp-*` directories of saves killed midway (nothing reads them), removed at the next start."""
    root = Path(run_dir) / "checkpoints"
    return remove_leftovers(root) if root.is_dir() else []


def prune_checkpoints(run_dir: str | Path, newest: Path, keep: int) -> list[Path]:
    """checkpoint.keep > 0: delete the checkpoints older than the `keep` most recent up to `newest`, the one just
    written. Any newer than it (a damaged one a resume went back past) is neither counted nor deleted: counting it
    would delete the checkpoint just written and leave only the damaged one. A step directory holding only files
    the user put there (an earlier prune kept them) is not a checkpoint and not counted. While every kept one is
    suspect (saved during a loss spike: a signal's or the final save), the newest healthy one stays besides them:
    a spike's state must never be all that is left to resume from. Returns those deleted."""
    if keep <= 0:
        return []
    ours = [d for d in checkpoint_dirs(run_dir) if d.name <= newest.name and _holds_a_save(d)]
    gone = ours[:-keep]
    if all(is_suspect(d) for d in ours[-keep:]):
        gone = [d for d in gone if d != last_healthy(gone)]
    for old in gone:
        delete_checkpoint(old)
    return gone


def is_suspect(path: Path) -> bool:
    """Whether a checkpoint was saved during a loss spike (state.json "suspect", written by the trainer's signal or
    final save then); an unreadable state.json counts as healthy here (verify_checkpoint names it)."""
    try:
        return json.loads((path / "state.json").read_text()).get("suspect") is True
    except (OSError, ValueError, AttributeError):
        return False


def last_healthy(dirs: list[Path]) -> Path | None:
    """The newest of `dirs` (oldest first) not saved during a loss spike."""
    return next((d for d in reversed(dirs) if not is_suspect(d)), None)


def _holds_a_save(path: Path) -> bool:
    """Whether a step directory still holds a save's files (not only what a user put there, once pruned)."""
    return any(f.name in (MANIFEST, ".metadata", *SAVED_FILES) for f in path.iterdir())


def delete_checkpoint(path: Path) -> None:
    """Delete the files a save wrote into `path` (those its manifest lists, or the names a save writes), the
    manifest last, then the directory if nothing else is left. A prune killed midway so leaves a manifest naming
    a missing file, which verify_checkpoint refuses, never a manifest-less directory that passes for a pre-manifest
    checkpoint lacking its EMA; a file the user put there stays, in its directory. A failure (permissions) leaves
    the rest in place: pruning is housekeeping, the run goes on."""
    try:
        listed = set(json.loads((path / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    try:
        for f in sorted(path.iterdir()):
            if f.name != MANIFEST and f.is_file() and (f.name in listed or f.name in SAVED_FILES or
                                                       f.name == ".metadata" or f.suffix == ".distcp"):
                f.unlink()
        (path / MANIFEST).unlink(missing_ok=True)
        if not any(path.iterdir()):
            path.rmdir()
    except OSError:
        pass
