"""`dsv3 serve` audited as a hostile and a demanding user (the serve-audit brief), against a live server on loopback
with the real `openai` client and raw HTTP. One test per defect the existing fuzz / hardening tests missed, each
failing before its fix:

1. per-request CPU work that grows with the input ran on the event loop: building a large response (n choices x
   thousands of logprob entries, 2-3 s of /health stall measured) and parsing / validating a large body (4M token ids:
   1.3 s);
2. OpenAI's `bytes` of a logprob entry was the UTF-8 of the token's decoded text, U+FFFD for a token that ends inside
   a character, so clients could not join a character split over tokens;
3. fields the server cannot honour were ignored instead of refused (`best_of`, `response_format`, `functions`,
   `function_call`, `tool_choice`), and JSON of the wrong type was coerced (`true` as token id 1, "2" as 2);
4. headers: the Bearer scheme is case-insensitive (RFC 7235), a body that is not JSON says so, HEAD /health.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading

import httpx
import openai
import pytest

from dsv3.data.tokenizer import SPECIAL_TOKENS
from dsv3.infer import EngineConfig, SamplingParams
import dsv3.serve.api_chat as api_chat
import dsv3.serve.api_completions as api_completions
import dsv3.serve.body as serve_body
import dsv3.serve.state as serve_state
from serve_fixture import ThreadRecorder, all_blocks_free, start_server, timed_health, wait_until

# room for 64 echoed prompts of 400 tokens at once
AUDIT_ENGINE = EngineConfig(block_size=8, num_blocks=3400, max_num_seqs=64, max_num_batched_tokens=4096)


@pytest.fixture(scope="module")
def server():
    s = start_server(AUDIT_ENGINE)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"], err
    return err


def lat_ms(lat: list[float]) -> str:
    return f"{len(lat)} /health calls, max {max(lat, default=0.0) * 1000:.0f} ms"


# ---- 1. the event loop ------------------------------------------------------------------------------------------

def test_1_a_large_response_is_built_off_the_event_loop(server, monkeypatch):
    """lm-eval's scoring call at batch size 32 with 20 top logprobs: 32 x 400 x 21 entries, 6 MB of JSON (before:
    built and serialised on the event loop, /health stalled ~1 s); and chat's n=16 with 20 top logprobs. Checked by
    the threads that parse the body, build the response and serialise it: none is the event loop's."""
    rec = ThreadRecorder(server)
    rec.watch(monkeypatch, serve_body, "parse_body")
    rec.watch(monkeypatch, api_completions, "completion_response")
    rec.watch(monkeypatch, serve_state, "json_body")
    ids = server.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 60)[:400]
    body = {"prompt": [ids] * 32, "max_tokens": 0, "echo": True, "logprobs": 20}
    r, lat = timed_health(server, lambda: httpx.post(server.url + "/v1/completions", json=body, timeout=120))
    assert r.status_code == 200 and len(r.content) > 5e6, (r.status_code, r.text[:300])
    choices = r.json()["choices"]
    assert len(choices) == 32 and all(len(c["logprobs"]["tokens"]) == 400 for c in choices)
    want = server.reference.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=20))[0].prompt_logprobs
    got = choices[5]["logprobs"]
    assert got["token_logprobs"][1:] == pytest.approx([e[0] for e in want], abs=1e-6)
    print("completions:", lat_ms(lat))
    rec.assert_off_loop()
    monkeypatch.undo()
    rec = ThreadRecorder(server)
    rec.watch(monkeypatch, serve_body, "parse_body")
    rec.watch(monkeypatch, api_chat, "chat_response")
    rec.watch(monkeypatch, serve_state, "json_body")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "n": 16, "logprobs": True,
            "top_logprobs": 20, "ignore_eos": True}
    r, lat = timed_health(server, lambda: httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=120))
    assert r.status_code == 200 and all(len(c["logprobs"]["content"]) == 200 for c in r.json()["choices"])
    print("chat:", lat_ms(lat))
    rec.assert_off_loop()
    assert all_blocks_free(server.engine)


