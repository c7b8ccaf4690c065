"""Penalties and logit_bias (dsv3.infer.penalties): the adjustment against a float64 pure-Python reference over
batches of mixed rows; the engine's greedy tokens against cache-free full forwards adjusted by that reference (and by
HF's own RepetitionPenaltyLogitsProcessor), through preemption, chunked prefill, padded buckets and the overlap
schedule; rows without penalties untouched; logprobs of the raw model; no speculation with them; no host sync."""

import pytest
import torch

from conftest import build, random_prompts, reference_greedy, tiny_config
from test_infer_sampling import NoSync
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.penalties import PenaltyState
from dsv3.infer.sequence import Sequence

V = 96
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")


@pytest.fixture(scope="module")
def model():
    # float64, as tests/test_infer_engine.py: batching then cannot flip a greedy token
    return build(tiny_config(vocab_size=V), seed=3, dtype=torch.float64)


prompts = random_prompts


def reference_adjust(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    """Float64 pure Python, token by token: bias, HF's repetition penalty over prompt + output, then OpenAI's
    frequency / presence penalties over the output."""
    out = []
    for t, x in enumerate(logits):
        x = float(x) + p.logit_bias.get(t, 0.0)
        if t in prompt or t in output:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        n = output.count(t)
        out.append(x - p.frequency_penalty * n - p.presence_penalty * (n > 0))
    return out


MIXED = [SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4),
         SamplingParams(),                                                     # no penalties: untouched
         SamplingParams(repetition_penalty=1.6, logit_bias={3: 5.0, 7: -100}),
         SamplingParams(temperature=0.0),                                      # greedy, no penalties
         SamplingParams(repetition_penalty=0.5, frequency_penalty=-2.0, presence_penalty=2.0, logit_bias={0: 0.5})]


def fake_seqs(params, seed=0, vocab=V, start=0):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, p in enumerate(params):
        seq = Sequence(start + i, torch.randint(0, vocab, (int(torch.randint(1, 9, (1,), generator=g)),),
                                                generator=g).tolist(), p)
        seq.token_ids += torch.randint(0, 12, (i,), generator=g).tolist()    # tokens another engine generated
        seqs.append(seq)
    return seqs


def test_adjustment_matches_a_float64_reference_step_by_step():
    """Random logits (both signs) for a batch of mixed rows over several steps: each step's adjusted logits equal
    the reference given the tokens so far (counted on the device by `record`); rows without penalties are the very
    logits they came with; finished rows release their state, new ones reuse it, and the last one frees it all."""
    torch.manual_seed(0)
    state = PenaltyState(V, "cpu")
    seqs = fake_seqs(MIXED)
    for step in range(6):
        if step == 3:                                # one finishes, one arrives (and reuses a row)
            state.release(seqs[0].seq_id)
            seqs = seqs[1:] + fake_seqs([SamplingParams(frequency_penalty=1.0, logit_bias={5: -3})], 1, start=10)
        logits = torch.randn(len(seqs), V) * 4
        scores, selected = state.apply(seqs, logits)
        for i, s in enumerate(seqs):
            want = reference_adjust(logits[i].tolist(), s.prompt_ids, s.output_ids, s.params)
            if s.params.modifies_logits:
                assert scores[i].double().tolist() == pytest.approx(want, rel=1e-6, abs=1e-5), (step, i)
            else:
                assert torch.equal(scores[i], logits[i]) and want == pytest.approx(logits[i].tolist())
        tokens = torch.randint(0, 12, (len(seqs),))   # a small range: tokens repeat, counts reach 2 and more
        state.record(selected, tokens)
        for s, t in zip(seqs, tokens.tolist()):
            s.token_ids.append(t)
    assert max(max(s.output_ids.count(t) for t in s.output_ids) for s in seqs) >= 2
    assert len(state.rows) == 3 and state.counts.shape[0] == 4
    for s in seqs:
        state.release(s.seq_id)
    assert state.counts.shape[0] == 0 and not state.rows


def test_a_batch_without_penalties_is_left_alone():
    state = PenaltyState(V, "cpu")
    logits = torch.randn(2, V)
    scores, selected = state.apply(fake_seqs([SamplingParams(), SamplingParams(temperature=0)]), logits)
    assert scores is logits and selected is None and state.counts.numel() == 0


