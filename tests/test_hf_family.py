"""Real DeepSeek-V3-family checkpoints, shrunk: each release's config.json with exactly its keys and value types (sizes
cut down), weights laid out as the release has them (FP8 + `weight_scale_inv`, the MTP layer `model.layers.N.*`),
then: the config round-trips exactly, the directory loads (FP8 and bf16), and the logits equal transformers'
DeepseekV3ForCausalLM on the same weights (fp32). Keys that change the math and that dsv3 does not implement are
refused with one line naming the key.

Sources of the configs: DeepSeek-V3 / V3-0324 / R1 (configs/v3-671b.json, spec 2.1: the three ship the same keys),
V3.1 (the same plus `quantization_config.scale_fmt: "ue8m0"`), moonshotai/Moonlight-16B-A3B-Instruct and
moonshotai/Kimi-K2-Instruct (their config.json as published), and what transformers 5 writes itself
(`DeepseekV3Config(...).to_json_string()`: `rope_parameters`, `head_dim`, `qk_head_dim`, `rope_interleave`).
"""

import copy
import json
import warnings

import pytest
import torch

import dsv3
from dsv3 import CheckpointError, ConfigError, ModelConfig
from dsv3.checkpoint import convert_checkpoint
from dsv3.config import CONFIG_DIR

from conftest import build

transformers = pytest.importorskip("transformers", reason="needs the optional `hf` extra (CI pins it)")

_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
             "AutoModel": "modeling_deepseek.DeepseekV3Model",
             "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

V3 = json.loads((CONFIG_DIR / "v3-671b.json").read_text())
V3_1 = {**V3, "quantization_config": {**_FP8, "scale_fmt": "ue8m0"}, "transformers_version": "4.44.2"}
MOONLIGHT = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": _AUTO_MAP, "aux_loss_alpha": 0.001, "bos_token_id": 163584, "eos_token_id": 163586, "ep_size": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11264, "kv_lora_rank": 512, "max_position_embeddings": 8192, "model_type": "deepseek_v3",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": True, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "num_nextn_predict_layers": 0, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 50000.0,
    "routed_scaling_factor": 2.446, "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False,
    "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 163840}
KIMI_K2 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": _AUTO_MAP, "aux_loss_alpha": 0.001, "bos_token_id": 163584, "eos_token_id": 163585,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 131072, "model_type": "kimi_k2",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 384, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 64, "num_nextn_predict_layers": 0, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "quantization_config": _FP8, "rms_norm_eps": 1e-06,
    "rope_theta": 50000.0, "routed_scaling_factor": 2.827,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False, "topk_group": 1,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.48.3", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 163840}

# Tiny shapes, the release's value types; vocabularies divisible by nothing useful (509 is prime, 515 = 5 x 103)
_SHAPES = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=16)
SHRINK = {
    "v3": dict(_SHAPES, q_lora_rank=48, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
               first_k_dense_replace=1, vocab_size=509),
    "moonlight": dict(_SHAPES, n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, vocab_size=515,
                      bos_token_id=512, eos_token_id=514),
    "kimi_k2": dict(_SHAPES, q_lora_rank=48, n_routed_experts=12, num_experts_per_tok=3, first_k_dense_replace=1,
                    vocab_size=515, bos_token_id=512, eos_token_id=513),
}
FAMILIES = {"DeepSeek-V3": (V3, "v3"), "DeepSeek-V3-0324": (V3, "v3"), "DeepSeek-R1": (V3, "v3"),
            "DeepSeek-V3.1": (V3_1, "v3"), "Moonlight-16B-A3B": (MOONLIGHT, "moonlight"),
            "Kimi-K2": (KIMI_K2, "kimi_k2")}


def shrunk(name: str) -> dict:
    raw, shape = FAMILIES[name]
    return {**copy.deepcopy(raw), **SHRINK[shape]}


