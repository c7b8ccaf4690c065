"""The model a post-training run reads at every step besides its own (GRPO's KL reference, `grpo.init`; logit
distillation's teacher, `distill.teacher`), pinned in the run's checkpoints so that a resume reads the same one.

A run directory's latest checkpoint moves on when that run trains further, and a Hugging Face directory may be
rewritten in place: a resume that read either again would go on against another model than the uninterrupted run,
silently. So each checkpoint's state.json records, under the run's own name for it (`reference`, `teacher`):
    path         the directory as the config gave it
    checkpoint   a run directory's: the name of the checkpoint read (step_N); None for a Hugging Face directory
    fingerprint  what the model read was, cheaply: a Hugging Face directory's hf_fingerprint, a run checkpoint's
                 manifest digest (checkpoint_fingerprint)
and a resume reads that checkpoint (refused if it is gone) and refuses one whose fingerprint changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import ConfigError

# read whole: small, and what the model is (its shape, the weight map, the ids); the weights only by name, size and
# modification time (a rewrite in place changes them; reading terabytes to check would not do)
READ_WHOLE = ("config.json", "model.safetensors.index.json", "tokenizer.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def hf_fingerprint(path: str | Path) -> str:
    """A Hugging Face directory's fingerprint: sha256 over READ_WHOLE's contents and every weight file's name, size
    and modification time (ns)."""
    path, h = Path(path), hashlib.sha256()
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        if f.name in READ_WHOLE:
            h.update(f"{f.name}\0".encode() + f.read_bytes() + b"\0")
        elif f.suffix in WEIGHT_SUFFIXES:
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def checkpoint_fingerprint(checkpoint: Path) -> str | None:
    """A run checkpoint's fingerprint: the sha256 of its manifest (which holds every file's sha256), so a checkpoint
    of that step saved again (the run resumed from before it) reads as changed; None for one without a manifest."""
    try:
        return hashlib.sha256((checkpoint / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


def pin(path: str | Path, checkpoint: Path | None) -> dict:
    """What a checkpoint records of the model read from `path` (`checkpoint`: a run directory's, else None)."""
    return {"path": str(path), "checkpoint": checkpoint.name if checkpoint is not None else None,
            "fingerprint": checkpoint_fingerprint(checkpoint) if checkpoint is not None else hf_fingerprint(path)}


def read_pin(resumed_from: Path, name: str) -> dict | None:
    """The pin `name` in the state.json of the checkpoint a run resumed from (None: an older run's, without one)."""
    try:
        pinned = json.loads((resumed_from / "state.json").read_text()).get(name)
    except (OSError, ValueError, AttributeError):
        return None
    return pinned if isinstance(pinned, dict) else None


def pinned_step(pinned: dict | None, key: str, path: str | Path, checkpoint: Path | None) -> int | None:
    """On resume: the step of the run directory's checkpoint to read in place of `checkpoint` (the one just read
    from `path`, the config's `key`; call again once it is read, to check it), or None when what was read is the
    pinned model (or nothing is pinned). A changed directory (`key` pointed elsewhere, a Hugging Face directory
    rewritten, the pinned checkpoint saved again): ConfigError naming the key and the directory."""
    if pinned is None:
        return None
    was = pinned.get("path", pinned.get("init"))      # GRPO's first pins named it "init"
    if was is not None and Path(was).resolve() != Path(path).resolve():
        raise ConfigError(f"--resume cannot change {key}={str(was)!r} -> {str(path)!r}: the run's checkpoints were "
                          f"trained against the model there; start a new run to use another")
    if pinned.get("checkpoint") and checkpoint is not None and pinned["checkpoint"] != checkpoint.name:
        return int(pinned["checkpoint"][len("step_"):])
    if bool(pinned.get("checkpoint")) != (checkpoint is not None) or (pinned.get("fingerprint") and pinned[
            "fingerprint"] != (checkpoint_fingerprint(checkpoint) if checkpoint else hf_fingerprint(path))):
        what = f"its checkpoint {checkpoint.name} was saved again" if checkpoint is not None else \
            "its config, tokenizer or weight files differ"
        raise ConfigError(f"--resume: {key}={str(path)!r} changed since the run started ({what}), so the run would "
                          f"go on against another model than it started with; restore it, or start a new run")
    return None


def gone(key: str, path: str | Path, pinned: dict, role: str) -> ConfigError:
    """The error for a pinned checkpoint that no longer exists."""
    return ConfigError(f"invalid config: {key}={str(path)!r}: its checkpoint {pinned['checkpoint']}, the run's {role}, "
                       f"is gone; restore it or start a new run")
