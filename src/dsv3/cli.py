"""The `dsv3` command line: one subcommand per job, each a thin wrapper over the library. The arguments each
subcommand takes are dsv3.cli_args's; `main` parses and runs the command."""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError, convert_checkpoint, load_pretrained, save_pretrained
from .cli_args import DTYPES, build_parser
from .config import ConfigError, ModelConfig, load_model_config
from .model import Transformer, generate
from .posttrain.base import load_model_and_tokenizer, tokenizer_dir


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def cmd_info(args: argparse.Namespace) -> None:
    cfg = load_model_config(args.config)
    n = _meta_model(cfg).num_params()
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    print(f"config            {args.config}")
    print(f"layers            {cfg.num_hidden_layers} ({cfg.num_hidden_layers - moe_layers} dense, {moe_layers} MoE) "
          f"+ {cfg.num_nextn_predict_layers} MTP")
    print(f"hidden / heads    {cfg.hidden_size} / {cfg.num_attention_heads}  (q_lora {cfg.q_lora_rank}, "
          f"kv_lora {cfg.kv_lora_rank}, qk {cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim}, v {cfg.v_head_dim})")
    print(f"experts           {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, {cfg.n_group} groups, "
          f"top-{cfg.topk_group} groups) + {cfg.n_shared_experts} shared, width {cfg.moe_intermediate_size}")
    print(f"latent cache      {(cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2:,} bytes/token (bf16)")
    print(f"total params      {n['total']:,} ({_fmt(n['total'])})  main model")
    print(f"active params     {n['active']:,} ({_fmt(n['active'])})  per token, embedding and head included")
    print(f"                  {n['active_without_embedding']:,} ({_fmt(n['active_without_embedding'])})  "
          f"without the input embedding")
    print(f"MTP params        {n['mtp']:,} ({_fmt(n['mtp'])})  own; "
          f"{_fmt(n['mtp_active'])} active with the shared embedding and head")


def cmd_demo(args: argparse.Namespace) -> None:
    """Build the tiny model, save and reload it, check the reload, run a forward and a short generation."""
    torch.manual_seed(args.seed)
    cfg = load_model_config(args.config)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    model.eval()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dsv3-demo-"))
    save_pretrained(model, out)
    reloaded = load_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        logits = model(ids)
        diff = (reloaded(ids) - logits).abs().max().item()
        absorbed = (model(ids, absorb=True) - logits).abs().max().item()
    new = generate(reloaded, [ids[0].tolist()], max_new_tokens=8)[0]
    n = model.num_params()
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"model       {args.config}: {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts, "
          f"{_fmt(n['total'])} params ({_fmt(n['active'])} active) + {_fmt(n['mtp'])} MTP")
    print(f"checkpoint  {out} ({size / 1e6:.1f} MB, HF format)")
    print(f"forward     logits {tuple(logits.shape)}, reload max|diff| {diff:.2e}, absorbed-MLA max|diff| {absorbed:.2e}")
    print(f"generate    {ids[0].tolist()[:6]}... -> {new}")
    print(f"done in {time.perf_counter() - t0:.1f}s")


def cmd_convert(args: argparse.Namespace) -> None:
    """Re-write a HF directory shard by shard: FP8 -> bf16 (dequantise), or bf16 -> released FP8 block format."""
    convert_checkpoint(args.src, args.dst, to=args.to, dtype=DTYPES[args.dtype])
    print(f"wrote {args.dst} ({args.to})")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .data import iter_documents, train_tokenizer
    t0 = time.perf_counter()
    tok = train_tokenizer((d.text for d in iter_documents(args.sources)), args.vocab_size, args.out)
    print(f"wrote {args.out}: byte-level BPE, {tok.vocab_size} tokens, in {time.perf_counter() - t0:.1f}s")