def transformers5(**kw) -> dict:
    """The config.json transformers 5 itself writes for a DeepSeek-V3 model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return json.loads(transformers.DeepseekV3Config(**kw).to_json_string())


def write_release(raw: dict, path, seed: int = 0):
    """A checkpoint directory laid out as the release is (FP8 where it says so, the MTP layer where it has one), with
    `raw` verbatim as its config.json. Returns the model whose weights were written."""
    cfg = ModelConfig.from_hf(raw)
    model = build(cfg, seed=seed, std=0.05)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
    dsv3.save_pretrained(model, path, quantize_fp8="quantization_config" in raw, dtype=torch.bfloat16,
                         max_shard_size="100KB")
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return model


def hf_logits(path, raw: dict, ids: torch.Tensor) -> torch.Tensor:
    """transformers' DeepseekV3ForCausalLM on a bf16/fp32 directory, computing in fp32 (model_type kimi_k2 is a
    DeepseekV3 architecture too: its config is passed as a DeepseekV3Config)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the directory is dequantised: without the release's quantization_config (on a GPU, transformers would
        # otherwise build FP8 layers for it and refuse the fp32 cast below)
        hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in copy.deepcopy(raw).items()
                                                  if k not in ("model_type", "quantization_config")})
        m = transformers.DeepseekV3ForCausalLM.from_pretrained(path, config=hf_cfg, dtype=torch.float32)
    m = m.float().eval()    # transformers 5 keeps its fused experts in the file's dtype whatever `dtype` says
    with torch.no_grad():
        return m(ids).logits


# ---------------------------------------------------------------------------------------------------------------
# config.json: read, round trip
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_release_config_round_trips_exactly(name):
    raw = FAMILIES[name][0]
    cfg = ModelConfig.from_hf(copy.deepcopy(raw))
    assert cfg.to_hf() == raw
    assert json.dumps(cfg.to_hf(), sort_keys=True) == json.dumps(raw, sort_keys=True)     # types too (1.0 vs 1)
    assert (cfg.vocab_size, cfg.eos_token_id, cfg.bos_token_id) == (raw["vocab_size"], raw["eos_token_id"],
                                                                     raw["bos_token_id"])
    assert cfg.num_nextn_predict_layers == raw["num_nextn_predict_layers"]