def adjusted_greedy(model, prompt: list[int], n: int, p: SamplingParams) -> list[int]:
    """n greedy tokens from cache-free full forwards, each step's logits adjusted by `reference_adjust`."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].double().tolist()
            adj = reference_adjust(logits, prompt, ids[len(prompt):], p)
            ids.append(max(range(len(adj)), key=adj.__getitem__))
    return ids[len(prompt):]


ENGINES = {
    "batch": dict(block_size=8, num_blocks=64),
    "preempt": dict(block_size=4, num_blocks=14, max_num_seqs=8, max_num_batched_tokens=7),
    "overlap-padded": dict(block_size=8, num_blocks=64, overlap_schedule="on"),
}


@pytest.mark.parametrize("name", list(ENGINES))
def test_engine_greedy_equals_the_adjusted_full_forward(model, name):
    """Greedy requests with each adjustment, and none, in one batch: every output is the reference's. The strong
    frequency penalty never repeats a token where plain greedy does; a +100 bias forces its token; a -100 bias bans
    plain greedy's favourite."""
    ps = prompts([3, 6, 9, 12, 5, 17, 8], seed=2)
    g = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = reference_greedy(model, ps[0], 16)
    assert len(set(plain)) < len(plain)                                # plain greedy repeats itself here
    params = [SamplingParams(frequency_penalty=2.0, **g), SamplingParams(**g),
              SamplingParams(logit_bias={42: 100.0}, **g), SamplingParams(logit_bias={plain[0]: -100.0}, **g),
              SamplingParams(presence_penalty=1.5, repetition_penalty=1.3, frequency_penalty=-0.5, **g),
              SamplingParams(repetition_penalty=0.7, **g),
              # every logit negative: the repetition penalty's other branch (and bias before it) decides
              SamplingParams(repetition_penalty=1.5, logit_bias={t: -30.0 for t in range(V)}, **g)]
    engine = Engine(model, config=EngineConfig(**ENGINES[name]))
    if name == "overlap-padded":
        engine.use_decode_graphs(capture=False)
    outs = [o.token_ids for o in engine.generate(ps, params)]
    assert outs == [adjusted_greedy(model, p, 16, sp) for p, sp in zip(ps, params)]
    assert outs[1] == reference_greedy(model, ps[1], 16)
    assert len(set(outs[0])) == 16 and outs[2] == [42] * 16 and plain[0] not in outs[3]
    assert engine.penalties.counts.shape[0] == 0 and not engine.penalties.rows        # freed with the last one
    if name == "preempt":
        assert engine.scheduler.num_preemptions > 0
    if name == "overlap-padded":
        assert engine.step_stats["chained_steps"] > 0


def test_repetition_penalty_equals_hf_logits_processor(model):
    """Step by step against transformers' own RepetitionPenaltyLogitsProcessor over cache-free full forwards."""
    transformers = pytest.importorskip("transformers", reason="needs the optional `hf` extra (CI pins it)")
    prompt, n = prompts([7], seed=5)[0], 14
    for r in (1.8, 0.6):
        proc = transformers.RepetitionPenaltyLogitsProcessor(r)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(n):
                scores = proc(ids, model(ids)[:, -1].double())
                ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], 1)
        want = ids[0, len(prompt):].tolist()
        engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=32))
        got = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                                       repetition_penalty=r))[0].token_ids
        assert got == want, r
        assert got != reference_greedy(model, prompt, n), r            # the penalty changed something


def test_mixed_batch_leaves_others_as_alone_and_logprobs_stay_raw(model):
    """Sampled requests with and without penalties: a seeded one without gets exactly its solo tokens and
    logprobs; the penalised one's logprobs are the model's own log_softmax (vLLM's default), not the adjusted
    distribution's."""
    ps = prompts([5, 8], seed=7)
    free = SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True, logprobs=2)
    pen = SamplingParams(temperature=0.9, seed=4, max_tokens=12, ignore_eos=True, logprobs=1, frequency_penalty=2.0,
                         presence_penalty=1.0, repetition_penalty=1.5, logit_bias={9: 4.0})
    cfg = EngineConfig(block_size=8, num_blocks=64)
    solo = Engine(model, config=cfg).generate([ps[1]], free)[0]
    both = Engine(model, config=cfg).generate(ps, [pen, free])
    assert both[1].token_ids == solo.token_ids
    assert [lp for lp, _, _ in both[1].logprobs] == pytest.approx([lp for lp, _, _ in solo.logprobs], abs=1e-9)
    alone_pen = Engine(model, config=cfg).generate([ps[0]], pen)[0]
    assert alone_pen.token_ids == both[0].token_ids                      # and the other way round
    with torch.no_grad():
        raw = model(torch.tensor([ps[0] + both[0].token_ids]))[0].double().log_softmax(-1)
    want = [raw[len(ps[0]) - 1 + i, t].item() for i, t in enumerate(both[0].token_ids)]
    assert [lp for lp, _, _ in both[0].logprobs] == pytest.approx(want, abs=1e-5)


