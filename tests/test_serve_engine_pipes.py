"""The HTTP process's side of the engine process's pipes (EngineProcess, `dsv3 serve`'s default layout).

1. Commands were written to the engine's pipe on the event loop. Connection.send blocks until the child has read
   the bytes, and the child reads commands only between steps: a submit of more than the pipe holds (64 KiB: a batch
   of prompts, one long prompt, n copies of it) held the event loop, /health and every open stream, for the rest of
   the engine's step (measured: /health 1.42 s behind a 2 s step). They are now written by a thread of their own.
2. Requests in flight when the engine process dies got a 500 `server_error` while every later request got a 503
   `service_unavailable`: the same cause (no engine), now the same answer, which tells a client to retry elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import pytest

from serve_fixture import RecordedConnection, all_blocks_free, start_server, wait_until
from test_serve_audit import assert_openai_error


@pytest.fixture(scope="module")
def server():
    s = start_server(process=True, threads=1)
    yield s
    s.stop()


def assert_waiters_got_503(out: dict, aengine, reason: str) -> None:
    """A plain request (out["plain"]) and a stream (out["lines"]) that waited on an engine which went away: a 503
    whose message holds `reason`, a stream ended by a service_unavailable event and [DONE], nothing left pending."""
    err = assert_openai_error(out["plain"], 503)
    assert err["type"] == "service_unavailable" and reason in err["message"], err
    assert out["lines"][-1] == "data: [DONE]", out["lines"][-3:]
    event = json.loads(out["lines"][-2].removeprefix("data: "))
    assert event["error"]["type"] == "service_unavailable", event
    assert wait_until(lambda: aengine.num_pending == 0)


def test_1_commands_reach_the_engine_process_off_the_event_loop(server):
    aengine = server.app.state.async_engine
    recorder = aengine._commands = RecordedConnection(aengine._commands)
    ids = server.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 60)[:400]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [ids] * 48, "max_tokens": 1}, timeout=120)
    assert r.status_code == 200 and len(r.json()["choices"]) == 48, r.text[:300]
    # an abort too: a stream its client leaves
    body = {"prompt": "import os", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as s:
        lines = s.iter_lines()
        assert [next(lines) for _ in range(4)]
    assert all_blocks_free(server)
    assert len(recorder.threads["add"]) == 49 and recorder.threads["abort"], recorder.threads.keys()
    on_loop = recorder.on_thread(server.thread)
    assert not on_loop, f"{on_loop} commands were written to the engine's pipe on the event loop's thread"


def test_2_requests_in_flight_when_the_engine_process_dies_get_503():
    s = start_server(process=True, threads=1)
    aengine, out = s.app.state.async_engine, {}
    long = {"prompt": "hi", "max_tokens": 480, "ignore_eos": True}

    def plain():
        out["plain"] = httpx.post(s.url + "/v1/completions", json=long, timeout=60)

    def stream():
        with httpx.stream("POST", s.url + "/v1/completions", json=long | {"stream": True, "n": 2}, timeout=60) as r:
            out["lines"] = [line for line in r.iter_lines() if line]
    threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
    try:
        for t in threads:
            t.start()
        assert wait_until(lambda: aengine.num_pending == 3, timeout=30)
        os.kill(aengine._process.pid, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert_waiters_got_503(out, aengine, "engine")
    finally:
        s.stop()
