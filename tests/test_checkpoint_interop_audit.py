"""Hugging Face checkpoints as a hostile user meets them: `save_pretrained` (and `dsv3 demo --out`) into a directory
holding someone's files, a released directory whose index / config / single shard is damaged, and a stacked expert
tensor of the wrong shape read rank by rank (train.init_from). Before: every file of the directory was deleted by the
atomic rename; the damaged files were tracebacks (TypeError, AttributeError, SafetensorError) instead of one line
naming the file; the mis-shaped expert row was broadcast into the model silently."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import CheckpointError, ConfigError
from dsv3.cli import main

from conftest import build, tiny_config


def snapshot(path):
    return sorted((str(p.relative_to(path)), p.read_bytes()) for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("interop") / "model"
    dsv3.save_pretrained(build(tiny_config()), path)
    return path


def test_save_pretrained_never_deletes_files_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("user data")
    (mine / "tokenizer.json").write_text("{}")
    before = snapshot(mine)
    with pytest.raises(FileExistsError, match=r"mine holds files save_pretrained did not write \(notes\.txt, "
                                              r"tokenizer\.json\)"):
        dsv3.save_pretrained(build(tiny_config()), mine)
    assert snapshot(mine) == before
    assert main(["demo", "--out", str(mine)]) == 2          # `dsv3 demo --out .` in one's home directory
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not write" in err
    assert snapshot(mine) == before and [p.name for p in tmp_path.iterdir()] == ["mine"]
    (tmp_path / "a file").write_text("user data")
    with pytest.raises(FileExistsError, match="not a directory"):
        dsv3.save_pretrained(build(tiny_config()), tmp_path / "a file")
    assert (tmp_path / "a file").read_text() == "user data"
    # a new directory, an empty one, and an earlier save_pretrained's output (sharded otherwise) are written
    model = build(tiny_config(), seed=1)
    for out in (tmp_path / "new", tmp_path / "mine" / "empty"):
        out.parent.mkdir(exist_ok=True)
        (tmp_path / "mine" / "empty").mkdir(exist_ok=True)
        dsv3.save_pretrained(model, out, max_shard_size="40KB")
        dsv3.save_pretrained(model, out)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                         "model.safetensors.index.json"]
        assert torch.equal(dsv3.load_pretrained(out).lm_head.weight, model.lm_head.weight)


def _damaged(saved, tmp_path, fn):
    d = tmp_path / "damaged"
    shutil.copytree(saved, d)
    fn(d)
    return d


def _index(text):
    return lambda d: (d / "model.safetensors.index.json").write_text(text)


def _single_truncated(d):
    (d / "model.safetensors.index.json").unlink()
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])


def _config(text):
    return lambda d: (d / "config.json").write_text(text)


@pytest.mark.parametrize("damage, error, says", [
    (_index("[]"), CheckpointError, r"model\.safetensors\.index\.json is not a valid safetensors index"),
    (_index('{"weight_map": []}'), CheckpointError, r"index\.json is not a valid safetensors index: weight_map"),
    (_index('{"weight_map": null}'), CheckpointError, r"index\.json is not a valid safetensors index: weight_map"),
    (_index('{"weight_map": {"model.norm.weight": 3}}'), CheckpointError,
     r"index\.json is not a valid safetensors index: weight_map\['model\.norm\.weight'\]"),
    (_single_truncated, CheckpointError, r"cannot read shard .*damaged/model\.safetensors"),
    (_config("[1, 2]"), ConfigError, r"damaged/config\.json is not a JSON object"),
    (_config('"abc"'), ConfigError, r"damaged/config\.json is not a JSON object"),
    (_config("5"), ConfigError, r"damaged/config\.json is not a JSON object"),
    (lambda d: _config(json.dumps({**json.loads((d / "config.json").read_text()), "rope_parameters": "x"}))(d),
     ConfigError, r"rope_parameters='x': must be an object"),
], ids=["index list", "weight_map list", "weight_map null", "weight_map file int", "single shard truncated",
        "config list", "config string", "config number", "rope_parameters string"])
def test_a_damaged_directory_is_one_error_naming_the_file(saved, tmp_path, capsys, damage, error, says):
    d = _damaged(saved, tmp_path, damage)
    with pytest.raises(error, match=says):
        dsv3.load_pretrained(d)
    assert main(["convert", str(d), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err and not (tmp_path / "out").exists()


def test_a_misshaped_expert_tensor_is_named_when_read_rank_by_rank(saved, tmp_path):
    """dsv3.train.hf_shards (train.init_from / sft from a Hugging Face directory): a routed expert's tensor of the
    wrong shape, or more rows than the model's in any tensor, is refused as load_pretrained refuses it (before: the
    expert's (1, D) row was broadcast over its (I, D) slot; the extra rows read as if they were not there)."""
    from dsv3.train.hf_shards import load_hf_owned
    cfg = tiny_config()
    for name, cut in [("model.layers.1.mlp.experts.2.up_proj.weight", lambda t: t[:1]),
                      ("model.layers.1.self_attn.o_proj.weight", lambda t: torch.cat([t, t]))]:
        d = tmp_path / name
        shutil.copytree(saved, d)
        shape = _rewrite(d, name, lambda t: cut(t).contiguous())
        with pytest.raises(CheckpointError, match=rf"tensor {name} has shape"):
            dsv3.load_pretrained(d)
        with pytest.raises(CheckpointError, match=re.escape(f"tensor {name} has shape {shape}, the config expects")):
            load_hf_owned([_empty(cfg)], d, cfg)


