"""Issue 23 on two GPUs: serving `lite` (random bf16 weights) with expert parallelism, the PD split and live EPLB.
Driven by benchmarks/gpu_serve_x2.sh (which also runs the single-GPU baseline through engine_decode.py); each part
appends its rows to a JSON under $OUT, and `report` prints every part's table from them.

  ep-decode (torchrun, 2 ranks): decode throughput of EPEngine (EP2 experts + DP attention: each rank its own half
      of the streams and its own cache), `bench_decode` on each rank with `make_engine` = EPEngine (eager: EPEngine
      has no CUDA graphs), with or without two-micro-batch overlap; total tok/s = the ranks' sum.   -> ep_decode.json
  pd --system pd|unified (no torchrun; one spawned process per GPU): the serving backends without the HTTP layer,
      driven from asyncio by C concurrent clients over N requests (long prompts, long outputs):
        pd       the real PDRouter (dsv3.serve.pd_router) over real workers (dsv3.infer.disagg.run_worker): a
                 PrefillEngine on GPU 0, a DecodeEngine on GPU 1, the latents handed over in /dev/shm;
        unified  two EngineProcess backends (what `dsv3 serve` runs), one plain Engine per GPU, each request to the
                 one with fewer pending (the router's rule).
      TTFT = first token delivered - submitted; TPOT = (last - first) / (tokens - 1), per request; p50/p99. -> pd.json
  eplb (torchrun, 2 ranks): EPEngine with redundant experts and rebalance_interval I under a skewed prompt mix
      (most prompts drawn from a few token ids): after the prefill step, 3I decode steps of one generation, the
      placement rebuilt live after steps I, 2I and 3I (windows of decode steps only). Per window: each GPU's expert load
      (the window's all-reduced loads split over the placement's replicas, Placement.gpu_loads) as max/mean over the
      GPUs, under the placement in use, the initial one (never rebalanced) and the one fit to that window; tok/s over
      the window's decode steps.
                                                                                                     -> eplb.json
  report: every part's table.

CPU dry run (gloo, tiny config): see the header of benchmarks/gpu_serve_x2.sh (DRY_RUN=1).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import multiprocessing
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3 import load_model_config
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.bench import bench_decode, random_model
from dsv3.infer.config import ExpertParallelConfig
from dsv3.infer.ep_driver import init_ep_group
from dsv3.infer.ep_engine import EPEngine
from dsv3.infer.ep_experts import ep_moe_layers
from dsv3.infer.eplb import balance_ratio

OUT = Path(os.environ.get("OUT", "out"))


def _model(a, device: str):
    cfg = load_model_config("tiny" if a.tiny else "lite").replace(num_nextn_predict_layers=0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return random_model(cfg, device, dtype, seed=a.seed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _append(name: str, row: dict) -> None:
    """Add a row to $OUT/name (rewritten every time: a part cut short keeps what it measured)."""
    path = OUT / name
    rows = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(rows + [row], indent=1))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


# ---- part 1: EP2 + DP attention decode ----------------------------------------------------------------------------
def ep_decode(a) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = init_ep_group(world)
    rank = dist.get_rank()
    tbo = a.tbo == "on"
    for total in map(int, a.batches.split(",")):
        per_rank = total // world
        model = _model(a, device)
        ep_config = ExpertParallelConfig(two_batch_overlap=tbo)
        make = lambda m, config: EPEngine(m, config=config, ep_config=ep_config)  # noqa: E731
        t0 = time.time()
        # each rank its own prompts (seed per rank); bench_decode's loop steps while any rank has work
        r = bench_decode(model, per_rank, a.prompt, a.tokens, seed=1000 * rank, cuda_graphs=False, make_engine=make)
        mine = [r["tok_per_s"], r["tpot_ms"], r["ttft_s"]]
        got = [None] * world
        dist.all_gather_object(got, mine)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if rank == 0:
            row = dict(system="EP2+DP-attn" if world == 2 else f"EP{world}", tbo=tbo, batch=total,
                       per_rank=per_rank, prompt=a.prompt, new_tokens=a.tokens,
                       tok_per_s=sum(g[0] for g in got), step_ms=max(g[1] for g in got),
                       ttft_s=max(g[2] for g in got), per_rank_tok_per_s=[g[0] for g in got],
                       wall_s=time.time() - t0)
            _append("ep_decode.json", row)
            print(f"EP{world} tbo={a.tbo:3s} batch {total:4d} ({per_rank}/rank): {row['tok_per_s']:9.1f} tok/s, "
                  f"{row['step_ms']:.2f} ms/step, prefill {row['ttft_s']:.3f} s; {row['wall_s']:.0f} s with warm-up",
                  flush=True)
    dist.destroy_process_group()


# ---- part 2: PD split vs unified, real serving backends without HTTP -----------------------------------------------
def _engine_kw(a) -> dict:
    return dict(cache_memory_gib=a.cache_gib, max_num_seqs=max(64, a.concurrency),
                max_num_batched_tokens=a.chunk, cuda_graphs=a.graphs == "on")


def _device(i: int) -> str:
    if torch.cuda.is_available():
        torch.cuda.set_device(i)
        return f"cuda:{i}"
    return "cpu"


def _build_engine(a, gpu: int) -> Engine:
    """An EngineProcess factory (runs in the child): a plain Engine on GPU `gpu`."""
    return Engine(_model(a, _device(gpu)), config=EngineConfig(**_engine_kw(a)))


def _pd_worker(a, role: str, gpu: int, address: str, key: str) -> None:
    from dsv3.infer.disagg import run_worker
    model = _model(a, _device(gpu))
    run_worker(role, model, None, EngineConfig(**_engine_kw(a)), address, key, threads=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests(a, n: int, max_tokens: int, seed: int) -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(seed)
    vocab = load_model_config("tiny" if a.tiny else "lite").vocab_size
    lens = torch.randint(a.prompt_min, a.prompt_max + 1, (n,), generator=g).tolist()
    return [(torch.randint(10, vocab, (length,), generator=g).tolist(),
             SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)) for length in lens]


async def _load(backends: list, requests: list, concurrency: int) -> list[dict]:
    """`concurrency` clients, each sending its next request when the last finished; one row per request."""
    sem, rows = asyncio.Semaphore(concurrency), []

    async def one(ids: list[int], params: SamplingParams) -> None:
        async with sem:
            backend = min(backends, key=lambda b: b.num_pending)
            handle = backend.submit(ids, params)
            final = None
            try:
                async for out in backend.stream(handle):
                    final = out
            except RuntimeError as e:           # a failed request is counted, not fatal to the measurement
                rows.append(dict(prompt=len(ids), error=str(e)[:300]))
                return
            end, n = time.perf_counter(), len(final.token_ids)
            rows.append(dict(prompt=len(ids), tokens=n, ttft_s=handle.first_token - handle.submitted,
                             tpot_ms=(end - handle.first_token) / max(n - 1, 1) * 1e3,
                             latency_s=end - handle.submitted))

    await asyncio.gather(*(one(ids, p) for ids, p in requests))
    return rows


def _start_pd(a, key: str) -> tuple[list, list]:
    from dsv3.serve.pd_router import PDRouter
    ctx = multiprocessing.get_context("spawn")
    addrs = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    gpus = (0, 1) if torch.cuda.device_count() >= 2 else (0, 0)
    procs = [ctx.Process(target=_pd_worker, args=(a, role, gpu, addr, key), daemon=True)
             for role, gpu, addr in zip(("prefill", "decode"), gpus, addrs)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 300
    while True:
        try:
            return [PDRouter(addrs[:1], addrs[1:], None, max_pending=4096, key=key)], procs
        except ValueError:                   # a worker not listening yet
            if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                raise RuntimeError("the PD workers did not start") from None
            time.sleep(0.5)


def _stop_pd(router, procs: list) -> None:
    router.stopping = True                 # the workers' connections close next: not a failure to report
    for w in router.workers:
        try:
            w.send(("stop",))
        except (OSError, ValueError):
            pass
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()


async def _pd_main(a) -> dict:
    from dsv3.serve.async_engine import EngineProcess
    t0 = time.time()
    if a.system == "pd":
        backends, procs = _start_pd(a, key=os.urandom(16).hex())
    else:
        gpus = (0, 1) if torch.cuda.device_count() >= 2 else (0, 0)
        backends = [EngineProcess(functools.partial(_build_engine, a, gpu), None, max_pending=4096, threads=4)
                    for gpu in gpus]
    started = time.time() - t0
    # warm-up (untimed): the same prompt lengths, short outputs: CUDA kernels, allocator, decode graph buckets
    await _load(backends, _requests(a, a.concurrency, 16, seed=a.seed + 1), a.concurrency)
    t1 = time.perf_counter()
    rows = await _load(backends, _requests(a, a.requests, a.max_tokens, seed=a.seed), a.concurrency)
    wall = time.perf_counter() - t1
    if a.system == "pd":
        kv = backends[0].kv_bytes
        await asyncio.get_running_loop().run_in_executor(None, _stop_pd, backends[0], procs)
    else:
        kv = 0
        for b in backends:
            await b.shutdown(drain=False)
    ok = [r for r in rows if "error" not in r]
    ttft, tpot = [r["ttft_s"] for r in ok], [r["tpot_ms"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return dict(system=a.system, requests=len(ok), failed=len(rows) - len(ok), concurrency=a.concurrency,
                prompt=[a.prompt_min, a.prompt_max],
                max_tokens=a.max_tokens, graphs=a.graphs, chunk=a.chunk, start_s=started, wall_s=wall,
                out_tok_per_s=tokens / wall, ttft_p50_s=_pct(ttft, 0.5), ttft_p99_s=_pct(ttft, 0.99),
                tpot_p50_ms=_pct(tpot, 0.5), tpot_p99_ms=_pct(tpot, 0.99), kv_bytes=kv, rows=rows)


def pd(a) -> None:
    row = asyncio.run(_pd_main(a))
    _append("pd.json", row)
    print(f"{row['system']:8s} {row['requests']} requests ({row['failed']} failed), concurrency "
          f"{row['concurrency']}: TTFT p50 "
          f"{row['ttft_p50_s']:.3f} s p99 {row['ttft_p99_s']:.3f} s, TPOT p50 {row['tpot_p50_ms']:.2f} ms p99 "
          f"{row['tpot_p99_ms']:.2f} ms, {row['out_tok_per_s']:.1f} output tok/s, {row['wall_s']:.1f} s "
          f"(+{row['start_s']:.0f} s start), kv {row['kv_bytes'] / 1e9:.2f} GB", flush=True)


# ---- part 3: live EPLB under a skewed prompt mix ----------------------------------------------------------------
def _skewed_prompts(a, n: int, vocab: int, rank: int) -> list[list[int]]:
    """A share `a.skew` of the prompts drawn from 4 token ids (the router then concentrates on few experts), the
    rest uniform; every prompt distinct (no prefix sharing)."""
    g = torch.Generator().manual_seed(a.seed + rank)
    hot = torch.tensor([11, 12, 13, 14])
    return [(hot[torch.randint(0, 4, (a.prompt,), generator=g)] if i < round(a.skew * n) else
             torch.randint(10, vocab, (a.prompt,), generator=g)).tolist() for i in range(n)]


def _balance(placement, loads: torch.Tensor, world: int) -> dict:
    r = balance_ratio(placement.gpu_loads(loads, world))
    return dict(mean=float(r.mean()), max=float(r.max()))


def _restart_window(engine: EPEngine) -> None:
    """Start the step count and the expert-load counters of EPLB's window again (what has run so far not counted)."""
    engine.ep_stats["steps"] = 0
    for _, m in ep_moe_layers(engine.model):
        m.tokens_per_expert.zero_()


