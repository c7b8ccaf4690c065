"""`dsv3 bench decode | prefill | serve` on random weights of a config (no checkpoint): the engine's decode and
prefill throughput (dsv3.infer.bench), a server's latencies and the server beside its own engine (dsv3.serve.bench)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
from pathlib import Path

import torch

from ..config import load_model_config
from ..infer import EngineConfig
from ..infer.bench import bench_decode, bench_prefill
from .loading import bench_engine, bench_model, bench_tokenizer, default_device


def run_bench(args: argparse.Namespace, dtype: torch.dtype | None) -> None:
    """Print the numbers of `args.what` (serve: also written to `--json`); `dtype` the `--dtype` asked."""
    if args.what == "serve":
        return _bench_serve(args, dtype)
    model = bench_model(args.config, args.mtp, default_device(args.device), dtype, args.fp8)
    for b in map(int, args.batches.split(",")):
        if args.what == "decode":
            r = bench_decode(model, b, args.prompt, args.tokens, args.spec, cuda_graphs=not args.no_cuda_graphs,
                             compile_decode=args.compile_decode, fused_moe=args.fused_moe,
                             compile_prefill=args.compile_prefill)
            print(f"decode  batch {b:4d}: TTFT {r['ttft_s'] * 1e3:8.1f} ms  TPOT {r['tpot_ms']:7.2f} ms  "
                  f"{r['tok_per_s']:10.1f} tok/s  ({r['roofline_fraction']:.1%} of the {r['roofline_tok_per_s']:.0f} "
                  f"tok/s roofline)")
        else:
            r = bench_prefill(model, b, args.prompt, compile_prefill=args.compile_prefill)
            print(f"prefill batch {b:4d} x {args.prompt}: {r['seconds'] * 1e3:8.1f} ms  {r['tok_per_s']:10.1f} tok/s")


def _bench_serve(args: argparse.Namespace, dtype: torch.dtype | None) -> None:
    # here, not at the top: dsv3.serve needs the `serve` extra (fastapi), which bench decode / prefill do not
    from ..serve.bench import bench_serve_vs_engine, run_load
    g = torch.Generator().manual_seed(0)
    # a local server refuses ids past its tokenizer's (serve/validation.token_limits): the bench tokenizer has 512
    vocab = args.vocab_size if args.url else min(load_model_config(args.config).vocab_size,
                                                 bench_tokenizer().vocab_size)

    def prompts(n: int) -> list[list[int]]:
        return [torch.randint(10, vocab, (args.prompt,), generator=g).tolist() for _ in range(n)]
    if args.url:
        r = asyncio.run(run_load(args.url, args.served_model_name, prompts(args.requests), args.tokens,
                                 args.concurrency, args.requests, args.api_key))
    else:
        device = default_device(args.device)
        config = EngineConfig(cache_memory_gib=args.cache_gib, max_num_seqs=args.concurrency,
                              max_num_batched_tokens=max(2048, args.prompt * 8),
                              cuda_graphs=not args.no_cuda_graphs, compile_decode=args.compile_decode,
                              compile_prefill=args.compile_prefill, fused_moe=args.fused_moe,
                              admission_delay=args.admission_delay, capture_graphs_at_start=not args.lazy_graphs)
        factory = functools.partial(bench_engine, args.config, args.mtp, device, dtype, args.fp8, config)
        r = bench_serve_vs_engine(factory, bench_tokenizer(), prompts(args.requests), prompts(args.requests),
                                  args.tokens, args.concurrency, args.requests, process=not args.engine_thread)
        print(f"engine alone: {r['engine_output_tok_per_s']:.1f} output tok/s; through the server (engine in a "
              f"{r['engine_layout']}): {r['output_tok_per_s']:.1f} ({r['server_vs_engine']:.1%})")
        for name, st in (("engine alone", r["engine_steps"]), ("server", r["steps"])):
            print(f"  {name} steps: {st['steps']}, {st['decode_share']:.1%} pure decode, {st['prefill_steps']} with "
                  f"prefill rows, {st['mean_seqs']:.1f} sequences per step, {st['graph_captures']} graph captures "
                  f"({st['graph_capture_seconds']:.1f} s)")
    ms = lambda d: " ".join(f"{k} {v * 1e3:.1f}" for k, v in d.items() if v is not None)  # noqa: E731
    print(f"{r['completed']}/{r['requests']} requests at concurrency {r['concurrency']} in {r['seconds']:.2f} s: "
          f"{r['output_tok_per_s']:.1f} output tok/s, {r['requests_per_s']:.2f} req/s\n"
          f"  TTFT ms: {ms(r['ttft_s'])}\n  TPOT ms: {ms(r['tpot_s'])}\n  ITL ms:  {ms(r['itl_s'])}")
    if r["errors"]:
        print("errors:", r["errors"])
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
