import json
import math

import pytest
import torch

from dsv3 import ConfigError, ModelConfig, Transformer, load_model_config
from dsv3.config import CONFIG_DIR

# ../shared beside the checkout (CI, dev machines), or a copy inside it (the device machine: gpu_suite.sh carries one)
SHARED = next((p for p in (CONFIG_DIR.parent.parent / "shared" / "bench" / "configs",
                           CONFIG_DIR.parent / "shared" / "bench" / "configs") if p.exists()),
              CONFIG_DIR.parent.parent / "shared" / "bench" / "configs")

# DeepSeek-V2-Lite's config.json (softmax gating, greedy top-k, no q_lora, YaRN with mscale 0.707)
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400}


@pytest.mark.parametrize("name", ["v3-671b", "lite", "lite-8L", "tiny"])
def test_presets_round_trip_exactly(name):
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    assert ModelConfig.from_hf(raw).to_hf() == raw


def test_v2_lite_round_trip_and_fields():
    cfg = ModelConfig.from_hf(V2_LITE)
    assert cfg.to_hf() == V2_LITE
    assert (cfg.scoring_func, cfg.topk_method, cfg.q_lora_rank, cfg.n_group) == ("softmax", "greedy", None, 1)
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2)


def test_lite_presets_are_the_shared_bench_configs():
    if not SHARED.exists():
        pytest.skip("the bench configs to compare with live in ../shared, which is neither beside nor inside this "
                    "checkout (on the device machine, carry a copy as shared/: benchmarks/gpu_suite.sh)")
    for name in ("lite", "lite-8L"):
        assert (CONFIG_DIR / f"{name}.json").read_text() == (SHARED / f"{name}.json").read_text()


def test_released_config_keeps_yarn_and_ignores_hub_init_range():
    cfg = load_model_config("v3-671b")
    assert cfg.yarn()["factor"] == 40.0 and cfg.yarn()["original_max_position_embeddings"] == 4096
    assert cfg.init_std == 0.006 and cfg.to_hf()["initializer_range"] == 0.02
    assert cfg.hf_extra["quantization_config"]["weight_block_size"] == [128, 128]


def test_transformers5_rope_parameters_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs the optional `hf` extra (CI pins it)")
    cfg = load_model_config("tiny")
    transformers.DeepseekV3Config(**cfg.to_hf()).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_scaling" not in raw
    back = ModelConfig.from_hf(raw)
    assert back.to_hf() == raw
    # the YaRN factor survives even though max_position_embeddings / original differs from it
    assert back.yarn()["factor"] == 4 and back.max_position_embeddings == 2048
    assert back.rope_scaling == {k: v for k, v in raw["rope_parameters"].items() if k != "rope_theta"}
    for f in ("hidden_size", "n_group", "topk_group", "q_lora_rank", "kv_lora_rank", "num_nextn_predict_layers"):
        assert getattr(back, f) == getattr(cfg, f)


def test_v3_671b_parameter_counts_match_spec():
    with torch.device("meta"):
        n = Transformer(load_model_config("v3-671b")).num_params()
    assert round(n["total"] / 1e9, 2) == 671.03           # spec 1.1
    assert round(n["active"] / 1e9, 2) == 37.55
    assert round(n["active_without_embedding"] / 1e9, 2) == 36.63
    assert round(n["mtp"] / 1e9, 2) == 11.61
    assert round(n["mtp_active"] / 1e9, 2) == 2.54


def test_lite_parameter_counts_match_anchors():
    with torch.device("meta"):
        assert round(Transformer(load_model_config("lite")).num_params()["total"] / 1e9, 2) == 15.71
        assert round(Transformer(load_model_config("lite-8L")).num_params()["total"] / 1e9, 2) == 4.59