def _rewrite(d, name: str, change) -> tuple:
    """Replace tensor `name` of d/model.safetensors by change(it); its new shape."""
    tensors = load_file(str(d / "model.safetensors"))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return tuple(tensors[name].shape)


def _empty(cfg):
    """A model of `cfg` with uninitialised CPU storage (what load_hf_owned fills)."""
    with torch.device("meta"):
        model = dsv3.Transformer(cfg)
    return model.to_empty(device="cpu")


def test_convert_keeps_the_files_that_go_with_the_weights(saved, tmp_path):
    """A release directory is more than its shards: tokenizer files (with the chat template), generation_config.json
    (the sampling defaults and EOS ids `dsv3 serve` reads from the model directory), the remote code its auto_map
    names. Before, `dsv3 convert` wrote the shards, index and config.json only: `dsv3 serve --model DST` had no
    tokenizer, and with --tokenizer SRC it sampled with OpenAI's defaults instead of the release's."""
    src = tmp_path / "release"
    shutil.copytree(saved, src)
    extra = {"tokenizer.json": "{}", "tokenizer_config.json": '{"chat_template": "x"}',
             "generation_config.json": '{"temperature": 0.6, "top_p": 0.95}', "modeling_deepseek.py": "# code",
             "README.md": "# model card"}
    for name, text in extra.items():
        (src / name).write_text(text)
    (src / "pytorch_model.bin").write_bytes(b"stale weights in another format")
    for to in ("fp8", "bf16"):
        assert main(["convert", str(src), str(tmp_path / to), "--to", to]) == 0
        out = tmp_path / to
        assert {n: (out / n).read_text() for n in extra} == extra
        assert not (out / "pytorch_model.bin").exists()
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
        dsv3.load_pretrained(out)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_damaged_tokenizer_config_is_one_line_naming_it(saved, tmp_path, capsys, text):
    """tokenizer_config.json (chat template, add_bos_token) damaged: `dsv3 serve` said "Expecting value: line 1
    column 1 (char 0)" naming no file, or an AttributeError traceback, and only after the model had been loaded
    (minutes for a large one; now it is read first); `dsv3 generate` the same."""
    import subprocess
    import sys
    from dsv3.data import train_tokenizer
    d = tmp_path / "m"
    shutil.copytree(saved, d)
    train_tokenizer(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=300, out_dir=d)
    (d / "tokenizer_config.json").write_text(text)
    assert main(["generate", "--model", str(d), "--prompt", "the", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{d / 'tokenizer_config.json'}: not a JSON object" in err, err
    r = subprocess.run([sys.executable, "-c", "import sys; from dsv3.cli import main; sys.exit(main())", "serve",
                        "--model", str(d), "--port", "1", "--device", "cpu"], capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and f"{d / 'tokenizer_config.json'}: not a JSON object" in lines[0], \
        r.stderr


def test_an_fp8_weight_not_in_e4m3_is_named_when_read_rank_by_rank(tmp_path):
    """A `weight_scale_inv` beside a weight that is not e4m3 (here e5m2): load_pretrained names the tensor; the
    rank-by-rank reader (train.init_from) raised dequantize_blocks' ValueError naming neither tensor nor file."""
    from dsv3.train.hf_shards import load_hf_owned
    cfg = tiny_config(hidden_size=128, q_lora_rank=128)
    d = tmp_path / "fp8"
    dsv3.save_pretrained(build(cfg), d, quantize_fp8=True)
    name = "model.layers.1.self_attn.o_proj.weight"
    _rewrite(d, name, lambda t: t.float().to(torch.float8_e5m2))
    with pytest.raises(CheckpointError, match=rf"tensor {name}: .*float8_e4m3fn"):
        dsv3.load_pretrained(d)
    with pytest.raises(CheckpointError, match=rf"tensor {name}: .*float8_e4m3fn"):
        load_hf_owned([_empty(cfg)], d, cfg)


@pytest.mark.parametrize("where", ["absolute", "parent", "subdirectory"])
def test_an_index_naming_a_shard_outside_the_directory_is_refused(saved, tmp_path, where):
    """The index's weight_map names each tensor's shard file; `dsv3 convert` writes its output shard under the same
    name in the new directory. Before: a name with a path in it was joined as is, so an absolute one (or "../x")
    made convert overwrite that file outside the output (here a file of the user's beside it) with shard bytes, and
    the output's index pointed there too. Now such an index is one CheckpointError naming the entry; nothing is
    written."""
    src = tmp_path / "src"
    shutil.copytree(saved, src)
    victim = tmp_path / "victim.safetensors"
    (src / "model.safetensors").rename(victim)
    name = {"absolute": str(victim), "parent": "../victim.safetensors", "subdirectory": "sub/model.safetensors"}[where]
    if where == "subdirectory":
        (src / "sub").mkdir()
        shutil.copy(victim, src / "sub" / "model.safetensors")
    keys = load_file(victim).keys()
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))
    before = victim.read_bytes()
    says = re.escape("weight_map[") + r".*is not a shard file name in the directory"
    with pytest.raises(CheckpointError, match=says):
        dsv3.load_pretrained(src)
    assert main(["convert", str(src), str(tmp_path / "out"), "--dtype", "float32"]) == 2
    assert victim.read_bytes() == before and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "victim.safetensors"]


