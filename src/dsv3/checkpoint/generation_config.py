"""A model directory's own sampling defaults (generation_config.json): what `dsv3 serve` requests and `dsv3 generate`
runs that leave temperature / top_p / top_k / repetition_penalty out sample with, and the ids that end a generation
besides the tokenizer's EOS (`eos_token_id`).

A release's `generation_config.json` says how its authors sample it (DeepSeek-V3 and R1: temperature 0.6, top_p
0.95); OpenAI's defaults (1.0, 1.0) would sample such a model hotter than intended whenever a client omits them, as
the `openai` client does unless told. As vLLM's `--generation-config auto`: the keys present there become the
server's defaults, a request's own values still win, and `do_sample` is not read (a release that sets a
temperature means it). Values are checked against the request ranges when the server starts, one line naming the
file and key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FILE = "generation_config.json"
_real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
# key -> (accepted?, what is): the ranges of a request's fields (serve/protocol.py)
RULES = {"temperature": (lambda v: _real(v) and 0 <= v <= 2, "a number in [0, 2]"),
         "top_p": (lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]"),
         "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1, "an integer >= -1"),
         "repetition_penalty": (lambda v: _real(v) and 0 < v <= 2, "a number in (0, 2]")}


def _read(model_dir: str | Path) -> tuple[Path, dict]:
    """The file's path and its object ({} without the file); a file that is not a JSON object is a ValueError."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return path, {}
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON object ({e}); pass --generation-config none to ignore it") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a JSON object; pass --generation-config none to ignore it")
    return path, d


def read_generation_config(model_dir: str | Path, sampling: bool = True) -> tuple[dict, list[int]]:
    """`read_sampling_defaults` and `read_eos_ids` from one read of the file (`dsv3 serve`'s and `dsv3 generate`'s
    start-up): the sampling defaults are checked first, so a file wrong in both is refused for the same key as by
    the two in turn. sampling=False: none wanted ({}, their keys not checked)."""
    path, d = _read(model_dir)
    return _sampling_defaults(path, d) if sampling else {}, _eos_ids(path, d)


def read_eos_ids(model_dir: str | Path) -> list[int]:
    """The ids generation_config.json's `eos_token_id` (an id or a list) says end a generation ([] without them):
    besides the tokenizer's EOS, as transformers' generate and vLLM stop (a chat model may end its turns with a token
    other than its tokenizer's EOS, e.g. an <|im_end|>). A value that is not a token id is a ValueError naming the
    key."""
    return _eos_ids(*_read(model_dir))


def read_sampling_defaults(model_dir: str | Path) -> dict:
    """{temperature, top_p, top_k, repetition_penalty} from `model_dir`'s generation_config.json, only the keys it
    sets ({} without the file). A value outside the request ranges is a ValueError naming the file and key."""
    return _sampling_defaults(*_read(model_dir))


def _eos_ids(path: Path, d: dict) -> list[int]:
    ids = d.get("eos_token_id")
    ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{path}: eos_token_id={d['eos_token_id']!r} must be a token id or a list of them; pass "
                         f"--generation-config none to ignore the file")
    return ids


def _sampling_defaults(path: Path, d: dict) -> dict:
    out = {}
    for key, (ok, what) in RULES.items():
        if d.get(key) is None:
            continue
        if not ok(d[key]):
            raise ValueError(f"{path}: {key}={d[key]!r} must be {what}; pass --generation-config none to ignore "
                             f"the file")
        out[key] = 0 if key == "top_k" and d[key] == -1 else d[key]
    return out