def _eplb_run(engine: EPEngine, device: str, interval: int) -> tuple[list[float], list[dict]]:
    """Step to the end; each step's seconds, and at each rebalance the window's loads and both placements."""
    times, windows = [], []
    while engine.has_unfinished():
        rebalances = interval and (engine.ep_stats["steps"] + 1) % interval == 0
        before = engine.placement
        _sync(device)
        t0 = time.perf_counter()
        engine.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if rebalances:
            windows.append(dict(loads=engine.window_loads.clone(), old=before, new=engine.placement,
                                moved=engine.ep_stats["moved_bytes"]))
    return times, windows


def eplb(a) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = init_ep_group(world)
    rank, I, B = dist.get_rank(), a.interval, a.streams // world
    model = _model(a, device)
    ep = ExpertParallelConfig(redundant_experts=a.redundant, rebalance_interval=I)
    engine = EPEngine(model, config=EngineConfig(max_num_seqs=B, cache_memory_gib=4, prefix_caching=False,
                                                 max_num_batched_tokens=max(2048, B * a.prompt), cuda_graphs=False),
                      ep_config=ep)
    prompts = _skewed_prompts(a, B, model.config.vocab_size, rank)
    # warm-up (untimed): a short generation; then the timed one's prefill step, so that every window counts
    # decode steps only (a placement fit to a prefill burst would be judged on decode loads otherwise)
    engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    _restart_window(engine)
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=a.windows * I + 2, ignore_eos=True))
    engine.step()
    _restart_window(engine)
    times, windows = _eplb_run(engine, device, I)
    if rank == 0:
        row = dict(streams=B * world, prompt=a.prompt, skew=a.skew, redundant=a.redundant, interval=I,
                   slots=engine.num_slots, rebalances=engine.ep_stats["rebalances"],
                   moved_bytes=engine.ep_stats["moved_bytes"], rebalance_step_s=[times[k * I - 1] for k in
                                                                                 range(1, len(windows) + 1)],
                   median_step_s=statistics.median(times), windows=[])
        initial = windows[0]["old"]
        for k, w in enumerate(windows):
            span = times[k * I:(k + 1) * I - 1]      # window k+1's decode steps, less the last (it rebalances)
            row["windows"].append(dict(
                window=k + 1, tok_per_s=B * world * len(span) / sum(span),
                step_ms=1e3 * statistics.median(span), balance_in_use=_balance(w["old"], w["loads"], world),
                balance_initial=_balance(initial, w["loads"], world),
                balance_fit=_balance(w["new"], w["loads"], world),
                hottest_expert_share=float((w["loads"].max(1).values / w["loads"].sum(1)).mean())))
        _append("eplb.json", row)
        _print_eplb(row)
    dist.destroy_process_group()


