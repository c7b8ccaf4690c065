"""Config mistakes a user makes, each refused by `dsv3 train` in one line naming the key before anything is written:
values of the wrong type in the model section (a traceback or a silently accepted string before), a typo'd key or
section (the close match suggested), one override given twice with different values, a model table or preset that
is not what it must be."""

from pathlib import Path

import pytest

from dsv3.cli import main
from dsv3.config import ConfigError, ModelConfig, load_model_config

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")


def refused(tmp_path: Path, capsys, *args: str) -> str:
    # a source that does not exist: were the config accepted, the run would stop there, not train
    rc = main(["train", *args, 'data.sources=["no-such-corpus"]', "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [p for p in tmp_path.iterdir() if p.name == "x.toml"], "wrote files"
    return err


@pytest.mark.parametrize("override,says", [
    ('model.rms_norm_eps="a"', "rms_norm_eps='a': must be a number > 0"),
    ('model.routed_scaling_factor="2.5"', "routed_scaling_factor='2.5': must be a number > 0"),
    ("model.rope_theta=nan", "rope_theta=nan: must be a number > 0"),
    ('model.bos_token_id="x"', "bos_token_id='x': must be a token id"),
    ("model.eos_token_id=-1", "eos_token_id=-1: must be a token id"),
    ("model.eos_token_id=[]", "eos_token_id=[]: must be a token id"),
    ("model.attention_bias=1", "attention_bias=1: must be true or false"),
    ('model.norm_topk_prob="no"', "norm_topk_prob='no': must be true or false"),
    ("model.preset=5", "preset=5: must be a preset name or a path"),
    ("train.stpes=5", "unknown keys ['stpes'] in [train] (did you mean 'steps' for 'stpes'?)"),
    ("trian.steps=5", "unknown sections ['trian'] (did you mean 'train' for 'trian'?)"),
    ("model.hidden_sise=64", "unknown keys ['hidden_sise'] (did you mean 'hidden_size' for 'hidden_sise'?)"),
    ('optim.master="half"', "optim.master='half'"),
    ('optim.master="split"', "optim.master=split needs optim.state_dtype=bf16"),
    # a bool is no integer, NaN / inf no number: accepted before, they trained a rank-1 q_lora or to a NaN loss
    ("model.q_lora_rank=true", "q_lora_rank=True: must be a positive integer or null"),
    ("model.rope_scaling={type='yarn',factor=nan,original_max_position_embeddings=4096}", "'factor' must be a number"),
    ("model.rope_scaling={type='yarn',factor=inf,original_max_position_embeddings=4096}", "'factor' must be a number"),
    ("model.rope_scaling={type='yarn',factor=512,original_max_position_embeddings=true}",
     "'original_max_position_embeddings' must be a positive integer"),
    ("model.rope_scaling={type='yarn',factor=2,original_max_position_embeddings=4096,mscale=inf}",
     "'mscale' must be a number >= 0"),
    ("parallel.timeout_minutes=1e300", "parallel.timeout_minutes=1e+300: must be a number in (0, 1e+06]"),
    # accepted before: a dtype no reader knows, ids past the vocabulary (tiny: 2048), an hf_extra that is no object
    # (a traceback) or that overrides a field when exported (a config.json contradicting the weights)
    ('model.torch_dtype="float33"', "torch_dtype='float33': must be one of 'float32', 'bfloat16'"),
    ("model.bos_token_id=2048", "bos_token_id=2048: must be a token id (an integer in [0, vocab_size=2048))"),
    ("model.pad_token_id=99999", "pad_token_id=99999: must be a token id"),
    ("model.eos_token_id=[1, 4096]", "eos_token_id=[1, 4096]: must be a token id"),
    ('model.hf_extra="abc"', "hf_extra='abc': must be an object of config.json keys"),
    ("model.hf_extra=[1]", "hf_extra=[1]: must be an object of config.json keys"),
    ("model.hf_extra={vocab_size=5}", "hf_extra holds ['vocab_size'], fields of the model config"),
    ("model.hf_extra={rope_interleave=false}", "rope_interleave=False: only interleaved RoPE"),
    ('model.hf_extra={dtype="float9"}', "dtype='float9': must be one of"),
])
def test_a_bad_model_value_or_a_typo_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys, override, says):
    monkeypatch.chdir(tmp_path)
    assert says in refused(tmp_path, capsys, "--config", TINY, override)


def test_an_override_given_twice_with_different_values_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = refused(tmp_path, capsys, "--config", TINY, "train.steps=5", "train.steps=6")
    assert "train.steps is given twice, as 5 and 6" in err
    err = refused(tmp_path, capsys, "--run-dir", "b", "--config", TINY, 'run_dir="a"')
    assert "run_dir is given twice, as 'a' and 'b'" in err
    # the same value twice is no contradiction (a script that appends an override it already had)
    from dsv3.train.config import load_run_config
    assert load_run_config(TINY, ["train.steps=5", "train.steps=5"]).train.steps == 5


@pytest.mark.parametrize("toml,says", [("model = 5\n", "[model] must be a table"),
                                       ("[train]\nsteps = 1\nsteps = 2\n", "is not valid TOML"),
                                       ("[data]\nsources = ['stdlib']\n[data]\nseed = 1\n", "is not valid TOML")])
def test_a_malformed_run_file_is_one_line(tmp_path, monkeypatch, capsys, toml, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.toml").write_text(toml)
    assert says in refused(tmp_path, capsys, "--config", "x.toml")


def test_released_configs_still_read():
    """The checks accept what the Hub's files hold: an eos list, V2's unnormalised top-k, integer rope_theta."""
    cfg = ModelConfig.from_hf({"model_type": "deepseek_v2", "eos_token_id": [1, 2], "norm_topk_prob": False,
                               "rope_theta": 10000, "routed_scaling_factor": 1, "bos_token_id": 100000})
    assert cfg.eos_token_id == [1, 2] and cfg.rope_theta == 10000
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        ModelConfig.from_hf({"tie_word_embeddings": "false"})
    for name in ("tiny", "lite", "lite-8L", "v3-671b"):
        assert load_model_config(name).vocab_size > 0