def test_speculation_steps_aside_for_penalties(model):
    """An MTP engine runs plain steps for a batch with a penalised request: its tokens are the adjusted reference's;
    without penalties the same engine speculates."""
    p = prompts([9], seed=8)[0]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, frequency_penalty=1.5)
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, num_speculative_tokens=2))
    assert engine.generate([p], params)[0].token_ids == adjusted_greedy(model, p, 10, params)
    assert engine.spec_stats["steps"] == 0
    engine.generate([p], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    assert engine.spec_stats["steps"] > 0


def test_disaggregated_decode_counts_the_prefill_workers_token(model):
    """A decode worker's row starts from the tokens generated before it (the prefill worker's first one)."""
    from dsv3.infer.disagg import DecodeEngine, PrefillEngine
    p, cfg = prompts([9], seed=9)[0], EngineConfig(block_size=4, num_blocks=32)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, frequency_penalty=2.0)
    prefill = PrefillEngine(model, config=cfg)
    first = prefill.generate([p], params)[0]
    decode = DecodeEngine(model, config=cfg)
    decode.add_prefilled(p, first, params, prefill.exported[first.request_id])
    final = []
    while decode.has_unfinished():
        final += [o for o in decode.step() if o.finished]
    assert final[-1].token_ids == adjusted_greedy(model, p, 12, params)


@pytest.mark.parametrize("kwargs, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 2.1}, "repetition_penalty"), ({"logit_bias": {1: 101}}, "logit_bias"),
    ({"logit_bias": {"1": 1.0}}, "logit_bias"), ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": [1]}, "logit_bias"),
])
def test_bad_values_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_logit_bias_ids_are_checked_against_the_vocabulary(model):
    engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=16))
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request([1, 2, 3], SamplingParams(logit_bias={V: 1.0}))
    assert not engine.has_unfinished()
    bias = {1: 2.0}
    params = SamplingParams(logit_bias=bias)
    bias[1] = 99.0                                  # the request keeps its own copy
    assert params.logit_bias == {1: 2.0}


def _step(state, seqs, logits):
    scores, selected = state.apply(seqs, logits)
    state.record(selected, scores.argmax(-1))


def test_no_host_sync_cpu():
    state, seqs = PenaltyState(V, "cpu"), fake_seqs(MIXED)
    logits = torch.randn(len(seqs), V)
    with NoSync():
        _step(state, seqs, logits)               # rows filled in on first use
        _step(state, seqs, logits)


@pytest.mark.gpu
@CUDA
def test_no_host_sync_cuda():
    state, seqs = PenaltyState(V, "cuda"), fake_seqs(MIXED)
    logits = torch.randn(len(seqs), V, device="cuda")
    _step(state, seqs, logits)                   # warm up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(state, fake_seqs(MIXED, seed=1, start=10), logits)        # new rows: their setup is sync-free too
        _step(state, seqs, logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@CUDA
def test_cuda_graph_decode_with_penalties_equals_eager_decode():
    """bf16 on the GPU: decode replayed from captured graphs, with the overlap schedule (chained steps count the
    tokens they never read on the host), gives the eager synchronous engine's penalised tokens."""
    lm = build(tiny_config(vocab_size=V), seed=3, dtype=torch.bfloat16).cuda()
    ps = prompts([5, 17, 30, 9])
    g = dict(max_tokens=24, ignore_eos=True)
    params = [SamplingParams(temperature=0.0, frequency_penalty=2.0, **g),
              SamplingParams(temperature=0.0, **g),
              SamplingParams(temperature=0.8, seed=1, repetition_penalty=1.5, presence_penalty=1.0, **g),
              SamplingParams(temperature=0.0, logit_bias={11: 100.0}, **g)]
    engine = Engine(lm, config=EngineConfig(block_size=16, num_blocks=64))
    assert engine.runner.graphs is not None and engine.overlap
    graphed = [o.token_ids for o in engine.generate(ps, params)]
    assert engine.step_stats["chained_steps"] > 0
    eager = [o.token_ids for o in Engine(lm, config=EngineConfig(block_size=16, num_blocks=64, cuda_graphs=False,
                                                                  overlap_schedule="off")).generate(ps, params)]
    assert len(set(graphed[0])) == 24 and graphed[3] == [11] * 24
    # bf16: padding changes GEMM shapes, so near-ties may flip (as tests/test_infer_engine.py's graph test)
    agree = sum(a == b for x, y in zip(graphed, eager) for a, b in zip(x, y)) / (24 * len(ps))
    assert agree >= 0.9, (agree, graphed, eager)
