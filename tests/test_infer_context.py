"""The attention-context seam (dsv3.model.context): MLA over the engine's paged cache equals MLA over the reference
contiguous cache, per row form; the engine runs the model's own blocks and MTP module; the cache owns the block
geometry and the scratch block."""

import pytest
import torch

from conftest import build, tiny_config
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.batch import Row, make_batch, padding_row
from dsv3.infer.cache import PagedLatentCache
from dsv3.model import MLA, LatentCache
from dsv3.model.rope import rope_cos_sin


@pytest.fixture(scope="module")
def model():
    return build(tiny_config(vocab_size=96), seed=3, dtype=torch.float64)


def test_paged_mla_equals_the_contiguous_cache(model):
    """Three sequences in one ragged batch: a prefill chunk after 5 cached tokens, a first chunk, and a decode token
    after 9 (absorbed on the pages): each token's MLA output equals the contiguous-cache forward of its own sequence
    (fp64; the decode kernel's softmax runs in fp32)."""
    cfg = model.config
    torch.manual_seed(0)
    attn = model.layers[1].self_attn
    assert isinstance(attn, MLA)
    cache = PagedLatentCache(cfg, 1, 16, 4, torch.float64, "cpu")
    seqs = [(torch.randn(1, 8, cfg.hidden_size, dtype=torch.float64), 5, [3, 0, 7]),       # 5 cached + 3 new
            (torch.randn(1, 4, cfg.hidden_size, dtype=torch.float64), 0, [1]),             # a first chunk
            (torch.randn(1, 10, cfg.hidden_size, dtype=torch.float64), 9, [2, 9, 4])]      # 9 cached + 1 decode
    want, rows, xs = [], [], []
    for x, past, table in seqs:
        ref = LatentCache(cfg, 1, 16, n_layers=1, dtype=torch.float64)
        T = x.shape[1]
        cos, sin = rope_cos_sin(cfg, torch.arange(T))
        want.append(attn(x, cos, sin, ref.layer(0), 0)[0, past:])
        # the cached prefix goes in as an earlier forward would have written it
        if past:
            make = make_batch([Row([0] * past, 0, table)], cache, "cpu")
            attn(x[:, :past], cos[:past], sin[:past], ctx=make.ctx)
        rows.append(Row([0] * (T - past), past, table))
        xs.append(x[0, past:])
    batch = make_batch(rows, cache, "cpu")
    assert [r.start for r in batch.ctx.prefill] == [0] and batch.ctx.decode_rows.tolist() == [7]
    assert [(g.rows, g.length, g.start, g.index) for g in batch.ctx.groups] == [(1, 4, 3, None)]   # the first chunk
    cos, sin = rope_cos_sin(cfg, batch.positions)
    got = attn(torch.cat(xs)[None], cos, sin, ctx=batch.ctx)[0]
    want = torch.cat(want)
    torch.testing.assert_close(got[:7], want[:7], rtol=1e-10, atol=1e-12)     # naive rows: fp64 throughout
    torch.testing.assert_close(got[7:], want[7:], rtol=1e-4, atol=1e-7)       # the decode kernel's fp32 softmax
    # a pure decode batch (decode_rows None: every token, in order) gives the same as the mixed batch
    decode_only = make_batch([rows[2]], cache, "cpu")
    assert decode_only.ctx.decode_rows is None and decode_only.ctx.prefill == ()
    torch.testing.assert_close(attn(xs[2][None], cos[7:8], sin[7:8], ctx=decode_only.ctx)[0], got[7:8],
                               rtol=1e-10, atol=1e-12)


