"""The fused greedy speculative step (dsv3.infer.spec_step) against the synchronous path (draft, verify, accept as
separate steps) and the cache-free forward, float64 `tiny`: identical tokens, identical acceptance counts step by
step (so the drafts, which verification would hide, are the same too), one host read and one graph-body run per
step; and mixed batches (arrivals, preemption, stop ids, a sampled request joining) keep all of it."""

import random

import pytest
import torch

from conftest import build, random_prompts, reference_greedy, tiny_config
from dsv3.infer import Engine, EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def model():
    return build(tiny_config(vocab_size=96), seed=3, dtype=torch.float64)


@pytest.fixture(scope="module")
def easy():
    """A model whose MTP head often agrees with it (vocabulary 8): most drafts accepted, so the chained drafts of
    k > 1 and the multi-token steps are exercised, not only rejections."""
    return build(tiny_config(vocab_size=8), seed=0, dtype=torch.float64)


prompts = random_prompts


def run(model, ps, params, fused: bool, padded: bool, arrive: list[int] | None = None, **cfg) -> tuple[list, list]:
    """Outputs and the per-step (steps, accepted) trace; with `arrive`, request i is added after step arrive[i]."""
    config = dict(block_size=4, num_blocks=64, max_num_seqs=8, speculative_max_batch=8) | cfg
    engine = Engine(model, config=EngineConfig(speculative_fused=fused, **config))
    if padded:
        engine.use_decode_graphs(capture=False)
    params = params if isinstance(params, list) else [params] * len(ps)
    arrive = arrive or [0] * len(ps)
    ids, final, trace, step = [], {}, [], 0
    while engine.has_unfinished() or len(ids) < len(ps):
        ids += [engine.add_request(ps[i], params[i]) for i in range(len(ps)) if arrive[i] == step]
        step += 1
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
        trace.append((engine.spec_stats["steps"], engine.spec_stats["accepted"]))
    b = engine.blocks
    assert b.num_free_blocks == b.num_blocks and not any(b.ref_count)
    return [final[i] for i in ids], trace, engine


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "buckets"])
def test_fused_step_equals_the_synchronous_path_and_plain_greedy(easy, k, padded):
    ps = prompts([2, 5, 9], 8, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    fused, trace, engine = run(easy, ps, params, fused=True, padded=padded, num_speculative_tokens=k)
    sync, sync_trace, _ = run(easy, ps, params, fused=False, padded=padded, num_speculative_tokens=k)
    assert [o.token_ids for o in fused] == [reference_greedy(easy, p, 14) for p in ps]
    assert [o.token_ids for o in sync] == [o.token_ids for o in fused]
    assert trace == sync_trace               # the same drafts accepted in the same steps
    steps, accepted = trace[-1]
    assert 0 < accepted < steps * k          # both outcomes occur
    if padded:                               # 3 sequences x (k+1) rows: the bucket of 4 sequences, padding included
        assert 4 * (k + 1) in {b for b, _ in engine.runner.spec_graphs.buckets}


def test_mixed_batches_arrivals_preemption_stop_ids_and_a_sampled_request(model):
    """Requests arriving while others decode (their prefill steps make the others' drafts stale: drafted again,
    re-running the MTP module's last position from the fused step's hidden state), a cache too small for all
    (preemption), a stop id; then a seeded sampled request joining a greedy batch after fused steps (the batch takes
    the synchronous path). Fused and synchronous engines agree token for token and step for step; greedy tokens are
    the reference's."""
    ps = prompts([3, 7, 4, 11, 6], 96, seed=2)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    arrive = [0, 1, 4, 6, 7]
    for cfg in (dict(), dict(num_blocks=12, max_num_seqs=4)):
        for k in (1, 2):
            a, trace_a, _ = run(model, ps, greedy, fused=True, padded=True, arrive=arrive, num_speculative_tokens=k,
                                **cfg)
            b, trace_b, engine = run(model, ps, greedy, fused=False, padded=True, arrive=arrive,
                                     num_speculative_tokens=k, **cfg)
            assert [o.token_ids for o in a] == [o.token_ids for o in b] == [reference_greedy(model, p, 16) for p in ps]
            assert trace_a == trace_b and trace_a[-1][1] > 0
    assert engine.scheduler.num_preemptions > 0
    want = reference_greedy(model, ps[1], 16)
    stop = SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[want[5]], ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_k=5, max_tokens=10, seed=7, ignore_eos=True)
    mix = [greedy, stop, greedy, sampled, greedy]
    a, trace_a, _ = run(model, ps, mix, fused=True, padded=False, arrive=arrive, num_speculative_tokens=2)
    b, trace_b, _ = run(model, ps, mix, fused=False, padded=False, arrive=arrive, num_speculative_tokens=2)
    assert [o.token_ids for o in a] == [o.token_ids for o in b] and trace_a == trace_b
    assert a[1].finish_reason == "stop" and a[1].token_ids == want[:want.index(want[5]) + 1]
    for i in (0, 2, 4):
        assert a[i].token_ids == reference_greedy(model, ps[i], 16)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "sync"])
