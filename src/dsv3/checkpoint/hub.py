"""A model named by its Hugging Face Hub id (`deepseek-ai/DeepSeek-V2-Lite-Chat`) where a model directory is asked
for: the files dsv3 reads (config, weights, tokenizer, chat template, generation config) fetched into the Hub's
own cache by huggingface_hub (the tokenizers package's dependency), or found there offline (HF_HUB_OFFLINE=1), as
transformers and vLLM resolve a model name. A local path always wins: a directory of that name is used as it is,
and so is a name whose parent directory exists here (`runs/tiny` before its run exists: the local error, not a
Hub lookup).
"""

from __future__ import annotations

import re
from pathlib import Path

# what the loaders read of a release (its modeling_*.py and the like are never run: dsv3 is the model code)
FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json", "chat_template.jinja", "special_tokens_map.json"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def resolve_model(name: str) -> str:
    """`name` itself when it exists locally or cannot be a Hub id; else the local snapshot of that Hub repository
    (downloaded if needed). ValueError in one line when the Hub cannot provide it."""
    # a local path, or one meant to be (its parent exists here: `runs/tiny` before the run has written it)
    if Path(name).exists() or Path(name).parent.is_dir() or not _REPO_ID.fullmatch(name) or name.startswith("."):
        return name
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return name
    try:
        return snapshot_download(repo_id=name, allow_patterns=FILES)
    except Exception as e:      # noqa: BLE001 (offline, unknown, gated, network: all one line for the user)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{name} is not a local directory, and the Hugging Face Hub did not provide it "
                         f"({type(e).__name__}: {first[:200]})") from None
