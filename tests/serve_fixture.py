"""A live dsv3 server on loopback for the serving tests: a random tiny model with a small trained tokenizer,
served by uvicorn in a thread; plus a direct Engine on the same model as the reference."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import torch
import uvicorn

from conftest import build, tiny_config
from dsv3.data import train_tokenizer
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.serve import EngineProcess, build_app

TEXTS = ["def read_file(path):\n    with open(path) as f:\n        return f.read()\n",
         "The quick brown fox jumps over the lazy dog. " * 3, "import os\nimport sys\nprint(os.getcwd())\n",
         "for i in range(10):\n    total += i * i\n", "class Point:\n    x: int = 0\n    y: int = 0\n"] * 20


@dataclass
class LiveServer:
    url: str
    engine: Engine              # the served engine (read block accounting from it)
    reference: Engine           # an engine of its own on the same model
    tokenizer: object
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


DEFAULT_CONFIG = EngineConfig(block_size=8, num_blocks=400, max_num_seqs=32, max_num_batched_tokens=512)


def build_engine(seed: int = 0, engine_config: EngineConfig | None = None, extra_rows: int = 0) -> Engine:
    """Deterministic: the same tokenizer and weights in every process (EngineProcess builds its own copy).
    `extra_rows`: embedding rows past the tokenizer's last id, as released models pad their vocabulary."""
    torch.set_num_threads(1)
    tok = train_tokenizer(TEXTS, vocab_size=320)
    # float64: the served engine batches requests differently from the reference, and greedy outputs must match
    model = build(tiny_config(vocab_size=tok.vocab_size + extra_rows, max_position_embeddings=512), seed=seed,
                  dtype=torch.float64)
    return Engine(model, tok, engine_config or DEFAULT_CONFIG)


def start_server(engine_config: EngineConfig | None = None, api_key: str | None = None, max_pending: int = 64,
                 seed: int = 0, process: bool = False, threads: int | None = None, extra_rows: int = 0,
                 **options) -> LiveServer:
    """With `process`, the served engine runs in a child process (EngineProcess, with `threads` torch threads);
    `.engine` is then None and block accounting comes from its stats. `options` go to build_app (metrics_public,
    allowed_hosts, max_body_bytes)."""
    reference = build_engine(seed, EngineConfig(block_size=8, num_blocks=400, max_num_seqs=32))
    tok = reference.tokenizer
    if process:
        engine = None
        served = EngineProcess(functools.partial(build_engine, seed, engine_config), tok, max_pending,
                               threads=threads)
    else:
        engine = served = build_engine(seed, engine_config, extra_rows)
    app = build_app(served, tok, "dsv3-tiny", api_key=api_key, max_pending=max_pending, **options)
    server, thread, url = serve_app(app)
    return LiveServer(url, engine, reference, tok, app, server, thread)


