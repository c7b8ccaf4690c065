"""The torch.compile'd prefill steps (`EngineConfig.compile_prefill`) against the eager engine: the same greedy
tokens and close hidden states over fresh rows, chunked prefill, prefix-cache hits and mixed prefill + decode steps;
no recompile per step (the token dimension is dynamic); the only graph break is the paged attention over the step's
rows (dsv3.model.mla `_attend_rows`). Inductor on the CPU, the engine without graphs (pure decode steps stay eager)."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import build, random_prompts, tiny_config
from dsv3.infer import Engine, EngineConfig, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def record(engine) -> list:
    """Every forward of the engine's runner: (its rows as (length, past, tokens), its hidden states)."""
    steps, runner = [], engine.runner
    real = runner.forward_eager

    def forward_eager(batch, compiled=False):
        out = real(batch, compiled)
        steps.append(([(len(r.tokens), r.past, tuple(r.tokens)) for r in batch.rows], out.float().clone()))
        return out
    runner.forward_eager = forward_eager
    return steps


def run(model, waves, **kw):
    """Greedy tokens of each wave of prompts (one `generate` each, on one engine: later waves hit the prefix cache)
    and the recorded forwards."""
    engine = Engine(model, config=EngineConfig(**(dict(block_size=4, num_blocks=128, max_num_batched_tokens=24) | kw)))
    steps = record(engine)
    return [[o.token_ids for o in engine.generate(ps, PARAMS)] for ps in waves], steps


def waves():
    """Prompts of several lengths; the second wave repeats two of them and extends a third past a block boundary
    (prefix-cache hits: rows with cached context), with a fresh one."""
    first = random_prompts([3, 9, 17, 30], seed=1)
    return [first, [first[2], first[1] + random_prompts([6], seed=2)[0], first[3], random_prompts([13], seed=3)[0]]]


def assert_same_steps(got, want, tol):
    assert [rows for rows, _ in got] == [rows for rows, _ in want]
    for (rows, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=0, msg=lambda m: f"{rows}: {m}")


@pytest.fixture(scope="module")
def model():
    return build(tiny_config(vocab_size=96), seed=3, dtype=torch.float32)


def test_compiled_prefill_gives_the_eager_tokens(model):
    """fp32, the routed experts of these small steps through the fused kernel's reference (fused_moe on; the MoE
    module's grouped GEMM has a bf16-only fake on the CPU: the bf16 test below). The steps cover fresh rows in groups,
    chunks after cached tokens (a 24-token budget), prefix-cache hits and decode rows beside prefill rows. Tolerance:
    fp32 sums in another order through inductor's fused kernels, 1e-4 of the largest hidden value."""
    want, eager = run(model, waves(), fused_moe="on")
    counters["graph_break"].clear()
    got, steps = run(model, waves(), fused_moe="on", compile_prefill=True)
    assert got == want
    assert_same_steps(steps, eager, 1e-4)
    kinds = [(any(n == 1 and p > 0 for n, p, _ in rows), any(n > 1 and p > 0 for n, p, _ in rows),
              any(p == 0 for _, p, _ in rows)) for rows, _ in steps]
    assert any(d and (c or f) for d, c, f in kinds)        # a mixed step: decode rows beside prefill rows
    assert any(c for _, c, _ in kinds) and any(f for _, _, f in kinds)   # rows with cached context, fresh rows
    breaks = list(counters["graph_break"])
    assert breaks and all("MLA._attend_rows" in b for b in breaks), breaks


def test_compiled_prefill_with_mtp_speculation(model):
    """MTP speculation (k = 1): the MTP module's forward over prefill rows compiles too (`mtp_forward_eager`); the
    eager engine's greedy tokens, hidden states as in the first test."""
    from dsv3.infer.runner import ModelRunner
    kw = dict(fused_moe="on", num_speculative_tokens=1)
    want, eager = run(model, waves(), **kw)
    compiled, real = [], ModelRunner.mtp_forward_eager

    def mtp_forward_eager(runner, batch, *args, **kwargs):
        compiled.append(runner.compiles_prefill(batch))
        return real(runner, batch, *args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ModelRunner, "mtp_forward_eager", mtp_forward_eager)
        got, steps = run(model, waves(), compile_prefill=True, **kw)
    assert got == want and any(compiled)
    assert_same_steps(steps, eager, 1e-4)


