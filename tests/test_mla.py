"""MLA's two forms, the latent cache, incremental decoding and MTP, all against full forwards."""

import pytest
import torch

from dsv3.model import LatentCache, generate

from conftest import build, tiny_config

CONFIGS = {
    "q_lora+groups+yarn": tiny_config(),
    "no_q_lora+no_yarn": tiny_config(q_lora_rank=None, rope_scaling=None, n_group=1, topk_group=1),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_naive_and_absorbed_forms_agree(name):
    model = build(CONFIGS[name], dtype=torch.float64)
    ids = torch.randint(0, 128, (3, 17))
    with torch.no_grad():
        a, b = model(ids), model(ids, absorb=True)
    assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decoding_matches_full_forward(name, absorb):
    cfg = CONFIGS[name]
    model = build(cfg, dtype=torch.float64)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = LatentCache(cfg, 2, 32, dtype=torch.float64)
        # prefill in two chunks (chunked prefill), then one token at a time
        parts = [model(ids[:, :7], 0, cache, absorb), model(ids[:, 7:15], 7, cache, absorb)]
        parts += [model(ids[:, t:t + 1], t, cache, absorb) for t in range(15, 24)]
    inc = torch.cat(parts, dim=1)
    assert (inc - full).abs().max() < 1e-10


def test_start_pos_without_cache_offsets_positions_only():
    """Without a cache the keys are only the given tokens; RoPE scores depend on relative positions only, so
    shifting every position leaves the logits unchanged."""
    model = build(tiny_config(), dtype=torch.float64)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        a, b = model(ids), model(ids, start_pos=5000)
    assert (a - b).abs().max() < 1e-6  # fp32 angles at position 5000 (as HF and DeepSeek compute them)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids, start_pos=16380)


def test_reference_generate_is_greedy_argmax_of_full_forward():
    model = build(tiny_config(), dtype=torch.float64)
    prompts = [[5, 9, 2, 77, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    outs = generate(model, prompts, max_new_tokens=6)
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out == seq[len(prompt):]


def test_generate_rejects_bad_input():
    model = build(tiny_config())
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], 3)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [[1, 500]], 3)
    with pytest.raises(ValueError, match="context"):
        generate(model, [[1] * 10], 16384)


def test_mtp_logits_follow_the_spec_order_and_causality():
    cfg = tiny_config(num_nextn_predict_layers=2)
    model = build(cfg, dtype=torch.float64)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        h = model.hidden_states(ids)
        outs = model.mtp_logits(h, ids)
        assert [o.shape for o in outs] == [(2, 11, 128), (2, 10, 128)]
        # depth 1 at position i by hand: eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)]) -> block -> norm -> head
        m = model.mtp[0]
        from dsv3.model import rope_cos_sin
        cos, sin = rope_cos_sin(cfg, torch.arange(11))
        x = m.eh_proj(torch.cat([m.enorm(model.embed_tokens(ids[:, 1:])), m.hnorm(h[:, :-1])], -1))
        x = x + m.self_attn(m.input_layernorm(x), cos, sin)
        x = x + m.mlp(m.post_attention_layernorm(x))
        assert torch.allclose(model.lm_head(m.shared_head.norm(x)), outs[0], atol=1e-12)
        # position i of depth k sees tokens up to i+k only
        ids2 = ids.clone()
        ids2[:, 8:] = (ids2[:, 8:] + 1) % 128
        outs2 = model.mtp_logits(model.hidden_states(ids2), ids2)
        assert torch.allclose(outs[0][:, :7], outs2[0][:, :7]) and not torch.allclose(outs[0][:, 7], outs2[0][:, 7])
        assert torch.allclose(outs[1][:, :6], outs2[1][:, :6]) and not torch.allclose(outs[1][:, 6], outs2[1][:, 6])
