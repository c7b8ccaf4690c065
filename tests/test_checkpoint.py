"""HF-format checkpoints: round trips, the released FP8 block format, and every way a checkpoint can be wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import CheckpointError
from dsv3.checkpoint import hf as hf_ckpt
from dsv3.fp8 import dequantize_blocks, quantize_blocks

from conftest import build, tiny_config


def _logits_and_mtp(model, ids):
    with torch.no_grad():
        h = model.hidden_states(ids)
        return model.lm_head(h), model.mtp_logits(h, ids)


def test_sharded_round_trip_keeps_everything(tmp_ckpt):
    model = build(tiny_config())
    dsv3.save_pretrained(model, tmp_ckpt, max_shard_size="40KB")
    index = json.loads((tmp_ckpt / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((tmp_ckpt / f).exists() for f in files)
    n = model.config.num_hidden_layers
    for name in ("model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                 f"model.layers.{n}.eh_proj.weight", f"model.layers.{n}.embed_tokens.weight",
                 f"model.layers.{n}.shared_head.head.weight", f"model.layers.{n}.mlp.experts.0.gate_proj.weight"):
        assert name in index["weight_map"]
    back = dsv3.load_pretrained(tmp_ckpt, dtype=torch.float32)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    ids = torch.randint(0, 128, (2, 10))
    (l1, m1), (l2, m2) = _logits_and_mtp(model, ids), _logits_and_mtp(back, ids)
    assert torch.equal(l1, l2) and torch.equal(m1[0], m2[0])


def test_bf16_load_keeps_routing_bias_fp32(tmp_ckpt):
    dsv3.save_pretrained(build(tiny_config()), tmp_ckpt, dtype=torch.bfloat16)
    model = dsv3.load_pretrained(tmp_ckpt)   # default dtype: the checkpoint's torch_dtype
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_dequantisation_matches_float64_reference():
    torch.manual_seed(0)
    w = torch.randn(300, 200, dtype=torch.float64) * torch.logspace(-3, 1, 200, dtype=torch.float64)
    q, s = quantize_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    ref = torch.empty_like(w)
    for i in range(3):
        for j in range(2):
            blk = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            ref[blk] = q[blk].double() * s[i, j].double()
    assert torch.equal(dequantize_blocks(q, s, torch.float64), ref)
    # e4m3 keeps 3 mantissa bits: relative error per element <= 2^-4, and the block max is exact
    err = ((ref - w).abs() / w.abs().clamp(min=1e-30))[w.abs() > 1e-2 * w.abs().max()]
    assert err.max() <= 2 ** -4 + 1e-9
    with pytest.raises(ValueError, match="scale must be a float32 tensor of shape"):
        dequantize_blocks(q, s[:2])


def _fp8_model(aligned: bool = False):
    if aligned:
        # transformers' CPU dequantiser needs every FP8 weight to be a whole number of 128x128 blocks
        cfg = tiny_config(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128,
                          num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=64, qk_rope_head_dim=128,
                          kv_lora_rank=128, v_head_dim=64)
    else:
        # hidden 192 and kv_a rows 32+8=40: shapes that are not multiples of 128 (edge blocks, like V3's 576 rows)
        cfg = tiny_config(hidden_size=192, intermediate_size=320, moe_intermediate_size=160, q_lora_rank=136)
    return build(cfg, std=0.05)


def test_fp8_load_with_edge_blocks_matches_float64_dequantisation(tmp_ckpt):
    model = _fp8_model()
    dsv3.save_pretrained(model, tmp_ckpt, quantize_fp8=True)
    raw = load_file(str(tmp_ckpt / "model.safetensors"))
    assert raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    assert raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 2)
    assert raw["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"].shape == (2, 2)
    assert raw["model.layers.1.mlp.gate.weight"].dtype == torch.float32          # gate stays high precision
    assert raw["model.layers.3.eh_proj.weight"].dtype == torch.float32           # so does the MTP projection
    ours = dsv3.load_pretrained(tmp_ckpt, dtype=torch.float64)
    for hf_name, got in [("model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                          ours.layers[0].self_attn.kv_a_proj_with_mqa.weight),
                         ("model.layers.1.mlp.experts.3.up_proj.weight", ours.layers[1].mlp.experts.up_proj[3])]:
        q, s = raw[hf_name].double(), raw[hf_name + "_scale_inv"].double()
        ref = torch.empty_like(q)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                block = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
                ref[block] = q[block] * s[i, j]
        assert torch.equal(got, ref)
    ref_w = model.layers[0].self_attn.kv_a_proj_with_mqa.weight.double()
    assert 0 < ((ours.layers[0].self_attn.kv_a_proj_with_mqa.weight - ref_w).norm() / ref_w.norm()) < 0.05


_HF_FP8_LOGITS = """
import sys, warnings, torch, transformers
warnings.simplefilter("ignore")
hf = transformers.DeepseekV3ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, device_map="cpu").eval()
with torch.no_grad():
    torch.save(hf(torch.load(sys.argv[2])).logits.float(), sys.argv[3])