def test_compiled_prefill_compiles_once_per_shape_kind(model):
    """Steps of five prompt lengths: after the first two, no frame compiles again (dynamo's default would compile
    one graph per new N until its limit); the first two compile each frame at most twice (the frames resumed after
    the attention break start static: their inputs come from the eager attention, unmarked)."""
    torch._dynamo.reset()
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=128, fused_moe="on", compile_prefill=True,
                                               prefix_caching=False))
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    frames = []
    for n in (5, 9, 17, 30, 12):
        engine.generate(random_prompts([n], seed=n), params)
        frames.append(counters["frames"]["ok"])
    assert frames[1] == frames[-1], frames
    # the first step compiles each frame once (on torch 2.13: the prologue, _layer, Block.forward, MLA.forward,
    # MLA._attend_paged and the two resumed ones, Block's for a dense and an MoE layer); the second recompiles only
    # the resumed frames
    assert frames[1] <= 2 * frames[0], frames


def test_compiled_prefill_bf16_module_path():
    """bf16, the MoE module's own forward (router, grouped GEMM, fp32 combine) compiled: the eager bf16 engine's
    greedy tokens, and hidden states within 2e-2 of the largest from those of the same weights in fp32 (eager, the
    fused kernel's exact reference): bf16 rounding of the activations, a few ulps (2^-8) over three layers. Not
    against the eager bf16 run: there one token of the second step parts by 0.25 (of 4.3) from both, a routing
    near-tie that its rounding decides otherwise (the compiled run is 0.02 from fp32 there)."""
    m = build(tiny_config(vocab_size=96), seed=4, dtype=torch.bfloat16)
    ps = [random_prompts([7, 20, 26], seed=5)]
    want, _ = run(m, ps, fused_moe="off")
    got, steps = run(m, ps, fused_moe="off", compile_prefill=True)
    assert got == want
    exact, ref = run(copy.deepcopy(m).float(), ps, fused_moe="on")
    assert exact == want
    assert_same_steps(steps, ref, 2e-2)


def test_compiled_prefill_fp32_module_path(model):
    """fp32 on the CPU through the MoE module (fused_moe off): the grouped GEMM's fake, which torch.compile traces
    with, takes bf16 only (every served prefill step failed: `dsv3 serve --compile-prefill` on the CPU's default
    float32), so compiled fp32 runs the experts one at a time eagerly (one graph break). The eager engine's tokens,
    hidden states as in the first test."""
    want, eager = run(model, waves(), fused_moe="off")
    got, steps = run(model, waves(), fused_moe="off", compile_prefill=True)
    assert got == want
    assert_same_steps(steps, eager, 1e-4)


def test_compile_prefill_switch():
    assert not EngineConfig().compile_prefill
    assert EngineConfig(compile_prefill=True).compile_prefill
    with pytest.raises(ValueError, match="EngineConfig.compile_prefill"):
        EngineConfig(compile_prefill="false")


# ---------------------------------------------------------------------------------------------------------------
# CUDA: inductor's Triton kernels, bf16
# ---------------------------------------------------------------------------------------------------------------

def _cuda_ok() -> bool:
    from dsv3.kernels.triton_setup import HAS_TRITON
    return torch.cuda.is_available() and HAS_TRITON and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA GPU of sm_89+ with triton (run through the device tool)")
def test_cuda_compiled_prefill_matches_eager():
    """bf16 on the GPU, the same steps as the CPU test (fresh, chunked, prefix hits, mixed), no CUDA graphs so that
    every step is recorded: the compiled run's hidden states against the same weights' in fp32, within 2e-2 of the
    largest or twice the eager bf16 run's own distance from fp32 (a routing near-tie that bf16 rounding decides
    parts either run from fp32), for every step until the runs' inputs part (greedy tokens of a random model part
    at near-ties too); prefill steps come first, so at least those are compared."""
    m = build(tiny_config(vocab_size=96), seed=3, dtype=torch.bfloat16).cuda()
    kw = dict(block_size=16, fused_moe="off", cuda_graphs=False)
    _, eager = run(m, waves(), **kw)
    _, comp = run(m, waves(), compile_prefill=True, **kw)
    _, ref = run(copy.deepcopy(m).float(), waves(), **kw)
    compared = 0
    for (rows, c), (rows_e, e), (rows_r, r) in zip(comp, eager, ref):
        if not rows == rows_e == rows_r:
            break
        top = r.abs().max().item()
        err, own = (c - r).abs().max().item(), (e - r).abs().max().item()
        assert err <= max(2e-2 * top, 2 * own), (rows, err, own, top)
        compared += 1
    assert compared >= 2, compared