def _print_eplb(row: dict) -> None:
    print(f"EPLB: {row['streams']} streams, skew {row['skew']}, {row['slots']} slots "
          f"(+{row['redundant']} redundant), interval {row['interval']}, {row['rebalances']} placement changes, "
          f"{row['moved_bytes'] / 1e9:.2f} GB moved to rank 0; rebalance steps "
          f"{', '.join(f'{s * 1e3:.0f}' for s in row['rebalance_step_s'])} ms (median step "
          f"{row['median_step_s'] * 1e3:.1f} ms)")
    print("max/mean GPU load, mean / worst layer, of each window's loads under: the placement in use, the initial "
          "one, the one fit to that window")
    print("window  in use           initial          fit              hottest expert   tok/s    ms/step")
    for w in row["windows"]:
        cols = "".join(f"{b['mean']:6.3f} / {b['max']:6.3f}  " for b in (w["balance_in_use"], w["balance_initial"],
                                                                          w["balance_fit"]))
        print(f"{w['window']:6d}  {cols}{w['hottest_expert_share']:8.1%}{w['tok_per_s']:14.1f} {w['step_ms']:8.2f}",
              flush=True)


# ---- report -------------------------------------------------------------------------------------------------------
def _read(name: str) -> list:
    path = OUT / name
    return json.loads(path.read_text()) if path.exists() else []