def test_one_token_prompt_chunks_do_not_speculate(model, fused):
    """A token budget that leaves a prompt a one-token chunk (here max_num_batched_tokens 1; on a server, the
    budget's leftover at the end of a step) schedules a row of n = 1 with num_cached_tokens > 0 that is not the
    sequence's last: a speculative step there took the next prompt token for the last emitted one and emitted
    tokens mid-prompt. The tokens are the reference's."""
    ps = prompts([5, 9], 96, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs, _, _ = run(model, ps, params, fused=fused, padded=False, arrive=[0, 2], num_speculative_tokens=2,
                     max_num_batched_tokens=1)
    assert [o.token_ids for o in outs] == [reference_greedy(model, p, 8) for p in ps]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "buckets"])
def test_chained_fused_steps_equal_the_synchronous_ones_and_plain_greedy(easy, k, padded):
    """The overlap schedule for fused steps (dsv3.infer.speculation.can_chain): step t+1 launches before step t's
    accepted counts are read, its rows at the host's stale positions moved on by a + 1 on the device
    (Batch.advance). The tokens are plain greedy decoding's and the accepted drafts the unchained engine's; chained
    steps are taken; every block comes back (in `run`)."""
    ps = prompts([2, 5, 9], 8, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    chained, trace, engine = run(easy, ps, params, fused=True, padded=padded, num_speculative_tokens=k,
                                 overlap_schedule="on")
    plain, plain_trace, _ = run(easy, ps, params, fused=True, padded=padded, num_speculative_tokens=k)
    assert [o.token_ids for o in chained] == [o.token_ids for o in plain] == [reference_greedy(easy, p, 14)
                                                                              for p in ps]
    assert engine.step_stats["chained_steps"] > 0
    assert trace[-1][1] == plain_trace[-1][1] > 0    # the same drafts accepted (a discarded step accepts none)


def test_chained_fused_steps_with_arrivals_preemption_stops_aborts_and_a_sampled_request(model):
    """What breaks a chain: arrivals (their prefill), a cache too small for all (no chain where blocks for both
    steps' worst case are not free, preemption then as unchained), stop ids and max_tokens met inside a step's
    accepted run (the step launched after it is discarded for that sequence), an abort while a step is in flight,
    a sampled request joining (synchronous speculation). Token for token the unchained engine's."""
    ps = prompts([3, 7, 4, 11, 6], 96, seed=2)
    want = reference_greedy(model, ps[1], 16)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    stop = SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[want[5]], ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_k=5, max_tokens=10, seed=7, ignore_eos=True)
    arrive = [0, 1, 4, 6, 7]
    for mix in ([greedy, stop, short, greedy, greedy], [greedy, stop, greedy, sampled, short]):
        for cfg in (dict(), dict(num_blocks=12, max_num_seqs=4)):
            for k in (1, 2):
                a, _, engine = run(model, ps, mix, fused=True, padded=True, arrive=arrive, num_speculative_tokens=k,
                                   overlap_schedule="on", **cfg)
                b, _, _ = run(model, ps, mix, fused=True, padded=True, arrive=arrive, num_speculative_tokens=k,
                              **cfg)
                assert [o.token_ids for o in a] == [o.token_ids for o in b]
                assert [o.finish_reason for o in a] == [o.finish_reason for o in b]
                assert engine.step_stats["chained_steps"] > 0
    assert a[1].finish_reason == "stop" and a[1].token_ids == want[:want.index(want[5]) + 1]
    assert len(a[4].token_ids) == 5
    # an abort while a chained step is in flight: the caller gets what was read, nothing after; every block back
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, num_speculative_tokens=2,
                                               overlap_schedule="on"))
    ids = [engine.add_request(p, greedy) for p in ps[:2]]
    final = {}
    for step in range(40):
        if step == 6:
            assert engine._in_flight is not None
            engine.abort(ids[0])
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
        if not engine.has_unfinished():
            break
    assert final[ids[0]].finish_reason == "abort" and 0 < len(final[ids[0]].token_ids) < 16
    assert final[ids[0]].token_ids == reference_greedy(model, ps[0], 16)[:len(final[ids[0]].token_ids)]
    assert final[ids[1]].token_ids == reference_greedy(model, ps[1], 16)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def _drive(model, requests, config: dict, padded: bool, aborts: list) -> list:
    """(token_ids, finish_reason) per request; request i = (prompt, params, arrival step), aborts (i, step). Checks
    on the way: no output after a request's final one, the streamed deltas add up to the final tokens, every block
    back, no hang."""
    engine = Engine(model, config=EngineConfig(**config))
    if padded:
        engine.use_decode_graphs(capture=False)
    ids, final, streams, step = {}, {}, {}, 0
    while engine.has_unfinished() or len(ids) < len(requests):
        ids.update({i: engine.add_request(p, sp) for i, (p, sp, at) in enumerate(requests) if at == step})
        for i, at in aborts:
            if at == step and i in ids:
                engine.abort(ids[i])
        step += 1
        assert step < 500, "no progress"
        for o in engine.step():
            assert o.request_id not in final
            streams.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                final[o.request_id] = o
    b = engine.blocks
    assert b.num_free_blocks == b.num_blocks and not any(b.ref_count)
    assert all(streams.get(ids[i], []) == final[ids[i]].token_ids for i in range(len(requests)))
    return [(final[ids[i]].token_ids, final[ids[i]].finish_reason) for i in range(len(requests))]


