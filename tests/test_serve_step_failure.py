"""An engine step that raises fails the requests it ran, and only those: the others (queued behind them) and later
requests are served, by the same engine (infer/engine.py leaves a failed step's sequences as they were). Before,
every request the engine held failed with it.

A request the engine itself refuses (its ValueError, past the HTTP layer's checks) is the client's error: a 400 with
the engine's message (a stream: that error event, then [DONE]). Before, it was a 500 `server_error`."""

from __future__ import annotations

import json
import logging
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
        assert third.status_code == 200 and httpx.get(s.url + "/health", timeout=60).status_code == 200
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
        assert ok.status_code == 200 and httpx.get(url + "/health", timeout=60).status_code == 200
        assert wait_until(lambda: app.state.async_engine.num_pending == 0)
    finally:
        server.should_exit = True
        thread.join(30)


SECRET = "sk-live-7f3a9c2e51b84d06a1c4e8f2b9d70a35"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")      # the thread that dies
def test_an_engine_exceptions_text_never_reaches_a_response_body(caplog):
    """An engine's exception text may hold paths, sizes, a prompt's words or a key: /health (open without the API
    key) showed it, as did the 503 of every request after the engine thread died. It goes to the server log; every
    body (/health, a completion, a stream, a chat, after a failed step and after a dead thread) says only what
    state the server is in."""
    s = start_server(api_key="the-key")
    auth = {"Authorization": "Bearer the-key"}
    engine, bodies = s.engine, []

    def requests() -> None:
        plain = {"model": "dsv3-tiny", "prompt": "hi", "max_tokens": 4}
        with httpx.Client(base_url=s.url, timeout=30) as http:
            for route, body in (("/v1/completions", plain), ("/v1/completions", plain | {"stream": True, "n": 2}),
                                ("/v1/chat/completions", {"model": "dsv3-tiny", "max_tokens": 4, "stream": True,
                                                          "messages": [{"role": "user", "content": "hi"}]})):
                with http.stream("POST", route, json=body, headers=auth) as r:
                    bodies.append((route, r.status_code, r.read().decode()))
            for http_get in (http.get, http.head):
                bodies.append(("/health", (r := http_get("/health")).status_code, r.text))
            bodies.append(("/metrics", (r := http.get("/metrics", headers=auth)).status_code, r.text))
    try:
        real_step = engine.step

        def failing_step():
            raise RuntimeError(f"step failed at /srv/keys/prod.env with OPENAI_API_KEY={SECRET}")
        engine.step = failing_step
        with caplog.at_level(logging.ERROR):
            requests()
            health = httpx.get(s.url + "/health", timeout=60).json()
            assert health == {"status": "unhealthy", "error": "engine step failed"}, health
            engine.step = real_step

            def broken():
                raise RuntimeError(f"engine loop broke: token {SECRET}")
            engine.has_unfinished = broken        # read by the engine's loop outside the step: its thread dies
            requests()
            health = httpx.get(s.url + "/health", timeout=60).json()
            assert health == {"status": "unhealthy", "error": "engine thread died"}, health
        # a failed step: its requests' 503 (a stream's error event after its 200); a dead engine: 503s at submit
        assert [status for route, status, _ in bodies if route != "/metrics"] == [503, 200, 200, 503, 503] + \
            [503] * 5, bodies
        leaked = [(route, body) for route, _, body in bodies if SECRET in body or "prod.env" in body]
        assert not leaked, leaked
        logged = [rec for rec in caplog.records if rec.exc_info and SECRET in str(rec.exc_info[1])]
        assert len({str(rec.exc_info[1]) for rec in logged}) == 2, "the server log lacks an exception"
    finally:
        s.stop()
