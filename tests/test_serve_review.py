"""`dsv3 serve` reviewed again as a hostile user (the serve-audit brief, second pass): one test per defect found,
each failing before its fix, against a live server on loopback.

1. /metrics counted a non-streamed request as answered (200) once the engine accepted it: one that then failed was
   counted twice (200 and 500), one whose client left (499) as a 200;
2. stop_token_ids outside the vocabulary got an error that listed every bad id (a 400 KB message for 100k of them)
   under param "prompt";
3. /detokenize took ids of the model's padded embedding rows (past the tokenizer's last id) and decoded them to
   nothing, where the completions API refuses them;
4. a second tool-call block that does not read lost its begin marker from the content (the parser counted the
   first block's calls as its own), so the text was not returned as generated;
5. error messages quoted the client's value whole (a model name, tool_choice, response_format, a schema type, a
   number): a 200 KB message for a 200 KB value, up to the body limit;
6. a streamed chat put its kept markers back (a decode per marker, quadratic) on the event loop; and that decode
   was quadratic wherever it ran (2 s for 8000 tokens);
7. a web page of another site could drive a loopback server from a visitor's browser: a POST whose body is a Blob
   has no Content-Type (read as JSON) and needs no CORS preflight; its Origin header was not looked at.
"""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dsv3.serve.chat_output import ChatOutput, ChatParsing, chat_message
from dsv3.serve.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from serve_fixture import start_server, wait_until


@pytest.fixture(scope="module")
def server():
    s = start_server(extra_rows=8)          # a padded vocabulary, as DeepSeek-V3's 129,280 rows
    yield s
    s.stop()


def request_series(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(url + "/metrics", timeout=60).text
    return {(s.labels["endpoint"], s.labels["status"]): s.value for f in text_string_to_metric_families(text)
            if f.name == "dsv3_requests" for s in f.samples if s.name == "dsv3_requests_total"}


def counted(before: dict, after: dict, endpoint: str, status: str) -> float:
    return after.get((endpoint, status), 0) - before.get((endpoint, status), 0)


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"], err
    return err


# ---- 1. metrics -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route, body", [("/v1/completions", {"prompt": "hi", "max_tokens": 3}),
                                         ("/v1/chat/completions",
                                          {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})])
def test_1_a_failed_request_is_counted_once_as_its_status(server, monkeypatch, route, body):
    """An engine step that fails (injected once) fails the request with a 503 (engine_step_failed: retry): counted
    as that, not also as a 200."""
    step, failed = server.engine.step, []

    def failing_step():
        if not failed:
            failed.append(True)
            raise RuntimeError("injected step failure")
        return step()
    monkeypatch.setattr(server.engine, "step", failing_step)
    before = request_series(server.url)
    assert_openai_error(httpx.post(server.url + route, json=body, timeout=30), 503)
    after = request_series(server.url)
    assert failed and counted(before, after, route, "503") == 1
    assert counted(before, after, route, "200") == 0, "a 503 was also counted as a 200"
    monkeypatch.undo()
    assert httpx.post(server.url + route, json=body, timeout=30).status_code == 200     # still serving
    assert counted(after, request_series(server.url), route, "200") == 1


def test_1_a_request_whose_client_left_is_not_counted_as_answered(server):
    aengine = server.app.state.async_engine
    before = request_series(server.url)
    with pytest.raises(httpx.ReadTimeout):          # the client gives up long before 400 tokens are generated
        httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 400, "ignore_eos": True},
                   timeout=0.3)
    assert wait_until(lambda: aengine.num_pending == 0, 30)
    assert wait_until(lambda: counted(before, request_series(server.url), "/v1/completions", "499") == 1)
    assert counted(before, request_series(server.url), "/v1/completions", "200") == 0


# ---- 2. stop_token_ids ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route, body", [("/v1/completions", {"prompt": "hi"}),
                                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
def test_2_stop_token_ids_outside_the_vocabulary_get_a_short_error_naming_them(server, route, body):
    r = httpx.post(server.url + route, json=body | {"max_tokens": 2, "stop_token_ids": [-1] * 100_000}, timeout=30)
    err = assert_openai_error(r, 400)
    assert err["param"] == "stop_token_ids" and "stop_token_ids" in err["message"]
    assert len(err["message"]) < 300, f"a {len(err['message'])}-character error message"
    # an id of the model's padded rows is no token either (as for logit_bias and prompt ids)
    r = httpx.post(server.url + route, json=body | {"max_tokens": 2, "stop_token_ids": [server.tokenizer.vocab_size]},
                   timeout=60)
    assert assert_openai_error(r, 400)["param"] == "stop_token_ids"
    assert httpx.post(server.url + route, json=body | {"max_tokens": 2, "stop_token_ids": [5]},
                      timeout=60).status_code == 200


