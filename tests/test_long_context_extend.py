"""Long-context extension phases (train.init_from, TR 4.3): a run starts from another run's weights with a longer
seq_len and YaRN, the config is validated against the source, and the exported model carries the rope_scaling that
makes transformers' logits equal ours at positions past the original length."""

import json
import re
import warnings

import pytest
import torch

import dsv3
from dsv3.config import ConfigError
from dsv3.cli import main
from dsv3.train import Trainer
from dsv3.train.export import load_run_model
from test_train_loop import small_run

transformers = pytest.importorskip("transformers", reason="needs the optional `hf` extra (CI pins it)")


def yarn(factor: float, orig: int, **kw) -> dict:
    return dict(type="yarn", factor=factor, original_max_position_embeddings=orig, **{
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, **kw})


def phase(tmp_path, name: str, source, seq_len: int, rope, max_pos: int = 256, **model):
    """An extension run: the source run's model (a run is a preset) with new positions, a constant small LR."""
    return small_run(tmp_path, name, model={"preset": str(source), "max_position_embeddings": max_pos,
                                            "rope_scaling": rope, **model},
                     data={"seq_len": seq_len}, train={"steps": 2, "init_from": str(source), "batch_size_start": 0},
                     optim={"lr": 7.3e-4, "warmup": 0.0, "constant_until": 1.0, "decay_until": 1.0, "final_at": 1.0},
                     log={"val_interval": 0})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    t = Trainer(small_run(tmp_path_factory.mktemp("pre"), "pre", train={"steps": 2}, log={"val_interval": 0},
                          model={"rope_scaling": None, "max_position_embeddings": 64}))
    t.run()
    return t.run_dir


def test_two_phases_start_from_the_source_and_export_what_transformers_reads(pretrained, tmp_path):
    source = load_run_model(pretrained)[0].state_dict()
    # phase 1: 32 -> 64 tokens, YaRN over the pre-training length; max positions not factor x original (HF's
    # gotcha of recomputing the factor from them would show)
    t1 = Trainer(phase(tmp_path, "p1", pretrained, 64, yarn(4.0, 32)))
    for k, v in t1.model.state_dict().items():
        assert torch.equal(v, source[k]), k
    t1.run()
    # phase 2 starts from phase 1: the original length stays the pre-training one
    t2 = Trainer(phase(tmp_path, "p2", t1.run_dir, 128, yarn(4.0, 32)))
    assert all(torch.equal(v, load_run_model(t1.run_dir)[0].state_dict()[k]) for k, v in t2.model.state_dict().items())
    t2.run()

    out = tmp_path / "hf"
    assert main(["export", str(t2.run_dir), str(out)]) == 0
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["max_position_embeddings"] == 256
    assert {k: hf_cfg["rope_scaling"][k] for k in ("factor", "original_max_position_embeddings", "mscale_all_dim")} \
        == {"factor": 4.0, "original_max_position_embeddings": 32, "mscale_all_dim": 1.0}
    ours = dsv3.load_pretrained(out, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 250))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert (a[:, 32:] - b[:, 32:]).abs().max() < 1e-4, "past the original length"
    assert (a - b).abs().max() < 1e-4
    plain = dsv3.Transformer(ours.config.replace(rope_scaling=None)).eval()   # YaRN is what is being compared
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        effect = (plain(ids) - a)[:, 32:].abs().max()
    # YaRN's effect must stand far above the ours-vs-transformers noise (an absolute 1e-3 was the measured size of
    # the effect itself on the H200 image: 0.0010, a coin flip)
    print(f"YaRN effect {effect:.3g}, ours vs transformers {(a - b).abs().max():.3g}")
    assert effect > max(100 * (a - b).abs().max(), 1e-5)


def test_plain_rope_control_extends_too(pretrained, tmp_path):
    t = Trainer(phase(tmp_path, "ctl", pretrained, 128, None, max_pos=128))
    assert t.run()["step"] == 2


@pytest.mark.parametrize("change,says", [
    (dict(rope=yarn(4.0, 64)), "original_max_position_embeddings=64 must be 32: the source was trained"),
    (dict(model=dict(hidden_size=96)), "model.hidden_size=96 differs from train.init_from's 64"),
    (dict(seq_len=256, rope=yarn(4.0, 32), max_pos=512), "data.seq_len=256 exceeds what YaRN interpolates"),
    (dict(rope=yarn(4.0, 32, beta_fast=0.5)), "'beta_fast' must be >= 'beta_slow'"),
])
def test_bad_extension_configs_are_one_line_errors_before_any_file(pretrained, tmp_path, change, says):
    args = dict(seq_len=64, rope=yarn(4.0, 32), max_pos=256, model={}) | change
    with pytest.raises(ConfigError, match=re.escape(says)) as e:
        Trainer(phase(tmp_path, "bad", pretrained, args["seq_len"], args["rope"], args["max_pos"], **args["model"]))
    assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()


def test_phase_two_keeps_the_original_length(pretrained, tmp_path):
    t1 = Trainer(phase(tmp_path, "p1", pretrained, 64, yarn(4.0, 32)))
    t1.run()
    with pytest.raises(ConfigError, match="must be 32: the source is YaRN-extended"):
        Trainer(phase(tmp_path, "p2", t1.run_dir, 128, yarn(8.0, 64)))
    with pytest.raises(ConfigError, match="train.init_from='nowhere': not a directory"):
        Trainer(small_run(tmp_path, "p3", train={"init_from": "nowhere"}))
