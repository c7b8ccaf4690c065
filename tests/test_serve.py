"""`dsv3 serve` against a live server on loopback, through the real `openai` client and raw HTTP: outputs equal the
engine's own, streaming equals non-streaming, logprobs/echo equal the engine's prompt log-probabilities,
disconnects, API key, queue limit, graceful drain, metrics. The load test (200 streams, 60 dropped) is in
test_serve_hardening."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import openai
import pytest

from dsv3.infer import EngineConfig, SamplingParams
from serve_fixture import all_blocks_free, start_server, wait_until

PROMPTS = ["def read_file(path):", "import os", "The quick brown", "class Point:", "for i in range(", "x = 1\n",
           "print(", "with open(", "return f.", "total += i", "import sys\nimport", "The lazy dog", "def f(x):",
           "y: int = 0", "os.getcwd()", "jumps over", "class A:\n    x", "if __name__", "f.read()", "i * i"]


@pytest.fixture(scope="module")
def server():
    s = start_server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def greedy(server, prompt, n: int, **kw) -> list[int]:
    out = server.reference.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, **kw))[0]
    return out


def test_completions_equal_the_engine(server, client):
    r = client.completions.create(model="dsv3-tiny", prompt=PROMPTS[:4], max_tokens=12, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for p, c in zip(PROMPTS[:4], r.choices):
        want = greedy(server, p, 12)
        assert c.text == want.text and c.finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == sum(len(server.tokenizer.encode(p)) for p in PROMPTS[:4])
    ids = server.tokenizer.encode(PROMPTS[0])                    # a token-id prompt gives the same text
    assert client.completions.create(model="dsv3-tiny", prompt=ids, max_tokens=12, temperature=0
                                     ).choices[0].text == r.choices[0].text


def test_suffix_fills_in_the_middle(server, client):
    """`suffix`: the prompt is the prefix of a fill-in-the-middle request in pretraining's PSM layout (TR 4.1):
    <fim_begin> prefix <fim_hole> suffix <fim_end>, the model writing the middle; text or token-id prompts, streamed
    or not. Refused with echo (what would be echoed is not what the model read), and, 400 naming `suffix`, where
    the tokenizer has no FIM tokens."""
    from types import SimpleNamespace

    from dsv3.serve.protocol import APIError, CompletionRequest
    from dsv3.serve.validation import fill_in_the_middle
    tok = server.tokenizer
    begin, hole, end = tok.fim_ids
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    ids = [begin, *tok.encode(prefix), hole, *tok.encode(suffix), end]
    want = server.reference.generate([ids], SamplingParams(temperature=0.0, max_tokens=12))[0]
    r = client.completions.create(model="dsv3-tiny", prompt=prefix, suffix=suffix, max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model="dsv3-tiny", prompt=tok.encode(prefix), suffix=suffix, max_tokens=12,
                                  temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in r if c.choices) == want.text
    with pytest.raises(openai.BadRequestError, match="echo and suffix"):
        client.completions.create(model="dsv3-tiny", prompt=prefix, suffix=suffix, echo=True, max_tokens=2)
    no_fim = SimpleNamespace(fim_ids=None)
    with pytest.raises(APIError, match="fill-in-the-middle") as e:
        fill_in_the_middle(CompletionRequest(model="m", prompt="x", suffix="y"), no_fim)
    assert e.value.param == "suffix"
    assert fill_in_the_middle(CompletionRequest(model="m", prompt="x", suffix=""), no_fim)([5]) == [5]   # none


def test_streaming_equals_non_streaming(server, client):
    for p in PROMPTS[4:7]:
        full = client.completions.create(model="dsv3-tiny", prompt=p, max_tokens=20, temperature=0)
        chunks = list(client.completions.create(model="dsv3-tiny", prompt=p, max_tokens=20, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_and_chat_streaming_equal_the_engine(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def read_file"}]
    ids = httpx.post(server.url + "/tokenize", json={"messages": messages}, timeout=60).json()["tokens"]
    want = greedy(server, ids, 10)
    r = client.chat.completions.create(model="dsv3-tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want.token_ids)
    stream = client.chat.completions.create(model="dsv3-tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text
    lp = client.chat.completions.create(model="dsv3-tiny", messages=messages, max_tokens=10, temperature=0,
                                        logprobs=True, top_logprobs=3).choices[0].logprobs.content
    ref = greedy(server, ids, 10, logprobs=3).logprobs              # the engine's own (logprob, top ids, top lps)
    assert len(lp) == len(ref) and all(len(t.top_logprobs) == 3 for t in lp)
    for t, (want_lp, _, want_top) in zip(lp, ref):
        assert t.logprob == pytest.approx(want_lp, abs=1e-9)
        assert [x.logprob for x in t.top_logprobs] == pytest.approx(want_top, abs=1e-9)


def test_logprobs_and_echo_equal_the_engine_prompt_logprobs(server, client):
    p = PROMPTS[0]
    r = client.completions.create(model="dsv3-tiny", prompt=p, max_tokens=3, temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    ids = server.tokenizer.encode(p)
    want = server.reference.generate([p], SamplingParams(temperature=0.0, max_tokens=3, logprobs=2,
                                                          prompt_logprobs=2))[0]
    assert c.text == p + want.text
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None
    expected = [e[0] for e in want.prompt_logprobs] + [e[0] for e in want.logprobs]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-9)
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    assert all(len(t) >= 2 for t in lp.top_logprobs[1:])
    # max_tokens=0 with echo scores the prompt only (lm-eval's log-likelihood requests)
    r0 = client.completions.create(model="dsv3-tiny", prompt=p, max_tokens=0, echo=True, logprobs=0)
    assert r0.choices[0].text == p and r0.usage.completion_tokens == 0
    assert r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected[:len(ids) - 1], abs=1e-9)


def test_n_seeds_and_stop_strings(server, client):
    r = client.completions.create(model="dsv3-tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0, n=3)
    assert len({c.text for c in r.choices}) == 1 and [c.index for c in r.choices] == [0, 1, 2]
    s1 = client.completions.create(model="dsv3-tiny", prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=2, seed=7)
    s2 = client.completions.create(model="dsv3-tiny", prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=2, seed=7)
    assert [c.text for c in s1.choices] == [c.text for c in s2.choices]      # per-request seeds reproduce
    for j, c in enumerate(s1.choices):            # choice j samples with seed + j, as the engine alone does
        ref = server.reference.generate([PROMPTS[1]], SamplingParams(temperature=1.0, max_tokens=8, seed=7 + j))[0]
        assert c.text == ref.text, j
    full = greedy(server, PROMPTS[2], 16, ignore_eos=True).text
    at = next(k for k in range(3, len(full) - 2) if full[k:k + 2] not in full[:k + 1])   # first occurrence at k
    stop = full[at:at + 2]
    for stream in (False, True):
        kw = dict(model="dsv3-tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})
        if stream:
            chunks = list(client.completions.create(stream=True, **kw))
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            c = client.completions.create(**kw).choices[0]
            text, reason = c.text, c.finish_reason
        assert text == full[:full.index(stop)] and reason == "stop", (text, full, stop)


def test_ids_past_the_tokenizer_are_refused():
    """A model may have embedding rows past the tokenizer's last id (DeepSeek-V3's 129,280 rows hold fewer tokens).
    Ids there were checked against the model's rows only: a logit_bias of +100 on one made the model generate a
    token with no text, and its logprob entry was a 500 (a stream died mid-way); a prompt of such ids with echo and
    logprobs too. They are not token ids of the vocabulary: a 400 naming the field."""
    s = start_server(extra_rows=8)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        pad = s.tokenizer.vocab_size + 3
        calls = {"logit_bias": [
            lambda: client.completions.create(model="dsv3-tiny", prompt="x", max_tokens=3, logprobs=1,
                                              logit_bias={str(pad): 100}),
            lambda: client.chat.completions.create(model="dsv3-tiny", messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=3, logprobs=True, logit_bias={str(pad): 100})],
            "prompt": [lambda: client.completions.create(model="dsv3-tiny", prompt=[5, pad], max_tokens=1, echo=True,
                                                         logprobs=1)]}
        for field, requests in calls.items():
            for request in requests:
                with pytest.raises(openai.BadRequestError, match=field):
                    request()
        ok = client.completions.create(model="dsv3-tiny", prompt="x", max_tokens=3, logprobs=1,
                                       logit_bias={str(s.tokenizer.vocab_size - 1): 100})
        assert ok.choices[0].logprobs.tokens
    finally:
        s.stop()


def test_a_generated_padded_row_is_an_empty_token_not_a_500():
    """A model that samples one of its padded rows by itself (no request can ask for one): the logprob entries and
    the stream read it as an empty token; before, TokenTable's lookup raised IndexError (a 500, a dead stream)."""
    s = start_server(extra_rows=8)
    pad = s.tokenizer.vocab_size + 3

    def force(module, args, out):
        out = out.clone()
        out[..., pad] = 1e4
        return out
    s.engine.model.lm_head.register_forward_hook(force)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="dsv3-tiny", prompt="x", max_tokens=3, logprobs=2, temperature=0)
        assert out.choices[0].logprobs.tokens == ["", "", ""] and out.choices[0].text == ""
        chunks = list(client.chat.completions.create(model="dsv3-tiny", max_tokens=2, logprobs=True, stream=True,
                                                     messages=[{"role": "user", "content": "x"}], temperature=0))
        assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        s.stop()


