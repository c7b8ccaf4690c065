"""`dsv3 serve` against failures and hostile input (the serve-robustness brief): one test per defect, each failing
before its fix, against a live server on loopback with the real `openai` client and raw HTTP.

1. `--engine-thread` (the engine stepped by a thread of the server process, AsyncEngine): a thread that died (an
   exception outside a step: a failed step is caught and fails only its requests) was not watched: the requests
   waiting on it waited forever. They now end as an engine process's do when it exits: 503 `service_unavailable`.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from serve_fixture import start_server, wait_until
from test_serve_audit import assert_openai_error


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
        err = assert_openai_error(out["plain"], 503)
        assert err["type"] == "service_unavailable" and "injected engine loop failure" in err["message"], err
        assert out["lines"][-1] == "data: [DONE]", out["lines"][-3:]
        event = json.loads(out["lines"][-2].removeprefix("data: "))
        assert event["error"]["type"] == "service_unavailable", event
        assert wait_until(lambda: aengine.num_pending == 0)
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and "injected engine loop failure" in health.json()["error"], health.text
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="dsv3-tiny", prompt="hi", max_tokens=3)
        assert e.value.status_code == 503 and "not running" in e.value.message, e.value
    finally:
        s.stop()