# ---- 3. /detokenize ---------------------------------------------------------------------------------------------

def test_3_detokenize_refuses_ids_past_the_tokenizer_as_the_completions_api_does(server):
    n = server.tokenizer.vocab_size
    assert server.app.state.async_engine.limits.vocab_size > n         # the padded rows this is about
    for route, body in (("/detokenize", {"tokens": [1, n, 2]}), ("/v1/completions", {"prompt": [1, n, 2]})):
        err = assert_openai_error(httpx.post(server.url + route, json=body, timeout=60), 400)
        assert str(n) in err["message"] and f"[0, {n})" in err["message"], (route, err)
    assert httpx.post(server.url + "/detokenize", json={"tokens": [1, n - 1, 2]}, timeout=60).status_code == 200


# ---- 4. tool calls ----------------------------------------------------------------------------------------------

CALL = f"{CALL_BEGIN}f{SEP}{{\"a\": 1}}{CALL_END}"


@pytest.mark.parametrize("tail", [f"{CALLS_BEGIN}garbage", f"{CALLS_BEGIN}{CALL_BEGIN}nope{CALL_END}", CALLS_BEGIN,
                                  f"{CALLS_BEGIN}  "])
def test_4_a_second_block_that_does_not_read_is_content_as_generated(tail):
    """The first block's call stands; what follows it, the second block's begin marker included, is the content,
    whole and streamed (cut at every place)."""
    text = f"A{CALLS_BEGIN}{CALL}{CALLS_END}B{tail}"
    parsing = ChatParsing(tools=frozenset({"f"}))
    message, reason = chat_message(parsing, text, "stop")
    assert message["content"] == "AB" + tail, message
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["f"] and reason == "tool_calls"
    for cut in range(1, len(text)):
        out = ChatOutput(parsing)
        deltas = [out.feed(text[:cut]), out.feed(text[cut:]), out.finish()]
        assert "".join(d.get("content", "") for d in deltas) == "AB" + tail, cut
        assert sum(len(d.get("tool_calls", [])) for d in deltas) == 1, cut


# ---- 5. error messages ------------------------------------------------------------------------------------------

