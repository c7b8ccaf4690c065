"""The overlap schedule (dsv3.infer.overlap) against the synchronous engine: the same outputs, delta by delta, for
mixed batches (prompt lengths, max_tokens, stop ids and strings, sampling with seeds, log-probabilities, penalties
and logit_bias (whose counts a chained step updates from tokens the host has not read), arrivals
while others decode, aborts, chunked prefill, preemption, padded graph buckets), every block returned, and no
extra forward for length-limited batches. float64, as tests/test_infer_engine.py: batch composition then cannot
flip a greedy token, so equality is exact."""

import pytest
import torch

from conftest import build, random_prompts, reference_greedy, tiny_config
from dsv3.infer import Engine, EngineConfig, SamplingParams

V = 96


@pytest.fixture(scope="module")
def model():
    return build(tiny_config(vocab_size=V), seed=3, dtype=torch.float64)


prompts = random_prompts


def mixed_requests(model) -> list[tuple[list[int], SamplingParams]]:
    """Request 0 decodes long (the others arrive while it does); a stop id that ends request 1 early; sampled ones
    with seeds; log-probabilities of outputs and of the prompt; max_tokens from 1 to 16; penalties and logit_bias."""
    ps = prompts([6, 5, 8, 17, 30, 9, 1, 12, 7], seed=1)
    stop = reference_greedy(model, ps[1], 9)[3]
    g = dict(temperature=0.0, ignore_eos=True)
    params = [SamplingParams(max_tokens=16, **g),
              SamplingParams(max_tokens=9, stop_token_ids=[stop], **g),
              SamplingParams(max_tokens=3, **g),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1, max_tokens=7, ignore_eos=True),
              SamplingParams(max_tokens=12, logprobs=2, **g),
              SamplingParams(max_tokens=5, prompt_logprobs=1, **g),
              SamplingParams(max_tokens=1, **g),
              SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0.7, seed=5, max_tokens=10, ignore_eos=True, logprobs=1,
                             frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.2, logit_bias={7: 2.0})]
    return list(zip(ps, params))


def delta(o) -> tuple:
    return (o.new_token_ids, o.new_logprobs, o.prompt_logprobs, o.finished, o.finish_reason,
            o.token_ids if o.finished else None, o.text)


def drive(engine: Engine, requests, at_once: int, abort: tuple[int, int] | None = None) -> list[list[tuple]]:
    """Every request's stream of outputs. The caller acts on what it has seen, as a server does: the first
    `at_once` requests are queued up front, one more each time request 0 has received two more tokens, and
    `abort` = (i, n) aborts request i once it has received n tokens."""
    ids = [engine.add_request(p, sp) for p, sp in requests[:at_once]]
    later = list(requests[at_once:])
    streams: dict[int, list] = {}
    got = lambda i: sum(len(d[0]) for d in streams.get(ids[i], [])) if i < len(ids) else 0    # noqa: E731
    aborted = False
    while engine.has_unfinished() or later:
        for o in engine.step():
            streams.setdefault(o.request_id, []).append(delta(o))
        while later and (got(0) >= 2 * (len(ids) - at_once + 1) or not engine.has_unfinished()):
            ids.append(engine.add_request(*later.pop(0)))
        if abort is not None and not aborted and got(abort[0]) >= abort[1]:
            engine.abort(ids[abort[0]])
            aborted = True
    return [streams[i] for i in ids]


def all_blocks_free(engine: Engine) -> bool:
    b = engine.blocks
    return b.num_free_blocks == b.num_blocks and not any(b.ref_count)


CONFIGS = {
    "batch": dict(block_size=8, num_blocks=64),
    "chunked": dict(block_size=8, num_blocks=64, max_num_batched_tokens=7),
    "preempt": dict(block_size=4, num_blocks=16, max_num_seqs=6),
}