def test_1_an_echoed_stream_builds_its_prompt_logprobs_off_the_event_loop(server, monkeypatch):
    """Each choice's first chunk carries its prompt's 400 x 21 logprob entries: built on a worker thread (the later
    chunks, a token's worth each, are built on the loop: only calls given prompt entries count)."""
    rec = ThreadRecorder(server)
    rec.watch(monkeypatch, api_completions, "choice_logprobs", when=lambda *a, **k: a[4] is not None)
    ids = server.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 60)[:400]
    body = {"prompt": [ids] * 64, "max_tokens": 1, "echo": True, "logprobs": 20, "stream": True}
    r, lat = timed_health(server, lambda: httpx.post(server.url + "/v1/completions", json=body, timeout=120))
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") and r.text.count('"text_offset"') == 64
    print(lat_ms(lat))
    assert len(rec.calls["choice_logprobs"]) == 64, len(rec.calls["choice_logprobs"])
    rec.assert_off_loop()


# ---- 2. logprob bytes ---------------------------------------------------------------------------------------------

def test_2_logprob_bytes_are_the_tokens_own_bytes(server, client):
    """Joined, the `bytes` of a choice's tokens are its text's UTF-8, split characters included (the tiny model
    emits many: its tokens are mostly single bytes)."""
    r = client.chat.completions.create(model="dsv3-tiny", messages=[{"role": "user", "content": "héllo wörld ☃"}],
                                       max_tokens=60, temperature=1.0, seed=3, logprobs=True, top_logprobs=3,
                                       n=4, extra_body={"ignore_eos": True})
    split = 0
    for c in r.choices:
        entries = c.logprobs.content
        # the message's text leaves special tokens out (the random model emits some)
        raw = b"".join(bytes(e.bytes) for e in entries if e.token not in SPECIAL_TOKENS.values())
        assert raw.decode("utf-8", "replace") == c.message.content
        split += sum("\ufffd" in e.token for e in entries)
        for e in entries:
            tid = server.tokenizer.backend.token_to_id(e.token) if "\ufffd" not in e.token else None
            assert tid is None or bytes(e.bytes) == e.token.encode()
            assert all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in e.top_logprobs)
    assert split > 0, "no output token ended inside a character: the test proves nothing"


def test_1_a_large_body_is_parsed_off_the_event_loop(server, monkeypatch):
    """3M token ids (6 MB, under the 8 MiB limit): FastAPI's json.loads + smart-union validation held the loop ~1 s.
    Parsing / validating the body and checking the prompt against the limits run on a worker thread."""
    rec = ThreadRecorder(server)
    rec.watch(monkeypatch, serve_body, "parse_body")
    rec.watch(monkeypatch, api_completions, "plan_completion")
    raw = b'{"prompt": [' + b",".join([b"1"] * 3_000_000) + b'], "max_tokens": 1}'
    r, lat = timed_health(server, lambda: httpx.post(server.url + "/v1/completions", content=raw, timeout=120,
                                                     headers={"content-type": "application/json"}))
    assert assert_openai_error(r, 400)["code"] == "context_length_exceeded"
    print(lat_ms(lat))
    rec.assert_off_loop()


# ---- 3. what cannot be honoured is refused; types are strict --------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("route, extra, word", [
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"best_of": 1, "n": 2}, "best_of"),
    ("/v1/chat/completions", {"functions": [{"name": "f", "parameters": {}}]}, "tools"),
    ("/v1/chat/completions", {"function_call": {"name": "f"}}, "function_call"),
    ("/v1/chat/completions", {"tool_choice": "any"}, "tool_choice"),      # (required / named: tool_grammar)
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_3_what_cannot_be_honoured_is_refused(server, route, extra, word):
    base = {"prompt": "hi", "max_tokens": 2} if route == "/v1/completions" else CHAT
    err = assert_openai_error(httpx.post(server.url + route, json=base | extra, timeout=60), 400)
    assert word in err["message"] and "not supported" in err["message"], err


