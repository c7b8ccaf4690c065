"""The engine against the model's full forward (no cache): greedy outputs are identical through the paged cache,
chunked prefill, preemption and prefix caching; every block comes back; bad requests fail alone."""

import pytest
import torch

from conftest import build, random_prompts, reference_greedy, tiny_config
from dsv3.infer import Engine, EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def model():
    # float64: the engine's absorbed decode and the reference's naive form then agree far below any logit gap
    return build(tiny_config(vocab_size=96), seed=3, dtype=torch.float64)


prompts = random_prompts


GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def all_blocks_free(engine: Engine) -> bool:
    b = engine.blocks
    return b.num_free_blocks == b.num_blocks and not any(b.ref_count)


@pytest.mark.parametrize("config", [
    EngineConfig(block_size=8, num_blocks=64),                                   # plain continuous batching
    EngineConfig(block_size=8, num_blocks=64, max_num_batched_tokens=7),         # chunked prefill, mixed steps
    EngineConfig(block_size=4, num_blocks=14, max_num_seqs=8),                   # preemption by recomputation
], ids=["batch", "chunked", "preempt"])
def test_greedy_engine_equals_full_forward(model, config):
    ps = prompts([1, 5, 8, 9, 17, 30])
    want = [reference_greedy(model, p, GREEDY.max_tokens) for p in ps]
    engine = Engine(model, config=config)
    outs = engine.generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == want
    assert all(o.finish_reason == "length" for o in outs)
    assert all_blocks_free(engine)
    if config.num_blocks == 14:
        assert engine.scheduler.num_preemptions > 0


def test_padded_decode_buckets_equal_full_forward(model):
    """The CUDA-graph decode path without the graph: batches padded to buckets (3 -> 4, 6 -> 8 rows), block
    tables to power-of-two widths, padding rows writing to the scratch block. Outputs and block accounting are
    those of the unpadded engine; preemption (max_num_seqs 6, 14 blocks) changes bucket sizes mid-run."""
    ps = prompts([1, 5, 8, 9, 17, 30])
    want = [reference_greedy(model, p, 10) for p in ps]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    for config in (EngineConfig(block_size=4, num_blocks=64), EngineConfig(block_size=4, num_blocks=17)):
        engine = Engine(model, config=config)
        engine.use_decode_graphs(capture=False)
        assert [o.token_ids for o in engine.generate(ps[:3], params)] == want[:3]
        assert [o.token_ids for o in engine.generate(ps, params)] == want
        assert all_blocks_free(engine)
        keys = set(engine.runner.graphs.buckets)
        assert {b for b, _ in keys} >= {4, 8} and len({w for _, w in keys}) >= 3, keys
        # the scratch block is outside what the manager hands out, and only padding wrote to it
        assert engine.cache.scratch_block == engine.blocks.num_blocks == engine.cache.c_kv.shape[1] - 1
    assert engine.scheduler.num_preemptions > 0


