"""Prefill/decode disaggregation (dsv3.infer.disagg + dsv3.serve.pd_router) through the real OpenAI client: one
prefill worker and two decode workers in their own processes, the router's HTTP server in this one. Completions
(streamed or not) equal the unified engine's; the latent bytes handed over are counted and equal prompt tokens x
layers x (kv_lora_rank + rope dim) x 8 (float64); a decode worker killed mid-generation fails exactly its own
requests with a 503 naming its role (its address and error only in the server log), the others finish, and the
router keeps serving new requests; a step that fails in a worker fails only its requests; a client gone during its
prefill step is not decoded; a role with no live worker left makes the router unhealthy and its requests 503s."""

from __future__ import annotations

import logging
import multiprocessing
import re
import socket
import threading
import time

import httpx
import openai
import pytest

from dsv3.infer import SamplingParams
from dsv3.infer.disagg import run_worker
from dsv3.serve import build_app
from dsv3.serve.pd_router import PDRouter
from serve_fixture import (DEFAULT_CONFIG, RecordedConnection, build_engine, rank_pid, serve_app,
                           wait_healthy)

PROMPTS = ["def read_file(path):", "import os", "The quick brown", "class Point:", "for i in range(", "x = 1\n"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAILING = 77          # max_tokens of the requests whose steps fail in a worker of `_worker(..., fail=True)`
HELD = 333            # ... and of those whose steps wait for `hold/release` (having written `hold/running`)
REFUSED = 55          # ... and of those the worker's engine refuses (its own check, past the router's)


def _worker(role: str, address: str, fail: bool = False, hold: str | None = None) -> None:
    engine = build_engine()
    if fail:             # a step that runs a request asking for FAILING tokens raises, as a forward out of memory
        from pathlib import Path

        from dsv3.infer.engine import Engine
        run = Engine._run          # (this process's own class: the worker builds its engine from it)

        def failing_run(self, seqs, *args, **kwargs):
            if any(s.params.max_tokens == FAILING for s in seqs):
                raise RuntimeError("injected step failure")
            if hold and any(s.params.max_tokens == HELD for s in seqs):     # a long step, as long as a test needs
                (Path(hold) / "running").touch()
                deadline = time.monotonic() + 60
                while not (Path(hold) / "release").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            return run(self, seqs, *args, **kwargs)
        Engine._run = failing_run
        check = Engine.check_request

        def refusing_check(self, prompt, params):
            if params.max_tokens == REFUSED:
                raise ValueError("injected refusal")
            return check(self, prompt, params)
        Engine.check_request = refusing_check
    run_worker(role, engine.model, engine.tokenizer, DEFAULT_CONFIG, address, "test-key", threads=1)


@pytest.fixture(scope="module")
def deployment():
    yield from _deployment(["prefill", "decode", "decode"])


def _deployment(roles: list[str], fail: bool = False, hold: str | None = None):
    ctx = multiprocessing.get_context("spawn")
    addrs = [f"127.0.0.1:{_free_port()}" for _ in roles]
    procs = [ctx.Process(target=_worker, args=(r, a, fail, hold), daemon=True) for r, a in zip(roles, addrs)]
    for p in procs:
        p.start()
    reference = build_engine()
    deadline = time.monotonic() + 60
    while True:
        try:
            router = PDRouter(addrs[:1], addrs[1:], reference.tokenizer, key="test-key")
            break
        except ValueError:                   # not listening yet
            assert time.monotonic() < deadline and all(p.is_alive() for p in procs), "workers did not start"
            time.sleep(0.3)
    app = build_app(router, reference.tokenizer, "dsv3-tiny")
    server, thread, url = serve_app(app)
    url += "/v1"
    yield dict(url=url, router=router, reference=reference, procs=procs, server_thread=thread,
               client=openai.OpenAI(base_url=url, api_key="unused", max_retries=0), base=url.removesuffix("/v1"))
    server.should_exit = True
    thread.join(30)
    for p in procs:
        p.kill()


def test_outputs_equal_the_unified_engine_and_kv_is_counted(deployment):
    client, ref, router = deployment["client"], deployment["reference"], deployment["router"]
    r = client.completions.create(model="dsv3-tiny", prompt=PROMPTS, max_tokens=12, temperature=0)
    want = ref.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12))
    assert [c.text for c in r.choices] == [w.text for w in want]
    assert [c.finish_reason for c in r.choices] == [w.finish_reason for w in want]
    chunks = list(client.completions.create(model="dsv3-tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want[0].text
    cfg = ref.model.config
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 8
    handed = [len(ref.tokenizer.encode(p)) for p, w in zip(PROMPTS, want) if len(w.token_ids) > 1] + \
        [len(ref.tokenizer.encode(PROMPTS[0]))] * (len(want[0].token_ids) > 1)
    assert router.stats_now()["kv_bytes"] == sum(handed) * per_token > 0
    assert {w["in_flight"] for w in router.stats_now()["workers"]} == {0}
    # log-probabilities (prompt's via echo, and generated tokens') come back as the unified engine computes them
    r = client.completions.create(model="dsv3-tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=2,
                                  echo=True)
    lp = ref.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=5, logprobs=2, prompt_logprobs=2))[0]
    got = r.choices[0].logprobs.token_logprobs
    assert got[0] is None and got[1:] == pytest.approx([x[0] for x in lp.prompt_logprobs + lp.logprobs], abs=1e-9)
    # a client that stops reading a stream has its request aborted wherever it is
    stream = client.completions.create(model="dsv3-tiny", prompt=PROMPTS[3], max_tokens=300, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while router.requests or not router.num_aborted:
        assert time.monotonic() < deadline, "the abandoned request was never aborted"
        time.sleep(0.05)
    # both decode workers got requests (routed by load)
    assert all(w.stats["kv_bytes_received"] > 0 for w in router.workers if w.role == "decode")


def test_structured_outputs_across_the_handover(deployment):
    """The prefill worker samples the first token under the grammar, the decode worker's matcher takes it over
    (dsv3.infer.structured: a matcher consumes the output a sequence arrives with)."""
    pytest.importorskip("llguidance", reason="structured outputs need llguidance (CI pins it)")
    client, ref = deployment["client"], deployment["reference"]
    spec = {"regex": r"[0-9]{3}-[a-z]{2,5}"}
    r = client.completions.create(model="dsv3-tiny", prompt=PROMPTS[:3], max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": spec})
    want = ref.generate(PROMPTS[:3], SamplingParams(temperature=0.0, max_tokens=20, structured_output={
        "type": "regex", "pattern": spec["regex"]}))
    assert [c.text for c in r.choices] == [w.text for w in want]
    assert all(re.fullmatch(spec["regex"], c.text) and c.finish_reason == "stop" for c in r.choices)


def test_killed_decode_worker_fails_its_requests_only(deployment, caplog):
    caplog.set_level(logging.ERROR, logger="dsv3.serve.pd_router")
    router, procs, url = deployment["router"], deployment["procs"], deployment["url"]
    long = dict(model="dsv3-tiny", max_tokens=400, temperature=0, extra_body={"ignore_eos": True})
    results: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            results[i] = openai.OpenAI(base_url=url, api_key="unused", max_retries=0).completions.create(
                prompt=PROMPTS[i], **long).choices[0].finish_reason
        except openai.APIError as e:
            results[i] = e
    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    victim = router.workers[1]                                   # the first decode worker (procs[1])
    deadline = time.monotonic() + 30
    while not (len(victim.in_flight) and len(victim.in_flight) + len(router.workers[2].in_flight) == 4):
        assert time.monotonic() < deadline, "the requests never all reached the decode workers"
        time.sleep(0.01)
    doomed = set(victim.in_flight)
    procs[1].kill()
    for t in threads:
        t.join(120)
    failed = {i for i, r in results.items() if isinstance(r, Exception)}
    assert failed and len(failed) == len(doomed) < 4, results
    # the client learns which role failed, not where it ran nor why (the server log's)
    assert all("decode worker" in str(results[i]) and victim.address not in str(results[i]) for i in failed), results
    assert victim.address in caplog.text and "decode worker" in caplog.text, caplog.text
    # as a request of an engine process that died: 503 (retry), not a 500
    assert all(results[i].status_code == 503 and results[i].type == "service_unavailable" for i in failed), results
    assert all(results[i] == "length" for i in set(results) - failed)
    assert not victim.alive and router.alive
    # the router keeps serving, on the surviving decode worker
    r = deployment["client"].completions.create(model="dsv3-tiny", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    want = deployment["reference"].generate([PROMPTS[2]], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert r.choices[0].text == want.text


def test_cli_roles_end_to_end(tmp_path):
    """`dsv3 serve --role prefill|decode|router`: the real command lines, each its own process; the workers with MTP
    speculation (`--spec 1`: the decode worker drafts, counted in the router's /metrics), the latents handed over
    inline (`--pd-handoff inline`: the bytes through the router, as between machines)."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from dsv3 import save_pretrained
    engine = build_engine()
    save_pretrained(engine.model, tmp_path / "m")
    engine.tokenizer.save(tmp_path / "m")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DSV3_PD_KEY="cli-key")
    cli = [sys.executable, "-c", "import sys; from dsv3.cli import main; sys.exit(main())", "serve", "--model",
           str(tmp_path / "m"), "--dtype", "float64", "--max-model-len", "256", "--cache-gib", "0.01", "--threads", "1"]
    pre, dec, port = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}", _free_port()
    procs = [subprocess.Popen(cli + ["--role", "prefill", "--pd-listen", pre, "--spec", "1", "--pd-handoff",
                                     "inline"], env=env),
             subprocess.Popen(cli + ["--role", "decode", "--pd-listen", dec, "--spec", "1"], env=env)]
    try:
        deadline = time.monotonic() + 60
        while True:          # the router needs its workers up
            try:
                socket.create_connection(("127.0.0.1", int(dec.split(":")[1])), timeout=1).close()
                socket.create_connection(("127.0.0.1", int(pre.split(":")[1])), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
                time.sleep(0.3)
        router = subprocess.Popen(cli + ["--role", "router", "--prefill", pre, "--decode", dec, "--port", str(port)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(router)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, router, deadline)
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": PROMPTS[0], "max_tokens": 8,
                                                      "temperature": 0}, timeout=30).json()
        want = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=8))[0]
        assert r["choices"][0]["text"] == want.text
        from prometheus_client.parser import text_string_to_metric_families
        drafts = [s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=60).text)
                  for s in f.samples if s.name == "dsv3_spec_decode_draft_tokens_total"]
        assert drafts and drafts[0] > 0
        router.send_signal(signal.SIGTERM)
        assert router.wait(30) in (0, -signal.SIGTERM)
        assert all(p.poll() is None for p in procs[:2])      # workers outlive a router and wait for the next
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        procs[-1].stdout and procs[-1].stdout.close()


def test_pd_key_is_private_per_user_and_required_beyond_loopback(tmp_path, monkeypatch):
    """Worker messages are pickles: the default key must be one only this user can read, never a fixed string, and a
    worker reachable from other machines must be given a key."""
    import stat

    from dsv3.infer.disagg import check_listen_address, pd_key
    monkeypatch.delenv("DSV3_PD_KEY", raising=False)
    f = tmp_path / "k" / "pd.key"
    a, b = pd_key(None, f), pd_key(None, f)
    assert a == b and len(a) == 64 and stat.S_IMODE(f.stat().st_mode) == 0o600
    assert pd_key(None, tmp_path / "other.key") != a            # random, not a constant
    assert pd_key("given", f) == b"given"
    f.chmod(0o644)
    with pytest.raises(ValueError, match="readable by other users"):
        pd_key(None, f)
    check_listen_address("127.0.0.1", None)
    with pytest.raises(ValueError, match="needs --pd-key"):
        check_listen_address("0.0.0.0", None)
    check_listen_address("0.0.0.0", "k")
    monkeypatch.setenv("DSV3_PD_KEY", "env-key")
    check_listen_address("0.0.0.0", None)
    assert pd_key(None, f) == b"env-key"


def test_the_router_writes_to_its_workers_off_the_event_loop(deployment):
    """A worker reads the router's messages between its steps, and a send blocks until it has: a large submit sent
    on the event loop held it (and every open stream) for the rest of the worker's step. The router's messages go
    out on a thread of their own (async_engine.Writer), as EngineProcess's commands do."""
    router, client = deployment["router"], deployment["client"]
    recorders = [RecordedConnection(w.conn) for w in router.workers]
    for w, rec in zip(router.workers, recorders):
        w.conn = rec
    live = [w for w in router.workers if w.alive]          # test_killed_decode_worker_... kills one
    r = client.completions.create(model="dsv3-tiny", prompt=PROMPTS, max_tokens=4, temperature=0)
    assert len(r.choices) == len(PROMPTS)
    stream = client.completions.create(model="dsv3-tiny", prompt=PROMPTS[3], max_tokens=300, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while router.requests:
        assert time.monotonic() < deadline, "the abandoned request was never aborted"
        time.sleep(0.05)
    sent = {kind for w, rec in zip(router.workers, recorders) if w in live for kind in rec.threads}
    assert {"add", "decode", "abort"} <= sent, sent
    thread = deployment["server_thread"]
    assert not [rec.on_thread(thread) for rec in recorders if rec.on_thread(thread)], "sent on the event loop"


def test_a_message_the_router_cannot_read_fails_that_worker_cleanly(deployment, caplog):
    """The router cannot read a worker's message (a worker of another dsv3 version: unpickling fails). Before, the
    thread reading that worker died and its requests waited forever; now the worker is lost as if its connection
    dropped: its requests get a 503 that says why, and /health says so once no decode worker is left (run after the
    killed-worker test, this is the last one)."""
    caplog.set_level(logging.ERROR, logger="dsv3.serve.pd_router")
    router, client = deployment["router"], deployment["client"]
    victim = router.workers[2]
    router.workers[1].in_flight.add(-1)           # (if still alive: the load picks the victim)

    class Unreadable:
        def __init__(self, conn):
            self.conn = conn

        def recv(self):
            self.conn.recv()
            raise TypeError("injected: a message of another version")

        def __getattr__(self, name):
            return getattr(self.conn, name)
    victim.conn = Unreadable(victim.conn)
    with pytest.raises(openai.APIStatusError) as e:
        client.with_options(timeout=30).completions.create(model="dsv3-tiny", prompt=PROMPTS[0], max_tokens=50,
                                                           temperature=0, extra_body={"ignore_eos": True})
    assert e.value.status_code == 503 and "decode worker" in e.value.message, e.value.message
    assert victim.address not in e.value.message and "cannot read" not in e.value.message, e.value.message
    assert victim.address in caplog.text and "cannot read" in caplog.text and "injected" in caplog.text, caplog.text
    router.workers[1].in_flight.discard(-1)
    assert not victim.alive and not router.requests
    health = httpx.get(deployment["base"] + "/health", timeout=60)
    if router.workers[1].alive:
        assert health.status_code == 200, health.text
    else:
        assert health.status_code == 503 and "decode" in health.json()["error"], health.text
        assert victim.address not in health.text and router.workers[1].address not in health.text, health.text


@pytest.fixture(scope="module")
def failing_deployment(tmp_path_factory):
    """One prefill and one decode worker whose steps fail on requests asking for FAILING tokens and wait on those
    asking for HELD (the test that kills the decode worker comes last)."""
    hold = tmp_path_factory.mktemp("hold")
    yield from (d | {"hold": hold} for d in _deployment(["prefill", "decode"], fail=True, hold=str(hold)))


def test_a_failed_worker_step_fails_its_requests_and_the_worker_serves_on(failing_deployment):
    """A step that raises in a worker (a forward out of memory) fails the requests it ran, with its error, as the
    unified engine's failed step does (test_serve_step_failure: a JSON 503, `service_unavailable`, saying the step
    failed, without the exception's text); the worker lives on. Before, the exception ended the worker process: its
    requests failed as a lost connection and the router had no prefill worker left (every later request a 503); then
    the requests got a 500 `server_error` quoting the exception."""
    d = failing_deployment
    client, router = d["client"], d["router"]
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="dsv3-tiny", prompt=PROMPTS[0], max_tokens=FAILING, temperature=0)
    assert e.value.status_code == 503 and e.value.type == "service_unavailable", e.value
    assert "step failed" in e.value.message and "injected" not in e.value.message, e.value.message
    with httpx.stream("POST", d["url"] + "/completions", json={"prompt": PROMPTS[0], "max_tokens": FAILING,
                                                                "stream": True}, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]", lines
    assert '"service_unavailable"' in lines[-2] and "injected" not in lines[-2], lines
    assert all(w.alive for w in router.workers) and all(p.is_alive() for p in d["procs"])
    assert httpx.get(d["base"] + "/health", timeout=60).status_code == 200
    r = client.completions.create(model="dsv3-tiny", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    want = d["reference"].generate([PROMPTS[2]], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert r.choices[0].text == want.text
    assert not router.requests and {w["in_flight"] for w in router.stats_now()["workers"]} == {0}


def test_a_request_a_worker_refuses_is_a_400(failing_deployment):
    """A request the prefill worker's engine refuses (its ValueError, past the router's own checks) is the client's
    error: a 400 with the engine's message, a stream's error event of that type; the workers serve on. Before, it was
    a 500 `server_error`."""
    d = failing_deployment
    client, router = d["client"], d["router"]
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="dsv3-tiny", prompt=PROMPTS[0], max_tokens=REFUSED, temperature=0)
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error", e.value
    assert "injected refusal" in e.value.message, e.value.message
    with httpx.stream("POST", d["url"] + "/completions", json={"prompt": PROMPTS[0], "max_tokens": REFUSED,
                                                                "stream": True}, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]", lines
    assert '"invalid_request_error"' in lines[-2] and "injected refusal" in lines[-2], lines
    assert all(w.alive for w in router.workers) and httpx.get(d["base"] + "/health", timeout=60).status_code == 200
    assert not router.requests and {w["in_flight"] for w in router.stats_now()["workers"]} == {0}


def test_a_client_gone_during_its_prefill_step_is_not_decoded(failing_deployment):
    """A stream whose client leaves while the prefill worker runs its request's step: the abort reaches the worker
    after the step that finished the request there. Before, the router then handed the request to a decode worker,
    which decoded all its max_tokens for nobody (holding a queue place and cache blocks); it now ends at the router."""
    d = failing_deployment
    router, hold = d["router"], d["hold"]
    recorders = [RecordedConnection(w.conn) for w in router.workers]
    for w, rec in zip(router.workers, recorders):
        w.conn = rec
    aborted = router.num_aborted
    body = {"model": "dsv3-tiny", "prompt": PROMPTS[0], "max_tokens": HELD, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", d["url"] + "/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        deadline = time.monotonic() + 30
        while not (hold / "running").exists():                  # the prefill worker is in the request's step
            assert time.monotonic() < deadline, "the held step never ran"
            time.sleep(0.01)
    # the client has gone: the abort is on its way to the prefill worker, which reads it after the step
    deadline = time.monotonic() + 30
    while "abort" not in recorders[0].threads:
        assert time.monotonic() < deadline, "the router never sent the abort"
        time.sleep(0.01)
    (hold / "release").touch()
    deadline = time.monotonic() + 30
    while router.requests or router.num_pending:
        assert time.monotonic() < deadline, "the abandoned request still runs"
        time.sleep(0.01)
    assert "decode" not in recorders[1].threads, "the abandoned request was handed to the decode worker"
    assert router.num_aborted == aborted + 1
    assert {w["in_flight"] for w in router.stats_now()["workers"]} == {0}


def test_losing_the_last_decode_worker_is_a_503_and_unhealthy(failing_deployment, caplog):
    """The decode role's last worker dies mid-stream: the stream ends with a `service_unavailable` error event (an
    engine process that dies gives the same), /health says which role is gone, later requests get a 503 that says
    the engine is not running. Before, the stream's error was a `server_error` (a 500's type). Neither names the
    worker's address (the server log does)."""
    caplog.set_level(logging.ERROR, logger="dsv3.serve.pd_router")
    d = failing_deployment
    client, router = d["client"], d["router"]
    stream = iter(client.completions.create(model="dsv3-tiny", prompt=PROMPTS[1], max_tokens=400, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    next(stream)
    decode = router.workers[1]
    deadline = time.monotonic() + 30
    while not decode.in_flight:
        assert time.monotonic() < deadline, "the request never reached the decode worker"
        time.sleep(0.01)
    d["procs"][1].kill()
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    assert e.value.body["type"] == "service_unavailable" and "decode worker" in e.value.message, e.value.body
    assert decode.address not in e.value.message, e.value.body
    assert decode.address in caplog.text, caplog.text
    health = httpx.get(d["base"] + "/health", timeout=60)
    assert health.status_code == 503 and "decode" in health.json()["error"], health.text
    assert decode.address not in health.text, health.text
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="dsv3-tiny", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert e.value.status_code == 503 and "not running" in e.value.message, e.value


def test_cli_ep_groups_as_workers(tmp_path):
    """`dsv3 serve --ep 2 --role prefill|decode` under torchrun (gloo): an EP group of two processes behind each
    worker address (experts sharded, requests spread over the ranks, hand-offs between ranks of the two groups),
    speculating on the decode side; the router's completions equal the unified engine's. SIGTERM to a group's rank 0
    releases its follower and the group exits cleanly (status 0)."""
    import os
    import signal
    import subprocess
    import sys

    from dsv3 import save_pretrained
    engine = build_engine()
    save_pretrained(engine.model, tmp_path / "m")
    engine.tokenizer.save(tmp_path / "m")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DSV3_PD_KEY="cli-key")
    args = ["serve", "--model", str(tmp_path / "m"), "--dtype", "float64", "--max-model-len", "256", "--cache-gib",
            "0.01", "--threads", "1", "--device", "cpu"]
    group = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dsv3.cli"]
    pre, dec, port = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}", _free_port()
    ep = ["--ep", "2", "--spec", "1", "--redundant-experts", "2", "--rebalance-interval", "2"]
    groups = [subprocess.Popen(group + args + ep + ["--role", role, "--pd-listen", address], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
              for role, address in (("prefill", pre), ("decode", dec))]
    router = None
    try:
        deadline = time.monotonic() + 120
        for address, p in zip((pre, dec), groups):
            while True:          # the router needs its workers up
                try:
                    socket.create_connection(("127.0.0.1", int(address.split(":")[1])), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and p.poll() is None, p.stdout.read() if p.poll() else ""
                    time.sleep(0.3)
        cli = [sys.executable, "-c", "import sys; from dsv3.cli import main; sys.exit(main())"]
        router = subprocess.Popen(cli + args + ["--role", "router", "--prefill", pre, "--decode", dec, "--port",
                                                str(port)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, router, deadline)
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": PROMPTS, "max_tokens": 8,
                                                      "temperature": 0}, timeout=60).json()
        want = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8))
        assert [c["text"] for c in r["choices"]] == [w.text for w in want]
        from prometheus_client.parser import text_string_to_metric_families
        drafts = [s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=60).text)
                  for s in f.samples if s.name == "dsv3_spec_decode_draft_tokens_total"]
        assert drafts and drafts[0] > 0
        router.send_signal(signal.SIGTERM)
        assert router.wait(30) in (0, -signal.SIGTERM)
        for p in groups:             # rank 0 stops and releases rank 1: torchrun sees both exit cleanly
            os.kill(rank_pid(p.pid, 0), signal.SIGTERM)
            code = p.wait(60)
            out = p.stdout.read()
            assert code == 0 and "Traceback" not in out, out
            assert "(EP group of 2) listening" in out
    finally:
        for p in groups + [router]:
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL) if p in groups else p.kill()
            if p is not None:
                p.stdout.close()