@pytest.mark.parametrize("route, extra", [
    ("/v1/completions", {"best_of": 2, "n": 2}), ("/v1/completions", {"best_of": None}),
    ("/v1/chat/completions", {"response_format": {"type": "text"}}),
    pytest.param("/v1/chat/completions", {"response_format": {"type": "json_object"}},     # dsv3.infer.structured
                 marks=pytest.mark.skipif(importlib.util.find_spec("llguidance") is None,
                                          reason="structured outputs need llguidance")),
    ("/v1/chat/completions", {"tool_choice": "none", "function_call": "auto"}),
])
def test_3_what_the_server_does_anyway_is_accepted(server, route, extra):
    base = {"prompt": "hi", "max_tokens": 2} if route == "/v1/completions" else CHAT
    r = httpx.post(server.url + route, json=base | extra, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route, body, field", [
    ("/v1/completions", {"prompt": [True, 5], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [[5], [False]], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [5, "a"], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": 5, "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "2"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop_token_ids": [True]}, "stop_token_ids"),
    ("/v1/chat/completions", CHAT | {"logprobs": 1}, "logprobs"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
])
def test_3_json_of_the_wrong_type_is_refused_not_coerced(server, route, body, field):
    err = assert_openai_error(httpx.post(server.url + route, json=body, timeout=60), 400)
    assert field in err["message"], err


def test_3_every_prompt_form_still_reads(server, client):
    ids = server.tokenizer.encode("import os")
    want = server.reference.generate([ids], SamplingParams(temperature=0.0, max_tokens=3))[0].text
    for prompt, n in (("import os", 1), (["import os", "import os"], 2), (ids, 1), ([ids, ids, ids], 3)):
        r = client.completions.create(model="dsv3-tiny", prompt=prompt, max_tokens=3, temperature=0)
        assert [c.text for c in r.choices] == [want] * n


# ---- 4. headers and bodies -----------------------------------------------------------------------------------------

def test_4_a_body_that_is_not_json_says_so(server):
    body = b'{"prompt": "hi", "max_tokens": 2}'
    for ct in ("text/plain", "application/x-www-form-urlencoded"):         # curl -d without -H sends the latter
        err = assert_openai_error(httpx.post(server.url + "/v1/completions", content=body,
                                             headers={"content-type": ct}, timeout=60), 415)
        assert "JSON" in err["message"] and ct in err["message"]
    for ct in ("application/json", "application/json; charset=utf-8", "APPLICATION/JSON", None):
        r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": ct} if ct else {},
                       timeout=60)
        assert r.status_code == 200, (ct, r.text)
    assert "JSON body" in assert_openai_error(httpx.post(server.url + "/v1/completions", content=b"",
                                                         headers={"content-type": "application/json"},
                                                         timeout=60), 400)["message"]
    for raw in (b'{"prompt": "h\xffi"}', b"[" * 100_000, b'{"prompt": "a",}', b'{"messages": [{"role": "user", '
                                                                               b'"content": "\\ud800"}]}'):
        err = assert_openai_error(httpx.post(server.url + "/v1/chat/completions", content=raw,
                                             headers={"content-type": "application/json"}, timeout=60), 400)
        assert "JSON" in err["message"] or "surrogate" in err["message"] or "messages" in err["message"], err


def test_4_bearer_scheme_is_case_insensitive_and_health_answers_head():
    s = start_server(api_key="sekret-ключ")
    try:
        for value in ("Bearer sekret-ключ", "bearer sekret-ключ", "BEARER  sekret-ключ"):
            r = httpx.get(s.url + "/v1/models", headers={"Authorization": value.encode()}, timeout=60)
            assert r.status_code == 200, (value, r.text)
        for value in ("Bearer sekret", "Basic sekret-ключ", "sekret-ключ", "Bearer", "Bearer sekret-ключx",
                      ""):
            r = httpx.get(s.url + "/v1/models", headers={"Authorization": value.encode()}, timeout=60)
            assert assert_openai_error(r, 401)["type"] == "authentication_error", value
            assert "sekret" not in r.text
        r = httpx.head(s.url + "/health")
        assert r.status_code == 200 and r.content == b""
    finally:
        s.stop()


# ---- 5. lifecycle -------------------------------------------------------------------------------------------------

def test_5_shutdown_ends_open_requests_cleanly():
    """Requests still open when the server's graceful-shutdown time runs out (uvicorn then cancels them) end as
    OpenAI clients understand: a stream with an error event and [DONE] (before: a cut chunked body), a non-streaming
    request with a 503 in the error shape (before: a plain-text 500); their sequences are aborted."""
    s = start_server()
    s.server.config.timeout_graceful_shutdown = 0.3
    long = {"prompt": "import os", "max_tokens": 480, "ignore_eos": True, "n": 8}
    out, started = {}, threading.Event()

    def stream():
        with httpx.stream("POST", s.url + "/v1/completions", json=long | {"stream": True}, timeout=60) as r:
            out["status"], out["lines"] = r.status_code, []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out["lines"].append(line)
                    started.set()

    def blocking():
        out["plain"] = httpx.post(s.url + "/v1/completions", json=long, timeout=60)
    threads = [threading.Thread(target=stream), threading.Thread(target=blocking)]
    try:
        for t in threads:
            t.start()
        assert started.wait(30)
        # both requests in the engine (n=8 each) before the shutdown: else the second may not be connected yet
        assert wait_until(lambda: len(s.engine.seqs) >= 16, timeout=30), len(s.engine.seqs)
        s.server.should_exit = True
        for t in threads:
            t.join(60)
        assert out["status"] == 200 and out["lines"][-1] == "data: [DONE]", out["lines"][-3:]
        last = json.loads(out["lines"][-2].removeprefix("data: "))
        assert last["error"]["type"] == "service_unavailable" and "shutting down" in last["error"]["message"]
        err = assert_openai_error(out["plain"], 503)
        assert err["type"] == "service_unavailable" and "shutting down" in err["message"]
        assert all_blocks_free(s.engine)
    finally:
        s.stop()


def test_5_a_dead_engine_process_gets_503s_not_500s():
    """The engine process killed (OOM killer, a crash): its open stream fails with an error event, /health says
    unhealthy, and every later request, /metrics included, gets a 503 in the error shape (before: uvicorn's
    plain-text 500 from a BrokenPipeError, and a server that failed its own shutdown)."""
    s = start_server(process=True, threads=1)
    try:
        aengine = s.app.state.async_engine
        assert httpx.get(s.url + "/metrics", timeout=60).status_code == 200
        os.kill(aengine._process.pid, signal.SIGKILL)
        aengine._process.join(30)
        r = httpx.get(s.url + "/health", timeout=60)
        assert r.status_code == 503 and r.json() == {"status": "unhealthy",
                                                     "error": "engine process exited with code -9"}, r.text
        for route, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                            ("/v1/completions", {"prompt": ["hi", "ho"], "max_tokens": 2, "stream": True}),
                            ("/v1/chat/completions", CHAT)):
            err = assert_openai_error(httpx.post(s.url + route, json=body, timeout=60), 503)
            assert err["type"] == "service_unavailable" and "engine" in err["message"]
        assert assert_openai_error(httpx.get(s.url + "/metrics", timeout=60), 503)["type"] == "service_unavailable"
        assert aengine.num_pending == 0
    finally:
        s.stop()
    assert not s.thread.is_alive()