def cmd_train(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 2 refused (config, run directory), 3 diverged, 128 + signal when SIGINT / SIGTERM
    stopped it after saving (130 / 143)."""
    from .train import Trainer, load_run_config
    from .train.run_dir import resume_config
    overrides = list(args.overrides) + ([f"run_dir={json.dumps(args.run_dir)}"] if args.run_dir else [])
    if args.resume:
        cfg, ignored = resume_config(args.config, args.run_dir, overrides)
        if ignored:
            print(f"dsv3 train: note: --resume continues {cfg.run_dir}/config.json (with the command line's "
                  f"overrides); not applied from {args.config}: {', '.join(ignored)} (pass section.key=value to "
                  f"change them)", file=sys.stderr)
    else:
        cfg = load_run_config(args.config, overrides)
    trainer = Trainer(cfg, resume=args.resume, progress=False if args.quiet else None, overwrite=args.overwrite)
    return _run_trainer(trainer, "train")


def _run_trainer(trainer, command: str) -> int:
    """Run a built Trainer (pre-training or SFT) under the signal handlers; the exit status of `cmd_train`."""
    import torch.distributed as dist

    from .train.signals import StopSignals
    from .train.trainer import TrainingInterrupted
    cfg = trainer.cfg
    n = trainer.param_counts
    ranks = trainer.layout.describe()
    if trainer.layout.is_main:
        print(f"training {cfg.run_dir}: {_fmt(n['total'])} params ({_fmt(n['active'])} active) + {_fmt(n['mtp'])} "
              f"MTP, {cfg.train.steps} steps of up to {cfg.train.batch_size} x {cfg.data.seq_len} tokens on "
              f"{trainer.device}{ranks} ({str(trainer.dtype).removeprefix('torch.')}), from step {trainer.step}",
              file=sys.stderr)
    try:
        with StopSignals(announce=trainer.layout.is_main) as stop:
            summary = trainer.run(stop)
    except TrainingInterrupted as e:
        if trainer.layout.is_main:
            print(f"dsv3 {command}: {e}", file=sys.stderr)
        return 128 + e.signum
    finally:
        if dist.is_initialized():       # a clean exit (NCCL warns about a group left open)
            dist.destroy_process_group()
    if trainer.layout.is_main:          # one summary per run, not one per rank
        print(json.dumps(summary))
    return 0


def cmd_posttrain(args: argparse.Namespace) -> int:
    """`dsv3 sft | grpo | distill` on the pre-training Trainer (dsv3.posttrain); exit statuses as `dsv3 train`."""
    from .posttrain.distill import distill_trainer
    from .posttrain.grpo import grpo_trainer
    from .posttrain.sft import sft_trainer
    if not args.config and not (args.resume and args.run_dir):
        raise ValueError("pass --config RUN.toml (or --resume --run-dir DIR)")
    make = {"sft": sft_trainer, "grpo": grpo_trainer, "distill": distill_trainer}[args.posttrain]
    made = make(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite,
                progress=False if args.quiet else None, run_dir=args.run_dir)
    trainer, lines = made if isinstance(made, tuple) else (made, [])     # grpo reports no data summary
    for line in lines:
        print(line, file=sys.stderr)
    return _run_trainer(trainer, args.posttrain)


def cmd_export(args: argparse.Namespace) -> None:
    from .train import export_run
    out = export_run(args.run_dir, args.out_dir, step=args.step, ema=args.ema,
                     dtype=DTYPES[args.dtype] if args.dtype else None, overwrite=args.overwrite)
    print(f"wrote {out}")


def cmd_plot(args: argparse.Namespace) -> None:
    from .train.plot import plot_run
    for path in plot_run(args.run_dir, args.out):
        print(path)


def prompt_prefix(args: argparse.Namespace, tokenizer) -> list[int]:
    """The token in front of a `generate` prompt, so that it starts a document as the model saw documents start:
    dsv3's pre-training packs `doc EOS doc EOS ...` (dsv3.data.packing; the tokenizers dsv3 writes say so in
    tokenizer_config.json, and a run directory is dsv3's), DeepSeek's released models start documents with BOS
    (their tokenizer_config.json: add_bos_token)."""
    from .data.tokenizer import DOCUMENT_START_KEY
    from .posttrain.base import is_run_dir, tokenizer_dir
    choice = args.prefix
    if choice == "auto":
        cfg_path = tokenizer_dir(args.model, args.tokenizer) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        released_bos = cfg.get("add_bos_token") is True and DOCUMENT_START_KEY not in cfg
        choice = "bos" if released_bos and not is_run_dir(args.model) else "eos"
    if choice == "bos" and tokenizer.bos_id is None:
        raise ValueError("--prefix bos: the tokenizer has no BOS token")
    return {"bos": [tokenizer.bos_id], "eos": [tokenizer.eos_id], "none": []}[choice]


def generate_sampling(args: argparse.Namespace) -> dict:
    """`dsv3 generate`'s temperature / top_k / top_p / repetition_penalty: the flags given, else the model
    directory's generation_config.json (as its authors sample it), else 0.8 / 50 / 0.95 / 1 (off)."""
    from .checkpoint.generation_config import read_sampling_defaults
    given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "repetition_penalty": args.repetition_penalty}
    model = read_sampling_defaults(args.model) if None in given.values() else {}
    fallback = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.0}
    return {k: v if v is not None else model.get(k, fallback[k]) for k, v in given.items()}


