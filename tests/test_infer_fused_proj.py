"""Decode-time fused projections (dsv3.infer.fused_proj) against the model's own modules on the same weights: the
forward within float rounding (fp32, bf16, FP8 block weights), the engine's greedy tokens identical, and the weights
shared (state dicts, load_weights, optimizer steps write through; training still sees its parameters)."""

import copy

import pytest
import torch

from conftest import build, tiny_config
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.fp8_weights import FP8Linear, quantize_weights
from dsv3.infer.fused_proj import FusedMLA, FusedMLP, fuse_projections
from dsv3.model.layers import MLP
from dsv3.model.mla import MLA

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _forward(model, ids):
    with torch.inference_mode():
        return model(ids).float()


def _counts(model):
    mla = sum(isinstance(m, MLA) for m in model.modules())
    mlp = sum(isinstance(m, MLP) for m in model.modules())
    return mla, mlp


@pytest.mark.parametrize("q_lora", [48, None], ids=["q_lora", "q_proj"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_fused_forward_matches_module(q_lora, dtype, tol):
    model = build(tiny_config(q_lora_rank=q_lora), seed=1, dtype=dtype)
    ids = torch.randint(0, 128, (2, 9))
    want = _forward(model, ids)
    n = fuse_projections(model)
    assert n == sum(_counts(model)) and n > 0
    assert any(type(m) is FusedMLA for m in model.modules()) and any(type(m) is FusedMLP for m in model.modules())
    got = _forward(model, ids)
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)
    # the projections' weights are views into the fused tensor: no second copy
    attn = model.layers[0].self_attn
    first = attn.q_proj if q_lora is None else attn.q_a_proj
    assert first.weight.data_ptr() == attn.fused_weight.data_ptr()
    assert set(model.state_dict()) == set(build(tiny_config(q_lora_rank=q_lora)).state_dict())
    fuse_projections(model, False)
    assert not any(type(m) in (FusedMLA, FusedMLP) for m in model.modules())
    torch.testing.assert_close(_forward(model, ids), want, atol=tol * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "padded-buckets"])
def test_engine_greedy_identical(graphs):
    base = build(tiny_config(vocab_size=96), seed=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 96, (n,), generator=g).tolist() for n in (1, 5, 9, 17)]
    outs = {}
    for fuse in (False, True):
        model = copy.deepcopy(base)
        engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=64, fuse_projections=fuse))
        if graphs:
            engine.use_decode_graphs(capture=False)
        outs[fuse] = [o.token_ids for o in engine.generate(prompts, GREEDY)]
        assert any(type(m) is FusedMLA for m in model.modules()) == fuse
    assert outs[True] == outs[False]


def _fp8_config(**kw):
    # 8 heads x (8 + 8) = 128 q rows and a 128-wide FFN: FP8 pairs whose first N is a whole 128-row scale block
    shape = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=8, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8, intermediate_size=128, moe_intermediate_size=128, q_lora_rank=None)
    return tiny_config(**{**shape, **kw})


def test_fp8_block_pairs_fuse_when_aligned():
    model = quantize_weights(build(_fp8_config(), seed=2, dtype=torch.bfloat16))
    ids = torch.randint(0, 128, (1, 7))
    want = _forward(model, ids)
    assert fuse_projections(model) == sum(_counts(model))
    attn = model.layers[0].self_attn
    # scale rows: one block for q's 128 rows, one for kv_a's 40
    assert attn.fused_weight.dtype == torch.float8_e4m3fn and attn.fused_scale_inv.shape[0] == 1 + 1
    got = _forward(model, ids)
    torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=0)
    # a first projection of 96 rows would split a scale block: that pair keeps the module's two GEMMs
    odd = quantize_weights(build(_fp8_config(intermediate_size=96, moe_intermediate_size=96), dtype=torch.bfloat16))
    fuse_projections(odd)
    assert all(type(m) is MLP for m in odd.modules() if isinstance(m, MLP))
    assert any(type(m) is FusedMLA for m in odd.modules())
    assert isinstance(odd.layers[0].self_attn.q_proj, FP8Linear)


def test_weights_write_through_and_training_sees_parameters():
    cfg = tiny_config()
    model = build(cfg, seed=4)
    ids = torch.randint(0, 128, (1, 6))
    fuse_projections(model)
    # training: gradients reach the projections' own parameters; the optimizer's in-place step reaches the fusion
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids).float().square().mean().backward()
    attn = model.layers[1].self_attn
    assert attn.q_a_proj.weight.grad is not None and attn.kv_a_proj_with_mqa.weight.grad.abs().sum() > 0
    opt.step()
    plain = build(cfg, seed=0)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(_forward(model, ids), _forward(plain, ids), atol=1e-5, rtol=0)
    # load_weights copies in place (through the views); a re-pointed weight is re-linked
    source = build(cfg, seed=5)
    engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=16))
    attn.q_a_proj.weight.data = attn.q_a_proj.weight.data.clone()       # the link broken from outside
    engine.load_weights(source)
    assert attn.q_a_proj.weight.data_ptr() == attn.fused_weight.data_ptr()
    torch.testing.assert_close(_forward(model, ids), _forward(source, ids), atol=1e-5, rtol=0)


def test_step_bytes_count_fused_weights_once():
    from dsv3.infer.bench import decode_step_bytes
    model = build(tiny_config(), seed=6)
    want = decode_step_bytes(model, 1)
    fuse_projections(model)
    assert decode_step_bytes(model, 1) == want