def test_capture_all_covers_every_bucket_a_generation_meets(model, monkeypatch):
    """EngineConfig.capture_graphs_at_start: DecodeGraphs.capture_all captures every (batch size, table width)
    bucket once, so no step of any later batch meets a bucket without its graph (a server stalled on such captures
    mid-traffic). The keys a real generation of ragged prompts met (padded buckets, capture off) and every key
    `key()` can give are among the captured ones; a second call captures nothing; with capture off it is a no-op."""
    from dsv3.infer.graphs import DecodeGraphs
    from dsv3.infer.runner import Row
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, max_num_seqs=6))
    engine.use_decode_graphs(capture=False)
    assert engine.runner.graphs.capture_all() == 0 and not engine.runner.graphs.buckets
    ps = prompts([1, 5, 8, 9, 17, 30])
    for n in (6, 3, 1):
        engine.generate(ps[:n], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    met = set(engine.runner.graphs.buckets)
    assert len({b for b, _ in met}) >= 2 and len({w for _, w in met}) >= 2, met

    def fake_capture(self, bucket):                  # a capture's eager warm-up run, and what it leaves behind
        # as inside a step: compiled layers must not trace a backward (custom ops without one fail so)
        assert torch.is_inference_mode_enabled()
        self._body(bucket)
        bucket.graph = object()
        self.captures += 1
    monkeypatch.setattr(DecodeGraphs, "_capture", fake_capture)
    g = engine.runner.graphs
    fresh = DecodeGraphs(engine.cache, g.body, 6, g.max_blocks, capture=True, pool=object())
    n = fresh.capture_all()
    assert n == len(fresh.batch_sizes) * len(fresh.widths()) == len(fresh.buckets) == fresh.captures
    assert met <= set(fresh.buckets)
    for rows in range(1, 7):
        for need in range(1, g.max_blocks + 1):
            key = fresh.key([Row([0], 1, [0] * need)] * rows)
            assert fresh.buckets[key].graph is not None, (rows, need, key)
    assert fresh.capture_all() == 0
    # the engine's own: the MTP module's graphs too only where it speculates (without, its latents have no layer)
    for k in (0, 1):
        engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, max_num_seqs=3,
                                                   num_speculative_tokens=k, max_model_len=32))
        engine.use_decode_graphs(capture=False)
        for g in engine.runner.all_graphs():
            g.capture = True
        n = engine.capture_all_graphs()
        want = sum(len(g.batch_sizes) * len(g.widths()) for g in engine.runner.all_graphs()[:1 if not k else None])
        assert n == want == engine.stats()["graph_captures"] > 0, (k, n, want)


@pytest.mark.parametrize("overlap", ["off", "on"])
@pytest.mark.parametrize("delay", [0, 3])
def test_admission_delay_holds_arrivals_and_changes_no_output(model, delay, overlap):
    """Requests arriving one per step while others decode: with admission_delay d each waits until the oldest
    waiting one has waited d steps (or they would fill every free slot), so they are prefilled together; without,
    each is admitted at its first step. The tokens are the reference's either way. With the overlap schedule the
    same steps run, and each first token comes back from the step() call after the one that sampled it."""
    ps = prompts([3, 4, 5, 6, 7], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=64, max_num_seqs=8, admission_delay=delay,
                                               overlap_schedule=overlap))
    late = int(overlap == "on")
    ids, admitted, outs = [engine.add_request(ps[0], params)], {}, {}
    step = 0
    while engine.has_unfinished():
        step += 1
        for o in engine.step():
            admitted.setdefault(o.request_id, step)
            outs[o.request_id] = outs.get(o.request_id, []) + o.new_token_ids
        if step < len(ps):                        # one arrival after each step, while request 0 decodes
            ids.append(engine.add_request(ps[step], params))
    first = [admitted[i] for i in ids]           # the step that produced each request's first token
    if delay:
        # arrivals after steps 1..4: the first one is due at step 1 + 3 and takes the two arrived since along;
        # the one arriving after step 4 waits its 3 steps alone
        assert first == [i + late for i in (1, 4, 4, 4, 7)]
        assert engine.step_stats["prefill_steps"] == 3
    else:
        assert first == [i + late for i in (1, 2, 3, 4, 5)]
        assert engine.step_stats["prefill_steps"] == 5
    assert [outs[i] for i in ids] == [reference_greedy(model, p, 12) for p in ps]
    assert all_blocks_free(engine)