def test_transformers5_config_round_trips_and_reads_as_transformers_does():
    raw = transformers5(vocab_size=515, hidden_size=64, num_hidden_layers=2, first_k_dense_replace=1,
                        rope_theta=50000.0, dtype="bfloat16",
                        rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                      "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    assert "rope_parameters" in raw and "rope_scaling" not in raw and raw["rope_interleave"] is True
    cfg = ModelConfig.from_hf(raw)
    assert cfg.to_hf() == raw
    assert cfg.rope_theta == 50000.0 and cfg.yarn()["factor"] == 32.0 and cfg.yarn()["beta_fast"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# the release's directory loads (FP8 and bf16) and gives transformers' logits
# ---------------------------------------------------------------------------------------------------------------

TOL = 2e-5      # fp32 on both sides; the fp32 rounding of a 3-layer model is ~1e-6


@pytest.mark.parametrize("name", ["DeepSeek-V3", "DeepSeek-V3.1", "Moonlight-16B-A3B", "Kimi-K2"])
def test_release_checkpoint_loads_and_matches_transformers(name, tmp_path):
    """(DeepSeek-V3-0324 and R1 ship V3's config.json and tensor set: the V3 case is theirs.)"""
    raw = shrunk(name)
    src = tmp_path / "release"
    write_release(raw, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2                                       # sharded, as the releases are
    n = raw["num_hidden_layers"]
    assert any(k.startswith(f"model.layers.{n}.") for k in index) == (raw["num_nextn_predict_layers"] > 0)
    if raw["num_nextn_predict_layers"]:
        for part in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
            assert f"model.layers.{n}.{part}.weight" in index
    fp8 = "quantization_config" in raw
    assert any(k.endswith("weight_scale_inv") for k in index) == fp8
    ours = dsv3.load_pretrained(src, dtype=torch.float32).eval()
    assert len(ours.mtp) == raw["num_nextn_predict_layers"]
    assert ours.config.to_hf() == raw
    # the same weights dequantised exactly into an fp32 directory: what transformers reads
    full = tmp_path / "fp32"
    convert_checkpoint(src, full, to="bf16", dtype=torch.float32)
    again = dsv3.load_pretrained(full, dtype=torch.float32)
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    ids = torch.randint(0, raw["vocab_size"], (2, 24))
    ids[0, :3] = torch.tensor([raw["vocab_size"] - 1, raw["bos_token_id"], raw["eos_token_id"]])
    with torch.no_grad():
        logits = ours(ids)
        assert (ours(ids, absorb=True) - logits).abs().max() < TOL
    ref = hf_logits(full, raw, ids)
    assert ref.abs().max() > 0.1 and (logits - ref).abs().max() < TOL
    # bf16 (dsv3 convert --to bf16): dsv3 and transformers read the same bf16 directory alike
    bf16 = tmp_path / "bf16"
    convert_checkpoint(src, bf16, to="bf16")
    assert json.loads((bf16 / "config.json").read_text()) == {k: v for k, v in raw.items()
                                                              if k != "quantization_config"}
    mine = dsv3.load_pretrained(bf16, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (mine(ids) - hf_logits(bf16, raw, ids)).abs().max() < TOL
    assert dsv3.load_pretrained(bf16).embed_tokens.weight.dtype == torch.bfloat16     # torch_dtype honoured


# ---------------------------------------------------------------------------------------------------------------
# keys that change the math and that dsv3 does not implement: refused, one line, naming the key
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, key", [
    # every release unties the head; dsv3's lm_head is its own matrix (spec 1.1), so a tied file would be read wrong
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    # transformers 5's switch to NeoX half-split RoPE; DeepSeek's (and dsv3's) pairs are interleaved
    ({"rope_interleave": False}, "rope_interleave"),
    # transformers 5 reads `dtype` over `torch_dtype`, transformers 4 the other way: two answers, no guess
    ({"dtype": "float32"}, "dtype"),
    # dropout on the attention probabilities changes fine-tuning; dsv3's attention has none
    ({"attention_dropout": 0.1}, "attention_dropout"),
])
def test_unimplemented_math_is_refused_naming_the_key(change, key, tmp_path):
    raw = {**shrunk("DeepSeek-V3"), **change}
    with pytest.raises(ConfigError, match=key) as e:
        ModelConfig.from_hf(raw)
    assert "\n" not in str(e.value)
    # and by every command that reads a directory (load, convert), before any tensor is read
    write_release(shrunk("DeepSeek-V3"), tmp_path / "src")
    (tmp_path / "src" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=key):
        dsv3.load_pretrained(tmp_path / "src")
    with pytest.raises(ConfigError, match=key):
        convert_checkpoint(tmp_path / "src", tmp_path / "out", to="bf16")
    assert not (tmp_path / "out").exists()


def test_tied_head_is_refused_in_every_config_path(tmp_path):
    """A tied config was accepted and its head silently left untied: the logits came from a head transformers never
    uses (or, with lm_head.weight absent, from a 'missing tensor' error that blames the checkpoint)."""
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        ModelConfig(tie_word_embeddings=True)
    (tmp_path / "m.toml").write_text('[model]\npreset = "tiny"\ntie_word_embeddings = true\n')
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        dsv3.load_model_config(tmp_path / "m.toml")
    assert ModelConfig.from_hf(shrunk("DeepSeek-V3")).tie_word_embeddings is False


def test_transformers5_directory_converts_with_one_dtype_answer(tmp_path):
    """A directory transformers 5 saved states its dtype as `dtype`: dsv3 convert / export must rewrite that key, not
    add a `torch_dtype` beside a stale `dtype` (transformers 5 would read the stale one; dsv3 refuses the pair)."""
    raw = transformers5(vocab_size=509, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, kv_lora_rank=32,
                        q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**copy.deepcopy(raw))).float()
        hf.save_pretrained(tmp_path / "t5")
    written = json.loads((tmp_path / "t5" / "config.json").read_text())
    assert written["dtype"] == "float32" and "torch_dtype" not in written
    ours = dsv3.load_pretrained(tmp_path / "t5")
    assert ours.embed_tokens.weight.dtype == torch.float32
    for to in ("bf16", "fp8"):
        convert_checkpoint(tmp_path / "t5", tmp_path / to, to=to)
        out = json.loads((tmp_path / to / "config.json").read_text())
        assert out["dtype"] == "bfloat16" and "torch_dtype" not in out, out
        assert dsv3.load_pretrained(tmp_path / to).embed_tokens.weight.dtype == torch.bfloat16
        assert ModelConfig.from_hf(out).to_hf() == out


# ---------------------------------------------------------------------------------------------------------------
# the keys real files vary: each variant round-trips and gives transformers' logits
# ---------------------------------------------------------------------------------------------------------------

_YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
         "original_max_position_embeddings": 4096, "type": "yarn"}