def test_penalties_and_logit_bias_reach_the_engine(server, client):
    """OpenAI's presence / frequency penalties and logit_bias (token ids as strings), and vLLM's repetition_penalty
    as an extra field: the server's tokens are the reference engine's with the same parameters, and they act
    (greedy repeats itself here, the penalised output does not; a +100 bias forces its token). Values out of range
    are 400s that name the field."""
    p, tok = PROMPTS[2], server.tokenizer
    plain = greedy(server, p, 24, ignore_eos=True)
    assert len(set(plain.token_ids)) < len(plain.token_ids)
    for named, extra in (({"frequency_penalty": 2.0}, {}), ({"presence_penalty": 1.5}, {}),
                         ({}, {"repetition_penalty": 2.0})):
        r = client.completions.create(model="dsv3-tiny", prompt=p, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True, **extra}, **named)
        want = greedy(server, p, 24, ignore_eos=True, **named, **extra)
        assert r.choices[0].text == want.text != plain.text, (named, extra)
    forced = tok.encode(" os")[0]
    messages = [{"role": "user", "content": "import"}]
    c = client.chat.completions.create(model="dsv3-tiny", messages=messages, max_tokens=5, temperature=0,
                                       logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert c.choices[0].message.content == tok.decode([forced] * 5)
    for kw, field in [({"frequency_penalty": 2.5}, "frequency_penalty"), ({"presence_penalty": -3}, "presence_penalty"),
                      ({"logit_bias": {"-1": 5}}, "logit_bias"), ({"logit_bias": {"a": 5}}, "logit_bias"),
                      ({"logit_bias": {str(10**6): 5}}, "logit_bias"),
                      ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
                      ({"logit_bias": {"5": 101}}, "logit_bias"),
                      ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty")]:
        with pytest.raises(openai.BadRequestError, match=field):
            client.completions.create(model="dsv3-tiny", prompt=p, max_tokens=2, **kw)
        with pytest.raises(openai.BadRequestError, match=field):
            client.chat.completions.create(model="dsv3-tiny", messages=messages, max_tokens=2, **kw)


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": "dsv3-tiny", "prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "stream": True,
            "ignore_eos": True}
    aengine = server.app.state.async_engine
    aborted = aengine.num_aborted
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert server.engine.has_unfinished()
    # the connection is closed here, mid-generation: the request is aborted (not run to its 480 tokens) and its
    # blocks come back
    assert all_blocks_free(server.engine)
    assert wait_until(lambda: aengine.num_aborted == aborted + 1)
    # a non-streaming client that gives up (read timeout) is noticed too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=dict(body, stream=False), timeout=0.3)
    assert all_blocks_free(server.engine)
    assert wait_until(lambda: aengine.num_aborted == aborted + 2)
    assert client_ok(server)


def client_ok(server) -> bool:
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "import os", "max_tokens": 4, "temperature": 0},
                   timeout=60)
    return r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(server, "import os", 4).text


