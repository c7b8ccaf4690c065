"""The models a post-training run is built from besides its own checkpoints (SFT's base, `sft.init` / `distill.init`:
its tokenizer, chat template and model config; GRPO's KL reference, `grpo.init`; logit distillation's teacher,
`distill.teacher`), pinned in the run's checkpoints so that a resume reads the same ones.

A run directory's latest checkpoint moves on when that run trains further, and a Hugging Face directory may be
rewritten in place: a resume that read either again would go on against another model than the uninterrupted run,
silently. So each checkpoint's state.json records, under the run's own name for it (`base`, `reference`, `teacher`):
    path         the directory as the config gave it
    checkpoint   a run directory's: the name of the checkpoint read (step_N); None for a Hugging Face directory
    fingerprint  what the model read was, cheaply: a Hugging Face directory's hf_fingerprint, a run checkpoint's
                 manifest digest (checkpoint_fingerprint)
and a resume reads that checkpoint (refused if it is gone) and refuses one whose fingerprint changed, before it
reads any model (`resolve_pin`): SFT's base, GRPO's reference and a teacher are each loaded once, the pinned one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import ConfigError
from ..train.checkpoint import MANIFEST, checkpoint_step, file_sha256
from ..train.run_dir import set_aside_copies

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
        return file_sha256(checkpoint / MANIFEST)
    except OSError:
        return None


def pin(path: str | Path, checkpoint: Path | None, pinned: dict | None = None) -> dict:
    """What a checkpoint records of the model read from `path` (`checkpoint`: a run directory's, else None).
    `pinned`: the resumed checkpoint's pin of it, which resolve_pin checked against what `path` holds: its
    fingerprint is reused, not computed again (a pin without one, from before fingerprints, gets one)."""
    fingerprint = (pinned or {}).get("fingerprint") or (
        checkpoint_fingerprint(checkpoint) if checkpoint is not None else hf_fingerprint(path))
    return {"path": str(path), "checkpoint": checkpoint.name if checkpoint is not None else None,
            "fingerprint": fingerprint}


def read_pin(resumed: Path, name: str) -> dict | None:
    """The pin `name` in the state.json of the checkpoint a run resumed from (None: an older run's, without one)."""
    try:
        pinned = json.loads((resumed / "state.json").read_text()).get(name)
    except (OSError, ValueError, AttributeError):
        return None
    return pinned if isinstance(pinned, dict) else None


def resolve_pin(resumed: Path | None, name: str, key: str, path: str | Path,
                role: str) -> tuple[dict | None, int | None]:
    """Before any model is read: the pin `name` of the checkpoint a resume will read (`resumed`; None: a fresh
    start), checked (pinned_checkpoint), and the step of the run directory's checkpoint to read (None: read `path`
    as a fresh run would: nothing pinned, or a Hugging Face directory). pin(path, checkpoint read, the pin) is then
    what the run's checkpoints record."""
    pinned = read_pin(resumed, name) if resumed is not None else None
    checkpoint = pinned_checkpoint(pinned, key, path, role)
    return pinned, checkpoint_step(checkpoint) if checkpoint is not None else None


def pinned_checkpoint(pinned: dict | None, key: str, path: str | Path, role: str) -> Path | None:
    """On resume, before anything is read (`pinned`: the resumed checkpoint's pin of the config's `key`, `path`):
    the run directory's checkpoint to read, the pinned one (gone: `gone`), or None to read `path` as a fresh run
    would (nothing pinned, or a Hugging Face directory). A changed directory (`key` pointed elsewhere, a Hugging
    Face directory rewritten, the pinned checkpoint saved again): ConfigError naming the key and the directory."""
    if pinned is None:
        return None
    _same_path(pinned, key, path)
    checkpoint = Path(path) / "checkpoints" / pinned["checkpoint"] if pinned.get("checkpoint") else None
    if checkpoint is not None and not checkpoint.is_dir():
        raise gone(key, path, pinned, role)
    if pinned.get("fingerprint") and pinned["fingerprint"] != (
            checkpoint_fingerprint(checkpoint) if checkpoint is not None else hf_fingerprint(path)):
        what = f"its checkpoint {checkpoint.name} was saved again" if checkpoint is not None else \
            "its config, tokenizer or weight files differ"
        aside = _set_aside(path, pinned) if checkpoint is not None else None
        fix = f"move {checkpoint} aside and {aside} back to {checkpoint} to resume" if aside else "restore it"
        raise ConfigError(f"--resume: {key}={str(path)!r} changed since the run started ({what}), so the run would "
                          f"go on against another model than it started with; {fix}, or start a new run")
    return checkpoint


def _same_path(pinned: dict, key: str, path: str | Path) -> None:
    was = pinned.get("path", pinned.get("init"))      # GRPO's first pins named it "init"
    if was is not None and Path(was).resolve() != Path(path).resolve():
        raise ConfigError(f"--resume cannot change {key}={str(was)!r} -> {str(path)!r}: the run's checkpoints were "
                          f"trained against the model there; start a new run to use another")


def _set_aside(path: str | Path, pinned: dict) -> Path | None:
    """The pinned checkpoint where a resume of the run at `path` that went back past it set it aside
    (checkpoints/rewound/<name>-<time>: dsv3.train.run_dir.set_aside_newer): the newest of that name there with the
    pinned fingerprint (any of that name for a pin without one); None if there is none."""
    found = set_aside_copies(path, pinned["checkpoint"])
    if pinned.get("fingerprint"):
        found = [d for d in found if checkpoint_fingerprint(d) == pinned["fingerprint"]]
    return found[-1] if found else None


def gone(key: str, path: str | Path, pinned: dict, role: str) -> ConfigError:
    """The error for a pinned checkpoint that no longer exists (where a resume of its run set it aside, if it did)."""
    name = pinned["checkpoint"]
    aside = _set_aside(path, pinned)
    fix = (f"it was set aside by a resume of that run that went back past it: move {aside} back to "
           f"{Path(path) / 'checkpoints' / name} to resume" if aside else "restore it or start a new run")
    return ConfigError(f"invalid config: {key}={str(path)!r}: its checkpoint {name}, the run's {role}, is gone; {fix}")