@pytest.mark.parametrize("padded", [False, True], ids=["eager", "padded"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_overlap_streams_equal_the_synchronous_engine(model, name, padded):
    requests = mixed_requests(model)
    runs = {}
    for mode in ("off", "on"):
        engine = Engine(model, config=EngineConfig(overlap_schedule=mode, **CONFIGS[name]))
        if padded:     # the CUDA-graph buckets without capture: chained steps feed the bucket's input buffer
            engine.use_decode_graphs(capture=False)
        assert engine.overlap == (mode == "on")
        runs[mode] = drive(engine, requests, at_once=3, abort=(2 if name == "batch" else 5, 2)), engine
    (sync, e_off), (over, e_on) = runs["off"], runs["on"]
    assert over == sync
    assert e_on.step_stats["chained_steps"] > 0 and e_off.step_stats["chained_steps"] == 0
    for engine in (e_off, e_on):
        assert all_blocks_free(engine) and not engine.seqs and not engine.has_unfinished()
    if name == "preempt":
        assert e_on.scheduler.num_preemptions > 0
    # and against the cache-free forward: the greedy requests' tokens, the stop where it was asked for
    finals = [s[-1] for s in sync]
    for (p, sp), f in zip(requests, finals):
        if sp.greedy and f[4] != "abort":
            want = reference_greedy(model, p, sp.max_tokens)
            if sp.stop_token_ids:
                want = want[:want.index(sp.stop_token_ids[0]) + 1]
                assert f[4] == "stop"
            assert f[5] == want
    assert [f[4] for f in finals].count("abort") == 1


def test_length_limited_batches_run_no_extra_step(model):
    """Every request ends by max_tokens: the engine knows which pending token is the last one (Sequence.stopping)
    and schedules nothing after it, so the overlap schedule runs exactly the synchronous engine's forwards; a stop
    id, known only once read, costs the stopped request one discarded row."""
    ps = prompts([4, 9, 13], seed=2)
    for stop, extra in ((None, 0), (True, 1)):
        counts = {}
        for mode in ("off", "on"):
            engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=32, overlap_schedule=mode))
            params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 8, 8)]
            if stop:
                params[2] = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                           stop_token_ids=[reference_greedy(model, ps[2], 4)[3]])
            outs = engine.generate(ps, params)
            counts[mode] = (engine.step_stats["steps"], engine.step_stats["seqs"], [o.token_ids for o in outs])
            assert all_blocks_free(engine)
        assert counts["on"][0] == counts["off"][0] and counts["on"][2] == counts["off"][2]
        assert counts["on"][1] == counts["off"][1] + extra


def test_prefix_cache_registers_generated_blocks_alike(model):
    """A second turn (prompt = first prompt + its output + more) hits the blocks the first turn computed, its
    generated tokens' blocks included: placeholders are never hashed into a block, so the hits are the same."""
    first = prompts([10], seed=3)[0]
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    hits = {}
    for mode in ("off", "on"):
        engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=32, overlap_schedule=mode))
        out = engine.generate([first], params)[0]
        second = engine.generate([first + out.token_ids + [5, 6]], params)[0]
        hits[mode] = (engine.blocks.prefix_hits, out.token_ids, second.token_ids)
        assert all_blocks_free(engine)
    assert hits["on"] == hits["off"] and hits["on"][0] == (10 + 14 - 1) // 4


def test_stop_strings_stream_the_same_text(tmp_path):
    from dsv3.data import train_tokenizer
    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "import os\nprint(os.sep)\n" * 20], 300)
    lm = build(tiny_config(vocab_size=tok.vocab_size), seed=7, dtype=torch.float64)
    full = Engine(lm, tok, EngineConfig(block_size=8, num_blocks=32)).generate(
        ["def f(x):"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 2:][:2]
    assert stop
    requests = [("def f(x):", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop])),
                ("import os", SamplingParams(temperature=0.0, max_tokens=10, stop=["\n\n"])),
                ("print(", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))]
    streams = [drive(Engine(lm, tok, EngineConfig(block_size=8, num_blocks=32, overlap_schedule=m)), requests, 3)
               for m in ("off", "on")]
    assert streams[0] == streams[1]
    assert streams[0][0][-1][4] == "stop" and streams[0][0][-1][6] == full.text[:full.text.find(stop)]


def test_overlap_schedule_is_validated_and_stays_off_where_it_cannot_run(model):
    assert EngineConfig(overlap_schedule=True).overlap_schedule == "on"
    assert EngineConfig(overlap_schedule="false").overlap_schedule == "off"
    with pytest.raises(ValueError, match="EngineConfig.overlap_schedule"):
        EngineConfig(overlap_schedule="sometimes")
    # auto: on only where decode steps replay captured graphs (never on the CPU); with speculation only the fused
    # speculative steps chain (test_infer_spec.py), never the plain ones
    assert not Engine(model, config=EngineConfig(block_size=8, num_blocks=16)).overlap
    spec = Engine(model, config=EngineConfig(block_size=8, num_blocks=16, num_speculative_tokens=1))
    assert not spec.overlap and not spec.spec_overlap
    spec = Engine(model, config=EngineConfig(block_size=8, num_blocks=16, num_speculative_tokens=1,
                                             overlap_schedule="on"))
    assert not spec.overlap and spec.spec_overlap


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_cuda_graph_decode_with_overlap_equals_synchronous_decode():
    """bf16 on the GPU, the same engine (the same captured graphs) with the overlap schedule on (the default with
    graphs) and then off: identical streams, chained steps taken, every block back. No prefix caching, so the
    second run computes what the first did."""
    lm = build(tiny_config(vocab_size=V), seed=3, dtype=torch.bfloat16).cuda()
    engine = Engine(lm, config=EngineConfig(block_size=16, num_blocks=64, prefix_caching=False))
    assert engine.runner.graphs is not None and engine.overlap
    requests = mixed_requests(lm)
    over = drive(engine, requests, at_once=3, abort=(2, 2))
    chained = engine.step_stats["chained_steps"]
    engine.config.overlap_schedule = "off"
    assert not engine.overlap
    sync = drive(engine, requests, at_once=3, abort=(2, 2))
    assert over == sync
    assert chained > 0 and engine.step_stats["chained_steps"] == chained
    assert all_blocks_free(engine)
