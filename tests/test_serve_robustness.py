"""`dsv3 serve` against failures and hostile input (the serve-robustness brief): one test per defect, each failing
before its fix, against a live server on loopback with the real `openai` client and raw HTTP.

1. `--engine-thread` (the engine stepped by a thread of the server process, AsyncEngine): a thread that died (an
   exception outside a step: a failed step is caught and fails only its requests) was not watched: the requests
   waiting on it waited forever. They now end as an engine process's do when it exits: 503 `service_unavailable`.
2. A context overflow named the wrong request field as `param`: `max_tokens` for a prompt of token ids that alone
   overflows (also when the request set no max_tokens), `prompt` for chat messages (a chat request has no `prompt`),
   `max_tokens` for a chat request that set `max_completion_tokens`, `prompt` for a chat `n` past the queue.
3. A stream's text (responses.TextStream, on the event loop) copied all of the output's text twice per step (the
   releasable part and what was sent): quadratic in the output's length. It keeps only the tail its stop-string
   holdback can still look at.
"""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from dsv3.infer.engine import RequestOutput
from dsv3.serve.responses import TextStream
from serve_fixture import start_server, wait_until

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    s = start_server(max_pending=8)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
from test_serve_engine_pipes import assert_waiters_got_503


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")      # the thread that dies
def test_1_requests_waiting_on_a_dead_engine_thread_get_503():
    s = start_server()
    engine, aengine, out = s.engine, s.app.state.async_engine, {}
    long = {"prompt": "hi", "max_tokens": 480, "ignore_eos": True}

    def plain():
        try:
            out["plain"] = httpx.post(s.url + "/v1/completions", json=long, timeout=30)
        except httpx.HTTPError as e:         # (before the fix: a timeout, the request never ended)
            out["plain"] = e

    def stream():
        try:
            with httpx.stream("POST", s.url + "/v1/completions", json=long | {"stream": True, "n": 2},
                              timeout=30) as r:
                out["lines"] = [line for line in r.iter_lines() if line]
        except httpx.HTTPError as e:
            out["lines"] = [e]

    def broken():
        raise RuntimeError("injected engine loop failure")
    threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
    try:
        for t in threads:
            t.start()
        assert wait_until(lambda: aengine.num_pending == 3 and engine.has_unfinished(), timeout=30)
        engine.has_unfinished = broken       # read by the engine's loop outside the step: its thread dies
        for t in threads:
            t.join(60)
        assert_waiters_got_503(out, aengine, "the engine thread died")
        assert not any("injected" in line for line in out["lines"]) and "injected" not in out["plain"].text
        health = httpx.get(s.url + "/health", timeout=60)  # a generic reason: the exception's text is the log's
        assert health.status_code == 503 and health.json() == {"status": "unhealthy", "error": "engine thread died"}
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="dsv3-tiny", prompt="hi", max_tokens=3)
        assert e.value.status_code == 503 and "not running" in e.value.message, e.value
    finally:
        s.stop()


@pytest.mark.parametrize("chat, body, param", [
    (False, {"prompt": [1] * 600}, "prompt"),                       # token ids past the context, no max_tokens
    (False, {"prompt": [1] * 600, "max_tokens": 5}, "prompt"),
    (False, {"prompt": [[1, 2], [1] * 600], "max_tokens": 5}, "prompt"),
    (False, {"prompt": [1] * 500, "max_tokens": 50}, "max_tokens"),     # the prompt fits; with max_tokens it does not
    (False, {"prompt": "x" * 5000}, "prompt"),                      # certain from its characters alone
    (False, {"prompt": "x" * 1500, "max_tokens": 500}, "max_tokens"),
    (True, {"messages": [{"role": "user", "content": "x" * 5000}]}, "messages"),
    (True, {"messages": [{"role": "user", "content": "x y " * 400}]}, "messages"),      # known once tokenised
    (True, {"messages": [{"role": "user", "content": "x y " * 400}], "max_tokens": 5}, "messages"),
    (True, {"messages": MESSAGES, "max_tokens": 510}, "max_tokens"),
    (True, {"messages": MESSAGES, "max_completion_tokens": 510}, "max_completion_tokens"),
    (True, {"messages": MESSAGES, "n": 12}, "n"),                     # more than the server's 8 at once
])
def test_2_an_overflow_names_the_request_field_that_overflows(server, client, chat, body, param):
    limits = server.app.state.async_engine.limits
    assert limits.max_model_len == 512 and limits.capacity >= 600      # what the bodies above are sized for
    create = client.chat.completions.create if chat else client.completions.create
    with pytest.raises(openai.BadRequestError) as e:
        create(model="dsv3-tiny", **body)
    assert e.value.param == param, (e.value.param, e.value.message)
    if param.startswith("max_"):             # the message names the field the client set, as `param` does
        assert f"{param} asks for" in e.value.message, e.value.message


@pytest.mark.parametrize("stop", [[], ["xyz"], ["a" * 64]])
def test_3_a_streamed_texts_work_per_step_does_not_grow_with_it(server, stop):
    """Token by token over a long output: the text a stream keeps (and copies per step) stays within a bound set by
    the longest stop string, and what it releases adds up to the whole text."""
    tok = server.tokenizer
    ids = tok.encode("The quick brown fox jumps over the lazy dog. import os\n" * 200)
    final = tok.decode(ids, skip_special_tokens=True)
    stream, got, bound = TextStream(tok, stop), [], 4 * (max(map(len, stop), default=0) + 32)
    for i in range(len(ids)):
        got.append(stream.delta(RequestOutput(0, [], [], new_token_ids=ids[i:i + 1])))
        assert len(stream.text) <= bound, (i, len(stream.text))
    assert final.startswith("".join(got)) and len(final) - len("".join(got)) <= bound
    got.append(stream.delta(RequestOutput(0, [], ids, text=final, finished=True)))
    assert "".join(got) == final and len(ids) > 2000
