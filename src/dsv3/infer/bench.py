"""`dsv3 bench decode | prefill`: engine throughput on random weights of any config (no checkpoint needed).

decode: B prompts of P random tokens, greedy, T new tokens each; reports time to first token (the batch's prefill
step), time per output token (per request) and decode tokens/s, beside the weight-streaming roofline
(ANCHORS: bytes a decode step must read / 4.25e12 B/s).
prefill: B prompts of P tokens, one token generated; reports prefill tokens/s.
"""

from __future__ import annotations

import time

import torch

from ..model import Transformer
from .config import EngineConfig
from .engine import Engine
from .sampling import SamplingParams

COPY_BANDWIDTH = 4.25e12      # bytes/s, measured on the H200 (ANCHORS)


def random_model(cfg, device: str, dtype: torch.dtype, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights(std=0.02)
    return model.eval()


def decode_step_bytes(model: Transformer, batch: int) -> int:
    """Weights one decode step reads: all but the routed experts and the embedding, plus min(E, B*K) experts per
    MoE layer (an upper bound on the distinct experts hit)."""
    cfg = model.config
    size = model.lm_head.weight.element_size()
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * size
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if ".experts." not in n and not n.startswith("mtp.") and n != "embed_tokens.weight")
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return rest + n_moe * min(cfg.n_routed_experts, batch * cfg.num_experts_per_tok) * expert


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_decode(model: Transformer, batch: int, prompt_len: int, new_tokens: int, spec_tokens: int = 0,
                 seed: int = 0) -> dict:
    device = str(next(model.parameters()).device)
    cfg = model.config
    engine = Engine(model, config=EngineConfig(block_size=64, max_num_seqs=batch, cache_memory_gib=4,
                                               max_num_batched_tokens=max(2048, batch * prompt_len),
                                               num_speculative_tokens=spec_tokens, speculative_max_batch=batch))
    g = torch.Generator().manual_seed(seed)
    for _ in range(batch):
        engine.add_request(torch.randint(10, cfg.vocab_size, (prompt_len,), generator=g).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
    _sync(device)
    t0 = time.perf_counter()
    engine.step()
    _sync(device)
    t1 = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    _sync(device)
    t2 = time.perf_counter()
    decoded = batch * (new_tokens - 1)
    nbytes = decode_step_bytes(model, batch)
    roof = COPY_BANDWIDTH / nbytes * batch
    return dict(batch=batch, prompt=prompt_len, new_tokens=new_tokens, ttft_s=t1 - t0, steps=steps,
                tpot_ms=(t2 - t1) / max(new_tokens - 1, 1) * 1e3, tok_per_s=decoded / (t2 - t1),
                step_bytes=nbytes, roofline_tok_per_s=roof, roofline_fraction=decoded / (t2 - t1) / roof,
                spec=dict(engine.spec_stats))


def bench_prefill(model: Transformer, batch: int, prompt_len: int, seed: int = 0) -> dict:
    device = str(next(model.parameters()).device)
    cfg = model.config
    engine = Engine(model, config=EngineConfig(block_size=64, max_num_seqs=batch, cache_memory_gib=4,
                                               max_num_batched_tokens=batch * prompt_len, prefix_caching=False))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, cfg.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    _sync(device)
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    _sync(device)
    dt = time.perf_counter() - t0
    return dict(batch=batch, prompt=prompt_len, seconds=dt, tok_per_s=batch * prompt_len / dt)