def cmd_generate(args: argparse.Namespace) -> None:
    from .infer import Engine, EngineConfig, SamplingParams
    # bad flags are refused before the model is read (minutes for a large checkpoint)
    if args.samples < 1 or args.spec < 0:
        raise ValueError(f"--samples must be >= 1 and --spec >= 0, got {args.samples} and {args.spec}")
    params = [SamplingParams(**generate_sampling(args), max_tokens=args.max_tokens, seed=args.seed + i)
              for i in range(args.samples)]
    from .checkpoint.generation_config import read_eos_ids
    eos = read_eos_ids(args.model)
    device = _device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.ema,
                                                dtype=_serving_dtype(args.dtype, device), device=device)
    # unicode_escape reads bytes as Latin-1: the prompt's other characters go in as escapes themselves, so "é\\n"
    # stays "é" + newline (its UTF-8 bytes would come back as "Ã©")
    prompt = (args.prompt.encode("latin-1", "backslashreplace").decode("unicode_escape") if args.escapes
              else args.prompt)
    # Special-token text in the prompt ("<｜User｜>") stays text unless --special-tokens: a prompt is data, not
    # control tokens
    ids = prompt_prefix(args, tokenizer) + tokenizer.encode(prompt, split_special_tokens=not args.special_tokens)
    if len(ids) + args.max_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({args.max_tokens}) exceed the model's context "
                         f"of {model.config.max_position_embeddings}")
    block = 16
    if args.spec and not len(model.mtp):
        raise ValueError("--spec needs a model with an MTP module")
    # speculation takes blocks ahead of the tokens: up to 3k + 1 positions when fused steps chain (infer/speculation)
    ahead = 3 * args.spec + 1 if args.spec else 0
    engine = Engine(model, tokenizer, EngineConfig(block_size=block, max_num_seqs=args.samples, num_blocks=args.samples
                                                   * -(-(len(ids) + args.max_tokens + ahead) // block),
                                                   num_speculative_tokens=args.spec, eos_token_ids=eos))
    for i, out in enumerate(engine.generate([ids] * args.samples, params)):
        if i:
            print("-" * 40)
        print(prompt + out.text)


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _serving_dtype(name: str | None, device: str) -> torch.dtype:
    return DTYPES[name] if name else (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def _bench_model(config_name: str, mtp: bool, device: str, dtype_name: str | None, fp8: bool) -> Transformer:
    """The random-weight model of `dsv3 bench`, optionally with FP8 block weights."""
    from .infer.bench import random_model
    cfg = load_model_config(config_name)
    if not mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    return _maybe_fp8(random_model(cfg, device, _serving_dtype(dtype_name, device)), fp8)


def _maybe_fp8(model: Transformer, fp8: bool) -> Transformer:
    if fp8:
        from .infer.fp8_weights import quantize_weights
        quantize_weights(model)
    return model


def _load_for_serving(args: argparse.Namespace, device: str):
    """(model, tokenizer) for `dsv3 serve --ep` / `--role` processes."""
    if args.fp8 and args.ep:
        raise ValueError("--fp8 with --ep is not supported yet (expert slots are placed from plain expert weights)")
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, dtype=_serving_dtype(args.dtype, device),
                                                device=device)
    return _maybe_fp8(model, args.fp8), tokenizer


def served_engine(model_path: str, tokenizer_path: str | None, device: str, dtype_name: str | None, fp8: bool,
                  config):
    """The engine `dsv3 serve` runs (built in the engine process)."""
    from .infer import Engine
    model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_path, dtype=_serving_dtype(dtype_name, device),
                                                device=device)
    return Engine(_maybe_fp8(model, fp8), tokenizer, config)


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import Tokenizer
    from .eval import EngineBackend, OpenAIBackend
    from .eval import run
    if args.server:
        if not args.tokenizer:
            raise ValueError("--server scores token ids: pass --tokenizer (the served model's tokenizer.json)")
        tok_dir = tokenizer_dir("", args.tokenizer)
        tokenizer = Tokenizer.load(tok_dir)
        backend = OpenAIBackend(args.server, args.served_model_name, args.api_key)
    else:
        from .infer import Engine, EngineConfig
        if not args.model:
            raise ValueError("pass --model (a run or HF directory) or --server URL")
        device = _device(args.device)
        tok_dir = tokenizer_dir(args.model, args.tokenizer)
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer,
                                                    dtype=_serving_dtype(args.dtype, device), device=device)
        from .checkpoint.generation_config import read_eos_ids
        # generations end where `dsv3 serve` ends them: the tokenizer's EOS and generation_config.json's
        backend = EngineBackend(Engine(model, tokenizer, EngineConfig(cache_memory_gib=args.cache_gib,
                                                                      max_num_seqs=args.max_num_seqs,
                                                                      eos_token_ids=read_eos_ids(args.model))))
    add_bos = run.tokenizer_adds_bos(tok_dir) if args.add_bos == "auto" else args.add_bos == "yes"
    if args.chat and args.mode != "gen":
        raise ValueError("--chat applies to dsv3 eval gen")
    if args.mode == "mc":
        metrics = run.evaluate_mc(backend, tokenizer, args.task, args.out, args.fewshot_file, args.fewshot, add_bos,
                                  args.continuation, args.limit, args.seed, args.strict, overwrite=args.overwrite)
    elif args.mode == "gen":
        chat = _chat_template(tok_dir) if args.chat else None
        metrics = run.evaluate_generation(backend, tokenizer, args.task, args.out, args.fewshot_file, args.fewshot,
                                          add_bos, args.k, args.temperature, args.max_tokens, args.limit, args.seed,
                                          args.strict, args.match, chat=chat, overwrite=args.overwrite)
    elif args.mode == "code":
        from .verify import SandboxUnavailable
        try:
            metrics = run.evaluate_code(backend, tokenizer, args.task, args.out, add_bos, args.k, args.temperature,
                                        args.max_tokens, args.limit, args.seed, args.workers, args.timeout,
                                        args.memory_mb, args.strict, overwrite=args.overwrite)
        except SandboxUnavailable as e:          # the machine's, not a sample's: one line, no results
            raise ValueError(str(e)) from None
    else:
        metrics = run.evaluate_needle(backend, tokenizer, args.task, args.out,
                                      _numbers(args.lengths, int, "--lengths"), _numbers(args.depths, float, "--depths"),
                                      add_bos, args.seed, overwrite=args.overwrite)
    total = metrics.get("samples", metrics["n"])
    if metrics.get("errors") and metrics["errors"] == total:
        print(f"dsv3 eval: every request failed ({metrics['errors']} of {total}); see the samples file",
              file=sys.stderr)
        return 1
    return 0


