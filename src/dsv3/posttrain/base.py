"""The model a post-training run starts from: a training run directory (its latest checkpoint, optionally the EMA
weights, and its tokenizer) or a Hugging Face directory (`dsv3 export`, or a released model), plus the chat template
the tokenizer carries (tokenizer_config.json's `chat_template`, the one the server renders with)."""

from __future__ import annotations

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
        raise FileNotFoundError(f"no tokenizer.json in {tok_dir}: a model directory needs its tokenizer (generate, "
                                f"serve and eval take --tokenizer for one kept elsewhere)")
    return tok_dir


def chat_template_of(tok_dir: str | Path) -> str | None:
    """The tokenizer's chat template (None: the built-in DeepSeek one, dsv3.data.tokenizer.CHAT_TEMPLATE)."""
    from ..data import read_chat_template
    return read_chat_template(tok_dir)


def load_model_and_tokenizer(model_path: str | Path, tokenizer_path: str | None = None, ema: bool = False,
                             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A training run (its latest checkpoint and tokenizer) or a Hugging Face directory, in `dtype` on `device`
    (a Hugging Face checkpoint is read straight into them: a 16B model never exists in fp32 on the host)."""
    from ..data import Tokenizer
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (a training run or a Hugging Face model directory)")
    tokenizer = Tokenizer.load(tokenizer_dir(path, tokenizer_path))
    return load_model(path, ema, dtype, device)[0], tokenizer


def load_model(path: str | Path, ema: bool = False, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", step: int | None = None) -> tuple[torch.nn.Module, Path | None]:
    """load_model_and_tokenizer's model, and the run checkpoint it is (None: a Hugging Face directory's); `step`:
    a training run's checkpoint of that step (default: its latest)."""
    from ..checkpoint import load_pretrained
    path = Path(path)
    if is_run_dir(path):
        from ..train import load_run_model
        model, ckpt = load_run_model(path, step=step, ema=ema)
        return model.to(device=device, dtype=dtype), ckpt
    if ema:
        raise ValueError(f"{path} is a Hugging Face directory: it has no EMA weights (ema applies to run "
                         f"directories)")
    return load_pretrained(path, dtype=dtype, device=device).eval(), None


@dataclass
class Base:
    """A starting point: its model config, weights, tokenizer and chat template source. `state`: a training run's
    fp32 CPU weights; None for a Hugging Face directory, which the Trainer reads rank by rank, each rank only the
    rows it holds (dsv3.train.hf_shards): a 16B base never exists whole in fp32 on every rank's host."""
    path: Path
    model_config: ModelConfig
    state: dict | None
    tokenizer: object
    template: str | None
    checkpoint: Path | None = None      # a training run's: the checkpoint the weights are (not "the latest")

    @property
    def weights(self) -> dict | Path:
        """The Trainer's `init_state`: the weights, or the Hugging Face directory to read them from."""
        return self.path if self.state is None else self.state


def load_base(path: str | Path, ema: bool = False, step: int | None = None) -> Base:
    """step: a training run's checkpoint of that step (default: its latest)."""
    path = Path(path)
    if path.is_dir() and not is_run_dir(path):       # a Hugging Face directory: its config and tokenizer only
        from ..checkpoint.hf import CheckpointReader
        from ..data import Tokenizer
        from ..train.hf_shards import check_hf_names
        if ema:
            raise ValueError(f"{path} is a Hugging Face directory: it has no EMA weights (ema applies to run "
                             f"directories)")
        tokenizer = Tokenizer.load(tokenizer_dir(path))
        config = CheckpointReader(path).model_config()      # load_pretrained's: less an MTP module it lacks
        check_hf_names(path, config)                        # refused before the run writes a file, as before
        return Base(path, config, None, tokenizer, chat_template_of(path))
    from ..data import Tokenizer
    from ..train import load_run_model
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (a training run or a Hugging Face model directory)")
    tokenizer = Tokenizer.load(tokenizer_dir(path))
    model, ckpt = load_run_model(path, step=step, ema=ema)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Base(path, model.config, state, tokenizer, chat_template_of(tokenizer_dir(path)), ckpt)
