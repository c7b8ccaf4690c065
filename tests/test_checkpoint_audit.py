"""`dsv3 convert` as a user who mistypes the output directory, and HF checkpoints damaged in ways the loader must name:
the output is never renamed over the source or over a directory holding someone's files (before, the source, or
every file of a non-empty output directory, was deleted by the atomic rename), and an FP8 weight whose scales are
missing is an error naming it (before, it was cast as is: weights off by their block scales, silently)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import CheckpointError
from dsv3.checkpoint import convert_checkpoint
from dsv3.cli import main

from conftest import build, tiny_config


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "model"
    dsv3.save_pretrained(build(tiny_config()), path, max_shard_size="300KB")
    return path


def snapshot(path):
    return sorted((str(p.relative_to(path)), p.read_bytes()) for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("where", ["same", "parent", "inside", "non-empty", "a file"])
def test_convert_refuses_an_output_that_would_delete_or_change_what_it_did_not_write(tmp_path, src, capsys, where):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("user data")
    (tmp_path / "file").write_text("user data")
    dst = {"same": src, "parent": tmp_path, "inside": src / "bf16", "non-empty": notes, "a file": tmp_path / "file"}
    before, mine = snapshot(src), snapshot(tmp_path)
    assert main(["convert", str(src), str(dst[where]), "--to", "fp8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(dst[where]) in err, err
    assert snapshot(src) == before and snapshot(tmp_path) == mine


def drop_scale(fp8: Path, name: str) -> dict:
    """Remove FP8 weight `name`'s _scale_inv from a one-shard checkpoint (file and index); returns the tensors left."""
    f = fp8 / "model.safetensors"
    tensors = load_file(str(f))
    del tensors[name + "_scale_inv"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    index = fp8 / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    idx["weight_map"].pop(name + "_scale_inv")
    index.write_text(json.dumps(idx))
    return tensors


def test_convert_into_a_new_or_empty_directory_and_a_failed_one_leaves_nothing(tmp_path, src, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(src), str(tmp_path / "empty"), "--to", "fp8"]) == 0
    assert (tmp_path / "empty" / "model.safetensors.index.json").exists()
    from dsv3.checkpoint import hf

    def full_disk(tensors, path, metadata=None):       # ENOSPC on the second shard
        if "-00002-of-" in path:
            raise OSError(28, "No space left on device")
        save_file(tensors, path, metadata=metadata)
    monkeypatch.setattr(hf, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(src, tmp_path / "new", to="fp8")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model"]      # no half directory, no leftovers


def test_a_truncated_or_missing_source_shard_is_named(tmp_path, src, capsys):
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert shard.name in capsys.readouterr().err
    shard.unlink()
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert f"missing: {shard.name}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_fp8_weight_without_its_scales_is_named(tmp_path):
    fp8 = tmp_path / "fp8"
    dsv3.save_pretrained(build(tiny_config()), fp8, quantize_fp8=True)
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors = drop_scale(fp8, name)
    with pytest.raises(CheckpointError, match=rf"{name} in .* is float8_e4m3fn but {name}_scale_inv is missing"):
        dsv3.load_pretrained(fp8)
    with pytest.raises(CheckpointError, match=rf"{name}_scale_inv is missing"):
        convert_checkpoint(fp8, tmp_path / "bf16")
    assert not (tmp_path / "bf16").exists()
    assert torch.float8_e4m3fn == tensors[name].dtype


def test_the_sliced_reader_names_a_truncated_shard_and_an_fp8_weight_without_scales(tmp_path, src):
    """dsv3.train.hf_shards (each rank reading its rows) refuses what load_pretrained refuses, naming the file."""
    from dsv3.train.hf_shards import load_hf_owned
    cfg = tiny_config()
    model = build(cfg)
    assert load_hf_owned([model], src, cfg) > 0                           # intact: reads
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"cannot read tensor .* from {shard}"):
        load_hf_owned([model], src, cfg)
    fp8 = tmp_path / "fp8"
    dsv3.save_pretrained(model, fp8, quantize_fp8=True)
    name = "model.layers.0.self_attn.o_proj.weight"
    drop_scale(fp8, name)
    with pytest.raises(CheckpointError, match=rf"{name} in .* is float8_e4m3fn but {name}_scale_inv is missing"):
        load_hf_owned([model], fp8, cfg)


KILLED_CONVERT = """
import os, signal, sys
from dsv3.checkpoint import convert_checkpoint, hf
real = hf.save_file
def save_then_die(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)          # killed after the first output shard
hf.save_file = save_then_die
convert_checkpoint(sys.argv[1], sys.argv[2], to="fp8")
"""


def test_a_killed_convert_leaves_no_output_and_the_next_one_removes_only_its_leftover(tmp_path, src):
    import os
    import subprocess
    import sys
    out = tmp_path / "fp8"
    r = subprocess.run([sys.executable, "-c", KILLED_CONVERT, str(src), str(out)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode < 0
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".fp8.tmp-")]
    assert len(left) == 1 and not out.exists()              # nothing that looks like a finished conversion
    alive = tmp_path / f".fp8.tmp-{os.getpid()}-0000"       # a conversion still running (this process)
    alive.mkdir()
    other = tmp_path / ".other.tmp-1-0000"                  # someone else's
    other.mkdir()
    assert main(["convert", str(src), str(out), "--to", "fp8"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "fp8", "model"])
