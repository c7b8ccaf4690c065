"""The models and engines the model-running commands build: the device and dtype they default to, a model directory
(a training run or a Hugging Face directory, dsv3.posttrain.base) or `dsv3 bench`'s random weights, optionally in FP8
block weights. `served_engine` and `bench_engine` are built again in the engine process (functools.partial over
them is the picklable recipe dsv3.serve.EngineProcess sends): top-level functions of this module."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from ..config import load_model_config
from ..data import Tokenizer
from ..infer import Engine, EngineConfig
from ..model import Transformer
from ..posttrain.base import is_run_dir, load_model_and_tokenizer, tokenizer_dir
from ..train.device import check_device


def default_device(name: str | None) -> str:
    """`--device` checked to exist here (one line, before a model is read: a typo or CUDA on a CPU machine was a
    traceback after loading), else CUDA where there is one."""
    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(name, "--device", "--device cpu")
    return name


def serving_dtype(dtype: torch.dtype | None, device: str) -> torch.dtype:
    """`--dtype`, else bfloat16 on CUDA and float32 on the CPU."""
    return dtype if dtype is not None else (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def maybe_fp8(model: Transformer, fp8: bool) -> Transformer:
    if fp8:
        from ..infer.fp8_weights import quantize_weights
        quantize_weights(model)
    return model


def bench_model(config_name: str, mtp: bool, device: str, dtype: torch.dtype | None, fp8: bool) -> Transformer:
    """The random-weight model of `dsv3 bench`, optionally with FP8 block weights."""
    from ..infer.bench import random_model
    cfg = load_model_config(config_name)
    if not mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    return maybe_fp8(random_model(cfg, device, serving_dtype(dtype, device)), fp8)


def load_model(model_path: str, tokenizer_path: str | None, device: str, dtype: torch.dtype | None, fp8: bool,
               mtp: bool = True) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) of a model directory in the serving dtype, optionally with FP8 block weights: a Hugging
    Face directory's read straight into them (a released FP8 checkpoint's own codes and scales, dsv3.infer.ep_load),
    a training run's quantised from its weights. `mtp=False` (an engine that does not speculate never runs the MTP
    module): a Hugging Face directory's MTP tensors are not read (V3's: 11.3 GB in FP8); a training run's are."""
    if (fp8 or not mtp) and not is_run_dir(model_path):
        from ..infer.ep_load import load_rank_model
        if not Path(model_path).is_dir():
            raise FileNotFoundError(f"{model_path} is not a directory (a training run or a Hugging Face model "
                                    f"directory)")
        tokenizer = Tokenizer.load(tokenizer_dir(model_path, tokenizer_path))
        return load_rank_model(model_path, serving_dtype(dtype, device), device, fp8=fp8, mtp=mtp)[0], tokenizer
    model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_path, dtype=serving_dtype(dtype, device),
                                                device=device)
    return maybe_fp8(model, fp8), tokenizer


def load_for_serving(args: argparse.Namespace, dtype: torch.dtype | None, device: str) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) for `dsv3 serve --role` processes (the MTP module only with `--spec`)."""
    return load_model(args.model, args.tokenizer, device, dtype, args.fp8, mtp=args.spec > 0)


def load_ep_rank(args: argparse.Namespace, dtype: torch.dtype | None, device: str, ep_config
                 ) -> tuple[Transformer, Tokenizer, object]:
    """(model, tokenizer, placement) of one `dsv3 serve --ep N` rank (the process group is up): from a Hugging Face
    directory only the rank's share is read, its experts already placed (dsv3.infer.ep_load), the MTP module only
    with `--spec`; a training run is loaded whole and placed by EPEngine (placement None)."""
    if is_run_dir(args.model):
        return (*load_model(args.model, args.tokenizer, device, dtype, args.fp8), None)
    import torch.distributed as dist

    from ..checkpoint.hf import CheckpointReader
    from ..infer.ep_engine import initial_placement
    from ..infer.ep_load import load_rank_model
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"{args.model} is not a directory (a training run or a Hugging Face model directory)")
    cfg = CheckpointReader(args.model).model_config()
    placement = initial_placement(cfg, dist.get_world_size(), ep_config)
    model, _ = load_rank_model(args.model, serving_dtype(dtype, device), device, args.fp8, dist.group.WORLD,
                               placement, mtp=args.spec > 0)
    return model, Tokenizer.load(tokenizer_dir(args.model, args.tokenizer)), placement


def served_engine(model_path: str, tokenizer_path: str | None, device: str, dtype: torch.dtype | None, fp8: bool,
                  config: EngineConfig) -> Engine:
    """The engine `dsv3 serve` runs (built in the engine process; the MTP module only when it speculates)."""
    return Engine(*load_model(model_path, tokenizer_path, device, dtype, fp8, config.num_speculative_tokens > 0),
                  config)


@functools.cache
def bench_tokenizer() -> Tokenizer:
    """Random-weight benchmarks decode text only for the HTTP layer: a small tokenizer (ids past it decode to '');
    trained once per process."""
    from ..data import stdlib_files, train_tokenizer
    return train_tokenizer([f.read_text(errors="ignore") for f in stdlib_files()[:50]], vocab_size=512)


def bench_engine(config_name: str, mtp: bool, device: str, dtype: torch.dtype | None, fp8: bool,
                 config: EngineConfig) -> Engine:
    """A random-weight engine for `dsv3 bench serve` (built again in the engine process: a picklable recipe)."""
    return Engine(bench_model(config_name, mtp, device, dtype, fp8), bench_tokenizer(), config)