# ---- 6. streamed text -------------------------------------------------------------------------------------------

def test_6_a_stream_of_invalid_utf8_is_released_as_it_comes(server):
    """Tokens whose bytes never form UTF-8 (every continuation byte alone): the text was held back to the end and the
    window decoded each step grew with the output (quadratic, on the event loop). Now it is released with a bounded
    window, and random mixes of such tokens, multi-byte pieces and specials still add up to the final decode."""
    import random

    from dsv3.infer.engine import RequestOutput
    from dsv3.serve.responses import TextStream
    tok = server.tokenizer
    lone = [i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"]
    assert len(lone) > 50
    stream, got, widest = TextStream(tok, []), "", 0
    for k in range(2000):
        got += stream.delta(RequestOutput(0, [], [], new_token_ids=[lone[k % len(lone)]]))
        widest = max(widest, len(stream.ids) - stream.prefix)
    final = tok.decode(stream.ids, skip_special_tokens=True)
    assert len(got) >= len(final) - 8 and widest <= 16, (len(got), len(final), widest)
    specials = [tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id]
    rng = random.Random(0)
    for trial in range(300):
        pool = rng.choice([lone, range(tok.vocab_size), specials + lone])
        ids = [rng.choice(pool) if rng.random() < 0.7 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(1, 80))]
        stream, got = TextStream(tok, ["xyz"] if trial % 2 else []), ""
        for i in range(len(ids)):
            got += stream.delta(RequestOutput(0, [], [], new_token_ids=ids[i:i + 1]))
            assert tok.decode(ids, skip_special_tokens=True).startswith(got), (trial, i, ids)
        final = tok.decode(ids, skip_special_tokens=True)
        got += stream.delta(RequestOutput(0, [], ids, text=final, finished=True))
        assert got == final, (trial, ids)


