"""Long-sequence attention (dsv3.model.attention): the fused and query-block paths against the exact fp64 math form
with the full score matrix, gradients included, and MLA / the whole model against the absorbed form (an
independent evaluation order) past the sizes the other tests use."""

import subprocess
import sys

import pytest
import torch

from dsv3.model.attention import causal_attention, query_block_attention, reference_attention

from conftest import build, tiny_config


def _qkv(B, H, T, S, dq, dv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, dq, generator=g, dtype=dtype)
    k = torch.randn(B, H, S, dq, generator=g, dtype=dtype)
    v = torch.randn(B, H, S, dv, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("T,S", [(1, 1), (7, 7), (300, 300), (1, 50), (37, 300), (300, 301), (129, 1000)])
@pytest.mark.parametrize("dq,dv", [(24, 16), (16, 16), (8, 24)])
def test_both_paths_equal_math_reference(T, S, dq, dv):
    """Causal, lower-right aligned when T < S (queries are the last T positions); MLA's unequal head dims padded."""
    q, k, v = _qkv(2, 3, T, S, dq, dv)
    ref = reference_attention(q, k, v, 0.3)
    assert (causal_attention(q, k, v, 0.3, block=64) - ref).abs().max() < 1e-12
    if T > 1:   # the query-block path on its own (padding is causal_attention's), blocks that do not divide T
        pad = torch.nn.functional.pad
        w = max(dq, dv)
        out = query_block_attention(pad(q, (0, w - dq)), pad(k, (0, w - dq)), pad(v, (0, w - dv)), 0.3, block=50)
        assert (out[..., :dv] - ref).abs().max() < 1e-12


def test_fp32_and_gradients_match_reference():
    q, k, v = _qkv(1, 2, 200, 200, 24, 16, dtype=torch.float32)
    for path in ("fused", "blocks"):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        r = [t.double().clone().requires_grad_() for t in (q, k, v)]
        if path == "fused":
            out = causal_attention(*x, 0.25)
        else:    # the cached case: the first 120 keys are context, 80 new queries
            x[0] = x[0][:, :, 120:].detach().requires_grad_()
            r[0] = r[0][:, :, 120:].detach().requires_grad_()
            out = causal_attention(*x, 0.25, block=32)
        ref = reference_attention(*r, 0.25)
        w = torch.randn_like(ref)
        (out.double() * w).sum().backward()
        (ref * w).sum().backward()
        assert (out.double() - ref).abs().max() < 1e-5
        for a, b in zip(x, r):
            assert (a.grad.double() - b.grad).abs().max() < 1e-4


def test_more_queries_than_keys_is_an_error():
    q, k, v = _qkv(1, 1, 5, 4, 8, 8)
    with pytest.raises(ValueError, match="last T positions"):
        causal_attention(q, k, v, 1.0)


def test_model_naive_equals_absorbed_at_2k_tokens_fp64():
    """The naive form (fused attention) and the absorbed one (explicit fp64 scores) of the whole model agree on a
    sequence long enough for YaRN's interpolated frequencies; and chunked prefill over a cache equals the full
    forward (the query-block path)."""
    from dsv3.model import LatentCache
    cfg = tiny_config(num_hidden_layers=2, max_position_embeddings=4096,
                      rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=512, beta_fast=32,
                                        beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
    model = build(cfg, dtype=torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (1, 2048))
    with torch.no_grad():
        full = model(ids)
        assert (full - model(ids, absorb=True)).abs().max() < 1e-10
        cache = LatentCache(cfg, 1, 2048, dtype=torch.float64)
        parts = [model(ids[:, a:b], a, cache) for a, b in ((0, 700), (700, 1900), (1900, 2048))]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-10


_PEAK = """
import resource, sys, torch
from dsv3.model.attention import causal_attention
S = int(sys.argv[1])
q, k, v = (torch.randn(1, 4, S, d) for d in (24, 24, 16))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
causal_attention(q, k, v, 0.2)
causal_attention(q[:, :, S // 2:], k, v, 0.2)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_peak_memory_has_no_score_matrix():
    """At 8K tokens the (1, 4, S, S) fp32 score matrix alone would be 1 GiB; both paths stay far below it (peak
    resident memory of a fresh process, Linux ru_maxrss in KiB)."""
    if sys.platform != "linux":
        pytest.skip("ru_maxrss is in KiB on Linux only")
    S = 8192
    out = subprocess.run([sys.executable, "-c", _PEAK, str(S)], capture_output=True, text=True, check=True)
    grew = int(out.stdout.split()[-1])
    assert grew < 4 * S * S * 4 / 8, f"peak grew by {grew / 2**20:.0f} MiB"
