"""Streaming checkpoint conversion, shard by shard: released FP8 -> bf16, or bf16 -> released FP8.

Peak host memory is one source shard plus its converted copy, so the 671B checkpoint converts on an ordinary
host (what DeepSeek's `fp8_cast_bf16.py` does, with our checks). The tensor set is checked against the model
of the config first, and each tensor's shape and dtype as it is read; the output keeps the source's shard layout, file
names and tensor names, and the files that go with the weights (tokenizer, generation_config.json, the remote code of
its auto_map, the model card with its figures/, a release's inference/ code: subdirectories too) are copied as they
are; it is written atomically. Left out, and reported: weight files the index does not list (another format's copy)
and hidden directories (tools' state, e.g. `.git`, which holds the weights again as LFS objects, and
`.cache/huggingface`, whose records of the downloaded files' hashes the converted shards no longer match).
Our on-disk format *is* the HF format, so there is no other direction to convert.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from ..fp8 import quantize_blocks
from ..model import Transformer
from .atomic import atomic_directory
from .hf import FP8_WEIGHT, INDEX_NAME, CheckpointReader, ShardWriter, expected_shapes, hf_name_map

# weights in any format: the converted shards replace them (a stale copy in another format would be loaded instead by
# a reader that prefers it)
WEIGHT_FILE = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|gguf|msgpack|h5)$")


def remove_dead_leftovers(dst: Path) -> list[str]:
    """What a killed conversion to `dst` left (its `.DST.tmp-PID-*` sibling: atomic_directory's, a whole model's
    worth of shards), removed when that process is gone; a live one's, or any other name, is left alone."""
    gone = []
    for p in dst.absolute().parent.glob(f".{dst.name}.tmp-*"):
        pid = p.name[len(dst.name) + 6:].split("-")[0]
        if not (p.is_dir() and not p.is_symlink() and pid.isdigit()) or _alive(int(pid)):
            continue
        shutil.rmtree(p)
        gone.append(p.name)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # another user's process
        return True
    return True


def check_destination(src: Path, dst: Path) -> None:
    """The output goes to a new (or empty) directory beside the source: it is renamed into place over `dst`, so an
    existing one's files, or a source at or inside it, would be deleted (no command deletes what it did not
    write); an output inside the source would become part of the source."""
    s, d = src.resolve(), dst.resolve()
    if d == s or s.is_relative_to(d):
        raise FileExistsError(f"{dst} is or contains the source {src}; convert into a new directory")
    if d.is_relative_to(s):
        raise FileExistsError(f"{dst} is inside the source {src}; convert into a directory outside it")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not an empty directory; convert into a new or empty one "
                              f"(nothing there is replaced)")


def convert_checkpoint(src: str | Path, dst: str | Path, to: str = "bf16",
                       dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """to="bf16": dequantise every FP8 weight into `dtype` and drop the scales; to="fp8": quantise the attention and
    FFN/expert Linear weights to e4m3 with 128x128 `weight_scale_inv`. Other tensors are cast to `dtype`, except
    the fp32 routing bias. Returns what of the source was not copied (copy_release_files)."""
    if to not in ("bf16", "fp8"):
        raise ValueError(f"convert to 'bf16' or 'fp8', not {to!r}")
    check_destination(Path(src), Path(dst))
    remove_dead_leftovers(Path(dst))
    ckpt = CheckpointReader(src)
    with torch.device("meta"):
        model = Transformer(ckpt.model_config())     # the tensors' model: without MTP where none is stored
    names = hf_name_map(model)
    ckpt.check_names(names)
    shapes = expected_shapes(model, names)
    writer = ShardWriter(ckpt.config, dtype, fp8=to == "fp8")
    written = {"config.json", INDEX_NAME, *ckpt.weight_map.values()}
    with atomic_directory(dst) as tmp:
        for file, file_names in ckpt.by_file().items():
            out = {}
            for name in file_names:
                if name.endswith(".weight_scale_inv"):
                    continue  # consumed with its weight
                t = ckpt.read(name, torch.float32 if to == "fp8" else dtype, shape=shapes.get(name))
                if to == "fp8" and name in ckpt.scales:
                    # already in the block format (and checked by the read): kept as stored. Re-quantising its values
                    # gives them back, but a power-of-two scale may come out halved with its codes doubled (a block
                    # whose largest code rounded down to 224): the same weights in other bytes
                    out[name], out[name + "_scale_inv"] = ckpt.read_stored(name), ckpt.read_stored(ckpt.scales[name])
                elif to == "fp8" and FP8_WEIGHT.search(name):
                    out[name], out[name + "_scale_inv"] = quantize_blocks(t, pow2=ckpt.config.ue8m0_scales)
                elif name.endswith("e_score_correction_bias"):
                    out[name] = t.float().contiguous()
                else:
                    out[name] = t.to(dtype).contiguous()
            writer.write_shard(tmp / file, out)
            del out
        left_out = copy_release_files(Path(src), tmp, written)
        writer.finish(tmp)
    ckpt.close()
    return left_out


def copy_release_files(src: Path, dst: Path, written: set[str]) -> list[str]:
    """Copy every file of `src` but the ones `written` names (the converted weights, index and config) into `dst`,
    subdirectories included; return the relative paths left out (weight files, hidden directories), sorted."""
    left_out = []
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        # a link to a directory is not followed (it could lead back up into src): named, as a hidden one is
        skip = {d for d in dirs if d.startswith(".") or (Path(root) / d).is_symlink()}
        left_out += [f"{(rel / d).as_posix()}/" for d in skip]
        dirs[:] = sorted(set(dirs) - skip)     # os.walk descends only into what is left here
        for name in sorted(files):
            path = rel / name
            if path.as_posix() in written:
                continue
            if WEIGHT_FILE.search(name):
                left_out.append(path.as_posix())
                continue
            (dst / rel).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / path, dst / path)     # a Hub cache's symlink: its content
    return sorted(left_out)
