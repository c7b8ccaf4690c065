"""`dsv3 serve`'s default layout: the engine in a child process (EngineProcess), the HTTP side in this one. Same
outputs as the engine, streaming, disconnects, metrics and a clean stop, across the process boundary."""

from __future__ import annotations

import httpx
import openai
import pytest

from dsv3.infer import SamplingParams
from serve_fixture import all_blocks_free, load_with_disconnects, start_server, wait_healthy, wait_until

PROMPTS = ["def read_file(path):", "import os", "The quick brown", "class Point:"]


@pytest.fixture(scope="module")
def server():
    s = start_server(process=True, threads=2)      # build_engine sets 1: the flag must win, in the child
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
    assert wait_until(lambda: aengine.num_aborted == before + 1)


def test_load_with_disconnects_across_the_process_boundary(server):
    """Issue 14's load, full size, against `dsv3 serve`'s layout (the engine in its own process)."""
    r = load_with_disconnects(server, requests=200, streams=32, dropped=60)
    assert r["finished"] == 140 and r["aborted"] == 60, r


def test_metrics_and_stop(server):
    text = httpx.get(server.url + "/metrics", timeout=60).text
    assert "dsv3_kv_cache_usage_ratio 0.0" in text and "dsv3_generation_tokens_total" in text
    assert "dsv3_engine_torch_threads 2.0" in text             # issue 14 (7): the engine process's thread count
    assert httpx.get(server.url + "/health", timeout=60).json() == {"status": "ok"}
    process = server.app.state.async_engine._process
    server.stop()                       # lifespan shutdown: drain, then the child exits
    assert not process.is_alive()


def test_cli_serve_end_to_end(tmp_path):
    """`dsv3 serve --model DIR` on a Hugging Face directory: the real command line, engine process included; a
    completion, then SIGTERM drains and exits cleanly."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from dsv3 import save_pretrained
    from serve_fixture import build_engine
    engine = build_engine()
    save_pretrained(engine.model, tmp_path / "m")
    engine.tokenizer.save(tmp_path / "m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from dsv3.cli import main; sys.exit(main())", "serve",
                             "--model", str(tmp_path / "m"), "--port", str(port), "--dtype", "float64",
                             "--max-model-len", "256", "--cache-gib", "0.01", "--threads", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        wait_healthy(url, proc, deadline)
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": PROMPTS[0], "max_tokens": 8,
                                                      "temperature": 0}, timeout=30).json()
        want = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=8))[0]
        assert r["choices"][0]["text"] == want.text
        assert "dsv3_engine_torch_threads 1.0" in httpx.get(url + "/metrics", timeout=60).text
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the captured signal: exit by SIGTERM, without a traceback
        assert proc.wait(30) in (0, -signal.SIGTERM)
        out = proc.stdout.read()
        assert "Traceback" not in out and "serving 'm'" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