"""


def test_fp8_checkpoint_loads_same_in_dsv3_and_transformers(tmp_ckpt):
    """transformers' CPU dequantising loader is the oracle. It runs in a process that sees no GPU: on a CUDA machine
    transformers would instead fetch a Triton kernel from the Hub (the `kernels` package), which offline fails."""
    import os
    import subprocess
    import sys
    pytest.importorskip("accelerate", reason="needs the optional `hf` extra (CI pins it)")
    pytest.importorskip("transformers", reason="needs the optional `hf` extra (CI pins it)")
    model = _fp8_model(aligned=True)
    dsv3.save_pretrained(model, tmp_ckpt, quantize_fp8=True)
    assert json.loads((tmp_ckpt / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    ours = dsv3.load_pretrained(tmp_ckpt, dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 12))
    torch.save(ids, tmp_ckpt.parent / "ids.pt")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _HF_FP8_LOGITS, str(tmp_ckpt), str(tmp_ckpt.parent / "ids.pt"),
                           str(tmp_ckpt.parent / "hf.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        a = ours(ids)
    assert (a - torch.load(tmp_ckpt.parent / "hf.pt")).abs().max() < 1e-4


def test_convert_fp8_to_bf16_cli(tmp_path):
    from dsv3.cli import main
    model = _fp8_model()
    dsv3.save_pretrained(model, tmp_path / "fp8", quantize_fp8=True)
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "bf16"), "--to", "bf16"]) == 0
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    raw = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert not any(k.endswith("_scale_inv") for k in raw)
    a = dsv3.load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    b = dsv3.load_pretrained(tmp_path / "bf16", dtype=torch.float32)
    wa, wb = a.layers[1].mlp.experts.gate_proj, b.layers[1].mlp.experts.gate_proj
    assert torch.allclose(wa, wb, rtol=2 ** -8, atol=0)                             # bf16 rounding only


# ---- bad checkpoints --------------------------------------------------------------------------------------------

def _rewrite(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    idx["weight_map"] = {k: "model.safetensors" for k in tensors}
    index.write_text(json.dumps(idx))


@pytest.fixture
def saved(tmp_ckpt):
    dsv3.save_pretrained(build(tiny_config()), tmp_ckpt)
    return tmp_ckpt


def test_missing_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        dsv3.load_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.extra\.weight"):
        dsv3.load_pretrained(saved)


def test_misshaped_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.layers.1.self_attn.kv_b_proj.weight", torch.zeros(96, 31)))
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight has shape \(96, 31\).*expects \(128, 32\)"):
        dsv3.load_pretrained(saved)


def test_config_that_does_not_fit_the_weights(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["n_routed_experts"] = 16
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensors: .*experts\.1[0-5]\."):
        dsv3.load_pretrained(saved)


def test_partial_mtp_layer_is_an_error_but_absent_mtp_loads_with_warning(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.3.eh_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.eh_proj\.weight"):
        dsv3.load_pretrained(saved)
    _rewrite(saved, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.3.")])
    with pytest.warns(UserWarning, match="no MTP tensors"):
        model = dsv3.load_pretrained(saved)
    assert len(model.mtp) == 0 and model.config.num_nextn_predict_layers == 0


def test_fp8_scale_problems_are_named(tmp_ckpt):
    dsv3.save_pretrained(_fp8_model(), tmp_ckpt, quantize_fp8=True)
    _rewrite(tmp_ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight_scale_inv", torch.ones(5, 5)))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight: scale_inv shape \(5, 5\)"):
        dsv3.load_pretrained(tmp_ckpt)
    _rewrite(tmp_ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.nothing.weight_scale_inv", torch.ones(1)))
    with pytest.raises(CheckpointError, match=r"scales without a weight: .*nothing"):
        dsv3.load_pretrained(tmp_ckpt)


def test_missing_and_corrupt_shards(tmp_ckpt):
    dsv3.save_pretrained(build(tiny_config()), tmp_ckpt, max_shard_size="100KB")
    shards = sorted(tmp_ckpt.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shards[1].name):
        dsv3.load_pretrained(tmp_ckpt)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"missing: {shards[1].name}"):
        dsv3.load_pretrained(tmp_ckpt)
    (tmp_ckpt / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="neither"):
        dsv3.load_pretrained(tmp_ckpt)


def test_killed_save_leaves_no_loadable_directory(tmp_path, monkeypatch):
    model = build(tiny_config())
    target = tmp_path / "ckpt"
    calls = []

    def dying_save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed mid-save")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_ckpt, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        dsv3.save_pretrained(model, target, max_shard_size="40KB")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    # over an existing checkpoint: the old one stays intact
    monkeypatch.setattr(hf_ckpt, "save_file", save_file)
    dsv3.save_pretrained(model, target, max_shard_size="40KB")
    before = sorted((p.name, p.read_bytes()) for p in target.iterdir())
    calls.clear()
    monkeypatch.setattr(hf_ckpt, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        dsv3.save_pretrained(build(tiny_config(), seed=1), target, max_shard_size="40KB")
    assert sorted((p.name, p.read_bytes()) for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_convert_bf16_to_fp8_and_back_streams_shards(tmp_path):
    from dsv3.cli import main
    model = _fp8_model()
    dsv3.save_pretrained(model, tmp_path / "bf16", max_shard_size="300KB")
    n_shards = len(list((tmp_path / "bf16").glob("model-*.safetensors")))
    assert n_shards > 1
    assert main(["convert", str(tmp_path / "bf16"), str(tmp_path / "fp8"), "--to", "fp8", "--dtype", "float32"]) == 0
    assert len(list((tmp_path / "fp8").glob("model-*.safetensors"))) == n_shards
    direct = tmp_path / "direct"
    dsv3.save_pretrained(model, direct, quantize_fp8=True)
    a = dsv3.load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    b = dsv3.load_pretrained(direct, dtype=torch.float32)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    index = tmp_path / "bf16" / "model.safetensors.index.json"   # a tensor the config needs goes missing
    idx = json.loads(index.read_text())
    idx["weight_map"].pop("model.layers.0.mlp.up_proj.weight")
    index.write_text(json.dumps(idx))
    assert main(["convert", str(tmp_path / "bf16"), str(tmp_path / "bad"), "--to", "fp8"]) == 2
    assert not (tmp_path / "bad").exists()