def test_fresh_rows_attend_in_groups_equal_to_their_own_forwards(model):
    """Fresh rows (no cached context) of lengths 5, 5, 3, 9, 1, 2, 5 between a chunk after cached tokens and a decode
    row: grouped by length (within 2x of the group's longest, padded to it; consecutive equal rows as a view), each
    token's MLA output equals its own sequence's contiguous-cache forward (fp64), and every latent is in its slot."""
    cfg = model.config
    torch.manual_seed(1)
    attn = model.layers[1].self_attn
    cache = PagedLatentCache(cfg, 1, 64, 4, torch.float64, "cpu")
    lengths, rows, xs, want, tables = [5, 5, 3, 9, 1, 2, 5], [], [], [], iter(range(64))
    for n in lengths:
        x = torch.randn(1, n, cfg.hidden_size, dtype=torch.float64)
        cos, sin = rope_cos_sin(cfg, torch.arange(n))
        want.append(attn(x, cos, sin, LatentCache(cfg, 1, 16, n_layers=1, dtype=torch.float64).layer(0), 0)[0])
        rows.append(Row([0] * n, 0, [next(tables) for _ in range(-(-n // 4))]))
        xs.append(x[0])
    x = torch.randn(1, 7, cfg.hidden_size, dtype=torch.float64)      # 6 cached tokens + 1 decode, then 4 + 3 new
    cos, sin = rope_cos_sin(cfg, torch.arange(7))
    want_dec = attn(x, cos, sin, LatentCache(cfg, 1, 16, n_layers=1, dtype=torch.float64).layer(0), 0)[0, 6:]
    dec_table = [next(tables), next(tables)]
    attn(x[:, :6], cos[:6], sin[:6], ctx=make_batch([Row([0] * 6, 0, dec_table)], cache, "cpu").ctx)
    y = torch.randn(1, 7, cfg.hidden_size, dtype=torch.float64)
    cos, sin = rope_cos_sin(cfg, torch.arange(7))
    want_chunk = attn(y, cos, sin, LatentCache(cfg, 1, 16, n_layers=1, dtype=torch.float64).layer(0), 0)[0, 4:]
    chunk_table = [next(tables), next(tables)]
    attn(y[:, :4], cos[:4], sin[:4], ctx=make_batch([Row([0] * 4, 0, chunk_table)], cache, "cpu").ctx)
    batch = make_batch([Row([0] * 3, 4, chunk_table)] + rows + [Row([0], 6, dec_table)], cache, "cpu")
    groups = {(g.rows, g.length, g.index is None) for g in batch.ctx.groups}
    assert groups == {(4, 9, False), (2, 3, False), (1, 1, True)}, groups     # 9 5 5 5 | 3 2 | 1, padded
    assert [r.start for r in batch.ctx.prefill] == [0]
    cos, sin = rope_cos_sin(cfg, batch.positions)
    got = attn(torch.cat([y[0, 4:]] + xs + [x[0, 6:]])[None], cos, sin, ctx=batch.ctx)[0]
    torch.testing.assert_close(got[3:-1], torch.cat(want), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[:3], want_chunk, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[-1:], want_dec, rtol=1e-4, atol=1e-7)
    # two consecutive rows of one length are one group without an index (a view of the flat batch)
    two = make_batch([Row([0] * 3, 0, [60]), Row([0] * 3, 0, [61])], cache, "cpu").ctx.groups
    assert [(g.rows, g.length, g.start, g.index) for g in two] == [(2, 3, 0, None)]


def test_engine_runs_the_models_own_blocks(model):
    """Every block and the MTP module run through their forward (forward hooks fire: no copy of their composition),
    in every step kind: prefill, decode, MTP drafting and verification."""
    calls = {"block": 0, "mtp": 0}
    hooks = [b.register_forward_hook(lambda *a: calls.__setitem__("block", calls["block"] + 1)) for b in model.layers]
    hooks.append(model.mtp[0].register_forward_hook(lambda *a: calls.__setitem__("mtp", calls["mtp"] + 1)))
    try:
        engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=32, num_speculative_tokens=1))
        engine.generate([[5, 6, 7], [9, 10]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    finally:
        for h in hooks:
            h.remove()
    assert engine.spec_stats["steps"] > 0
    steps = calls["block"] // len(model.layers)
    assert calls["block"] == steps * len(model.layers) and steps > engine.spec_stats["steps"] and calls["mtp"] > 0


def test_cache_owns_geometry_and_scratch_block(model):
    engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=10))
    cache = engine.cache
    assert (cache.block_size, cache.num_blocks, cache.scratch_block) == (8, 10, 10) and cache.c_kv.shape[1] == 11
    assert (engine.blocks.block_size, engine.blocks.num_blocks) == (8, 10)
    assert (engine.limits.block_size, engine.limits.num_blocks) == (8, 10)
    assert cache.slots([4, 2], 6, 4) == [4 * 8 + 6, 4 * 8 + 7, 2 * 8 + 0, 2 * 8 + 1]
    assert padding_row(cache).block_table == [cache.scratch_block] and cache.scratch_slot == 80
    # the block manager never hands out the scratch block
    taken = {engine.blocks._take() for _ in range(engine.blocks.num_blocks)}
    assert cache.scratch_block not in taken and engine.blocks.num_free_blocks == 0
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        PagedLatentCache(model.config, 1, 0, 8, torch.float32, "cpu")


def test_decode_step_ops_counts_per_layer():
    """benchmarks/decode_step_ops.py profiles one decode step through the blocks' own forwards: per-layer counts for
    both layer kinds, the paged attention and the routed experts apart; a pure decode batch gathers no queries (no
    aten::index in a block outside its attention) and the step has no host sync outside the CPU references."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from decode_step_ops import profile_step
    r = profile_step(batch=4, prompt=6, layers=2, graph_buckets=True)
    assert {"dense", "moe", "dense.attn", "moe.attn", "moe.experts", "step"} <= set(r)
    assert r["dense"]["kernels"] > 10 and r["moe"]["kernels"] > r["dense"]["kernels"] - 10
    for kind in ("dense", "moe"):
        assert r[kind].get("k:aten::index", 0) == 0 and r[kind].get("syncs", 0) == 0, r[kind]
        # the step's latents are stored by the paged attention itself (`append`: in its own launch on the GPU; the
        # CPU reference's two index_copy_), not by a cache write before it
        assert r[kind].get("k:aten::index_copy_", 0) == 0 and r[f"{kind}.attn"]["k:aten::index_copy_"] == 2
        assert r[f"{kind}.attn"]["calls"] > 0
