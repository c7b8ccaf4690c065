"""Logits parity with transformers' DeepseekV3ForCausalLM on the same random weights, both directions (fp32)."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the optional `hf` extra (CI pins it)")
from transformers import DeepseekV3ForCausalLM

import dsv3

from conftest import build, tiny_config

TOL = 1e-4
CONFIGS = {
    "q_lora+groups+dense+yarn": dict(),
    "no_q_lora+no_groups+no_yarn": dict(q_lora_rank=None, n_group=1, topk_group=1, rope_scaling=None),
    "all_moe+topk_group1": dict(first_k_dense_replace=0, n_group=4, topk_group=1, num_experts_per_tok=2),
    "deeper_dense+3_shared": dict(first_k_dense_replace=2, n_shared_experts=3, num_hidden_layers=4,
                                  num_experts_per_tok=3, norm_topk_prob=False, routed_scaling_factor=1.0),
}


def _hf_model(cfg: dsv3.ModelConfig, family: str = "V3"):
    hf_cfg = getattr(transformers, f"Deepseek{family}Config")(**cfg.to_hf())
    torch.manual_seed(0)
    m = getattr(transformers, f"Deepseek{family}ForCausalLM")(hf_cfg).float().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.8, 1.2)
    return m


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_saves_dsv3_loads(name, tmp_path):
    cfg = tiny_config(num_nextn_predict_layers=0, **CONFIGS[name])
    hf = _hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = dsv3.load_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ours(ids) - ref).abs().max() < TOL
        assert (ours(ids, absorb=True) - ref).abs().max() < TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_dsv3_saves_hf_loads(name, tmp_path):
    cfg = tiny_config(**CONFIGS[name])               # with the MTP layer, which HF skips
    ours = build(cfg)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
    dsv3.save_pretrained(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < TOL


def test_yarn_at_long_positions_matches_hf(tmp_path):
    """A 4,600-token sequence: relative distances beyond original_max_position_embeddings (4096), where YaRN's
    interpolated frequencies and the mscale^2 softmax factor decide the result."""
    cfg = tiny_config(num_nextn_predict_layers=0, num_hidden_layers=2)
    assert cfg.yarn()["factor"] == 4.0
    hf = _hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = dsv3.load_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 4600))
    with torch.no_grad():
        ref = hf(ids, logits_to_keep=64).logits
        cache = dsv3.model.LatentCache(cfg, 1, 4600, dtype=torch.float32)
        ours(ids[:, :4536], 0, cache)                 # prefill, then the last 64 through the absorbed form
        out = ours(ids[:, 4536:], 4536, cache, absorb=True)
    assert (out - ref).abs().max() < TOL
    # the same weights without YaRN give visibly different logits: the test exercises the scaling
    plain = dsv3.Transformer(cfg.replace(rope_scaling=None)).eval()
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (plain(ids[:, -200:]) - ours(ids[:, -200:])).abs().max() > 1e-3


V2_ROUTING = {"greedy": dict(n_group=1, topk_group=1), "group_limited_greedy": dict(n_group=4, topk_group=2)}


@pytest.mark.parametrize("method", V2_ROUTING)
def test_deepseek_v2_family_matches_hf(method, tmp_path):
    """V2-family checkpoints: softmax scores, no selection bias, greedy or group-max-limited top-k, YaRN mscale
    0.707."""
    cfg = tiny_config(model_type="deepseek_v2", topk_method=method, scoring_func="softmax", norm_topk_prob=False,
                      routed_scaling_factor=1.0, num_nextn_predict_layers=0, num_experts_per_tok=3,
                      rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=4096, beta_fast=32,
                                        beta_slow=1, mscale=0.707, mscale_all_dim=0.707), **V2_ROUTING[method])
    hf = _hf_model(cfg, "V2")
    hf.save_pretrained(tmp_path)
    ours = dsv3.load_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        ref = hf(ids).logits
        assert ref.abs().max() > 0.1
        assert (ours(ids) - ref).abs().max() < TOL
        # the routing rule matters: V3's sigmoid + top-2-sum grouping on the same weights gives other logits
        v3 = dsv3.Transformer(cfg.replace(model_type="deepseek_v3", scoring_func="sigmoid",
                                          topk_method="noaux_tc")).eval()
        v3.load_state_dict(ours.state_dict(), strict=False)
        assert (v3(ids) - ref).abs().max() > 1e-3


def _saved_v2(raw: dict, path):
    """transformers' DeepseekV2 built from the config.json keys `raw` (its own defaults for the rest), weights
    N(0, 0.3), saved to `path`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        hf = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**raw)).float().eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.3)
        hf.save_pretrained(path)
    return hf


def test_a_deepseek_v2_file_without_scoring_func_reads_as_transformers_reads_it(tmp_path):
    """transformers' DeepseekV2Config has no `scoring_func` (its router is always softmax), so the config.json it
    writes has none: the absent key must read as softmax for a deepseek_v2 file, not V3's sigmoid (before: sigmoid
    routing weights, logits off by ~0.7). The file still round-trips exactly."""
    import json
    cfg = tiny_config(model_type="deepseek_v2", topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                      routed_scaling_factor=1.0, num_nextn_predict_layers=0, n_group=1, topk_group=1, rope_scaling=None)
    raw = {k: v for k, v in cfg.to_hf().items() if k not in ("scoring_func", "num_nextn_predict_layers")}
    hf = _saved_v2(raw, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "scoring_func" not in written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = dsv3.load_pretrained(tmp_path, dtype=torch.float32).eval()
    assert ours.config.scoring_func == "softmax"
    assert dsv3.ModelConfig.from_hf(written).to_hf() == written
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < TOL


def test_a_minimal_deepseek_v2_file_reads_with_transformers_v2_defaults(tmp_path):
    """A deepseek_v2 config.json that leaves out routed_scaling_factor, first_k_dense_replace, n_shared_experts and
    num_nextn_predict_layers: transformers reads them as DeepseekV2Config's defaults (1.0, 0, 2, no MTP). Before:
    V3's (2.5, 3, 1, 1) were read, so the file was refused for missing dense-layer tensors, and once those keys were
    present the logits were off by ~2.5 (the routed experts' output scaled 2.5x), silently."""
    import json
    raw = dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=128, hidden_size=64,
               intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=None,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, torch_dtype="float32")
    hf = _saved_v2(raw, tmp_path)
    ids = torch.randint(0, 128, (2, 20))
    for keys in (raw, {**raw, "first_k_dense_replace": 0, "n_shared_experts": 2}):
        (tmp_path / "config.json").write_text(json.dumps(keys))
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # no "has no MTP tensors" warning: V2 has no MTP module
            ours = dsv3.load_pretrained(tmp_path, dtype=torch.float32).eval()
        assert ours.config.routed_scaling_factor == 1.0 and ours.config.num_nextn_predict_layers == 0
        assert dsv3.ModelConfig.from_hf(keys).to_hf() == keys
        with torch.no_grad():
            assert (ours(ids) - hf(ids).logits).abs().max() < TOL