def test_saving_and_converting_through_a_symlinked_directory_keeps_the_link(tmp_path, capsys):
    """A model directory reached through a symlink (kept on another disk). Before: the atomic rename moved the link
    itself aside, put a real directory in its place, then failed in rmtree (which refuses links): save_pretrained
    raised OSError after writing, the link was gone, the directory it pointed at still held the old weights, and a
    `.link.old-*` link was left behind. Now what the link points at is replaced and the link kept."""
    real, link = tmp_path / "disk" / "model", tmp_path / "model"
    real.parent.mkdir()
    dsv3.save_pretrained(build(tiny_config()), real)
    link.symlink_to(real)
    new = build(tiny_config(), seed=1)
    dsv3.save_pretrained(new, link)
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["disk", "model"]
    assert [p.name for p in real.parent.iterdir()] == ["model"]
    assert torch.equal(dsv3.load_pretrained(real).lm_head.weight, new.lm_head.weight)
    (tmp_path / "disk" / "out").mkdir()                              # convert into an empty directory's link
    (tmp_path / "out").symlink_to(tmp_path / "disk" / "out")
    assert main(["convert", str(link), str(tmp_path / "out"), "--dtype", "float32"]) in (0, None)
    assert (tmp_path / "out").is_symlink() and (tmp_path / "disk" / "out" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "model", "out"]
