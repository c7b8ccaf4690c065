"""`dsv3 serve`'s default layout: the engine in a child process (EngineProcess), the HTTP side in this one. Same
outputs as the engine, streaming, disconnects, metrics and a clean stop, across the process boundary."""

from __future__ import annotations

import httpx
import openai
import pytest

from dsv3.infer import SamplingParams
from serve_fixture import all_blocks_free, start_server

PROMPTS = ["def read_file(path):", "import os", "The quick brown", "class Point:"]


@pytest.fixture(scope="module")
def server():
    s = start_server(process=True)
    yield s
    s.stop()


def test_outputs_and_streams_equal_the_engine(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="dsv3-tiny", prompt=PROMPTS, max_tokens=12, temperature=0, logprobs=1)
    for p, c in zip(PROMPTS, r.choices):
        want = server.reference.generate([p], SamplingParams(temperature=0.0, max_tokens=12, logprobs=1))[0]
        assert c.text == want.text
        assert c.logprobs.token_logprobs == pytest.approx([e[0] for e in want.logprobs], abs=1e-9)
    chunks = client.completions.create(model="dsv3-tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert all_blocks_free(server)


def test_disconnect_aborts_in_the_engine_process(server):
    aengine = server.app.state.async_engine
    before = aengine.num_aborted
    body = {"prompt": PROMPTS[1], "max_tokens": 480, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(4)]
    assert all_blocks_free(server)
    assert aengine.num_aborted == before + 1


def test_metrics_and_stop(server):
    text = httpx.get(server.url + "/metrics").text
    assert "dsv3_kv_cache_usage_ratio 0.0" in text and "dsv3_generation_tokens_total" in text
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    process = server.app.state.async_engine._process
    server.stop()                       # lifespan shutdown: drain, then the child exits
    assert not process.is_alive()
