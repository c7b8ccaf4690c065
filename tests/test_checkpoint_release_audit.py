"""HF checkpoint conversion and loading against a release directory as it is downloaded: the model card's `figures/`,
the release's `inference/` code, `.cache/huggingface/` (what `hf download --local-dir` writes), a git clone's `.git/`;
and tensors damaged in ways only their header shows. Before: `dsv3 convert` copied only the top level (the README's
figures and the inference code vanished without a word); a tensor of the wrong shape was converted as it was (the
error came at the next load, naming no file); an integer tensor was cast into a float weight silently by load,
convert and the rank-by-rank reader."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import CheckpointError
from dsv3.cli import main

from conftest import build, tiny_config


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """An FP8 release, sharded with its index, with the files around the weights that real releases ship."""
    path = tmp_path_factory.mktemp("release") / "DeepSeek-V3"
    dsv3.save_pretrained(build(tiny_config()), path, quantize_fp8=True, dtype=torch.bfloat16, max_shard_size="100KB")
    files = {"README.md": "![](figures/benchmark.png)", "LICENSE-MODEL": "license", ".gitattributes": "*.st lfs",
             "tokenizer.json": "{}", "tokenizer_config.json": "{}", "generation_config.json": '{"temperature": 0.6}',
             "figures/benchmark.png": "png", "inference/model.py": "# code", "inference/requirements.txt": "torch",
             "inference/configs/config_671B.json": '{"dim": 7168}',
             # left out: tools' state, and weights the index does not list
             ".cache/huggingface/download/model-00001-of-00004.safetensors.metadata": "etag",
             ".git/lfs/objects/ab/cd/abcd": "the weights again", "pytorch_model.bin": "stale",
             "original/consolidated.00.pth": "stale"}
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def files_of(path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_convert_copies_the_release_subdirectories_and_names_what_it_leaves_out(release, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["convert", str(release), str(out), "--to", "bf16"]) == 0
    src, dst = files_of(release), files_of(out)
    index = json.loads((release / "model.safetensors.index.json").read_text())["weight_map"]
    left_out = {n for n in src if n.startswith((".cache/", ".git/")) or n.endswith((".bin", ".pth"))}
    weights = {"config.json", "model.safetensors.index.json", *index.values()}
    assert {n: b for n, b in src.items() if n not in left_out | weights} == \
        {n: b for n, b in dst.items() if n not in weights}
    assert not left_out & dst.keys()
    said = capsys.readouterr().out.splitlines()[-1]
    assert said.endswith(": .cache/, .git/, original/consolidated.00.pth, pytorch_model.bin"), said
    dsv3.load_pretrained(out)


def _damage(src, dst, name, change):
    """A copy of `src` with tensor `name` replaced by change(it), in its own shard; that shard's path."""
    shutil.copytree(src, dst)
    file = dst / json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(file))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


@pytest.fixture(scope="module")
def bf16(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "model"
    dsv3.checkpoint.convert_checkpoint(release, out, to="bf16")
    return out


@pytest.mark.parametrize("name, change, says", [
    ("model.layers.1.mlp.experts.3.down_proj.weight", lambda t: t[:, :-1].contiguous(),
     "has shape (64, 31), the config expects (64, 32)"),
    ("model.layers.0.input_layernorm.weight", lambda t: t[:-1].contiguous(),
     "has shape (63,), the config expects (64,)"),
    ("model.norm.weight", lambda t: t.to(torch.int32), "is int32, not a floating-point weight"),
    ("model.layers.1.mlp.gate.e_score_correction_bias", lambda t: t.to(torch.int64),
     "is int64, not a floating-point weight"),
])
def test_a_misshaped_or_integer_tensor_is_one_line_naming_tensor_and_file(bf16, tmp_path, capsys, name, change, says):
    file = _damage(bf16, tmp_path / "src", name, change)
    for to in ("fp8", "bf16"):
        assert main(["convert", str(tmp_path / "src"), str(tmp_path / to), "--to", to]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and name in err and str(file) in err and says in err, err
        assert not (tmp_path / to).exists()
    from dsv3.train.hf_shards import load_hf_owned
    with torch.device("meta"):
        model = dsv3.Transformer(tiny_config())
    for load in (lambda: dsv3.load_pretrained(tmp_path / "src"),           # and train.init_from's reader, rank by rank
                 lambda: load_hf_owned([model.to_empty(device="cpu")], tmp_path / "src", tiny_config())):
        with pytest.raises(CheckpointError) as e:
            load()
        assert name in str(e.value) and str(file) in str(e.value) and says in str(e.value), e.value


TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_chat_template_saved_as_its_own_file_is_the_models(bf16, tmp_path):
    """transformers' save_pretrained writes the chat template to chat_template.jinja and leaves it out of
    tokenizer_config.json (a fine-tuned DeepSeek-V3 saved with it is such a directory), and reads it from there
    first. Before: serve, generate --chat, eval --chat and post-training read tokenizer_config.json only, so such a
    model was prompted in the built-in DeepSeek template, silently."""
    transformers = pytest.importorskip("transformers", reason="needs the optional `hf` extra (CI pins it)")
    from dsv3.data import ChatTemplate, train_tokenizer
    from dsv3.posttrain.base import chat_template_of, load_base     # what serve / generate / eval / sft read
    d = tmp_path / "finetuned"
    shutil.copytree(bf16, d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    train_tokenizer(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=300, out_dir=tmp_path / "tok")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    assert (d / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((d / "tokenizer_config.json").read_text())
    assert chat_template_of(d) == TEMPLATE and load_base(d).template == TEMPLATE
    messages = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "jumps"},
                {"role": "user", "content": "the dog"}]
    assert ChatTemplate(chat_template_of(d)).render(messages) == \
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # named templates in tokenizer_config.json (the older form of several): the default one, as transformers takes it
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": TEMPLATE}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert chat_template_of(d) == TEMPLATE


# ---------------------------------------------------------------------------------------------------------------
# DeepSeek-V2-Lite and V2.5 as released: their config.json keys, checked against transformers' DeepseekV2
# ---------------------------------------------------------------------------------------------------------------

_V2_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                "AutoModel": "modeling_deepseek.DeepseekV2Model",
                "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}
_V2_YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096, "type": "yarn"}
# deepseek-ai/DeepSeek-V2-Lite's config.json (no num_nextn_predict_layers: V2 has no MTP), shapes cut down below
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": _V2_AUTO_MAP, "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_scaling": _V2_YARN, "rope_theta": 10000,
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True, "tie_word_embeddings": False,
    "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 102400}
# deepseek-ai/DeepSeek-V2.5: group-limited routing over 8 groups, q_lora, routed outputs scaled by 16
V2_5 = {**V2_LITE, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_group": 8,
        "n_routed_experts": 160, "num_attention_heads": 128, "num_hidden_layers": 60, "num_key_value_heads": 128,
        "q_lora_rank": 1536, "routed_scaling_factor": 16.0, "topk_group": 3, "topk_method": "group_limited_greedy",
        "transformers_version": "4.39.3"}
V2_SHRINK = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, vocab_size=509, bos_token_id=507, eos_token_id=508)
V2_RELEASES = {"DeepSeek-V2-Lite": dict(V2_LITE, **V2_SHRINK, n_routed_experts=8, num_experts_per_tok=3),
               "DeepSeek-V2.5": dict(V2_5, **V2_SHRINK, q_lora_rank=48, n_routed_experts=8, num_experts_per_tok=2,
                                     n_group=4, topk_group=2, routed_scaling_factor=4.0)}