BIG = "x" * 200_000
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("route, body, word", [
    ("/v1/chat/completions", {"messages": MESSAGES, "tool_choice": {"type": BIG}}, "tool_choice"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": BIG}}, "response_format"),
    ("/v1/chat/completions", {"messages": MESSAGES, "model": BIG}, "model"),
    ("/v1/completions", {"prompt": "hi", "model": BIG}, "model"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": BIG}}}]}, "parameters"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**4000}, "max_tokens"),
])
def test_5_an_error_quoting_a_huge_value_stays_short(server, route, body, word):
    """The error message quoted the client's value whole: a 200 KB message (8 MB for a body at the limit)."""
    r = httpx.post(server.url + route, json=body, timeout=60)
    err = assert_openai_error(r, 404 if word == "model" else 400)
    assert word in err["message"] and len(err["message"]) <= 1100, (len(err["message"]), err["message"][:200])


# ---- 6. the event loop ------------------------------------------------------------------------------------------

def test_6_a_streamed_chat_puts_its_kept_markers_back_off_the_event_loop(monkeypatch):
    """A tokenizer that flags the tool-call markers special (the server keeps them for the parser), tools in the
    request and a logit_bias that makes every token a marker: the stream's last output had its markers put back
    (marked_text: a decode of the output's prefix at every marker, 2 s for 8000 tokens, quadratic) on the event
    loop, holding up every other client. Checked by the thread that runs it, as test_serve_audit does."""

    import torch

    import dsv3.serve.responses as responses
    from conftest import build, tiny_config
    from dsv3.infer import Engine, EngineConfig
    from dsv3.serve import build_app
    from serve_fixture import LiveServer, ThreadRecorder, serve_app
    from test_serve_chat_parsing import TOOLS, USER
    from test_serve_tools import V31, deepseek_like_tokenizer

    torch.set_num_threads(1)
    tok = deepseek_like_tokenizer()
    model = build(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=1024), seed=0,
                  dtype=torch.float32)
    engine = Engine(model, tok, EngineConfig(block_size=8, num_blocks=128, max_num_seqs=4))
    app = build_app(engine, tok, "t", chat_template=V31)
    server, thread, url = serve_app(app)
    live = LiveServer(url, engine, None, tok, app, server, thread)
    try:
        marker = tok.backend.token_to_id(CALL_BEGIN)
        rec = ThreadRecorder(live)
        rec.watch(monkeypatch, responses, "marked_text", when=lambda _tok, out, keep: bool(keep))
        body = {"messages": USER, "tools": TOOLS, "max_tokens": 64, "stream": True, "ignore_eos": True,
                "logit_bias": {str(marker): 100}}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text[-300:]
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert content.count(CALL_BEGIN) > 8, content[:200]      # the markers, as content (no call reads)
        rec.assert_off_loop()
    finally:
        live.stop()


# ---- 7. cross-site pages ----------------------------------------------------------------------------------------

def test_7_a_page_of_another_site_cannot_drive_a_loopback_server(server):
    """What `fetch("http://127.0.0.1:8000/v1/completions", {method: "POST", body: new Blob([json])})` sends from
    https://evil.example: no Content-Type, the page's Origin, a loopback Host."""
    body = b'{"prompt": "hi", "max_tokens": 2}'
    for origin in ("https://evil.example", "null", "http://127.0.0.1.evil.example"):
        r = httpx.post(server.url + "/v1/completions", content=body, headers={"Origin": origin}, timeout=60)
        err = assert_openai_error(r, 403)
        assert err["param"] == "origin" and "Origin" in err["message"], err
    for origin in ("http://127.0.0.1:8000", "http://localhost:3000", "http://[::1]:8080"):    # local pages, /docs
        r = httpx.post(server.url + "/v1/completions", content=body, headers={"Origin": origin}, timeout=60)
        assert r.status_code == 200, (origin, r.text[:200])
    assert httpx.post(server.url + "/v1/completions", content=body, timeout=60).status_code == 200  # API clients: none


def test_7_a_server_open_to_any_host_takes_any_origin():
    s = start_server(allowed_hosts=["*"])
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       headers={"Origin": "https://ui.example"}, timeout=60)
        assert r.status_code == 200, r.text[:200]
    finally:
        s.stop()


def test_6_markers_are_put_back_in_one_pass_with_the_decodes_lengths():
    """marked_text decoded the output's prefix at every kept marker: quadratic (4000 markers: 8M tokens decoded).
    The lengths now come from one pass over the tokens' bytes; they are the decodes' lengths exactly (random ids:
    invalid UTF-8, characters split over tokens, special tokens skipped), and the text the same."""
    import random

    import dsv3.serve.responses as responses
    from dsv3.infer.engine import RequestOutput
    from dsv3.serve.chat_output import marker_ids
    from dsv3.serve.tool_calls import MARKERS
    from serve_fixture import build_engine
    from test_serve_tools import deepseek_like_tokenizer

    tok = deepseek_like_tokenizer()
    keep = marker_ids(tok, MARKERS)
    marker = tok.backend.token_to_id(CALL_BEGIN)
    ids = [marker, 50] * 2000
    out = RequestOutput(0, [1], ids, tok.decode(ids, skip_special_tokens=True), True, "length")
    decoded = []
    real = tok.decode_batch
    tok.decode_batch = lambda seqs, **kw: decoded.extend(map(len, seqs)) or real(seqs, **kw)
    text = responses.marked_text(tok, out, keep)
    assert text == tok.decode(ids, skip_special_tokens=False)
    assert sum(decoded) <= 2 * len(ids), f"{sum(decoded)} tokens decoded for an output of {len(ids)}"

    rng = random.Random(0)
    for tok in (deepseek_like_tokenizer(), build_engine().tokenizer):
        for _ in range(1000):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
            at = sorted(rng.sample(range(len(ids) + 1), rng.randrange(1, min(8, len(ids) + 1))))
            want = [len(t) for t in tok.decode_batch([ids[:k] for k in at], skip_special_tokens=True)]
            assert responses.text_lengths(tok, ids, at) == want, (ids, at)
