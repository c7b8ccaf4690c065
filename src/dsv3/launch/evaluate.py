"""`dsv3 eval mc | gen | code | needle`: a task scored (dsv3.eval.run) through a local engine on a model directory, or
an OpenAI-compatible server (`--server`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint.generation_config import read_eos_ids
from ..data import Tokenizer
from ..data.chat import ChatTemplate
from ..eval import EngineBackend, OpenAIBackend, run
from ..eval.report import check_out
from ..infer import Engine, EngineConfig
from ..posttrain.base import chat_template_of, tokenizer_dir
from ..verify import SandboxUnavailable
from .loading import default_device, load_model


def check_flags(args: argparse.Namespace) -> None:
    """The flags' ranges and the output directory, before a model is read (minutes for a large checkpoint): the
    evaluators check them again where they run (dsv3.eval.run), for their Python callers."""
    if args.chat and args.mode != "gen":
        raise ValueError("--chat applies to dsv3 eval gen")
    per_mode = {"mc": ("limit", "fewshot"), "gen": ("limit", "fewshot", "k", "max_tokens", "temperature"),
                "code": ("limit", "k", "max_tokens", "temperature", "workers", "memory_mb"), "needle": ()}[args.mode]
    options = {name: getattr(args, name) for name in per_mode}
    if args.mode == "code":
        options["timeout_s"] = args.timeout
    if args.mode == "needle":
        options.update(lengths=numbers(args.lengths, int, "--lengths"), depths=numbers(args.depths, float, "--depths"))
    run.check_options(**options)
    check_out(args.out, "needle" if args.mode == "needle" else Path(args.task).stem, args.overwrite)


def run_eval(args: argparse.Namespace, dtype: torch.dtype | None) -> int:
    """The exit status: 1 when every request failed, else 0; `dtype` the `--dtype` asked (a local engine's)."""
    check_flags(args)
    if args.server:
        if not args.tokenizer:
            raise ValueError("--server scores token ids: pass --tokenizer (the served model's tokenizer.json)")
        tok_dir = tokenizer_dir("", args.tokenizer)
        tokenizer = Tokenizer.load(tok_dir)
        backend = OpenAIBackend(args.server, args.served_model_name, args.api_key)
    else:
        if not args.model:
            raise ValueError("pass --model (a run or HF directory) or --server URL")
        device = default_device(args.device)
        tok_dir = tokenizer_dir(args.model, args.tokenizer)
        model, tokenizer = load_model(args.model, args.tokenizer, device, dtype, fp8=False, mtp=False)  # no --spec
        # generations end where `dsv3 serve` ends them: the tokenizer's EOS and generation_config.json's
        backend = EngineBackend(Engine(model, tokenizer, EngineConfig(cache_memory_gib=args.cache_gib,
                                                                      max_num_seqs=args.max_num_seqs,
                                                                      eos_token_ids=read_eos_ids(args.model))))
    add_bos = run.tokenizer_adds_bos(tok_dir) if args.add_bos == "auto" else args.add_bos == "yes"
    if args.mode == "mc":
        metrics = run.evaluate_mc(backend, tokenizer, args.task, args.out, args.fewshot_file, args.fewshot, add_bos,
                                  args.continuation, args.limit, args.seed, args.strict, overwrite=args.overwrite)
    elif args.mode == "gen":
        chat = chat_template(tok_dir) if args.chat else None
        metrics = run.evaluate_generation(backend, tokenizer, args.task, args.out, args.fewshot_file, args.fewshot,
                                          add_bos, args.k, args.temperature, args.max_tokens, args.limit, args.seed,
                                          args.strict, args.match, chat=chat, overwrite=args.overwrite)
    elif args.mode == "code":
        try:
            metrics = run.evaluate_code(backend, tokenizer, args.task, args.out, add_bos, args.k, args.temperature,
                                        args.max_tokens, args.limit, args.seed, args.workers, args.timeout,
                                        args.memory_mb, args.strict, overwrite=args.overwrite)
        except SandboxUnavailable as e:          # the machine's, not a sample's: one line, no results
            raise ValueError(str(e)) from None
    else:
        metrics = run.evaluate_needle(backend, tokenizer, args.task, args.out,
                                      numbers(args.lengths, int, "--lengths"), numbers(args.depths, float, "--depths"),
                                      add_bos, args.seed, overwrite=args.overwrite)
    total = metrics.get("samples", metrics["n"])
    if metrics.get("errors") and metrics["errors"] == total:
        print(f"dsv3 eval: every request failed ({metrics['errors']} of {total}); see the samples file",
              file=sys.stderr)
        return 1
    return 0


def chat_template(tok_dir: str | Path) -> ChatTemplate:
    """The tokenizer's chat template (its tokenizer_config.json's, else the built-in DeepSeek one)."""
    return ChatTemplate(chat_template_of(tok_dir))


def numbers(text: str, kind: Callable[[str], float], flag: str) -> list:
    """`--lengths` / `--depths`: comma-separated numbers of `kind`; anything else a ValueError naming the flag."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None
