"""An engine step that raises fails the requests it ran, and only those: the others (queued behind them) and later
requests are served, by the same engine (infer/engine.py leaves a failed step's sequences as they were). Before,
every request the engine held failed with it.

A request the engine itself refuses (its ValueError, past the HTTP layer's checks) is the client's error: a 400 with
the engine's message (a stream: that error event, then [DONE]). Before, it was a 500 `server_error`."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from dsv3.infer import EngineConfig
from dsv3.serve import EngineProcess, build_app
from serve_fixture import all_blocks_free, build_engine, serve_app, start_server, wait_until


def test_a_failed_step_fails_only_its_requests():
    # one sequence at a time: the second request waits in the scheduler while the first one's step fails
    s = start_server(EngineConfig(block_size=8, num_blocks=200, max_num_seqs=1))
    try:
        engine, aengine = s.engine, s.app.state.async_engine
        forward, failed = engine.runner.forward, []

        def failing_forward(batch):
            if not failed and engine.scheduler.waiting:       # the second request is queued in the engine
                failed.append(True)
                raise RuntimeError("injected step failure")
            return forward(batch)
        engine.runner.forward = failing_forward
        first: dict = {}

        def stream():
            body = {"prompt": "def read_file(path):", "max_tokens": 480, "ignore_eos": True, "stream": True}
            with httpx.Client(timeout=60) as http, http.stream("POST", s.url + "/v1/completions", json=body) as r:
                first["status"], first["lines"] = r.status_code, [line for line in r.iter_lines() if line]
        t = threading.Thread(target=stream)
        t.start()
        assert wait_until(lambda: engine.has_unfinished(), 30)
        second = httpx.post(s.url + "/v1/completions", json={"prompt": "import os", "max_tokens": 5,
                                                             "ignore_eos": True}, timeout=60)
        t.join(60)
        assert failed
        # the request of the failed step: its stream ends with an error event and [DONE]
        assert first["status"] == 200 and first["lines"][-1] == "data: [DONE]", first
        error = json.loads(first["lines"][-2].removeprefix("data: "))["error"]
        assert error["type"] == "service_unavailable" and "step failed" in error["message"], error
        assert "injected" not in error["message"], error
        # the request queued behind it was not in that step: it is served
        assert second.status_code == 200, second.text[:300]
        assert second.json()["choices"][0]["finish_reason"] == "length"
        # and so is a new one; the engine is healthy again
        third = httpx.post(s.url + "/v1/completions", json={"prompt": "x = 1", "max_tokens": 3}, timeout=60)
        assert third.status_code == 200 and httpx.get(s.url + "/health").status_code == 200
        assert wait_until(lambda: aengine.num_pending == 0) and all_blocks_free(engine)
    finally:
        s.stop()



def refusing_engine():
    """The fixture's engine, refusing max_tokens=7 itself (as an engine-side check the HTTP layer lacks would)."""
    engine = build_engine()
    check = engine.check_request

    def refusing_check(prompt, params):
        if params.max_tokens == 7:
            raise ValueError("injected refusal: max_tokens=7 is not served here")
        return check(prompt, params)
    engine.check_request = refusing_check
    return engine


@pytest.mark.parametrize("process", [False, True])
def test_a_request_the_engine_refuses_is_a_400(process):
    """In this process (AsyncEngine) and across an engine process's pipe (EngineProcess)."""
    engine = refusing_engine()
    backend = EngineProcess(refusing_engine, engine.tokenizer, 64, threads=1) if process else engine
    app = build_app(backend, engine.tokenizer, "dsv3-tiny")
    server, thread, url = serve_app(app)
    try:
        body = {"prompt": "import os", "max_tokens": 7}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and "injected refusal" in error["message"], error
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}
        r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 400 and "injected refusal" in r.text, r.text
        with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True), timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]", lines
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert error["type"] == "invalid_request_error" and "injected refusal" in error["message"], error
        # the engine is healthy and serves the next request
        ok = httpx.post(url + "/v1/completions", json={"prompt": "import os", "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200 and httpx.get(url + "/health").status_code == 200
        assert wait_until(lambda: app.state.async_engine.num_pending == 0)
    finally:
        server.should_exit = True
        thread.join(30)