VARIANTS = {
    "eos list, no bos": dict(eos_token_id=[514, 513, 1], bos_token_id=None),
    "yarn, mscale != mscale_all_dim": dict(rope_scaling={**_YARN, "mscale": 0.707, "mscale_all_dim": 1.0}),
    "yarn, rope_type key, float factor": dict(rope_scaling={"rope_type": "yarn", "factor": 8.0, "beta_fast": 16,
                                                            "beta_slow": 2, "original_max_position_embeddings": 2048}),
    "yarn, no mscale keys": dict(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096}),
    "all layers MoE": dict(first_k_dense_replace=0),
    "all layers dense": dict(first_k_dense_replace=3),
    "integer rope_theta, no yarn": dict(rope_theta=10000),
    # the latent norms (q_a / kv_a_layernorm) keep eps 1e-6 whatever rms_norm_eps says: transformers, DeepSeek's and
    # Moonshot's released modeling code; Moonlight's 1e-5 showed it, a large eps shows it plainly
    "rms_norm_eps 1e-2, q_lora": dict(rms_norm_eps=1e-2, q_lora_rank=48),
    "attention_bias, q_lora": dict(attention_bias=True, q_lora_rank=48),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_variants_match_transformers(variant, tmp_path):
    raw = {**shrunk("Moonlight-16B-A3B"), **VARIANTS[variant]}
    raw = {k: v for k, v in raw.items() if v is not None}
    assert ModelConfig.from_hf(raw).to_hf() == raw
    write_release(raw, tmp_path)
    ours = dsv3.load_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, raw["vocab_size"], (2, 40))
    with torch.no_grad():
        assert (ours(ids) - hf_logits(tmp_path, raw, ids)).abs().max() < TOL


def test_mixed_dtypes_in_one_checkpoint_load_as_asked(tmp_path):
    """Files mix dtypes (fp32 norms and routing bias, bf16 or fp16 matrices): each tensor is read as written and cast
    once to the dtype asked for (default: the config's torch_dtype)."""
    from safetensors.torch import load_file, save_file
    raw = shrunk("Moonlight-16B-A3B")
    write_release(raw, tmp_path)
    for f in tmp_path.glob("model-*.safetensors"):
        tensors = load_file(str(f))
        for i, k in enumerate(sorted(tensors)):
            tensors[k] = tensors[k].to((torch.float32, torch.float16, torch.bfloat16)[i % 3])
        save_file(tensors, str(f), metadata={"format": "pt"})
    ours = dsv3.load_pretrained(tmp_path, dtype=torch.float32).eval()
    assert dsv3.load_pretrained(tmp_path).embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, raw["vocab_size"], (2, 16))
    with torch.no_grad():
        assert (ours(ids) - hf_logits(tmp_path, raw, ids)).abs().max() < TOL