def serve_app(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    """`app` served by uvicorn on a free loopback port in a daemon thread: (server, thread, base URL), once up."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


class ThreadRecorder:
    """Which threads ran the wrapped functions: the structural check that a request's CPU work stays off the event
    loop (LiveServer.thread runs it), instead of timing /health, which a loaded CI machine slows for reasons of its
    own. `watch(monkeypatch, module, name, when)` wraps module.name (looked up at call time by the server's code);
    `when(*args, **kwargs)` picks the calls that count (the heavy ones)."""

    def __init__(self, server: LiveServer):
        self.server = server
        self.calls: dict[str, list[threading.Thread]] = {}

    def watch(self, monkeypatch, module, name: str, when=None) -> None:
        fn, calls = getattr(module, name), self.calls.setdefault(name, [])

        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            if when is None or when(*args, **kwargs):
                calls.append(threading.current_thread())
            return fn(*args, **kwargs)
        monkeypatch.setattr(module, name, recorded)

    def assert_off_loop(self) -> None:
        """Every watched function ran (else the check proves nothing), none of its counted calls on the loop."""
        for name, threads in self.calls.items():
            assert threads, f"{name} never ran: the check proves nothing"
            on_loop = sum(t is self.server.thread for t in threads)
            assert not on_loop, f"{name} ran on the event loop's thread ({on_loop} of {len(threads)} calls)"
        for threads in self.calls.values():
            threads.clear()


class RecordedConnection:
    """A multiprocessing Connection whose `send` callers' threads are recorded by message kind (its first item): the
    structural check that the server writes to an engine's pipe or socket off the event loop (a send blocks until the
    engine, which reads between steps, has taken the bytes)."""

    def __init__(self, conn):
        self.conn, self.threads = conn, {}

    def send(self, message) -> None:
        self.threads.setdefault(message[0], []).append(threading.current_thread())
        self.conn.send(message)

    def __getattr__(self, name):
        return getattr(self.conn, name)

    def on_thread(self, thread: threading.Thread) -> list[str]:
        """The kinds of message sent on `thread`."""
        return [kind for kind, threads in self.threads.items() if thread in threads]


def timed_health(server: LiveServer, send) -> tuple[object, list[float]]:
    """`send()` on a thread, /health timed on this one until it returns: printed by the tests as information (a
    timing is never asserted in a unit test: the thread checks above are the assertion)."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", send()))
    t.start()
    latencies = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        while t.is_alive():
            start = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
    t.join()
    return out["r"], latencies


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll `predicate` until it holds. Outputs reach the event loop through call_soon_threadsafe, after the engine
    has already freed the request's blocks, so counters kept on the event loop lag block accounting slightly."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def all_blocks_free(engine_or_server, timeout: float = 10.0) -> bool:
    """Every block back in the pool and nothing left to run (waits for the engine to process aborts); takes an
    Engine, or a LiveServer whose engine may live in another process."""
    def stats() -> dict:
        if isinstance(engine_or_server, Engine):
            return engine_or_server.stats()
        if engine_or_server.engine is not None:
            return engine_or_server.engine.stats()
        return engine_or_server.app.state.async_engine.stats_future().result(10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = stats()
        if s["free_blocks"] == s["num_blocks"] and not s["referenced_blocks"] and not s["unfinished"]:
            return True
        time.sleep(0.05)
    return False


LOAD_PROMPTS = ["def read_file(path):", "import os", "The quick brown", "class Point:", "for i in range(", "x = 1\n",
                "print(", "with open(", "return f.", "total += i"]


def load_with_disconnects(server: LiveServer, requests: int, streams: int, dropped: int, timeout: float = 300) -> dict:
    """Issue 14's load: `requests` streamed completions (16 tokens, ignore_eos), `streams` in flight, `dropped` of
    them closed by their client after their first text (they asked for 200 tokens: they must really be aborted).
    Checks no 5xx (the clients raise), no hang (a bounded wait), every finished stream equal to the reference engine,
    every block back, one abort per dropped stream, nothing pending, /health ok; returns the counts and seconds."""
    want = {p: server.reference.generate([p], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0].text
            for p in LOAD_PROMPTS}
    aengine = server.app.state.async_engine
    aborted = aengine.num_aborted
    drop = {i * requests // dropped for i in range(dropped)} if dropped else set()

    async def one(client, i):
        p = LOAD_PROMPTS[i % len(LOAD_PROMPTS)]
        if i in drop:
            await dropped_stream(server.url, {"model": "dsv3-tiny", "prompt": p, "max_tokens": 200, "temperature": 0,
                                              "stream": True, "ignore_eos": True})
            return p, None
        stream = await client.completions.create(model="dsv3-tiny", prompt=p, max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return p, "".join([c.choices[0].text async for c in stream])

    async def main():
        sem = asyncio.Semaphore(streams)
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=60) as client:
            async def limited(i):
                async with sem:
                    return await one(client, i)
            return await asyncio.wait_for(asyncio.gather(*(limited(i) for i in range(requests))), timeout)

    start = time.perf_counter()
    results = asyncio.run(main())
    seconds = time.perf_counter() - start
    finished = [(p, text) for p, text in results if text is not None]
    assert all(text == want[p] for p, text in finished)
    assert all_blocks_free(server)
    assert wait_until(lambda: aengine.num_aborted - aborted >= len(drop))
    assert wait_until(lambda: aengine.num_pending == 0)
    assert httpx.get(server.url + "/health", timeout=60).json() == {"status": "ok"}
    return {"finished": len(finished), "aborted": aengine.num_aborted - aborted, "seconds": round(seconds, 2)}


async def dropped_stream(url: str, body: dict) -> None:
    """A client that goes away mid-stream: a plain connection, closed once a chunk with text has arrived (no client
    library whose half-read streams are left for the garbage collector)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    try:
        status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        while True:
            line = await reader.readline()
            assert line, "the stream ended before any text"
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                return
    finally:
        writer.close()
        await writer.wait_closed()


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (Linux /proc)."""
    for child in open(f"/proc/{launcher}/task/{launcher}/children").read().split():
        env = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise AssertionError(f"no rank {rank} under {launcher}")


def wait_healthy(url: str, proc, deadline: float) -> None:
    """Poll `url`/health until it answers 200; fail with `proc`'s output (a server started as a subprocess with
    its stdout piped) if it exits first or `deadline` (time.monotonic) passes."""
    import httpx
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
        time.sleep(0.2)
