"""The engine's block accounting and step statistics against independent counts, after every step of random
workloads: which blocks the live sequences' tables hold (reference counts, the free list), how many each may hold
given its tokens, and which steps were pure decode."""

import random
from collections import Counter

import pytest
import torch

from conftest import build, random_prompts, reference_greedy, tiny_config
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.speculation import SpecInFlight


@pytest.fixture(scope="module")
def model():
    return build(tiny_config(vocab_size=96), seed=3, dtype=torch.float64)


@pytest.fixture(scope="module")
def easy():
    """MTP drafts mostly accepted (vocabulary 8): steps of several tokens, and some rejections."""
    return build(tiny_config(vocab_size=8), seed=0, dtype=torch.float64)


def check_blocks(engine: Engine) -> None:
    """The block manager's books against the sequences': each block's reference count is the number of live block
    tables holding it, the free list is exactly the blocks none holds, a queued sequence holds none, and a running
    one holds the blocks of its computed positions and no more than its tokens need (more only while a chained
    speculative step, launched and not read, writes past them)."""
    b, sched = engine.blocks, engine.scheduler
    held = Counter(bid for s in sched.running for bid in s.block_table)
    assert [b.ref_count[i] for i in range(b.num_blocks)] == [held[i] for i in range(b.num_blocks)]
    assert sorted(b.free) == [i for i in range(b.num_blocks) if not held[i]]
    assert b.num_free_blocks == b.num_blocks - len(held)
    assert engine.stats()["referenced_blocks"] == len(held)
    assert all(not s.block_table for s in sched.waiting)
    k = engine.config.num_speculative_tokens
    ahead = k + 1 + max(k + 1, 2 * k) if isinstance(engine._in_flight, SpecInFlight) else 0
    for s in sched.running:
        assert b.blocks_needed(s.num_cached_tokens) <= len(s.block_table), (s.num_cached_tokens, s.block_table)
        assert len(s.block_table) <= b.blocks_needed(max(len(s), s.num_cached_tokens + ahead)), \
            (len(s), s.num_cached_tokens, len(s.block_table))