def _chat_template(tok_dir):
    from .data.chat import ChatTemplate
    from .posttrain.base import chat_template_of
    return ChatTemplate(chat_template_of(tok_dir))


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def cmd_serve(args: argparse.Namespace) -> None:
    import json

    import uvicorn

    from .data import Tokenizer
    from .infer import EngineConfig
    from .checkpoint.generation_config import read_eos_ids, read_sampling_defaults
    from .serve import EngineProcess, build_app
    from .serve.async_engine import engine_threads
    from .serve.guard import default_allowed_hosts
    path = Path(args.model)
    defaults = read_sampling_defaults(path) if args.generation_config == "auto" else {}   # before any loading
    eos = read_eos_ids(path) if args.generation_config == "auto" else []
    tok_dir = tokenizer_dir(args.model, args.tokenizer)
    tokenizer = Tokenizer.load(args.tokenizer or tok_dir)
    device = _device(args.device)
    block = {} if args.block_size is None else dict(block_size=args.block_size)     # EngineConfig owns the default
    config = EngineConfig(cache_memory_gib=args.cache_gib, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len, num_speculative_tokens=args.spec,
                          admission_delay=args.admission_delay, eos_token_ids=eos, **block)
    factory = functools.partial(served_engine, args.model, args.tokenizer, device, args.dtype, args.fp8, config)
    # the step loop in a process of its own, so HTTP work never competes with it for the GIL
    threads = engine_threads(args.threads)
    if args.ep and args.role:
        raise ValueError("--ep and --role do not combine (yet): an EP group serves unified prefill and decode")
    if args.role in ("prefill", "decode"):
        from .infer.disagg import run_worker
        return run_worker(args.role, *_load_for_serving(args, device), config, args.pd_listen, args.pd_key, threads)
    if args.role == "router":
        from .serve.pd_router import pd_router_from_args
        engine = pd_router_from_args(args, tokenizer)
    elif args.ep:
        from .serve.ep import ep_serving_front
        engine = ep_serving_front(args, config, functools.partial(_load_for_serving, args), threads)
        if engine is None:           # a follower rank: rank 0 has stopped
            return
    elif args.engine_thread:
        import torch
        torch.set_num_threads(threads)
        engine = factory()
    else:
        engine = EngineProcess(factory, tokenizer, args.max_pending, threads=threads)
    template = None
    if args.chat_template:
        template = Path(args.chat_template).read_text()
    elif (tok_dir / "tokenizer_config.json").exists():
        template = json.loads((tok_dir / "tokenizer_config.json").read_text()).get("chat_template")
    name = args.served_model_name or path.resolve().name
    limit = {} if args.max_body_bytes is None else {"max_body_bytes": args.max_body_bytes}
    app = build_app(engine, tokenizer, name, api_key=args.api_key, max_pending=args.max_pending,
                    chat_template=template, metrics_public=args.metrics_public, sampling_defaults=defaults,
                    reasoning_parser=args.reasoning_parser,
                    allowed_hosts=default_allowed_hosts(args.host, args.allowed_hosts), **limit)
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