def test_a_missing_or_wrong_shard_of_the_index_is_named(tmp_path):
    raw = shrunk("DeepSeek-V3")
    write_release(raw, tmp_path / "src")
    index_file = tmp_path / "src" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    (tmp_path / "src" / shards[1]).rename(tmp_path / "elsewhere.safetensors")
    for read in (dsv3.load_pretrained, lambda p: convert_checkpoint(p, tmp_path / "out", to="bf16")):
        with pytest.raises(CheckpointError, match=f"missing: {shards[1]}"):
            read(tmp_path / "src")
    (tmp_path / "elsewhere.safetensors").rename(tmp_path / "src" / shards[1])
    # the index sends a tensor to a shard that does not hold it
    name = next(k for k, f in index["weight_map"].items() if f == shards[0] and k.endswith("kv_b_proj.weight"))
    index["weight_map"][name] = shards[1]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{name}.*{shards[1]}"):
        dsv3.load_pretrained(tmp_path / "src")
    assert not (tmp_path / "out").exists()


def test_kimi_k2_rotary_inv_freq_buffers_are_not_weights(tmp_path):
    """Kimi-K2-Instruct's shards hold `model.layers.N.self_attn.rotary_emb.inv_freq` for its 61 layers (139,644
    tensors = the model's 139,583 + 61): a buffer older transformers saved, recomputed from the config by every
    reader (the remote code, transformers, vLLM). dsv3 refused the checkpoint for them."""
    from safetensors.torch import load_file, save_file
    raw = shrunk("Kimi-K2")
    write_release(raw, tmp_path / "src")
    want = dsv3.load_pretrained(tmp_path / "src", dtype=torch.float32)
    index_file = tmp_path / "src" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(tmp_path / "src" / shard))
    for i in range(raw["num_hidden_layers"]):
        name = f"model.layers.{i}.self_attn.rotary_emb.inv_freq"
        tensors[name] = torch.rand(56).to(torch.bfloat16)        # the shape and dtype the release lists
        index["weight_map"][name] = shard
    save_file(tensors, str(tmp_path / "src" / shard), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    got = dsv3.load_pretrained(tmp_path / "src", dtype=torch.float32)
    for (k, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), k
    convert_checkpoint(tmp_path / "src", tmp_path / "bf16", to="bf16")     # carried through as the source has it
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in json.loads(
        (tmp_path / "bf16" / "model.safetensors.index.json").read_text())["weight_map"]
    # any other stray tensor is still named
    tensors["model.layers.0.self_attn.rotary_emb.cos_cached"] = torch.zeros(4)
    save_file(tensors, str(tmp_path / "src" / shard), metadata={"format": "pt"})
    index["weight_map"]["model.layers.0.self_attn.rotary_emb.cos_cached"] = shard
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected tensors: model.layers.0.self_attn.rotary_emb.cos_cached"):
        dsv3.load_pretrained(tmp_path / "src")


# ---------------------------------------------------------------------------------------------------------------
# the commands on a release directory: dsv3 generate, and a run's train.init_from source
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, spec", [("DeepSeek-V3", "1"), ("Kimi-K2", "0")])
def test_generate_runs_on_a_release_directory(name, spec, tmp_path, capsys):
    """`dsv3 generate --model DIR` on the FP8 release layout, with the MTP layer speculating where there is one; the
    greedy text is the reference's (full forwards, no cache) from the same directory, the prompt after BOS."""
    from dsv3.cli import main
    from dsv3.data import Tokenizer, train_tokenizer
    from posttrain_fixture import TEXTS
    from conftest import reference_greedy
    raw = shrunk(name)
    write_release(raw, tmp_path)
    train_tokenizer(TEXTS, vocab_size=300).save(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"          # a release's tokenizer_config.json: add_bos_token only
    cfg = json.loads(cfg_path.read_text())
    del cfg["dsv3_document_start"]
    cfg_path.write_text(json.dumps(cfg))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "the quick", "--max-tokens", "6",
                 "--temperature", "0", "--spec", spec, "--device", "cpu"]) == 0   # the fp32 CPU reference's
    out = capsys.readouterr().out
    tok = Tokenizer.load(tmp_path)
    model = dsv3.load_pretrained(tmp_path, dtype=torch.float32).eval()
    # a release's tokenizer_config.json says add_bos_token: its documents start with BOS (dsv3 generate --prefix auto)
    want = reference_greedy(model, [tok.bos_id] + tok.encode("the quick"), 6)
    assert out == "the quick" + tok.decode(want) + "\n"


