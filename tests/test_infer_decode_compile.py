"""Decode-speed paths of the engine against the plain engine: the fused MoE decode kernel (`fused_moe="on"`: the
PyTorch reference of dsv3.kernels.moe_decode on CPU) and the torch.compile'd decode layers (`compile_decode`, inductor
on CPU), both through the padded graph buckets run eagerly (capture=False, as test_infer_engine does)."""

import pytest
import torch

from conftest import build, random_prompts, tiny_config
from dsv3.infer import Engine, EngineConfig, SamplingParams, moe_dispatch
from dsv3.infer.graphs import BATCH_BUCKETS
from dsv3.infer.moe_dispatch import (FUSED_MOE_AUTO_TOKENS, MOE_DECODE_MAX_TOKENS, expert_tensors,
                                     fused_moe_available, fused_moe_for)
from dsv3.model.moe import MoE

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


prompts = random_prompts


def greedy(model, ps, padded=True, **kw):
    engine = Engine(model, config=EngineConfig(**(dict(block_size=4, num_blocks=64) | kw)))
    if padded:
        engine.use_decode_graphs(capture=False)
    return [o.token_ids for o in engine.generate(ps, PARAMS)], engine


@pytest.fixture(scope="module")
def model():
    return build(tiny_config(vocab_size=96), seed=3, dtype=torch.float32)


def test_fused_moe_engine_equals_the_module_path(model):
    """Every MoE layer of every step through the fused kernel's reference: the same greedy tokens and the same
    routing loads as the MoE module's own forward (unpadded and padded batches)."""
    ps = prompts([1, 5, 9, 17])
    want, plain = greedy(model, ps, padded=False, fused_moe="off")
    for padded in (False, True):
        got, engine = greedy(model, ps, padded=padded, fused_moe="on")
        assert engine.runner.fused_moe and got == want
    loads = lambda m: [x.tokens_per_expert.clone() for x in m.modules() if isinstance(x, MoE)]  # noqa: E731
    for m in model.modules():
        if isinstance(m, MoE):
            m.tokens_per_expert.zero_()
    greedy(model, ps, padded=False, fused_moe="off")
    off = loads(model)
    for m in model.modules():
        if isinstance(m, MoE):
            m.tokens_per_expert.zero_()
    greedy(model, ps, padded=False, fused_moe="on")
    assert all(torch.equal(a, b) for a, b in zip(off, loads(model))) and sum(int(a.sum()) for a in off) > 0


def test_fused_moe_engine_with_fp8_weights():
    from dsv3.infer.fp8_weights import FP8Experts, quantize_weights
    lm = quantize_weights(build(tiny_config(vocab_size=96), seed=5, dtype=torch.float32))
    assert any(expert_tensors(m) is not None for m in lm.modules() if isinstance(m, FP8Experts))
    ps = prompts([3, 11], seed=2)
    assert greedy(lm, ps, fused_moe="on")[0] == greedy(lm, ps, padded=False, fused_moe="off")[0]


def test_fused_moe_switch(model):
    assert not fused_moe_available(model, "auto")          # CPU: auto means CUDA only
    assert fused_moe_available(model, "on") and not fused_moe_available(model, "off")
    assert MOE_DECODE_MAX_TOKENS >= 256
    with pytest.raises(ValueError, match="EngineConfig.fused_moe"):
        EngineConfig(fused_moe="yes")
    assert EngineConfig().fused_moe == "auto"                                 # the default
    assert [EngineConfig(fused_moe=v).fused_moe for v in (True, False, "true", "false", "on", "off")] == \
        ["on", "off", "on", "off", "on", "off"]                               # TOML booleans spell on / off


def test_fused_moe_auto_picks_per_bucket():
    """auto: the fused kernel exactly for the buckets inside FUSED_MOE_AUTO_TOKENS (from the measured launch table:
    at least batch 1 to 32); on: every batch up to MOE_DECODE_MAX_TOKENS; off, or auto without the kernel: none."""
    lo, hi = FUSED_MOE_AUTO_TOKENS
    assert lo == 1 and 32 <= hi <= MOE_DECODE_MAX_TOKENS
    for b in BATCH_BUCKETS:
        assert fused_moe_for("auto", True, b) == (lo <= b <= hi), b
        assert fused_moe_for("on", True, b) == (b <= MOE_DECODE_MAX_TOKENS)
        assert not fused_moe_for("off", False, b) and not fused_moe_for("auto", False, b)