@functools.cache
def _bench_tokenizer():
    """Random-weight benchmarks decode text only for the HTTP layer: a small tokenizer (ids past it decode to '');
    trained once per process."""
    from .data import stdlib_files, train_tokenizer
    return train_tokenizer([f.read_text(errors="ignore") for f in stdlib_files()[:50]], vocab_size=512)


def bench_engine(config_name: str, mtp: bool, device: str, dtype_name: str | None, fp8: bool, config):
    """A random-weight engine for `dsv3 bench serve` (built again in the engine process: a picklable recipe)."""
    from .infer import Engine
    return Engine(_bench_model(config_name, mtp, device, dtype_name, fp8), _bench_tokenizer(), config)


def _bench_serve(args: argparse.Namespace) -> None:
    import asyncio
    import functools
    import json
    g = torch.Generator().manual_seed(0)
    vocab = load_model_config(args.config).vocab_size if not args.url else args.vocab_size

    def prompts(n: int) -> list[list[int]]:
        return [torch.randint(10, vocab, (args.prompt,), generator=g).tolist() for _ in range(n)]
    if args.url:
        from .serve.bench import run_load
        r = asyncio.run(run_load(args.url, args.served_model_name, prompts(args.requests), args.tokens,
                                 args.concurrency, args.requests, args.api_key))
    else:
        from .infer import EngineConfig
        from .serve.bench import bench_serve_vs_engine
        device = _device(args.device)
        config = EngineConfig(cache_memory_gib=args.cache_gib, max_num_seqs=args.concurrency,
                              max_num_batched_tokens=max(2048, args.prompt * 8),
                              cuda_graphs=not args.no_cuda_graphs, compile_decode=args.compile_decode,
                              fused_moe=args.fused_moe, admission_delay=args.admission_delay)
        factory = functools.partial(bench_engine, args.config, args.mtp, device, args.dtype, args.fp8, config)
        r = bench_serve_vs_engine(factory, _bench_tokenizer(), prompts(args.requests), prompts(args.requests),
                                  args.tokens, args.concurrency, args.requests, process=not args.engine_thread)
        print(f"engine alone: {r['engine_output_tok_per_s']:.1f} output tok/s; through the server (engine in a "
              f"{r['engine_layout']}): {r['output_tok_per_s']:.1f} ({r['server_vs_engine']:.1%})")
        for name, st in (("engine alone", r["engine_steps"]), ("server", r["steps"])):
            print(f"  {name} steps: {st['steps']}, {st['decode_share']:.1%} pure decode, {st['prefill_steps']} with "
                  f"prefill rows, {st['mean_seqs']:.1f} sequences per step")
    ms = lambda d: " ".join(f"{k} {v * 1e3:.1f}" for k, v in d.items() if v is not None)  # noqa: E731
    print(f"{r['completed']}/{r['requests']} requests at concurrency {r['concurrency']} in {r['seconds']:.2f} s: "
          f"{r['output_tok_per_s']:.1f} output tok/s, {r['requests_per_s']:.2f} req/s\n"
          f"  TTFT ms: {ms(r['ttft_s'])}\n  TPOT ms: {ms(r['tpot_s'])}\n  ITL ms:  {ms(r['itl_s'])}")
    if r["errors"]:
        print("errors:", r["errors"])
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