def test_models_health_tokenize_metrics(server, client):
    assert [m.id for m in client.models.list()] == ["dsv3-tiny"]
    assert httpx.get(server.url + "/health", timeout=60).json() == {"status": "ok"}
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "def f(x):"}, timeout=60).json()["tokens"]
    assert ids == server.tokenizer.encode("def f(x):")
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}, timeout=60).json() == {"prompt": "def f(x):"}
    info = httpx.get(server.url + "/tokenizer_info", timeout=60).json()
    assert info["eos_token"] == server.tokenizer.decode([server.tokenizer.eos_id]) and "chat_template" in info
    assert client_ok(server)          # at least one answered completion, whichever tests ran before on this worker
    from prometheus_client.parser import text_string_to_metric_families
    samples = {s.name: s.value for f in text_string_to_metric_families(httpx.get(server.url + "/metrics",
                                                                                 timeout=60).text)
               for s in f.samples if not s.labels or s.name.endswith("_count")}
    # client_ok's request was counted: 4 tokens generated, a first token timed, a request answered
    assert samples["dsv3_generation_tokens_total"] >= 4
    assert samples["dsv3_time_to_first_token_seconds_count"] >= 1
    assert samples["dsv3_time_per_output_token_seconds_count"] >= 1
    for name in ("dsv3_kv_cache_usage_ratio", "dsv3_num_requests_waiting", "dsv3_spec_decode_acceptance_ratio"):
        assert name in samples, name
    text = httpx.get(server.url + "/metrics", timeout=60).text
    assert 'dsv3_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_api_key_queue_limit_and_graceful_drain():
    s = start_server(EngineConfig(block_size=8, num_blocks=200, max_num_seqs=4), api_key="sekret", max_pending=3)
    try:
        body = {"prompt": "import os", "max_tokens": 120, "temperature": 0, "ignore_eos": True}
        assert httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(s.url + "/v1/completions", json=body, headers=wrong, timeout=60).status_code == 401
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.get(s.url + "/health", timeout=60).status_code == 200          # open without the key
        assert httpx.post(s.url + "/v1/completions", json=body, headers=auth, timeout=60).status_code == 200

        long = dict(body, max_tokens=300)        # long enough that the burst overlaps on any machine

        async def burst():
            async with httpx.AsyncClient(timeout=120) as http:
                return await asyncio.gather(*(http.post(s.url + "/v1/completions", json=long, headers=auth)
                                              for _ in range(12)))
        codes = [r.status_code for r in asyncio.run(burst())]
        assert codes.count(429) > 0 and codes.count(200) >= 3 and set(codes) <= {200, 429}, codes
        r429 = next(r for r in asyncio.run(burst()) if r.status_code == 429)
        assert r429.json()["error"]["code"] == "queue_full"
        assert all_blocks_free(s.engine)

        # graceful shutdown: a stream open when the server is told to exit still runs to its end
        out = {}

        def consume():
            with httpx.stream("POST", s.url + "/v1/completions", headers=auth, timeout=60,
                              json=dict(body, stream=True)) as r:
                out["lines"] = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        t = threading.Thread(target=consume)
        t.start()
        deadline = time.monotonic() + 30
        while not s.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert s.engine.has_unfinished()
        s.server.should_exit = True
        t.join(60)
        assert out["lines"][-1] == "data: [DONE]" and len(out["lines"]) >= 10
    finally:
        s.stop()