def test_fused_moe_auto_engine(model, monkeypatch):
    """An engine with fused_moe = auto (made available on the CPU: the kernel's reference) sends the forwards of the
    buckets inside the range, and only those, through the fused call, and its greedy tokens equal the module
    path's (fp32: the reference is exact)."""
    import dsv3.infer.runner as runner
    seen = []
    fused = runner.fused_moe_ffn

    def recording(mlp, x):
        seen.append(x.numel() // x.shape[-1])
        return fused(mlp, x)
    monkeypatch.setattr(runner, "fused_moe_available", lambda model, mode: mode != "off")
    monkeypatch.setattr(runner, "fused_moe_ffn", recording)
    # a narrow range, so that a bucket past it stays small on the CPU (the measured one reaches 256 tokens)
    monkeypatch.setattr(moe_dispatch, "FUSED_MOE_AUTO_TOKENS", (1, 4))
    lo, hi = moe_dispatch.FUSED_MOE_AUTO_TOKENS
    for n in (1, 3, hi + 1):                   # decode buckets 1 and 4 (fused), the next past hi (module)
        ps = prompts([1 + i % 3 for i in range(n)], seed=n)
        seen.clear()
        got, engine = greedy(model, ps, fused_moe="auto", num_blocks=4 * n)
        assert engine.runner.fused_moe
        buckets = {key[0] for key in engine.runner.graphs.buckets}
        assert len(buckets) == 1
        (b,) = buckets
        assert (b in seen) == (lo <= b <= hi) and all(lo <= t <= hi for t in seen), (b, seen)
        assert got == greedy(model, ps, padded=False, fused_moe="off")[0]


def test_compiled_decode_gives_the_eager_tokens(model):
    """Inductor (CPU) compiles the decode layers of the graph buckets: greedy tokens equal the eager engine's, the
    compiled functions did run (dynamo counted their frames), and the only graph breaks are the paged cache's opaque
    calls (its write and decode attention): everything else of a block is compiled."""
    from torch._dynamo.utils import counters
    ps = prompts([1, 5, 9])
    want, _ = greedy(model, ps, padded=False, fused_moe="off")
    before = counters["stats"]["unique_graphs"]
    counters["graph_break"].clear()
    # with the dense projections through the GEMV op too (dsv3.infer.fused_proj: its reference on the CPU)
    got, engine = greedy(model, ps, compile_decode=True, fused_moe="on", dense_gemv=True)
    assert got == want
    assert counters["stats"]["unique_graphs"] > before
    assert engine.runner.config.compile_decode
    breaks = list(counters["graph_break"])
    assert breaks and all("torch.compiler.disable" in b and ("PagedLatentCache.write" in b or
                                                              "PagedLatentCache.decode" in b) for b in breaks), breaks


# ---------------------------------------------------------------------------------------------------------------
# CUDA: the same paths captured in CUDA graphs, bf16 and FP8 block weights
# ---------------------------------------------------------------------------------------------------------------

def _cuda_ok() -> bool:
    from dsv3.kernels.triton_setup import HAS_TRITON
    return torch.cuda.is_available() and HAS_TRITON and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA GPU of sm_89+ with triton (run through the device tool)")
@pytest.mark.parametrize("fp8,compile_decode,fused", [(False, True, "off"), (False, False, "on"), (False, True, "on"),
                                                      (True, False, "on"), (True, True, "on")],
                         ids=["compile", "fused", "compile-fused", "fp8-fused", "fp8-compile-fused"])
def test_cuda_fast_decode_matches_plain_decode(fp8, compile_decode, fused):
    """Graph replays of the compiled / fused decode step equal the eager step of the same rows (hidden states, bf16
    tolerance) while inputs change between replays, and greedy generations agree with the plain eager engine."""
    from dsv3.infer.runner import Row
    model = build(tiny_config(vocab_size=96), seed=3, dtype=torch.bfloat16).cuda()
    if fp8:
        from dsv3.infer.fp8_weights import quantize_weights
        quantize_weights(model)
    config = dict(block_size=16, num_blocks=64, compile_decode=compile_decode, fused_moe=fused)
    # synchronous steps here: the rows below read each sequence's last token on the host after step()
    engine = Engine(model, config=EngineConfig(**config, overlap_schedule="off"))
    assert engine.runner.graphs is not None and engine.runner.fused_moe == (fused == "on")
    ps = prompts([5, 17, 30])
    for p in ps:
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    engine.step()                                                    # prefill
    for _ in range(4):
        seqs = list(engine.scheduler.running)
        assert all(engine.blocks.ensure_capacity(s, s.num_cached_tokens + 1) for s in seqs)
        rows = [Row([s.token_ids[-1]], s.num_cached_tokens, s.block_table) for s in seqs]
        eager = engine.runner.forward(engine.runner.prepare(rows, graph=False))
        replayed = engine.runner.forward(engine.runner.prepare(rows))
        torch.testing.assert_close(replayed.float(), eager.float(), atol=3e-2, rtol=3e-2)
        engine.step()
    assert all(b.graph is not None for b in engine.runner.graphs.buckets.values())
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    fast = [o.token_ids for o in Engine(model, config=EngineConfig(**config)).generate(ps, params)]
    plain = [o.token_ids for o in Engine(model, config=EngineConfig(block_size=16, num_blocks=64, cuda_graphs=False,
                                                                    fused_moe="off")).generate(ps, params)]
    # Greedy sequences of a random-weight model part at near-ties (bf16 / FP8 rounding decides them), and after the
    # first parting a positional comparison means nothing. So: where a sequence parts from the plain one, the plain
    # model's logits there must be a near-tie between the two tokens chosen.
    for p, x, y in zip(ps, fast, plain):
        i = next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), None)
        if i is None:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([p + y[:i]], device="cuda"))[0, -1].float()
        gap = (logits[y[i]] - logits[x[i]]).item()
        assert abs(gap) <= 0.05 * logits.abs().max().item(), (i, gap, x, y)   # either sign: the full forward rounds too
