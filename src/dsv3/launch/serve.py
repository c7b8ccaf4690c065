"""`dsv3 serve`: the OpenAI-compatible server (dsv3.serve) over the engine its flags ask for: in a process of its own
(default), on a thread, an EP group's front (`--ep`), a PD router or a prefill / decode worker (`--role`)."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import uvicorn

from ..checkpoint.generation_config import read_generation_config
from ..data import Tokenizer, read_chat_template
from ..infer import EngineConfig
from ..posttrain.base import tokenizer_dir
from ..serve import EngineProcess, build_app
from ..serve.async_engine import engine_threads
from ..serve.guard import default_allowed_hosts
from ..serve.state import ServeOptions
from .loading import default_device, load_ep_rank, load_for_serving, served_engine


def serve_engine_config(args: argparse.Namespace, eos: list[int]) -> EngineConfig:
    """The EngineConfig `dsv3 serve`'s flags ask for (every backend's: its own process, a thread, an EP group, a PD
    worker); `eos` the extra stop ids of generation_config.json."""
    block = {} if args.block_size is None else dict(block_size=args.block_size)     # EngineConfig owns the default
    return EngineConfig(cache_memory_gib=args.cache_gib, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, num_speculative_tokens=args.spec,
                        admission_delay=args.admission_delay, eos_token_ids=eos, compile_decode=args.compile_decode,
                        compile_prefill=args.compile_prefill, fused_moe=args.fused_moe,
                        capture_graphs_at_start=not args.lazy_graphs, **block)


def run_serve(args: argparse.Namespace, dtype: torch.dtype | None) -> None:
    """Serve until stopped (a PD worker: work until stopped); `dtype` the `--dtype` asked."""
    path = Path(args.model)
    if args.ep and args.role == "router":
        raise ValueError("--ep is for a group that holds the model (a front end, or a --role prefill / decode "
                         "worker); a router holds none")
    allowed_hosts = default_allowed_hosts(args.host, args.allowed_hosts)      # a bad entry: refused before loading
    ServeOptions(api_key=args.api_key)                                          # a blank key: likewise
    # before any loading: generation_config.json read once for both
    defaults, eos = read_generation_config(path) if args.generation_config == "auto" else ({}, [])
    tok_dir = tokenizer_dir(args.model, args.tokenizer)
    tokenizer = Tokenizer.load(args.tokenizer or tok_dir)
    # the chat template too, so that a damaged file is refused before the model is loaded
    template = Path(args.chat_template).read_text() if args.chat_template else \
        read_chat_template(tok_dir)
    device = default_device(args.device)
    config = serve_engine_config(args, eos)
    factory = functools.partial(served_engine, args.model, args.tokenizer, device, dtype, args.fp8, config)
    # the step loop in a process of its own, so HTTP work never competes with it for the GIL
    threads = engine_threads(args.threads)
    if args.role in ("prefill", "decode") and args.ep:
        from ..infer.ep_disagg import run_ep_worker
        from ..serve.ep import ep_config_from_args
        return run_ep_worker(args.role, functools.partial(load_ep_rank, args, dtype), config, ep_config_from_args(args),
                             args.ep, args.pd_listen, args.pd_key, threads, device, args.pd_handoff)
    if args.role in ("prefill", "decode"):
        from ..infer.disagg import run_worker
        return run_worker(args.role, *load_for_serving(args, dtype, device), config, args.pd_listen, args.pd_key,
                          threads, args.pd_handoff)
    if args.role == "router":
        from ..serve.pd_router import pd_router_from_args
        engine = pd_router_from_args(args, tokenizer)
    elif args.ep:
        from ..serve.ep import ep_serving_front
        engine = ep_serving_front(args, config, functools.partial(load_ep_rank, args, dtype), threads, device)
        if engine is None:           # a follower rank: rank 0 has stopped
            return
    elif args.engine_thread:
        torch.set_num_threads(threads)
        engine = factory()
    else:
        engine = EngineProcess(factory, tokenizer, args.max_pending, threads=threads)
    name = args.served_model_name or path.resolve().name
    limit = {} if args.max_body_bytes is None else {"max_body_bytes": args.max_body_bytes}
    app = build_app(engine, tokenizer, name, api_key=args.api_key, max_pending=args.max_pending,
                    chat_template=template, metrics_public=args.metrics_public, sampling_defaults=defaults,
                    reasoning_parser=args.reasoning_parser,
                    allowed_hosts=allowed_hosts, **limit)
    limits = app.state.async_engine.limits
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({device}, {threads} torch threads; context "
          f"{limits.max_model_len}, cache {limits.capacity} tokens)", flush=True)
    if app.state.server.reasoning:
        print("chat completions split reasoning_content at </think> (--reasoning-parser none: off)", flush=True)
    if defaults:
        print("sampling defaults from generation_config.json: " + ", ".join(f"{k} {v}" for k, v in defaults.items())
              + " (--generation-config none: OpenAI's)", flush=True)
    if set(eos) - {tokenizer.eos_id}:
        print(f"generations end at token ids {sorted(set(eos) | {tokenizer.eos_id})} (the tokenizer's EOS and "
              f"generation_config.json's eos_token_id)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