def test_6_text_offsets_index_the_text(server, client):
    """`text_offset` points at each token's text in the choice's text, across characters split over tokens (it
    summed each piece's U+FFFD and drifted past every such character), and a stream's offsets count from the start
    of the text in every chunk (they restarted at 0 in each)."""
    prompt = "héllo wörld ☃ 日本"
    kw = dict(model="dsv3-tiny", prompt=prompt, max_tokens=30, temperature=1.0, seed=5, logprobs=1, echo=True,
              extra_body={"ignore_eos": True})
    c = client.completions.create(**kw).choices[0]
    text, lp = c.text, c.logprobs
    assert text.startswith(prompt) and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    whole = [(t, o) for t, o in zip(lp.tokens, lp.text_offset) if "\ufffd" not in t]
    assert all(text[o:o + len(t)] == t for t, o in whole), list(zip(lp.tokens, lp.text_offset))
    assert len(whole) < len(lp.tokens), "no token split a character: the test proves nothing"
    chunks = [ch.choices[0] for ch in client.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(ch.text for ch in chunks) == text
    assert [o for ch in chunks if ch.logprobs for o in ch.logprobs.text_offset] == lp.text_offset


def test_6_text_offsets_of_random_tokens(server):
    """The same property over random ids (split and invalid UTF-8, generated specials that the text leaves out):
    every whole token's text is at its offset in the decoded text."""
    import random

    from dsv3.serve.responses import TextOffsets, TokenTable
    tok, rng = server.tokenizer, random.Random(1)
    table = TokenTable.of(tok)
    for trial in range(500):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        text, at = tok.decode(ids, skip_special_tokens=True), TextOffsets(tok)(ids, generated=True)
        assert at == sorted(at) and at[-1] <= len(text), (trial, ids)
        for tid, o in zip(ids, at):
            t = table.texts[tid]
            assert tid in table.special or "\ufffd" in t or text[o:o + len(t)] == t, (trial, ids, tid, o)


def test_5_a_client_that_leaves_during_prefill_frees_its_sequences(server):
    """No defect found, kept as a guard: 8 prompts of 400 tokens, the client gone before the first token (streaming
    and not): every sequence is aborted and every block comes back."""
    ids = server.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 60)[:400]
    aengine = server.app.state.async_engine
    aborted = aengine.num_aborted
    body = {"prompt": [ids] * 8, "max_tokens": 100, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.05)
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/completions",
                                                       json=body | {"stream": True}) as r:
        assert r.status_code == 200
    assert all_blocks_free(server.engine)
    assert wait_until(lambda: aengine.num_aborted - aborted == 16 and aengine.num_pending == 0)


# ---- 7. stop strings in the engine --------------------------------------------------------------------------------

def test_7_stop_strings_are_found_from_the_tail_exactly():
    """The engine decoded the whole output after every token to look for stop strings (quadratic: 23 ms a token at
    32K tokens). The tail check finds the first occurrence at exactly the token the whole decode does, over random
    ids full of split and invalid UTF-8 and specials, with stops cut from the text (U+FFFD and all)."""
    import random

    from dsv3.data import train_tokenizer
    from dsv3.infer.stop_rules import is_byte_level, stop_may_end_here
    tok = train_tokenizer(["héllo wörld ünïcode 日本語のテキスト 🎉🎉 " * 20, "def f(x):\n    return x * 2\n" * 20],
                          vocab_size=400)
    assert is_byte_level(tok)
    special = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    rng, found = random.Random(0), 0
    for trial in range(400):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(2, 120))]
        text = tok.decode(ids, skip_special_tokens=True)
        if not text:
            continue
        stops = []
        for _ in range(rng.randint(1, 3)):
            a = rng.randrange(len(text))
            stops.append(text[a:a + rng.randint(1, 6)])
        if trial % 5 == 0:
            stops.append("never-there")
        want = next((t for t in range(1, len(ids) + 1)
                     if any(s in tok.decode(ids[:t], skip_special_tokens=True) for s in stops)), None)
        got = next((t for t in range(1, len(ids) + 1) if stop_may_end_here(tok, ids[:t], stops, special)), None)
        assert got == want, (trial, ids, stops)
        found += want is not None
    assert found > 300


def test_7_the_engine_stops_where_it_did(server):
    """Through the engine and the server: stop strings end the text where the whole-output search ended it."""
    full = server.reference.generate(["import os"], SamplingParams(temperature=1.0, seed=11, max_tokens=120,
                                                                   ignore_eos=True))[0].text
    for stop in (full[90:93], full[40:41], "\ufffd", full[-2:]):
        if not stop:
            continue
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "import os", "max_tokens": 120, "seed": 11,
                                                             "temperature": 1.0, "ignore_eos": True, "stop": stop},
                       timeout=60)
        c = r.json()["choices"][0]
        assert c["text"] == full[:full.index(stop)] and c["finish_reason"] == "stop", (stop, c["text"][-20:])