def report(a) -> None:
    single = [r for d in ("single_eager", "single_best") for r in _read(f"{d}/engine_decode.json")]
    ep = _read("ep_decode.json")
    print("Part 1: decode, 128-token prompts, greedy. EP2 = EPEngine on 2 GPUs (eager: no CUDA graphs), 1 GPU = Engine")
    print("batch  system               tok/s    ms/step   EP2 / this (no tbo, tbo)")
    for B in sorted({r["batch"] for r in ep} | {r["batch"] for r in single}):
        eps = {r["tbo"]: r for r in ep if r["batch"] == B}
        ok = [r for r in single if r["batch"] == B and "error" not in r]
        for r in [r for r in single if r["batch"] == B]:
            if "error" in r:
                print(f"{B:5d}  1 GPU {r['mode']:14s} FAILED {r['error'][:80]}")
                continue
            ratios = ", ".join(f"{eps[t]['tok_per_s'] / r['tok_per_s']:.2f}x" for t in (False, True) if t in eps)
            print(f"{B:5d}  1 GPU {r['mode']:14s} {r['tok_per_s']:9.1f} {r['tpot_ms']:9.2f}   {ratios}")
        for t, r in sorted(eps.items()):
            print(f"{B:5d}  EP2 {'tbo' if t else 'no tbo':16s} {r['tok_per_s']:9.1f} {r['step_ms']:9.2f}")
        if ok and eps:
            best, top = max(ok, key=lambda r: r["tok_per_s"]), max(eps.values(), key=lambda r: r["tok_per_s"])
            print(f"{B:5d}  best EP2 ({'tbo' if top['tbo'] else 'no tbo'}) / best 1 GPU ({best['mode']}): "
                  f"{top['tok_per_s'] / best['tok_per_s']:.2f}x (target >= 1.8x)")
    print("Part 2: PD split (PDRouter + PrefillEngine on GPU 0 + DecodeEngine on GPU 1, no HTTP) vs unified (one "
          "Engine per GPU in an EngineProcess, each request to the one with fewer pending)")
    print("system    req  conc  TTFT p50 s  p99 s   TPOT p50 ms  p99 ms   out tok/s")
    for r in _read("pd.json"):
        print(f"{r['system']:8s} {r['requests']:4d} {r['concurrency']:5d} {r['ttft_p50_s']:10.3f} "
              f"{r['ttft_p99_s']:6.3f} {r['tpot_p50_ms']:12.2f} {r['tpot_p99_ms']:7.2f} {r['out_tok_per_s']:10.1f}"
              f"{'  ' + str(r['failed']) + ' FAILED' if r.get('failed') else ''}")
    print("Part 3: live EPLB")
    for r in _read("eplb.json"):
        _print_eplb(r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["ep-decode", "pd", "eplb", "report"])
    p.add_argument("--tiny", action="store_true", help="the tiny config (CPU dry run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", default="64,256", help="ep-decode: total streams over the ranks")
    p.add_argument("--prompt", type=int, default=128, help="ep-decode / eplb prompt tokens")
    p.add_argument("--tokens", type=int, default=64, help="ep-decode: new tokens per stream")
    p.add_argument("--tbo", choices=["off", "on"], default="off", help="ep-decode: two-micro-batch overlap")
    p.add_argument("--system", choices=["pd", "unified"], default="pd")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-min", type=int, default=2048)
    p.add_argument("--prompt-max", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--chunk", type=int, default=2048, help="pd: max_num_batched_tokens (chunked prefill)")
    p.add_argument("--cache-gib", type=float, default=8.0)
    p.add_argument("--graphs", choices=["off", "on"], default="on", help="pd: CUDA graphs for decode steps")
    p.add_argument("--streams", type=int, default=128, help="eplb: total streams")
    p.add_argument("--skew", type=float, default=0.9)
    p.add_argument("--redundant", type=int, default=8)
    p.add_argument("--interval", type=int, default=24)
    p.add_argument("--windows", type=int, default=3, help="eplb: rebalance windows in the timed generation")
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    {"ep-decode": ep_decode, "pd": pd, "eplb": eplb, "report": report}[a.part](a)


if __name__ == "__main__":
    main()