@pytest.mark.parametrize("seed", range(40))
def test_chained_and_unchained_engines_agree_on_random_workloads(model, easy, seed):
    """Random workloads (the audit's differential fuzz, 40 seeds of it): k = 0..3, buckets or not, small caches
    (preemption, no chain), short contexts, token budgets, arrivals, aborts, max_tokens 1..30, stop ids, EOS, seeded
    sampled requests, logprobs and penalties (no speculation for those). The overlap schedule on (chained steps)
    and off give the same tokens and finish reasons; an abort may land one step later when chained, so an aborted
    output need only be a prefix of the other's. Greedy requests are `reference_greedy`'s."""
    r = random.Random(seed)
    m, V = (easy, 8) if r.random() < 0.6 else (model, 96)
    bs = r.choice([2, 4, 8])
    cfg = dict(block_size=bs, num_blocks=r.choice([64, 200]), max_num_seqs=r.choice([2, 4, 8]),
               speculative_max_batch=r.choice([1, 2, 8]), num_speculative_tokens=r.choice([0, 1, 2, 3]))
    if r.random() < 0.3:
        cfg["num_blocks"] = r.choice([10, 14, 20])
    if r.random() < 0.3:
        cfg["max_model_len"] = r.choice([12, 16, 20, 24])
    if r.random() < 0.2:
        cfg["max_num_batched_tokens"] = r.choice([4, 8, 16])
    context = cfg.get("max_model_len", m.config.max_position_embeddings)
    requests = []
    for _ in range(r.randint(1, 5)):
        prompt = [r.randrange(2, V) for _ in range(r.randint(1, min(10, context - 1)))]
        kw = dict(temperature=0.0, max_tokens=r.choice([1, 2, 3, 5, 8, 16, 30]), ignore_eos=r.random() < 0.6)
        if r.random() < 0.3:
            kw["stop_token_ids"] = [r.randrange(0, V)]
        if r.random() < 0.15:
            kw.update(temperature=0.8, top_k=5, seed=r.randrange(100))
        if r.random() < 0.08:
            kw["logprobs"] = 2
        if r.random() < 0.05:
            kw["repetition_penalty"] = 1.3
        params = SamplingParams(**kw)
        if -(-min(len(prompt) + params.max_tokens, context) // bs) <= cfg["num_blocks"]:
            requests.append((prompt, params, r.choice([0, 0, 0, 1, 2, 3, 5])))
    if not requests:
        return
    aborts = [(r.randrange(len(requests)), r.randint(1, 12)) for _ in range(r.choice([0, 0, 1, 2]))]
    padded = r.random() < 0.5
    off = _drive(m, requests, dict(cfg, overlap_schedule="off"), padded, aborts)
    on = _drive(m, requests, dict(cfg, overlap_schedule="on"), padded, aborts)
    for (prompt, params, _), (a, why_a), (b, why_b) in zip(requests, on, off):
        if "abort" in (why_a, why_b):
            n = min(len(a), len(b))
            assert a[:n] == b[:n]
            continue
        assert (a, why_a) == (b, why_b)
        if params.greedy and not params.modifies_logits:
            assert b == reference_greedy(m, prompt, len(b))


def test_drafting_again_after_a_plain_step_rewrites_the_mtp_latents_unchanged(model):
    """After a fused step the MTP module's last accepted position L'-1 is handed to the synchronous catch-up with the
    main model's hidden state there (the fused step's second output): a plain step in between (a new request's
    prefill) and the catch-up that follows rewrite that position's MTP latents with the same values."""
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, num_speculative_tokens=1))
    engine.add_request(prompts([6], 96)[0], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    for _ in range(4):
        engine.step()
    (seq,) = engine.scheduler.running
    assert seq.spec_next is not None and seq.spec_next[2] == seq.num_cached_tokens    # a fused step drafted
    cache, layer = engine.cache, model.config.num_hidden_layers
    slot = cache.slot(seq.block_table, seq.num_cached_tokens - 1)
    saved = cache.c_kv[layer].flatten(0, 1)[slot].clone()
    engine.add_request(prompts([5], 96, seed=1)[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    steps = engine.spec_stats["steps"]
    engine.step()                                   # prefill + seq's plain decode row
    engine.step()                                   # catch-up over L'-1 and L', then the fused step
    assert engine.spec_stats["steps"] == steps + 1
    torch.testing.assert_close(cache.c_kv[layer].flatten(0, 1)[slot], saved, rtol=1e-12, atol=1e-12)


def test_a_step_writes_only_its_sequences_next_positions_and_the_scratch_block(easy):
    """Padding rows of a bucket (3 sequences in the bucket of 4) and the chained drafts' slots, computed on the
    device: one fused step (k=3) writes latents only at each sequence's positions L .. L + 2k - 1 (verify rows, MTP
    rows, chained drafts) and in the scratch block, in every cache layer."""
    k = 3
    engine = Engine(easy, config=EngineConfig(block_size=4, num_blocks=64, num_speculative_tokens=k))
    engine.use_decode_graphs(capture=False)
    for p in prompts([6, 9, 13], 8, seed=3):
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    for _ in range(3):
        engine.step()
    cache, seqs = engine.cache, list(engine.scheduler.running)
    for s in seqs:                 # the step below takes the blocks it needs first
        engine.blocks.ensure_capacity(s, s.num_cached_tokens + 2 * k)
    allowed = {cache.slot(s.block_table, p) for s in seqs for p in range(s.num_cached_tokens, s.num_cached_tokens
                                                                         + 2 * k)}
    # every slot gets a sentinel, so that each write shows, also where an earlier step wrote the same values (the
    # step's tokens are then nonsense: only where it writes is checked)
    cache.c_kv.fill_(1e4)
    before = cache.c_kv.clone()
    steps = engine.spec_stats["steps"]
    engine.step()
    assert engine.spec_stats["steps"] == steps + 1 and 4 * (k + 1) in {b for b, _ in engine.runner.spec_graphs.buckets}
    changed = (cache.c_kv != before).any(-1).flatten(1)          # (layers, slots)
    scratch = set(range(cache.scratch_slot, cache.scratch_slot + cache.block_size))
    for layer in range(changed.shape[0]):
        slots = set(changed[layer].nonzero().flatten().tolist())
        assert slots - scratch <= allowed, (layer, sorted(slots - scratch - allowed))
    assert set(changed[-1].nonzero().flatten().tolist()) & scratch       # the padding rows wrote there


def test_one_host_read_and_one_body_per_step(model, monkeypatch):
    """A steady-state fused step of 2 sequences: exactly one device -> host read (the step's output), one run of the
    fused body (one graph replay on the GPU) and no other graph body; the synchronous path needs three reads and two
    bodies (MTP catch-up, verify)."""
    from dsv3.infer.graphs import DecodeGraphs
    counts = {"reads": 0, "bodies": 0, "inside": False}
    body = DecodeGraphs._body

    def counting_body(self, bucket):       # inside, the CPU's reference decode attention reads lengths: not the GPU's
        counts["bodies"] += 1
        counts["inside"] = True
        try:
            return body(self, bucket)
        finally:
            counts["inside"] = False
    tolist = torch.Tensor.tolist

    def counting_tolist(self):
        counts["reads"] += not counts["inside"]
        return tolist(self)
    per_step = {}
    for fused in (True, False):
        engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, num_speculative_tokens=1,
                                                   speculative_fused=fused))
        engine.use_decode_graphs(capture=False)
        for p in prompts([5, 8], 96):
            engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        for _ in range(3):
            engine.step()
        with monkeypatch.context() as m:
            m.setattr(DecodeGraphs, "_body", counting_body)
            m.setattr(torch.Tensor, "tolist", counting_tolist)
            m.setattr(torch.Tensor, "cpu", lambda self: pytest.fail("a .cpu() read on the step's path"))
            counts.update(reads=0, bodies=0)
            steps = engine.spec_stats["steps"]
            for _ in range(5):
                engine.step()
            assert engine.spec_stats["steps"] == steps + 5
        per_step[fused] = (counts["reads"] / 5, counts["bodies"] / 5)
    assert per_step == {True: (1, 1), False: (3, 2)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
@pytest.mark.parametrize("k", [1, 3])
def test_cuda_graph_fused_step_matches_the_synchronous_path(k):
    """bf16 on the GPU: the fused step replayed from its captured graphs vs the synchronous path (its own graphs)
    and plain graph decoding; near-ties may flip in bf16 (padding changes GEMM shapes), so agreement >= 90%."""
    model = build(tiny_config(vocab_size=96), seed=3, dtype=torch.bfloat16).cuda()
    ps = prompts([5, 17, 30], 96)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = {}
    for name, kw in (("fused", dict(num_speculative_tokens=k)),
                     ("sync", dict(num_speculative_tokens=k, speculative_fused=False)), ("plain", dict())):
        engine = Engine(model, config=EngineConfig(block_size=16, num_blocks=64, **kw))
        outs[name] = [o.token_ids for o in engine.generate(ps, params)]
        if name == "fused":
            assert any(b.graph is not None for b in engine.runner.spec_graphs.buckets.values())
            assert engine.spec_stats["steps"] > 0
    for other in ("sync", "plain"):
        agree = sum(a == b for x, y in zip(outs["fused"], outs[other]) for a, b in zip(x, y)) / (24 * len(ps))
        assert agree >= 0.9, (other, agree, outs)


def _pd(model, p, params, prefill_k: int, decode_k: int, chunk: int | None = None, handoff: str = "shm"):
    """One request through a prefill worker and a decode worker (dsv3.infer.disagg), each speculating with k drafts
    or not; returns the final output, both engines and the decode worker's MTP-layer latents right after the import
    (its first step). `chunk`: the prefill worker's token budget per step (chunked prefill); `handoff`: the prefill
    worker's (an inline handle goes through a pickle, as through the router's connections)."""
    from dsv3.infer.disagg import DecodeEngine, PrefillEngine
    cfg = dict(block_size=4, num_blocks=64)
    budget = {} if chunk is None else dict(max_num_batched_tokens=chunk)
    prefill = PrefillEngine(model, config=EngineConfig(**cfg, **budget, num_speculative_tokens=prefill_k),
                            handoff=handoff)
    first = prefill.generate([p], params)[0]
    decode = DecodeEngine(model, config=EngineConfig(**cfg, num_speculative_tokens=decode_k))
    handle = prefill.exported.pop(first.request_id)
    if handoff == "inline":
        import pickle
        assert handle.path == "" and len(handle.data) == handle.nbytes
        handle = pickle.loads(pickle.dumps(handle))
    decode.add_prefilled(p, first, params, handle)
    final, mtp = [], None
    while decode.has_unfinished():
        final += [o for o in decode.step() if o.finished]
        if mtp is None and decode_k:
            seq = next(iter(decode.seqs.values()))
            mtp = decode.cache.c_kv[-1, seq.block_table].flatten(0, 1)[:len(p) - 1].clone()
    return final[-1], prefill, decode, mtp


@pytest.mark.parametrize("n, chunk, handoff", [(1, None, "shm"), (2, None, "shm"), (9, None, "shm"),
                                               (13, None, "shm"), (13, 4, "shm"), (9, None, "inline")])
def test_a_disaggregated_decode_worker_speculates_as_the_unified_engine(easy, n, chunk, handoff, monkeypatch):
    """Prefill and decode workers both with MTP (`--spec`): the prefill worker catches the MTP module up over the
    prompt and hands its latents and the last hidden state over with the request; the decode worker's speculative
    steps then accept the very drafts a unified speculating engine accepts (same acceptance trace) and its MTP
    latents of the prompt equal the unified engine's; greedy tokens are plain greedy's. The prefill worker never
    drafts. n = 1: no position to catch up before the last; chunk 4: the prompt in chunks, the MTP module caught
    up part of the way between them (Speculation.settle) and the rest at the hand-off; inline: the bytes in the
    handle (`--pd-handoff inline`)."""
    p = prompts([n], 8, seed=1)[0]          # (prompts whose drafts the model accepts some of)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    from dsv3.infer.disagg import MTPCatchUp
    settled, settle = [], MTPCatchUp.settle      # the MTP module's progress between the prompt's chunks
    monkeypatch.setattr(MTPCatchUp, "settle", lambda self, seqs: (settle(self, seqs),
                                                                   settled.extend(s.mtp_cached for s in seqs))[0])
    out, prefill, decode, mtp = _pd(easy, p, params, 2, 2, chunk, handoff)
    assert max(settled, default=0) > 0 if chunk else True
    assert out.token_ids == reference_greedy(easy, p, 12)
    assert prefill.spec_stats["steps"] == 0 and decode.spec_stats["steps"] > 0
    # the unified speculating engine, stepped by hand: its latents of the MTP layer after its first draft
    unified = Engine(easy, config=EngineConfig(block_size=4, num_blocks=64, num_speculative_tokens=2))
    rid = unified.add_request(p, params)
    unified.step()                     # the prompt (a plain step), then the first speculative step drafts
    unified.step()
    seq = unified.seqs[rid]
    want = unified.cache.c_kv[-1, seq.block_table].flatten(0, 1)[:n - 1]
    torch.testing.assert_close(mtp, want, rtol=1e-12, atol=1e-12)
    while unified.has_unfinished():
        unified.step()
    assert decode.spec_stats == unified.spec_stats and decode.spec_stats["accepted"] > 0


def test_a_disaggregated_decode_worker_and_the_mtp_module(easy):
    """A prefill worker with MTP serves a plain decode worker too (the extra layer dropped, tokens unchanged); a
    speculating decode worker refuses a request prefilled without the module, naming the setting (its drafts would
    have no MTP context), before the cache sees it."""
    p = prompts([7], 8, seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out, _, decode, _ = _pd(easy, p, params, 1, 0)
    assert out.token_ids == reference_greedy(easy, p, 8) and decode.spec_stats["steps"] == 0
    with pytest.raises(ValueError, match="prefill workers with --spec"):
        _pd(easy, p, params, 0, 1)
    # a plain pair, as before
    assert _pd(easy, p, params, 0, 0)[0].token_ids == reference_greedy(easy, p, 8)


def test_a_disaggregated_seeded_request_samples_as_in_the_unified_engine(model):
    """A seeded sampled request through a prefill and a decode worker: the hand-off carries its generator's state
    after the first token, so the decode worker's draws go on from there and the tokens are the unified engine's.
    (A fresh generator from the seed on the decode side, as before, redraws the first token's randomness: the
    control below differs.)"""
    from dataclasses import replace

    from dsv3.infer.disagg import DecodeEngine, PrefillEngine
    cfg = EngineConfig(block_size=4, num_blocks=64)
    ps = prompts([3, 8, 13], 96, seed=6)
    params = [SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=s) for s in (1, 2, 3)]
    want = [o.token_ids for o in Engine(model, config=cfg).generate(ps, params)]

    def through_workers(keep_state: bool) -> list:
        prefill, decode = PrefillEngine(model, config=cfg), DecodeEngine(model, config=cfg)
        order = {}
        for i, (p, f, sp) in enumerate(zip(ps, prefill.generate(ps, params), params)):
            h = prefill.exported.pop(f.request_id)
            assert h.rng is not None and h.rng_device == "cpu"
            order[decode.add_prefilled(p, f, sp, h if keep_state else replace(h, rng=None))] = i
        final = {}
        while decode.has_unfinished():
            final |= {order[o.request_id]: o.token_ids for o in decode.step() if o.finished}
        return [final[i] for i in range(len(ps))]

    assert through_workers(True) == want
    assert through_workers(False) != want


def _pending(seq) -> int:
    return sum(h.shape[0] for h in seq.pending_hidden)


def _run_stepwise(model, ps, params: list, padded: bool, check=None, **cfg) -> tuple[list, object]:
    """Outputs of the requests, all added at once; `check(engine)` after every step."""
    engine = Engine(model, config=EngineConfig(**(dict(block_size=4, num_blocks=96, max_num_seqs=8) | cfg)))
    if padded:
        engine.use_decode_graphs(capture=False)
    ids = [engine.add_request(p, sp) for p, sp in zip(ps, params)]
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
        if check is not None:
            check(engine)
    b = engine.blocks
    assert b.num_free_blocks == b.num_blocks and not any(b.ref_count)
    return [final[i] for i in ids], engine


def _blocked(blocker: str, n: int) -> tuple[list, list, dict]:
    """Three requests of which the third keeps speculation off while it runs (max_tokens 20): by the batch size
    (speculative_max_batch 2) or by asking for logprobs. Prompts longer than a block and a token budget that chunks
    them (prefill rows beside decode rows); the first two run on to n tokens."""
    ps = prompts([3, 9, 14], 8, seed=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    third = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                           logprobs=2 if blocker == "logprobs" else None)
    cfg = dict(max_num_batched_tokens=8, speculative_max_batch=2 if blocker == "batch" else 8)
    return ps, [greedy, greedy, third], cfg


@pytest.mark.parametrize("blocker", ["batch", "logprobs"])
@pytest.mark.parametrize("k", [1, 2])
def test_pending_hidden_states_stay_bounded_while_speculation_is_off(easy, k, blocker):
    """While speculation does not apply (more sequences than speculative_max_batch, or a logprobs request), every
    plain step kept each sequence's hidden states for the MTP module's next catch-up, one more per step, each a view
    of the step's whole hidden tensor: memory grew with the live tokens, beyond the cache's sizing. A plain step
    now catches the MTP module up on a sequence once `max_pending` positions wait (Speculation.settle), so after
    every decode step each sequence holds at most that many, none of them a view of a larger tensor, and the
    catch-up state stays consistent (pending rows = num_cached_tokens - mtp_cached)."""
    ps, params, cfg = _blocked(blocker, 40)
    cap, seen = max(4, 2 * (k + 1)), {"settled": 0}     # max_pending: a block (4), at least 2 (k + 1)

    def check(engine):
        for s in engine.scheduler.running:
            assert _pending(s) == s.num_cached_tokens - s.mtp_cached
            if s.num_cached_tokens > s.num_prompt_tokens:         # past its prefill
                assert _pending(s) <= cap, (s.seq_id, _pending(s), cap)
            seen["settled"] += s.mtp_cached > 0
            if engine.spec_stats["steps"] == 0:
                # what a kept row holds alive while plain steps run: its own rows, or a decode step's (one a
                # sequence), never a prefill chunk that ran beside it
                for h in s.pending_hidden:
                    rows = h.untyped_storage().nbytes() // (h.shape[1] * h.element_size())
                    assert rows <= max(h.shape[0], len(ps)), (s.seq_id, rows, h.shape)
    outs, engine = _run_stepwise(easy, ps, params, padded=False, check=check, num_speculative_tokens=k, **cfg)
    assert engine.speculation.max_pending == cap and seen["settled"] > 0 and engine.spec_stats["steps"] > 0
    assert [o.token_ids for o in outs] == [reference_greedy(easy, p, sp.max_tokens) for p, sp in zip(ps, params)]


@pytest.mark.parametrize("blocker", ["batch", "logprobs"])
@pytest.mark.parametrize("overlap", ["off", "on"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "buckets"])
@pytest.mark.parametrize("k", [1, 2])
def test_speculation_resuming_after_a_long_plain_stretch_keeps_greedy_outputs(easy, k, padded, overlap, blocker):
    """Speculation resumes once the third request ends (its ~20 plain steps each settled the MTP module's catch-up
    on the others): the tokens are plain greedy decoding's and the engine's without speculation, with and without
    the overlap schedule, with and without the padded decode buckets; drafts are accepted after resuming."""
    ps, params, cfg = _blocked(blocker, 36)
    outs, engine = _run_stepwise(easy, ps, params, padded, num_speculative_tokens=k, overlap_schedule=overlap, **cfg)
    plain, _ = _run_stepwise(easy, ps, params, padded, overlap_schedule=overlap, **cfg)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain] == [
        reference_greedy(easy, p, sp.max_tokens) for p, sp in zip(ps, params)]
    assert engine.spec_stats["steps"] > 0 and engine.spec_stats["accepted"] > 0


def test_settled_mtp_latents_equal_one_catch_up_and_acceptance_holds(easy):
    """The MTP module caught up in pieces over a plain stretch (settle) writes, at every position, the latents of
    the original single catch-up when drafting resumes (max_pending out of reach: the code before settle), and the
    drafts after resuming are accepted as often as in a run that never stopped speculating (the same sequences
    without the third request)."""
    k = 2
    ps, params, cfg = _blocked("batch", 40)
    engines = []
    for max_pending in (None, 10**9):
        engine = Engine(easy, config=EngineConfig(block_size=4, num_blocks=96, num_speculative_tokens=k, **cfg))
        if max_pending is not None:
            engine.speculation.max_pending = max_pending
        for p, sp in zip(ps, params):
            engine.add_request(p, sp)
        engines.append(engine)
    layer, compared = easy.config.num_hidden_layers, 0
    while engines[0].has_unfinished():
        for e in engines:
            e.step()
        assert engines[0].spec_stats == engines[1].spec_stats
        for a, b in zip(*(e.scheduler.running for e in engines)):
            for p in range(min(a.mtp_cached, b.mtp_cached)):
                sa, sb = engines[0].cache.slot(a.block_table, p), engines[1].cache.slot(b.block_table, p)
                for name in ("c_kv", "k_pe"):
                    ta, tb = (getattr(e.cache, name)[layer].flatten(0, 1) for e in engines)
                    torch.testing.assert_close(ta[sa], tb[sb], rtol=1e-10, atol=1e-10)
                compared += 1
    assert compared > 0 and not engines[1].has_unfinished()
    resumed = engines[0].spec_stats
    _, never = _run_stepwise(easy, ps[:2], params[:2], padded=False, num_speculative_tokens=k,
                             **(cfg | dict(speculative_max_batch=8)))
    after, always = (st["accepted"] / st["proposed"] for st in (resumed, never.spec_stats))
    assert resumed["accepted"] > 0 and after >= 0.8 * always, (resumed, never.spec_stats)
