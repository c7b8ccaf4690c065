"""`train.init_from`: a run that starts from another model's weights, e.g. a long-context extension phase
(TR 4.3: 4K -> 32K -> 128K with YaRN) starting from the pre-training run, or phase 2 from phase 1.

The source is a training run directory (its newest valid checkpoint), one of its checkpoint directories, or a
Hugging Face directory (`dsv3 export`, a released model). Only the weights (and routing biases) are taken: the new
run has its own optimizer state, schedule, data position and step count.

What may differ from the source: the positions (`max_position_embeddings`, `rope_scaling`) and nothing else of the
shapes or the routing rules. The YaRN rule (spec 1.5): `original_max_position_embeddings` is the *pre-training*
length, so it must equal the source's own original length when the source is already YaRN-extended (phase 2 keeps
phase 1's), else the source's training length (a run's `data.seq_len`; a HF model's `max_position_embeddings`).
Every refusal names the key and happens before the run writes a file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..config import ConfigError, ModelConfig
from ..parallel.dcp import fill_entries, owned_state
from .checkpoint import load_sharded, verify_checkpoint
from .hf_shards import hf_source_error, load_hf_owned

# ModelConfig fields an extension phase may change (the rest must equal the source's)
POSITION_FIELDS = ("max_position_embeddings", "rope_scaling", "rope_key", "hf_extra", "hf_absent", "torch_dtype",
                   "init_std", "bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class Source:
    path: Path
    model: ModelConfig
    trained_len: int          # the sequence length the source was trained at (HF: its max_position_embeddings)
    checkpoint: Path | None   # a training checkpoint, or None for a HF directory


def find_source(path: str | Path) -> Source:
    """Where the weights come from and what the source's model was (reads configs only)."""
    from .checkpoint import is_suspect, newest_valid_checkpoint
    from .config import RunConfig
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"invalid run config: train.init_from={str(path)!r}: not a directory (a run, one of its "
                          f"checkpoints, or a Hugging Face model directory)")
    ckpt = None
    if (p / "checkpoints").is_dir():
        ckpt, skipped = newest_valid_checkpoint(p)
        if ckpt is None:
            raise ConfigError(f"invalid run config: train.init_from={str(path)!r}: the run has no valid checkpoint")
        # a run names its newest checkpoint: an older one (past a damaged or spiking newer one) is taken only when
        # named, not silently
        why = skipped[0] if skipped else (f"{ckpt.name} was saved during a loss spike" if is_suspect(ckpt) else "")
        if why:
            raise ConfigError(f"invalid run config: train.init_from={str(path)!r}: {why}; name the checkpoint to "
                              f"start from (e.g. train.init_from={str(ckpt)!r})")
    elif (p / "state.json").exists():
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            raise ConfigError(f"invalid run config: train.init_from={str(path)!r}: {e}") from None
        ckpt = p
    if ckpt is not None:
        run = RunConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
        return Source(p, run.model, run.data.seq_len, ckpt)
    if not (p / "config.json").exists():
        raise ConfigError(f"invalid run config: train.init_from={str(path)!r}: neither a run, a checkpoint nor a "
                          f"Hugging Face directory (no config.json)")
    model = ModelConfig.from_hf(p)
    return Source(p, model, model.max_position_embeddings, None)


def check_extension(model: ModelConfig, seq_len: int, source: Source) -> None:
    """The new run's model must be the source's up to its positions; YaRN's original length the pre-training one."""
    for f in dataclasses.fields(ModelConfig):
        if f.name in POSITION_FIELDS:
            continue
        if getattr(model, f.name) != getattr(source.model, f.name):
            raise ConfigError(f"invalid run config: model.{f.name}={getattr(model, f.name)!r} differs from "
                              f"train.init_from's {getattr(source.model, f.name)!r} (only max_position_embeddings "
                              f"and rope_scaling may change when starting from a model)")
    y, src = model.yarn(), source.model.yarn()
    if y is None:
        return          # plain RoPE: the no-YaRN control of an extension (or a fine-tune at the same length)
    want = src["original_max_position_embeddings"] if src is not None else source.trained_len
    if y["original_max_position_embeddings"] != want:
        why = ("the source is YaRN-extended from that length" if src is not None
               else "the source was trained at that length")
        raise ConfigError(f"invalid run config: model.rope_scaling.original_max_position_embeddings="
                          f"{y['original_max_position_embeddings']} must be {want}: {why} (spec 1.5)")


def source_tensors(source: Source) -> dict[str, torch.Tensor]:
    """The source's weights and buffers as whole tensors by parameter name (the trainer copies each rank's rows).
    The Trainer uses it for a dsv3 checkpoint only: a HF directory is read rank by rank (dsv3.train.hf_shards)."""
    if source.checkpoint is not None:
        from .checkpoint import read_tensors       # looked up at call time (the rank tests refuse it there)
        return read_tensors(source.checkpoint)["model"]
    from ..checkpoint import load_pretrained
    return load_pretrained(source.path, dtype=torch.float32).state_dict()


def load_starting_weights(roots, whole: dict[str, torch.Tensor] | Path, where: str) -> None:
    """This rank's rows of the starting weights (a fine-tune's base model, train.init_from's source) into the
    modules `roots` (the trainer's laid-out model): whole tensors, or a sharded checkpoint read rank by rank whatever
    layout wrote it (torch.distributed.checkpoint; a collective), its model entries only, neither the optimizer state
    nor the EMA."""
    entries = {k: v for k, v in owned_state(roots).items() if k.startswith("model/")}
    try:
        if isinstance(whole, Path):
            load_sharded(whole, lambda _: entries, restore_rng=False)
        else:
            fill_entries(entries, {f"model/{k}": v for k, v in whole.items()})    # this rank's rows only
    except (KeyError, ValueError) as e:        # (a CheckpointError is a ValueError)
        raise ConfigError(f"invalid run config: the starting weights ({where}) do not fit the model: {e} "
                          f"(a model without its MTP module? set model.num_nextn_predict_layers=0)") from None


def load_hf_starting_weights(roots, path: Path, model: ModelConfig, where: str) -> None:
    """This rank's rows of a Hugging Face directory's weights (bf16, or the released FP8 dequantised block by
    block), read straight from its files (dsv3.train.hf_shards): the whole model never exists on one rank."""
    try:
        load_hf_owned(roots, path, model)
    except CheckpointError as e:      # a damaged shard, an FP8 weight without scales, tensors the model lacks
        raise ConfigError(hf_source_error(where, e)) from None