def test_prefix_cache_hits_change_no_output(model):
    shared = prompts([20], seed=1)[0]
    ps = [shared + tail for tail in prompts([3, 7, 1], seed=2)]
    want = [reference_greedy(model, p, 4) for p in ps]
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    first = engine.generate(ps[:1], params)
    rest = engine.generate(ps[1:], params)
    assert [o.token_ids for o in first + rest] == want
    assert engine.blocks.prefix_hits >= 2 * (20 // 4)
    assert all_blocks_free(engine)


def test_aborts_and_finishes_return_every_block(model):
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=40, max_num_batched_tokens=16))
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
           for p in prompts([3, 9, 14, 20, 6])]
    for _ in range(3):
        engine.step()
    engine.abort(ids[1])
    engine.abort(ids[4])
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
    assert outs[ids[1]].finish_reason == "abort" and outs[ids[4]].finish_reason == "abort"
    assert all(outs[i].finish_reason == "length" and len(outs[i].token_ids) == 12 for i in (0, 2, 3))
    assert all_blocks_free(engine) and not engine.seqs


def test_stop_tokens_and_prompt_logprobs(model):
    p = prompts([10], seed=4)[0]
    want = reference_greedy(model, p, 6)
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=32))
    out = engine.generate([p], SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[want[2]],
                                              ignore_eos=True, logprobs=2, prompt_logprobs=1))[0]
    stop_at = want.index(want[2])
    assert out.token_ids == want[:stop_at + 1] and out.finish_reason == "stop"
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p + out.token_ids]))[0].double(), -1)
    prompt_lp = [ref[i, p[i + 1]].item() for i in range(len(p) - 1)]
    assert [lp for lp, _, _ in out.prompt_logprobs] == pytest.approx(prompt_lp, abs=1e-5)
    gen_lp = [ref[len(p) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert [lp for lp, _, _ in out.logprobs] == pytest.approx(gen_lp, abs=1e-5)
    assert all(ids[0] == t for (_, ids, _), t in zip(out.logprobs, out.token_ids))     # greedy = top-1


def test_bad_requests_fail_alone_and_the_engine_keeps_serving(model):
    engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=16, max_model_len=64))
    good = prompts([5])[0]
    for prompt, params, msg in [
        (list(range(2, 66)), GREEDY, "context"),
        ([], GREEDY, "empty"),
        (good + [96], GREEDY, "vocabulary"),
        ("text", GREEDY, "tokenizer"),
    ]:
        with pytest.raises(ValueError, match=msg):
            engine.add_request(prompt, params)
    for kwargs, field in [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
                          ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k")]:
        with pytest.raises(ValueError, match=field):
            engine.add_request(good, SamplingParams(**kwargs))
    with pytest.raises(ValueError, match="cache capacity"):
        Engine(model, config=EngineConfig(block_size=8, num_blocks=2)).add_request(good, SamplingParams(max_tokens=30))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([good, []], GREEDY)
    assert not engine.has_unfinished()
    assert engine.generate([good], GREEDY)[0].token_ids == reference_greedy(model, good, GREEDY.max_tokens)


@pytest.mark.parametrize("k,padded,fused", [(1, False, True), (2, False, True), (3, False, True), (2, True, True),
                                            (1, False, False), (2, True, False)])
def test_mtp_speculative_greedy_equals_plain_greedy(model, k, padded, fused):
    """Both speculative paths: the fused greedy step (dsv3.infer.spec_step) and draft / verify / accept as separate
    steps (tests/test_infer_spec.py compares the two step by step)."""
    ps = prompts([3, 9, 16], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    want = [reference_greedy(model, p, 7) for p in ps]
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, num_speculative_tokens=k,
                                               max_num_batched_tokens=10, speculative_fused=fused))
    if padded:    # the verify rows (3 x 3 one-token rows) run through the padded graph buckets
        engine.use_decode_graphs(capture=False)
    outs = engine.generate(ps, params)
    assert [o.token_ids for o in outs] == want
    stats = engine.spec_stats
    assert stats["steps"] > 0 and stats["proposed"] >= stats["accepted"] >= 0
    assert all_blocks_free(engine)
    if padded and fused:     # 3 sequences x 3 rows: the bucket of 4 sequences (12 rows), then fewer as they end
        assert 12 in {b for b, _ in engine.runner.spec_graphs.buckets}
    elif padded:             # verify rows and steady-state MTP catch-up rows both went through buckets
        assert any(b == 16 for b, _ in engine.runner.graphs.buckets) and engine.runner.mtp_graphs.buckets