@pytest.mark.parametrize("change, field, reason", [
    (dict(topk_group=9), "topk_group", "cannot exceed n_group"),
    (dict(n_routed_experts=250), "n_routed_experts", "divisible by n_group"),
    (dict(num_key_value_heads=0), "num_key_value_heads", "positive"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim", "even"),
    (dict(num_experts_per_tok=300), "num_experts_per_tok", "cannot exceed"),
    (dict(hidden_size=0), "hidden_size", "positive"),
    (dict(scoring_func="relu"), "scoring_func", "sigmoid"),
    (dict(topk_method="magic"), "topk_method", "one of"),
    (dict(first_k_dense_replace=99), "first_k_dense_replace", "num_hidden_layers"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling", "YaRN"),
    (dict(rope_scaling={"type": "yarn", "factor": 40}), "rope_scaling", "original_max_position_embeddings"),
    (dict(hidden_act="gelu"), "hidden_act", "silu"),
])
def test_invalid_configs_name_field_and_reason(change, field, reason):
    raw = json.loads((CONFIG_DIR / "v3-671b.json").read_text())
    raw.update(change)
    with pytest.raises(ConfigError, match=field) as e:
        ModelConfig.from_hf(raw)
    assert reason in str(e.value)


def test_inconsistent_kv_dims_and_bad_files(tmp_path):
    raw = json.loads((CONFIG_DIR / "tiny.json").read_text())
    with pytest.raises(ConfigError, match="qk_head_dim.*inconsistent"):
        ModelConfig.from_hf({**raw, "qk_head_dim": 99})
    with pytest.raises(ConfigError, match="head_dim.*inconsistent"):
        ModelConfig.from_hf({**raw, "head_dim": 99})
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf({**raw, "model_type": "llama"})
    with pytest.raises(ConfigError, match="n_routed_experts"):
        ModelConfig.from_hf({**raw, "n_routed_experts": "sixteen"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="presets"):
        load_model_config("no-such-preset")


def test_toml_model_section(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('[model]\npreset = "tiny"\nnum_hidden_layers = 5\n')
    cfg = load_model_config(p)
    assert cfg.num_hidden_layers == 5 and cfg.hidden_size == 64
    p.write_text('[model]\npreset = "tiny"\nnum_hiden_layers = 5\n')
    with pytest.raises(ConfigError, match="num_hiden_layers"):
        load_model_config(p)


def test_to_hf_returns_a_copy():
    cfg = load_model_config("tiny")
    d = cfg.to_hf()
    d["rope_scaling"]["rope_theta"] = 1.0
    assert "rope_theta" not in cfg.rope_scaling and cfg.to_hf() != d


# ---------------------------------------------------------------------------------------------------------------
# A key absent from a config.json reads as transformers reads it (issue 12)
# ---------------------------------------------------------------------------------------------------------------

def _shared_fields() -> list[str]:
    """ModelConfig fields that transformers' DeepseekV3Config also has (rope_scaling stands for its rope_parameters
    and rope_theta; model_type is the file's identity, not a default)."""
    import dataclasses
    transformers = pytest.importorskip("transformers", reason="needs the optional `hf` extra (CI pins it)")
    hf = transformers.DeepseekV3Config()
    names = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "model_type" and hasattr(hf, f.name)]
    return names + ["rope_scaling"]


def _ours_and_theirs(d: dict):
    import copy
    import warnings
    import transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers edits the dicts it is given: give it a copy
        return ModelConfig.from_hf(d), transformers.DeepseekV3Config(**copy.deepcopy(d))


def _their_value(hf, name):
    if name == "rope_scaling":   # transformers 5 keeps RoPE in rope_parameters; "default" means none
        rp = dict(hf.rope_parameters)
        return None if rp.pop("rope_type", rp.pop("type", None)) == "default" else rp
    if name == "torch_dtype":
        return None if hf.dtype is None else str(hf.dtype).removeprefix("torch.")
    return getattr(hf, name)


@pytest.mark.parametrize("name", ["vocab_size", "hidden_size", "max_position_embeddings", "rope_scaling", "rope_theta",
                                  "num_attention_heads", "torch_dtype", "q_lora_rank", "n_group", "norm_topk_prob"])
def test_shared_fields_cover_what_matters(name):
    assert name in _shared_fields() + ["rope_theta"]


def test_absent_keys_load_to_transformers_defaults(tmp_path):
    """For every field transformers' DeepseekV3Config has: the tiny preset's config.json without that key loads to
    the value transformers reads; where the model that describes stays small, the same weights under that file give
    logits within 1e-4 (fp32) of transformers'."""
    import warnings
    import transformers
    import dsv3
    from conftest import build
    full = json.loads((CONFIG_DIR / "tiny.json").read_text())
    full.update(torch_dtype="float32", max_position_embeddings=2048)
    checked, compared = [], []
    for name in _shared_fields():
        d = {k: v for k, v in full.items() if k != name}
        if name == "rope_scaling":
            d.pop("rope_theta", None)
        if name == "num_attention_heads":   # transformers repeats K/V by heads / kv heads: drop the pair together
            d.pop("num_key_value_heads")
        ours, hf = _ours_and_theirs(d)
        want = _their_value(hf, name)
        got = getattr(ours, name)
        assert got == want, (name, got, want)
        if name == "rope_scaling":
            assert ours.rope_theta == hf.rope_parameters["rope_theta"] and ours.yarn() is None
        checked.append(name)
        with torch.device("meta"):
            n_params = Transformer(ours).num_params()["total"]
        if n_params > 20e6 or name == "num_hidden_layers":
            # 61 random layers: one near-tie in top-k routing flips between two float summation orders (seen on
            # transformers 5.17: 1e-2), so only the value is compared there
            continue
        model = build(ours.replace(num_nextn_predict_layers=0, hf_absent=()), seed=len(compared))
        path = tmp_path / name
        dsv3.save_pretrained(model, path)
        (path / "config.json").write_text(json.dumps({**d, "num_nextn_predict_layers": 0}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        mine = dsv3.load_pretrained(path, dtype=torch.float32).eval()
        ids = torch.randint(0, min(ours.vocab_size, full["vocab_size"]), (2, 40))
        with torch.no_grad():
            err = (mine(ids) - theirs(ids).logits).abs().max().item()
        assert err < 1e-4, (name, err)
        compared.append(name)
    assert {"max_position_embeddings", "rope_scaling", "torch_dtype", "attention_bias", "norm_topk_prob",
            "routed_scaling_factor", "rms_norm_eps", "tie_word_embeddings"} <= set(compared), compared
    assert len(checked) >= 25, checked


@pytest.mark.parametrize("rope", [{"rope_type": "default"}, {"type": "default"}])
def test_default_rope_scaling_is_plain_rope_both_ways(rope):
    # transformers' name for no scaling: read as plain RoPE (None), written back as the file had it
    raw = json.loads((CONFIG_DIR / "tiny.json").read_text())
    raw["rope_scaling"] = dict(rope)
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope_scaling is None and cfg.yarn() is None
    assert cfg.to_hf() == raw
    assert ModelConfig.from_hf(cfg.to_hf()).rope_scaling is None
    # a YaRN set later replaces it on the way out; unscaled again, null
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    assert cfg.replace(rope_scaling=yarn).to_hf()["rope_scaling"] == yarn
    # beside transformers 5's rope_parameters it agrees with no scaling, and contradicts YaRN
    t5 = {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_theta")}
    t5["rope_parameters"], t5["rope_scaling"] = {"rope_type": "default", "rope_theta": 10000.0}, dict(rope)
    back = ModelConfig.from_hf(t5)
    assert back.rope_scaling is None and back.to_hf() == t5
    t5["rope_parameters"] = {**yarn, "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="contradicts"):
        ModelConfig.from_hf(t5)