def test_a_release_directory_is_a_train_init_from_source(tmp_path):
    """train.init_from / model.preset pointing at a release directory (Kimi-K2: FP8, model_type kimi_k2, no MTP):
    the run's model is the directory's and its weights are the dequantised checkpoint."""
    from dsv3.config import load_model_config
    from dsv3.train.init_from import check_extension, find_source, source_tensors
    raw = shrunk("Kimi-K2")
    write_release(raw, tmp_path)
    model = load_model_config(tmp_path)
    assert model.to_hf() == raw
    source = find_source(tmp_path)
    check_extension(model, 64, source)
    weights = source_tensors(source)
    with torch.device("meta"):
        want = dsv3.Transformer(model).state_dict()
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert torch.equal(weights["layers.1.mlp.experts.gate_proj"],
                       dsv3.load_pretrained(tmp_path, dtype=torch.float32).layers[1].mlp.experts.gate_proj)


def test_transformers5_rope_parameters_beside_a_top_level_rope_theta():
    """What transformers 5.7 wrote re-saving Kimi-K2 (a public dump of its DeepseekV3Config): `rope_parameters` with
    rope_theta inside, and rope_theta at the top level too. Both are kept (exact round trip); two different values
    are refused (transformers 5 reads the one inside)."""
    raw = {k: v for k, v in shrunk("Kimi-K2").items() if k not in ("rope_scaling", "model_type")}
    raw.update(model_type="deepseek_v3", dtype="bfloat16", rope_theta=50000.0, transformers_version="5.7.0",
               rope_parameters={"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
                                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                "rope_theta": 50000.0, "rope_type": "yarn", "type": "yarn"})
    del raw["torch_dtype"]
    cfg = ModelConfig.from_hf(raw)
    assert cfg.to_hf() == raw and cfg.rope_theta == 50000.0 and cfg.yarn()["factor"] == 32.0
    with pytest.raises(ConfigError, match="rope_theta"):
        ModelConfig.from_hf({**raw, "rope_theta": 10000.0})
    # a rope_scaling kept beside rope_parameters: kept too, and refused when it says something else
    both = {**raw, "rope_scaling": {k: v for k, v in raw["rope_parameters"].items() if k != "rope_theta"}}
    assert ModelConfig.from_hf(both).to_hf() == both
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig.from_hf({**both, "rope_scaling": {**both["rope_scaling"], "factor": 40.0}})


def test_moonlight_without_num_nextn_predict_layers_loads_without_mtp(tmp_path):
    """A config that leaves num_nextn_predict_layers out reads it as transformers does (1); a checkpoint with no MTP
    tensor at all then loads, converts and round-trips without one (a warning says so), as transformers reads it."""
    raw = shrunk("Moonlight-16B-A3B")
    write_release(raw, tmp_path / "src")
    del raw["num_nextn_predict_layers"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="no MTP tensors"):
        ours = dsv3.load_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    assert len(ours.mtp) == 0
    with pytest.warns(UserWarning, match="no MTP tensors"):
        convert_checkpoint(tmp_path / "src", tmp_path / "fp8", to="fp8")
    assert json.loads((tmp_path / "fp8" / "config.json").read_text()) == {**raw, "quantization_config": _FP8}
    ids = torch.randint(0, raw["vocab_size"], (2, 16))
    with torch.no_grad():
        assert (ours(ids) - hf_logits(tmp_path / "src", raw, ids)).abs().max() < TOL


