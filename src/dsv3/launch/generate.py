"""`dsv3 generate`: a prompt's continuations from a training run or a Hugging Face directory, sampled by the engine as
the model directory says (generation_config.json) unless the flags say otherwise."""

from __future__ import annotations

import argparse

import torch

from ..checkpoint.generation_config import read_generation_config
from ..data import Tokenizer, read_tokenizer_config
from ..data.tokenizer import DOCUMENT_START_KEY
from ..infer import Engine, EngineConfig, SamplingParams
from ..posttrain.base import is_run_dir, load_model_and_tokenizer, tokenizer_dir
from .loading import default_device, load_model, serving_dtype


def prompt_prefix(args: argparse.Namespace, tokenizer: Tokenizer) -> list[int]:
    """The token in front of a `generate` prompt, so that it starts a document as the model saw documents start:
    dsv3's pre-training packs `doc EOS doc EOS ...` (dsv3.data.packing; the tokenizers dsv3 writes say so in
    tokenizer_config.json, and a run directory is dsv3's), DeepSeek's released models start documents with BOS
    (their tokenizer_config.json: add_bos_token)."""
    choice = args.prefix
    if choice == "auto":
        cfg = read_tokenizer_config(tokenizer_dir(args.model, args.tokenizer))
        released_bos = cfg.get("add_bos_token") is True and DOCUMENT_START_KEY not in cfg
        choice = "bos" if released_bos and not is_run_dir(args.model) else "eos"
    if choice == "bos" and tokenizer.bos_id is None:
        raise ValueError("--prefix bos: the tokenizer has no BOS token")
    return {"bos": [tokenizer.bos_id], "eos": [tokenizer.eos_id], "none": []}[choice]


def generate_sampling(args: argparse.Namespace) -> tuple[dict, list[int]]:
    """`dsv3 generate`'s temperature / top_k / top_p / repetition_penalty: the flags given, else the model
    directory's generation_config.json (as its authors sample it), else 0.8 / 50 / 0.95 / 1 (off); and the eos ids
    the file adds. The file is read once, for both (its sampling keys checked only when a flag is left out), and not
    at all with --generation-config none."""
    given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "repetition_penalty": args.repetition_penalty}
    model, eos = read_generation_config(args.model, sampling=None in given.values()) \
        if args.generation_config == "auto" else ({}, [])
    fallback = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.0}
    return {k: v if v is not None else model.get(k, fallback[k]) for k, v in given.items()}, eos


def run_generate(args: argparse.Namespace, dtype: torch.dtype | None) -> None:
    """Print `--samples` continuations of `--prompt` (the prompt in front of each), `dtype` the `--dtype` asked."""
    # the sampling flags are refused before the model is read (minutes for a large checkpoint), as dsv3.cli refuses
    # --samples and --spec
    sampling, eos = generate_sampling(args)
    params = [SamplingParams(**sampling, max_tokens=args.max_tokens, seed=args.seed + i) for i in range(args.samples)]
    device = default_device(args.device)
    if args.ema or is_run_dir(args.model):
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.ema,
                                                    dtype=serving_dtype(dtype, device), device=device)
    else:       # a Hugging Face directory: its MTP module only with --spec (dsv3.launch.loading)
        model, tokenizer = load_model(args.model, args.tokenizer, device, dtype, fp8=False, mtp=args.spec > 0)
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
