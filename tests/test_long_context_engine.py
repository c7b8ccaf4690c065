"""The inference engine at long context (fp32, CPU, the tiniest MLA + MoE model): a 16.4K-token prompt through the
planned cache, chunked prefill and the prefix cache gives the full forward's prompt log-probabilities and greedy
tokens, at positions past YaRN's original length."""

import pytest
import torch

from conftest import build, tiny_config
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.cache import bytes_per_block

N = 16_400                 # prompt tokens: 8 YaRN original lengths
BLOCK, CHUNK = 64, 2048


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(vocab_size=96, num_hidden_layers=2, num_nextn_predict_layers=0, max_position_embeddings=20480,
                      rope_scaling=dict(type="yarn", factor=10.0, original_max_position_embeddings=2048, beta_fast=32,
                                        beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
    assert cfg.is_moe_layer(1) and not cfg.is_moe_layer(0)
    return build(cfg, seed=5, dtype=torch.float32)


def reference(model, ids: list[int]) -> torch.Tensor:
    """Log-probabilities (len - 1, V) of the token after each position: one full forward, no cache."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, :-1].log_softmax(-1)


def check_greedy(ref: torch.Tensor, prompt_len: int, out) -> None:
    """Every generated token is the full forward's argmax (up to fp32 rounding: random weights at 16K tokens give
    near-ties) and its log-probability is the full forward's."""
    for j, (tok, (lp, _, _)) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[prompt_len - 1 + j]
        assert row[tok] >= row.max() - 1e-4 and abs(lp - row[tok].item()) < 1e-4


def test_long_prompt_through_chunked_prefill_and_prefix_cache_equals_full_forward(model):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, 96, (N,), generator=g).tolist()
    # capacity planning: a cache budget of two such sequences (bytes per block of latents, spec 1.4)
    per_block = bytes_per_block(cfg, cfg.num_hidden_layers, BLOCK, torch.float32)
    assert per_block == cfg.num_hidden_layers * BLOCK * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    budget = 2 * -(-(N + 8) // BLOCK) * per_block
    engine = Engine(model, config=EngineConfig(block_size=BLOCK, cache_memory_gib=budget / 2**30,
                                               max_num_batched_tokens=CHUNK, max_model_len=20480))
    assert engine.limits.capacity == 2 * -(-(N + 8) // BLOCK) * BLOCK
    small = Engine(model, config=EngineConfig(block_size=BLOCK, cache_memory_gib=100 * per_block / 2**30))
    assert small.limits.capacity == 6400       # a budget of 100 blocks refuses the long prompt up front
    with pytest.raises(ValueError, match="exceed the cache capacity of 6400 tokens"):
        small.check_request(prompt, SamplingParams(max_tokens=3))

    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=0, logprobs=0)
    out = engine.generate([prompt], params)[0]
    ref = reference(model, prompt + out.token_ids)
    got_lp = torch.tensor([p[0] for p in out.prompt_logprobs])
    assert got_lp.shape == (N - 1,)
    # every position, prefilled in 8 chunks of 2048 over the paged cache
    assert (got_lp - ref[:N - 1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]).abs().max() < 1e-4
    check_greedy(ref, N, out)                       # decode: the absorbed form on the paged cache

    # a second prompt sharing the first 16,000 tokens: the cached prefix blocks are reused, output unchanged
    second = prompt[:16_000] + torch.randint(2, 96, (300,), generator=g).tolist()
    hits = engine.blocks.prefix_hits
    out2 = engine.generate([second], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=0))[0]
    assert engine.blocks.prefix_hits - hits == 16_000 // BLOCK
    check_greedy(reference(model, second + out2.token_ids), len(second), out2)