@pytest.mark.parametrize("name", V2_RELEASES)
def test_v2_release_config_round_trips_and_loads_with_transformers_logits(name, tmp_path):
    """The V2 family's files as released (V3's test covers V3 / V3.1 / Moonlight / Kimi-K2): the config round-trips
    exactly through dsv3 convert both ways, and the logits equal transformers' DeepseekV2ForCausalLM's (fp32)."""
    transformers = pytest.importorskip("transformers", reason="needs the optional `hf` extra (CI pins it)")
    import warnings
    from dsv3 import ModelConfig
    from test_hf_family import TOL, write_release
    raw = json.loads(json.dumps(V2_RELEASES[name]))      # a copy: transformers' config adds keys to rope_scaling
    assert ModelConfig.from_hf(json.loads(json.dumps(raw))).to_hf() == raw
    write_release(raw, tmp_path / "release")
    for to in ("fp8", "bf16"):
        dsv3.checkpoint.convert_checkpoint(tmp_path / ("release" if to == "fp8" else "fp8"), tmp_path / to, to=to,
                                           dtype=torch.float32)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text()) == {**raw, "torch_dtype": "float32"}
    ours = dsv3.load_pretrained(tmp_path / "release", dtype=torch.float32).eval()
    assert len(ours.mtp) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_cfg = transformers.DeepseekV2Config(**{k: v for k, v in json.loads(json.dumps(raw)).items()
                                                  if k != "model_type"})
        hf = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "release", config=hf_cfg,
                                                                 dtype=torch.float32).float().eval()
    ids = torch.randint(0, raw["vocab_size"], (2, 24))
    with torch.no_grad():
        ref = hf(ids).logits
        assert ref.abs().max() > 0.1 and (ours(ids) - ref).abs().max() < TOL
        assert (ours(ids, absorb=True) - ref).abs().max() < TOL


@pytest.mark.parametrize("ue8m0", [False, True])
def test_an_fp8_release_round_trips_bit_for_bit(tmp_path, ue8m0):
    """Released FP8 -> dsv3 convert --to fp8, and (fp32 scales) released FP8 -> dsv3 (fp32) -> FP8 again: every stored
    tensor equal bit for bit (e4m3 codes, scales, the fp32 routing bias, the MTP layer). Power-of-two scales (V3.1)
    through dsv3's fp32 weights come back as the same weights, not always the same bytes: a block whose largest code
    rounded down to 224 re-quantises with half the scale and doubled codes. Before, convert re-quantised too."""
    cfg = tiny_config(hidden_size=192, moe_intermediate_size=160, intermediate_size=288)     # partial edge blocks
    if ue8m0:
        cfg = dsv3.ModelConfig.from_hf({**cfg.to_hf(), "quantization_config": {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
            "scale_fmt": "ue8m0"}})
    src = tmp_path / "release"
    dsv3.save_pretrained(build(cfg, std=0.05), src, quantize_fp8=True, dtype=torch.bfloat16, max_shard_size="200KB")
    dsv3.save_pretrained(dsv3.load_pretrained(src, dtype=torch.float32), tmp_path / "resaved", quantize_fp8=True,
                         dtype=torch.bfloat16, max_shard_size="200KB")
    dsv3.checkpoint.convert_checkpoint(src, tmp_path / "converted", to="fp8")

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out
    want = tensors(src)
    assert any(t.dtype == torch.float8_e4m3fn for t in want.values())
    assert want["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    for d in ("converted",) if ue8m0 else ("converted", "resaved"):
        got = tensors(tmp_path / d)
        assert got.keys() == want.keys(), d
        for k, t in want.items():
            assert got[k].dtype == t.dtype and torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)), (d, k)
        assert json.loads((tmp_path / d / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    a, b = (dsv3.load_pretrained(tmp_path / d, dtype=torch.float32).state_dict() for d in ("release", "resaved"))
    assert all(torch.equal(a[k], b[k]) for k in a)
