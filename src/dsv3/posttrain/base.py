"""The model a post-training run starts from: a training run directory (its latest checkpoint, optionally the EMA
weights, and its tokenizer) or a Hugging Face directory (`dsv3 export`, or a released model), plus the chat template
the tokenizer carries (tokenizer_config.json's `chat_template`, the one the server renders with)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "checkpoints").is_dir()


def tokenizer_dir(model_path: str | Path, tokenizer_path: str | None = None) -> Path:
    """Where a model's tokenizer files live: `tokenizer_path` (tokenizer.json or its directory), else a training
    run's `tokenizer/`, else the Hugging Face directory itself."""
    if tokenizer_path:
        p = Path(tokenizer_path)
        return p.parent if p.is_file() else p
    path = Path(model_path)
    tok_dir = path / "tokenizer" if is_run_dir(path) else path
    if not (tok_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {tok_dir}; pass --tokenizer")
    return tok_dir


def chat_template_of(tok_dir: str | Path) -> str | None:
    """The tokenizer's chat template (None: the built-in DeepSeek one, dsv3.data.tokenizer.CHAT_TEMPLATE)."""
    f = Path(tok_dir) / "tokenizer_config.json"
    return json.loads(f.read_text()).get("chat_template") if f.exists() else None


def load_model_and_tokenizer(model_path: str | Path, tokenizer_path: str | None = None, ema: bool = False,
                             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A training run (its latest checkpoint and tokenizer) or a Hugging Face directory, in `dtype` on `device`
    (a Hugging Face checkpoint is read straight into them: a 16B model never exists in fp32 on the host)."""
    from ..checkpoint import load_pretrained
    from ..data import Tokenizer
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (a training run or a Hugging Face model directory)")
    tokenizer = Tokenizer.load(tokenizer_dir(path, tokenizer_path))
    if is_run_dir(path):
        from ..train import load_run_model
        model, _ = load_run_model(path, ema=ema)
        model.to(device=device, dtype=dtype)
    else:
        if ema:
            raise ValueError(f"{path} is a Hugging Face directory: it has no EMA weights (ema applies to run "
                             f"directories)")
        model = load_pretrained(path, dtype=dtype, device=device).eval()
    return model, tokenizer


@dataclass
class Base:
    """A starting point: its model config, fp32 CPU weights, tokenizer and chat template source."""
    path: Path
    model_config: ModelConfig
    state: dict
    tokenizer: object
    template: str | None


def load_base(path: str | Path, ema: bool = False) -> Base:
    model, tokenizer = load_model_and_tokenizer(path, ema=ema)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Base(Path(path), model.config, state, tokenizer, chat_template_of(tokenizer_dir(path)))