def test_incremental_text_equals_the_final_decode():
    """Streamed deltas (windowed decoding, U+FFFD held back, stop-string holdback) always add up to the final text,
    for random ids that split multi-byte characters and include specials."""
    import random

    from dsv3.data import train_tokenizer
    from dsv3.infer.engine import RequestOutput
    from dsv3.serve.responses import TextStream
    tok = train_tokenizer(["héllo wörld ünïcode 日本語のテキスト 🎉🎉 " * 20, "def f(x):\n    return x * 2\n" * 20],
                          vocab_size=400)
    rng = random.Random(0)
    for trial in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 60))]
        stop = ["xyz"] if trial % 2 else []
        stream = TextStream(tok, stop)
        got = ""
        for i in range(1, len(ids) + 1):
            got += stream.delta(RequestOutput(0, [], [], new_token_ids=ids[i - 1:i]))   # mid-stream: deltas
            # independently: everything decoded so far is released, except an incomplete trailing character and
            # the stop-string holdback
            now = tok.decode(ids[:i], skip_special_tokens=True)
            if not now.endswith("\ufffd"):
                assert got == now[:max(len(now) - (2 if stop else 0), 0)], (trial, i)
        final = tok.decode(ids, skip_special_tokens=True)
        assert final.startswith(got), trial
        got += stream.delta(RequestOutput(0, [], ids, text=final, finished=True))
        assert got == final, trial


def test_a_failed_engine_step_fails_its_requests_and_the_server_recovers(caplog):
    """An exception inside Engine.step: the requests of that step get an OpenAI-style 503 (`service_unavailable`:
    retry; streaming: an error event, then [DONE]) that says the step failed and holds none of the exception's text
    (that goes to the server's log, traceback included), /health turns 503 with a generic reason (open without the
    key: the exception's text is the log's), the blocks come back, and
    the next request is served (and /health is ok). Before, the requests got a 500 `server_error` quoting the
    exception."""
    s = start_server()
    try:
        real_step, failures = s.engine.step, [1]

        def flaky_step():
            if failures[0]:
                failures[0] -= 1
                raise RuntimeError("injected failure")
            return real_step()

        s.engine.step = flaky_step
        body = {"model": "dsv3-tiny", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
        with caplog.at_level(logging.ERROR):
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
        assert "step failed" in r.json()["error"]["message"] and "injected" not in r.text, r.text
        logged = [rec for rec in caplog.records if rec.exc_info and "injected failure" in str(rec.exc_info[1])]
        assert logged, "the failed step's traceback was not logged"
        health = httpx.get(s.url + "/health", timeout=60)
        assert health.status_code == 503 and health.json() == {"status": "unhealthy", "error": "engine step failed"}
        failures[0] = 3             # the steps that would return the aborted request's blocks fail too
        with httpx.stream("POST", s.url + "/v1/completions", json=dict(body, stream=True), timeout=30) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", events
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "service_unavailable" and "step failed" in error["message"], events
        assert not any("injected" in e for e in events), events
        assert all_blocks_free(s.engine)
        want = s.reference.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=8))[0].text
        assert httpx.post(s.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"] == want
        assert httpx.get(s.url + "/health", timeout=60).json() == {"status": "ok"}
    finally:
        s.stop()
