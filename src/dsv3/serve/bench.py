"""`dsv3 bench serve`: the usual serving-benchmark numbers for a running server, and the server vs its own engine.

Load: `num_requests` streaming /v1/completions requests (token-id prompts, greedy, `ignore_eos`, fixed output length),
at most `concurrency` in flight. Per request: time to first token (TTFT), time per output token after the first
(TPOT), the gaps between streamed chunks (inter-token latency, ITL); overall: output tokens/s and requests/s.

`bench_serve_vs_engine` runs the same workload twice: on an engine directly (`Engine.generate`, the batch of
`concurrency` sequences kept full), and through the HTTP server (uvicorn in this process, the engine in its own
process as `dsv3 serve` runs it, the load generator in a third so that it competes with neither), and reports the
ratio of output throughputs: what the HTTP layer costs.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import threading
import time

import httpx
import torch


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"mean": statistics.fmean(s), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


async def _one(http: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event.get("choices"):
                times.append(time.perf_counter())
    if not times:
        return {"error": "no tokens streamed"}
    return {"start": t0, "first": times[0], "end": times[-1], "tokens": tokens,
            "itl": [b - a for a, b in zip(times, times[1:])]}


async def run_load(url: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int,
                   num_requests: int, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=None, limits=limits, headers=headers) as http:
        async def limited(i):
            async with sem:
                return await _one(http, url, model, prompts[i % len(prompts)], max_tokens)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(num_requests)))
        elapsed = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    out_tokens = sum(r["tokens"] for r in ok)
    return {"requests": num_requests, "completed": len(ok), "errors": [r["error"] for r in results if "error" in r][:5],
            "concurrency": concurrency, "seconds": elapsed, "output_tok_per_s": out_tokens / elapsed,
            "requests_per_s": len(ok) / elapsed,
            "ttft_s": _percentiles([r["first"] - r["start"] for r in ok]),
            "tpot_s": _percentiles([(r["end"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]),
            "itl_s": _percentiles([x for r in ok for x in r["itl"]])}


def _load_process(args: dict, results) -> None:
    results.put(asyncio.run(run_load(**args)))


def load_in_subprocess(**args) -> dict:
    """run_load in a fresh process (spawned: no threads or CUDA state inherited)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    p = ctx.Process(target=_load_process, args=(args, results))
    p.start()
    out = results.get()
    p.join()
    return out


def step_mix(before: dict, after: dict) -> dict:
    """What the engine's steps were between two `stats()`: how many, the share of pure decode steps (every row a
    generated token: the graph buckets; the others carry prefill rows), the mean number of sequences per step and
    the graphs captured meanwhile."""
    d = {k: after[f"step_{k}"] - before[f"step_{k}"] for k in ("steps", "decode_steps", "prefill_steps", "seqs")}
    n = max(d["steps"], 1)
    # graphs captured during the run: each stalled every stream (EngineConfig.capture_graphs_at_start)
    return {"steps": d["steps"], "prefill_steps": d["prefill_steps"], "decode_share": d["decode_steps"] / n,
            "mean_seqs": d["seqs"] / n, "graph_captures": after["graph_captures"] - before["graph_captures"],
            "graph_capture_seconds": after["graph_capture_seconds"] - before["graph_capture_seconds"]}


def engine_throughput(engine, prompts: list[list[int]], max_tokens: int, num_requests: int) -> dict:
    """The same workload straight through Engine.generate (its max_num_seqs bounds the batch like the concurrency),
    with the torch thread count the served engine gets (`engine_threads`), so both runs get the same cores."""
    from ..infer import SamplingParams
    from .async_engine import engine_threads
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    batch = [prompts[i % len(prompts)] for i in range(num_requests)]
    threads = torch.get_num_threads()
    torch.set_num_threads(engine_threads())
    try:
        before = engine.stats()
        t0 = time.perf_counter()
        outs = engine.generate(batch, params)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    tokens = sum(len(o.token_ids) for o in outs)
    return {"seconds": elapsed, "output_tok_per_s": tokens / elapsed, "steps": step_mix(before, engine.stats())}


def bench_serve_vs_engine(factory, tokenizer, prompts: list[list[int]], other_prompts: list[list[int]],
                          max_tokens: int, concurrency: int, num_requests: int, process: bool = True) -> dict:
    """The engine `factory()` builds, alone on `prompts`, then (a fresh one) behind the server on `other_prompts`
    (same lengths, other tokens: neither run finds the other's prompts in the prefix cache). Each run is preceded by
    an untimed round of `concurrency` requests (kernel compilation, CUDA-graph capture)."""
    import gc

    import uvicorn

    from .app import build_app
    from .async_engine import EngineProcess
    engine = factory()
    engine_throughput(engine, prompts, max_tokens, concurrency)
    direct = engine_throughput(engine, prompts, max_tokens, num_requests)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    served = EngineProcess(factory, tokenizer, max(num_requests, 1)) if process else factory()
    app = build_app(served, tokenizer, "bench", max_pending=max(num_requests, 1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    aengine = app.state.async_engine
    try:
        load = dict(url=url, model="bench", prompts=other_prompts, max_tokens=max_tokens, concurrency=concurrency)
        load_in_subprocess(**load, num_requests=concurrency)
        before = aengine.stats_future().result(60)
        served_run = load_in_subprocess(**load, num_requests=num_requests)
        served_run["steps"] = step_mix(before, aengine.stats_future().result(60))
    finally:
        server.should_exit = True
        thread.join(60)
    served_run["engine_output_tok_per_s"] = direct["output_tok_per_s"]
    served_run["engine_steps"] = direct["steps"]
    served_run["server_vs_engine"] = served_run["output_tok_per_s"] / direct["output_tok_per_s"]
    served_run["engine_layout"] = "process" if process else "thread"
    return served_run