def cmd_plan(args: argparse.Namespace) -> None:
    import json

    from .parallel.plan import Cluster, Layout, format_plan, plan, training_cost
    cfg = load_model_config(args.config)
    p = plan(cfg, Cluster(args.gpus, args.gpus_per_node, args.gpu_memory, args.nvlink, args.ib),
             Layout(args.pp, args.ep, args.schedule, args.micro_batch, args.seq_len, args.micro_batches,
                    2 if args.moments == "bf16" else 4))
    batch = args.micro_batch * args.seq_len * args.micro_batches * p["layout"]["dp"]
    p["cost"] = training_cost(cfg, args.gpus, args.mfu, args.peak_tflops, args.seq_len, batch, args.price)
    print(json.dumps(p, indent=1) if args.json else format_plan(p))


def cmd_bench(args: argparse.Namespace) -> None:
    from .infer.bench import bench_decode, bench_prefill
    if args.what == "serve":
        return _bench_serve(args)
    model = _bench_model(args.config, args.mtp, _device(args.device), args.dtype, args.fp8)
    for b in map(int, args.batches.split(",")):
        if args.what == "decode":
            r = bench_decode(model, b, args.prompt, args.tokens, args.spec, cuda_graphs=not args.no_cuda_graphs,
                             compile_decode=args.compile_decode, fused_moe=args.fused_moe)
            print(f"decode  batch {b:4d}: TTFT {r['ttft_s'] * 1e3:8.1f} ms  TPOT {r['tpot_ms']:7.2f} ms  "
                  f"{r['tok_per_s']:10.1f} tok/s  ({r['roofline_fraction']:.1%} of the {r['roofline_tok_per_s']:.0f} "
                  f"tok/s roofline)")
        else:
            r = bench_prefill(model, b, args.prompt)
            print(f"prefill batch {b:4d} x {args.prompt}: {r['seconds'] * 1e3:8.1f} ms  {r['tok_per_s']:10.1f} tok/s")


COMMANDS = {"info": cmd_info, "demo": cmd_demo, "convert": cmd_convert, "tokenizer train": cmd_tokenizer_train,
            "train": cmd_train, "sft": cmd_posttrain, "grpo": cmd_posttrain, "distill": cmd_posttrain,
            "export": cmd_export, "plot": cmd_plot, "generate": cmd_generate, "serve": cmd_serve, "eval": cmd_eval,
            "plan": cmd_plan, "bench": cmd_bench}     # a parse's command (and tokenizer_command) -> what runs it


def _rank_tag() -> str:
    """Under torchrun, which rank an error is from ("rank 3 of 8: "): it may be that rank's alone (its data, its
    disk), and the other ranks' lines are then only the collective they were left in."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ.get('RANK', '0')} of {world}: " if world > 1 else ""


def main(argv: list[str] | None = None) -> int:
    """Parse (dsv3.cli_args), run the command; its errors are one line and an exit status: 2 refused (bad input,
    config, checkpoint), 3 a training run diverged, 128 + the signal's number when SIGINT / SIGTERM stopped it."""
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "tokenizer_command", None))))
    try:
        return COMMANDS[command](args) or 0
    except ConfigError as e:            # the same on every rank: said once (rank 0), every rank exits 2
        if os.environ.get("RANK", "0") == "0":
            print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        if os.environ.get("RANK", "0") == "0" or not getattr(e, "said_by_rank_0", False):   # a shared decision
            print(f"dsv3 {args.command}: {_rank_tag()}error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                # the machine's (a full disk, permissions): one line; writes are atomic
        print(f"dsv3 {args.command}: {_rank_tag()}error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from .train.data_parallel import is_collective_timeout, timeout_message
        if is_collective_timeout(e) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print(f"dsv3 {args.command}: {_rank_tag()}error: {timeout_message(e)}", file=sys.stderr)
            if torch.distributed.is_initialized():    # else the gloo group's teardown at exit aborts the process
                torch.distributed.destroy_process_group()
            return 1
        if type(e).__name__ != "TrainingDiverged":
            raise
        print(f"dsv3 {args.command}: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:      # Ctrl-C outside the training loop, or a second one inside it
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"dsv3 {args.command}: aborted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