def test_refusals_are_one_line_from_the_commands(tmp_path, capsys):
    from dsv3.cli import main
    from dsv3.data import train_tokenizer
    from posttrain_fixture import TEXTS
    raw = {**shrunk("DeepSeek-V3"), "rope_interleave": False}
    write_release(shrunk("DeepSeek-V3"), tmp_path / "src")
    train_tokenizer(TEXTS, vocab_size=300).save(tmp_path / "src")
    (tmp_path / "src" / "config.json").write_text(json.dumps(raw))
    for argv in (["convert", str(tmp_path / "src"), str(tmp_path / "out")],
                 ["generate", "--model", str(tmp_path / "src"), "--prompt", "x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "rope_interleave" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# DeepSeek-V3.1's power-of-two (ue8m0) block scales survive re-quantisation
# ---------------------------------------------------------------------------------------------------------------

def _ue8m0_release(tmp_path):
    """V3.1's layout: every FP8 weight's block scale a power of two (quantization_config.scale_fmt "ue8m0"),
    re-quantised here by the test itself so the checkpoint does not depend on the code under test."""
    from safetensors.torch import load_file, save_file
    from dsv3.fp8 import dequantize_blocks, quantize_blocks
    raw = shrunk("DeepSeek-V3.1")
    write_release(raw, tmp_path)
    for f in tmp_path.glob("model-*.safetensors"):
        t = load_file(str(f))
        for k in [k for k in t if k.endswith("_scale_inv")]:
            w = k[: -len("_scale_inv")]
            t[w], t[k] = quantize_blocks(dequantize_blocks(t[w], t[k]), pow2=True)
            assert torch.equal(t[k], torch.exp2(torch.log2(t[k]).round()))
        save_file(t, str(f), metadata={"format": "pt"})
    return raw


def test_ue8m0_scales_survive_convert_to_fp8_and_serving_in_fp8(tmp_path):
    """Re-quantising V3.1's weights with amax/448 scales moved ~85% of them to other e4m3 codes (up to 28%
    relative): `dsv3 convert --to fp8` and `serve --fp8` served other weights than the release. With scale_fmt ue8m0
    the scales are rounded up to powers of two, which gives back the released codes exactly."""
    from dsv3.infer.fp8_weights import quantize_weights
    raw = _ue8m0_release(tmp_path / "src")
    release = dsv3.load_pretrained(tmp_path / "src", dtype=torch.float32)
    convert_checkpoint(tmp_path / "src", tmp_path / "again", to="fp8")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == raw           # scale_fmt kept
    again = dsv3.load_pretrained(tmp_path / "again", dtype=torch.float32)
    for (k, a), b in zip(release.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    served = quantize_weights(dsv3.load_pretrained(tmp_path / "src", dtype=torch.bfloat16))
    for mod, ref in ((served.layers[0].self_attn.q_a_proj, release.layers[0].self_attn.q_a_proj.weight),
                     (served.layers[0].mlp.down_proj, release.layers[0].mlp.down_proj.weight)):
        from dsv3.fp8 import dequantize_blocks
        assert torch.equal(dequantize_blocks(mod.weight, mod.weight_scale_inv, torch.float32), ref)
    experts = served.layers[1].mlp.experts
    assert torch.equal(dequantize_blocks(experts.up_proj[3], experts.up_proj_scale_inv[3], torch.float32),
                       release.layers[1].mlp.experts.up_proj[3])
    # another scale format is refused naming the key, not read as if it were one of these
    bad = {**raw, "quantization_config": {**raw["quantization_config"], "scale_fmt": "e5m2"}}
    (tmp_path / "src" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="quantization_config.scale_fmt='e5m2'"):
        dsv3.load_pretrained(tmp_path / "src")