def test_mtp_acceptance_count_matches_an_independent_replay():
    """Greedy, k=1: each speculative step at position L drafts argmax of the MTP head at L-1 (which guesses token
    L+1) and keeps it iff it equals the greedy token there. Replaying that rule with the model's own cache-free
    `mtp_logits` over the final sequence must give the engine's step and acceptance counts. (A vocabulary of 8 and
    this seed give a mix of accepted and rejected drafts, so both branches are checked.)"""
    lm = build(tiny_config(vocab_size=8), seed=0, dtype=torch.float64)
    p, n = [1, 2, 3, 0, 2, 1, 4, 5], 16
    engine = Engine(lm, config=EngineConfig(block_size=4, num_blocks=32, num_speculative_tokens=1))
    out = engine.generate([p], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
    assert out.token_ids == reference_greedy(lm, p, n)
    ids = torch.tensor([p + out.token_ids])
    with torch.no_grad():
        drafts = lm.mtp_logits(lm.hidden_states(ids), ids)[0][0].argmax(-1).tolist()      # drafts[i] guesses i+2
    seq, L, steps, accepted = ids[0].tolist(), len(p), 0, 0
    while L - len(p) + 1 < n:                     # tokens generated so far: positions len(p) .. L
        a = int(drafts[L - 1] == seq[L + 1])
        steps, accepted, L = steps + 1, accepted + a, L + a + 1
    assert 0 < accepted < steps
    assert (engine.spec_stats["steps"], engine.spec_stats["accepted"]) == (steps, accepted)
    assert engine.spec_stats["proposed"] == steps


def test_text_prompts_stop_strings_and_bench_cli(tmp_path):
    from dsv3.cli import main
    from dsv3.data import train_tokenizer
    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "import os\nprint(os.sep)\n" * 20], 300)
    lm = build(tiny_config(vocab_size=tok.vocab_size), seed=7, dtype=torch.float64)
    engine = Engine(lm, tok, EngineConfig(block_size=8, num_blocks=32))
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = engine.generate(["def f(x):"], greedy)[0]
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True) and len(full.token_ids) == 12
    stop = full.text[len(full.text) // 2:][:2]
    assert stop
    cut = engine.generate(["def f(x):"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                       stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    assert main(["bench", "decode", "--config", "tiny", "--batches", "1,2", "--prompt", "8", "--tokens", "3",
                 "--device", "cpu"]) == 0
    assert main(["bench", "prefill", "--config", "tiny", "--batches", "2", "--prompt", "8", "--device", "cpu"]) == 0


def test_speculative_sampling_keeps_the_target_distribution():
    """Second generated token with MTP speculation (k=1, temperature 1) vs its exact distribution under the model,
    sum_t1 p(t1 | prompt) p(t2 | prompt, t1). The random MTP head is a poor drafter (about a third of its drafts are
    accepted), so accepting drafts blindly moves the distribution far beyond the tolerance (TV 0.52); the rejection
    sampler must undo that. 4000 samples over 16 tokens: sampling noise in total variation ~0.03."""
    lm = build(tiny_config(vocab_size=16), seed=11, dtype=torch.float64)
    prompt = [3, 7, 1, 12]
    with torch.no_grad():
        lm.lm_head.weight.mul_(10.0)       # peaked distributions: the MTP head's drafts then often differ
        p1 = torch.softmax(lm(torch.tensor([prompt]))[0, -1], -1)
        p2 = sum(p1[t] * torch.softmax(lm(torch.tensor([prompt + [t]]))[0, -1], -1) for t in range(16))
    n = 4000
    engine = Engine(lm, config=EngineConfig(block_size=8, num_blocks=n + 8, max_num_seqs=n, num_speculative_tokens=1,
                                            speculative_max_batch=n, max_num_batched_tokens=4 * n))
    outs = engine.generate([prompt] * n, [SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True, seed=i)
                                          for i in range(n)])
    assert engine.spec_stats["proposed"] == n
    second = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=16).double() / n
    tv = 0.5 * (second - p2).abs().sum().item()
    # measured: 0.028 here; accepting every draft gives 0.52
    assert tv < 0.06, tv
    assert 0 < engine.spec_stats["accepted"] < 0.6 * n


def test_fp8_weights_serve_close_to_bf16_and_exactly_like_their_own_forward():
    from dsv3.infer.fp8_weights import FP8Experts, FP8Linear, quantize_weights
    lm = build(tiny_config(vocab_size=96), seed=12)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm(ids)
        quantize_weights(lm)
        got = lm(ids)
    assert any(isinstance(m, FP8Experts) for m in lm.modules()) and any(isinstance(m, FP8Linear) for m in lm.modules())
    assert lm.layers[1].mlp.experts.gate_proj.dtype == torch.float8_e4m3fn
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.08, rel                  # e4m3 has a 3-bit mantissa: a few percent, not zero
    p = prompts([7, 13], seed=8)
    engine = Engine(lm, config=EngineConfig(block_size=4, num_blocks=32))
    assert [o.token_ids for o in engine.generate(p, GREEDY)] == [reference_greedy(lm, x, GREEDY.max_tokens) for x in p]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-weights"])
def test_cuda_graph_decode_matches_eager_decode(fp8):
    """bf16 on the GPU: hidden states of decode steps replayed from captured graphs equal the eager forward of the
    same rows (same kernels; padding only changes GEMM shapes), over steps whose inputs change between replays, and
    the greedy outputs of a whole generation agree with the eager engine's."""
    from dsv3.infer.runner import Row
    model = build(tiny_config(vocab_size=96), seed=3, dtype=torch.bfloat16).cuda()
    if fp8:
        from dsv3.infer.fp8_weights import quantize_weights
        quantize_weights(model)
    # synchronous steps here: the rows below read each sequence's last token on the host after step()
    engine = Engine(model, config=EngineConfig(block_size=16, num_blocks=64, overlap_schedule="off"))
    assert engine.runner.graphs is not None and engine.runner.graphs.capture
    ps = prompts([5, 17, 30])
    for p in ps:
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    engine.step()                                                    # prefill
    for _ in range(6):
        seqs = list(engine.scheduler.running)
        assert all(engine.blocks.ensure_capacity(s, s.num_cached_tokens + 1) for s in seqs)
        rows = [Row([s.token_ids[-1]], s.num_cached_tokens, s.block_table) for s in seqs]
        eager = engine.runner.forward(engine.runner.prepare(rows, graph=False))
        graph_batch = engine.runner.prepare(rows)
        assert graph_batch.graph_key[0] == 4
        replayed = engine.runner.forward(graph_batch)
        torch.testing.assert_close(replayed.float(), eager.float(), atol=3e-2, rtol=3e-2)
        engine.step()
    assert all(b.graph is not None for b in engine.runner.graphs.buckets.values())
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    with_graphs = [o.token_ids for o in Engine(model, config=EngineConfig(block_size=16, num_blocks=64)
                                               ).generate(ps, params)]
    without = [o.token_ids for o in Engine(model, config=EngineConfig(block_size=16, num_blocks=64, cuda_graphs=False)
                                           ).generate(ps, params)]
    agree = sum(a == b for x, y in zip(with_graphs, without) for a, b in zip(x, y)) / (24 * len(ps))
    assert agree >= 0.9, (agree, with_graphs, without)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_graphs_captured_at_start_leave_no_capture_to_the_steps():
    """capture_graphs_at_start on the GPU: every bucket captured when the engine is built; a generation whose batch
    shrinks as ragged requests end (new batch sizes and table widths) captures nothing more, and its greedy tokens
    are the lazily capturing engine's."""
    model = build(tiny_config(vocab_size=96), seed=3, dtype=torch.bfloat16).cuda()
    config = EngineConfig(block_size=16, num_blocks=64, max_num_seqs=4, max_model_len=256)
    early = Engine(model, config=EngineConfig(**{**config.__dict__, "capture_graphs_at_start": True}))
    start = early.stats()["graph_captures"]
    g = early.runner.graphs
    assert start == len(g.batch_sizes) * len(g.widths()) > 0
    ps = prompts([5, 17, 30, 60])
    outs = early.generate(ps, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    assert early.stats()["graph_captures"] == start
    lazy = Engine(model, config=config)
    want = lazy.generate(ps, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    assert lazy.stats()["graph_captures"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert all_blocks_free(early)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_cuda_graph_speculative_decoding_matches_plain_decoding():
    """bf16 on the GPU, k=2: the fused speculative step replays from graphs; greedy outputs agree with plain graph
    decoding (bf16: padding changes GEMM shapes, so near-ties may flip; exactness is the fp64 CPU test). The
    synchronous path's graphs: tests/test_infer_spec.py."""
    model = build(tiny_config(vocab_size=96), seed=3, dtype=torch.bfloat16).cuda()
    ps = prompts([5, 17, 30])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine = Engine(model, config=EngineConfig(block_size=16, num_blocks=64, num_speculative_tokens=2))
    spec = [o.token_ids for o in engine.generate(ps, params)]
    plain = [o.token_ids for o in Engine(model, config=EngineConfig(block_size=16, num_blocks=64)).generate(ps, params)]
    agree = sum(a == b for x, y in zip(spec, plain) for a, b in zip(x, y)) / (24 * len(ps))
    assert agree >= 0.9, (agree, spec, plain)
    graphs = engine.runner
    assert any(b.graph is not None for b in graphs.spec_graphs.buckets.values())
    assert engine.spec_stats["steps"] > 0 and all_blocks_free(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
@pytest.mark.parametrize("k", [1, 2])
def test_cuda_graph_chained_speculative_steps_equal_unchained_ones(k):
    """bf16 on the GPU: fused speculative steps chained (the default with captured graphs: each launched before the
    last one's accepted counts are read, its positions moved on by Batch.advance inside the replayed body) vs the
    same engine's graphs with the overlap schedule off: the same captured bodies on the same values, so the same
    tokens, exactly; a stop id ends one request inside a step. A chained steady-state step makes no synchronising
    CUDA call (its only wait is the event of the step before it)."""
    model = build(tiny_config(vocab_size=96), seed=3, dtype=torch.bfloat16).cuda()
    ps = prompts([5, 17, 30])
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine = Engine(model, config=EngineConfig(block_size=16, num_blocks=64, num_speculative_tokens=k))
    assert engine.spec_overlap
    tenth = engine.generate([ps[1]], greedy)[0].token_ids[9]          # also captures the graphs
    params = [greedy, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[tenth]),
              greedy]
    chained = [o.token_ids for o in engine.generate(ps, params)]
    assert engine.step_stats["chained_steps"] > 0 and all_blocks_free(engine)
    engine.config.overlap_schedule = "off"
    assert not engine.spec_overlap
    unchained = [o.token_ids for o in engine.generate(ps, params)]
    assert chained == unchained and all_blocks_free(engine)
    assert chained[1][-1] == tenth and len(chained[1]) <= 10
    # steady state, two sequences chaining: once a chained step is in flight, the steps make no synchronising call
    engine.config.overlap_schedule = "auto"
    for p in ps[:2]:
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    chained_before = engine.step_stats["chained_steps"]
    while engine.step_stats["chained_steps"] < chained_before + 2:
        engine.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.step_stats["chained_steps"] == chained_before + 5
    while engine.has_unfinished():
        engine.step()
    assert all_blocks_free(engine)