def random_workload(r: random.Random, V: int, context: int, bs: int, num_blocks: int) -> list:
    """(prompt, params, arrival step) per request; prompts share prefixes (prefix-cache hits where sharing is on)."""
    stem = [r.randrange(2, V) for _ in range(12)]
    requests = []
    for _ in range(r.randint(2, 6)):
        n = r.randint(1, min(14, context - 1))
        head = stem[:r.randint(0, n)]
        prompt = head + [r.randrange(2, V) for _ in range(n - len(head))]
        kw = dict(temperature=0.0, max_tokens=r.choice([1, 3, 8, 12, 20]), ignore_eos=r.random() < 0.7)
        if r.random() < 0.2:
            kw["stop_token_ids"] = [r.randrange(0, V)]
        if r.random() < 0.2:
            kw.update(temperature=0.8, top_k=5, seed=r.randrange(100))
        params = SamplingParams(**kw)
        if -(-min(n + params.max_tokens, context) // bs) <= num_blocks:
            requests.append((prompt, params, r.choice([0, 0, 1, 2, 4])))
    return requests


@pytest.mark.parametrize("seed", range(16))
def test_block_accounting_holds_after_every_step_on_random_workloads(model, easy, seed):
    """Random workloads: MTP speculation k = 0..3 (fused, synchronous with sampled requests, chained under the
    overlap schedule), small caches (preemption), prefix caching, token budgets, arrivals, aborts. `check_blocks`
    after every step. Before, blocks taken for speculative positions stayed with the sequence whatever was accepted
    (and a batch refused speculation after taking blocks for some of its sequences kept them): a sequence held up to
    2k positions' worth of blocks past its tokens, which admission and preemption counted as used. Greedy outputs
    are the reference's; every block comes back."""
    r = random.Random(seed)
    k = [2, 3, 0, 1][seed % 4]          # (k = 1 takes no blocks past k + 1 accepted positions: never any spare)
    m, V = (easy, 8) if r.random() < 0.5 else (model, 96)
    bs = r.choice([2, 4])
    cfg = dict(block_size=bs, num_blocks=r.choice([12, 16, 24, 64]), max_num_seqs=r.choice([2, 4, 8]),
               speculative_max_batch=r.choice([2, 8]), num_speculative_tokens=k,
               overlap_schedule="on" if r.random() < 0.3 else "off", max_num_batched_tokens=r.choice([4, 16, 512]))
    requests = random_workload(r, V, m.config.max_position_embeddings, bs, cfg["num_blocks"])
    aborts = {r.randint(1, 12): r.randrange(len(requests)) for _ in range(r.choice([0, 1, 2]))}
    engine = Engine(m, config=EngineConfig(**cfg))
    ids, final, step = {}, {}, 0
    while engine.has_unfinished() or len(ids) < len(requests):
        ids.update({i: engine.add_request(p, sp) for i, (p, sp, at) in enumerate(requests) if at == step})
        if step in aborts and aborts[step] in ids:
            engine.abort(ids[aborts[step]])
        step += 1
        assert step < 600, "no progress"
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
        check_blocks(engine)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    for i, (prompt, params, _) in enumerate(requests):
        out = final[ids[i]]
        if params.greedy and out.finish_reason != "abort":
            want = reference_greedy(m, prompt, len(out.token_ids))
            assert out.token_ids == want


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "sync"])
def test_speculative_steps_leave_room_for_an_arrival(easy, fused):
    """A cache of 9 blocks of 2: a sequence that has decoded twice (k = 3: one speculative step, which took blocks
    for 2k positions past its last token) and an arrival whose prompt needs 5 blocks. The blocks of the rejected
    positions were kept, so the arrival waited (the cache looked full); now it is admitted at once, as in an engine
    without speculation, and the first request's tokens are unchanged."""
    first, second = random_prompts([3, 10], 8, seed=5)
    params = (SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True) if fused else
              SamplingParams(temperature=0.8, top_k=3, seed=1, max_tokens=12, ignore_eos=True))
    short = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    status, outputs = {}, {}
    for k in (0, 3):
        engine = Engine(easy, config=EngineConfig(block_size=2, num_blocks=9, num_speculative_tokens=k,
                                                  speculative_fused=fused))
        a = engine.add_request(first, params)
        engine.step(), engine.step()
        b = engine.add_request(second, short)
        engine.step()
        status[k] = engine.seqs[b].status.value
        check_blocks(engine)
        final = {}
        while engine.has_unfinished():
            final.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
            check_blocks(engine)
        outputs[k] = final[a]
    assert status == {0: "running", 3: "running"}
    assert engine.spec_stats["steps"] > 0
    if fused:
        assert outputs[0] == outputs[3] == reference_greedy(easy, first, 12)


@pytest.mark.parametrize("budget", [1, 2, 3])
@pytest.mark.parametrize("overlap", ["off", "on"])
def test_decode_steps_count_only_steps_of_generated_tokens(model, budget, overlap):
    """One request, a prompt of 7 chunked by the token budget: ceil(7 / budget) prefill steps, then one decode step
    per generated token after the first. A one-token chunk of the prompt (budget 1, or 7's leftover of budget 2 and
    3) has num_cached_tokens > 0 and was counted as a decode step."""
    prompt = random_prompts([7], seed=2)[0]
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=32, max_num_batched_tokens=budget,
                                               overlap_schedule=overlap))
    (out,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert out.token_ids == reference_greedy(model, prompt, 5)
    st = engine.step_stats
    assert (st["prefill_steps"], st["decode_steps"]) == (-(-7 // budget), 4)
    assert st["steps"] == st["prefill_steps"] + st["decode_steps"]


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_a_prompt_sharing_a_running_prefix_is_admitted_on_the_blocks_it_adds(model, overlap):
    """A cache of 10 blocks of 4, a running request whose 24-token prompt fills 6 of them (7 with its next tokens),
    and an arrival with the same 24 tokens and one more: it shares the 6 computed blocks and takes 1 from the free
    list. Admission asked for all 7 free, so it waited for the first to finish; now it runs at once, with the
    reference's tokens, and the books hold (`check_blocks`)."""
    stem = random_prompts([24], seed=2)[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=10, overlap_schedule=overlap))
    a = engine.add_request(stem + [5], params)
    engine.step(), engine.step()
    b = engine.add_request(stem + [7], params)
    engine.step()
    check_blocks(engine)
    assert engine.seqs[b].status.value == "running" and engine.blocks.prefix_hits == 6
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        check_blocks(engine)
    assert final[a] == reference_greedy(model, stem + [5], 8) and final[b] == reference_greedy(model, stem + [7], 8)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
