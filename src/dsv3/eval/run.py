"""`dsv3 eval mc | gen | code | needle`: one task through a backend, its results written and printed.

The tokenizer's BOS convention decides `add_bos` unless the caller says otherwise: a tokenizer whose
`tokenizer_config.json` has `add_bos_token` (ours) gets BOS in front of every context, as lm-eval's `hf` backend
gives it; lm-eval's `local-completions` sends none unless `add_bos_token=True` is in its model_args (README).

A bad row of the task file is skipped and counted (`bad_rows` in the metrics, its file:line and reason in the
samples file, a line on stderr) unless `strict`, where it is the run's one-line error; scores are over the usable
rows. Few-shot files are always read strictly.

A task whose results are already in `out_dir` is refused before any question is asked unless `overwrite`
(dsv3.eval.report.check_out): a re-run never replaces an earlier report without being asked.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from ..data import read_tokenizer_config
from .backends import GenerateBackend, LoglikBackend
from .code import read_code, score_code
from .generation import read_qa, score_generation
from .multiple_choice import PROMPT_LAYOUT, read_mc, score_mc
from .needle import heat_map, needle_grid
from .report import check_out, table, write_results

PROMPT_VERSION = PROMPT_LAYOUT   # mc_prompt's layout, so results.json says what was measured
GEN_PROMPT_VERSION = "qa-v1"     # qa_prompt's
CHAT_PROMPT_VERSION = "chat-v1"  # generation.chat_messages through the model's chat template
CODE_PROMPT_VERSION = "code-v1"  # code.py's prompts, stop sequences and output comparison
NEEDLE_PROMPT_VERSION = "needle-v1"


def check_options(**options) -> None:
    """Range checks of a run's options before anything is read or asked, one line naming the flag (`--limit -1`
    would silently drop the last question, `--k 0` would fail only after generating)."""
    rules = {"limit": (0, "an integer >= 0 (0: all)"), "fewshot": (0, "an integer >= 0"),
             "k": (1, "an integer >= 1"), "max_tokens": (1, "an integer >= 1"), "workers": (1, "an integer >= 1"),
             "memory_mb": (16, "an integer >= 16")}
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if name in rules and (not isinstance(value, int) or value < rules[name][0]):
            raise ValueError(f"{flag} must be {rules[name][1]}, got {value!r}")
        if name == "temperature" and not 0 <= value < float("inf"):
            raise ValueError(f"{flag} must be a number >= 0 (0: greedy), got {value!r}")
        if name == "timeout_s" and not 0 < value <= 3600:
            raise ValueError(f"--timeout must be a number of seconds in (0, 3600], got {value!r}")
        if name == "lengths" and (not value or any(not isinstance(L, int) or L < 1 for L in value)):
            raise ValueError(f"--lengths must be positive token counts, got {value!r}")
        if name == "depths" and (not value or any(not 0 <= d <= 1 for d in value)):
            raise ValueError(f"--depths must be fractions in [0, 1] (0: the start, 1: the end), got {value!r}")


def tokenizer_adds_bos(tokenizer_dir: str | Path | None) -> bool:
    return bool(read_tokenizer_config(tokenizer_dir or "").get("add_bos_token", False))


def evaluate_mc(backend: LoglikBackend, tokenizer, task: str | Path, out_dir: str | Path, fewshot_file=None,
                fewshot: int = 0, add_bos: bool = True, continuation: str = "letter", limit: int = 0,
                seed: int = 0, strict: bool = False, overwrite: bool = False) -> dict:
    check_options(fewshot=fewshot, limit=limit)
    check_out(out_dir, Path(task).stem, overwrite)
    bad = None if strict else []
    questions = read_mc(task, bad)[:limit or None]
    shots = []
    if fewshot:
        if fewshot_file is None:
            raise ValueError("few-shot examples come from a dev split: pass --fewshot-file")
        pool = read_mc(fewshot_file)
        shots = random.Random(seed).sample(pool, min(fewshot, len(pool)))
    metrics, records = score_mc(backend, tokenizer, questions, shots, add_bos=add_bos, continuation=continuation)
    name = Path(task).stem
    config = dict(task=str(task), fewshot=len(shots), fewshot_file=str(fewshot_file) if fewshot_file else None,
                  add_bos=add_bos, continuation=continuation, seed=seed)
    return _finish(out_dir, name, metrics, records, bad, PROMPT_VERSION, config)


def evaluate_generation(backend: GenerateBackend, tokenizer, task: str | Path, out_dir: str | Path, fewshot_file=None,
                        fewshot: int = 0, add_bos: bool = True, k: int = 1, temperature: float = 0.0,
                        max_tokens: int = 256, limit: int = 0, seed: int = 0,
                        strict: bool = False, match: str = "math", chat=None, overwrite: bool = False) -> dict:
    """`chat`: the model's ChatTemplate, to ask a chat model in its own format (generation.py)."""
    check_options(fewshot=fewshot, k=k, temperature=temperature, max_tokens=max_tokens, limit=limit)
    check_out(out_dir, Path(task).stem, overwrite)
    bad = None if strict else []
    questions = read_qa(task, bad)[:limit or None]
    if fewshot and not fewshot_file:
        raise ValueError("few-shot examples come from a dev split: pass --fewshot-file")
    shots = []
    if fewshot:          # as evaluate_mc: at most what the file holds (results.json's config says how many)
        pool = read_qa(fewshot_file)
        shots = random.Random(seed).sample(pool, min(fewshot, len(pool)))
    if k > 1 and temperature == 0:
        raise ValueError("k > 1 samples need --temperature > 0 (greedy samples are all the same)")
    metrics, records = score_generation(backend, tokenizer, questions, shots, k, temperature, max_tokens, add_bos, seed,
                                        match=match, chat=chat)
    name = Path(task).stem
    config = dict(task=str(task), fewshot=len(shots), add_bos=add_bos if chat is None else "chat template", k=k,
                  temperature=temperature, max_tokens=max_tokens, seed=seed, match=match, chat=chat is not None)
    version = GEN_PROMPT_VERSION if chat is None else CHAT_PROMPT_VERSION
    return _finish(out_dir, name, metrics, records, bad, version, config)


def evaluate_code(backend: GenerateBackend, tokenizer, task: str | Path, out_dir: str | Path, add_bos: bool = True,
                  k: int = 1, temperature: float = 0.0, max_tokens: int = 512, limit: int = 0, seed: int = 0,
                  workers: int = 2, timeout_s: float = 5.0, memory_mb: int = 512,
                  strict: bool = False, overwrite: bool = False) -> dict:
    if k > 1 and temperature == 0:
        raise ValueError("k > 1 samples need --temperature > 0 (greedy samples are all the same)")
    check_options(k=k, temperature=temperature, max_tokens=max_tokens, limit=limit, workers=workers,
                  timeout_s=timeout_s, memory_mb=memory_mb)
    check_out(out_dir, Path(task).stem, overwrite)
    bad = None if strict else []
    problems = read_code(task, bad)[:limit or None]
    metrics, records = score_code(backend, tokenizer, problems, k, temperature, max_tokens, add_bos, seed, workers,
                                  timeout_s=timeout_s, memory_mb=memory_mb)
    name = Path(task).stem
    config = dict(task=str(task), add_bos=add_bos, k=k, temperature=temperature, max_tokens=max_tokens, seed=seed,
                  timeout_s=timeout_s, memory_mb=memory_mb)
    return _finish(out_dir, name, metrics, records, bad, CODE_PROMPT_VERSION, config)


def evaluate_needle(backend: GenerateBackend, tokenizer, filler: str | Path, out_dir: str | Path,
                    lengths: list[int], depths: list[float], add_bos: bool = True, seed: int = 0,
                    overwrite: bool = False) -> dict:
    """The grid's mean and per-cell scores in results.json (task "needle"), one record a cell, needle.png."""
    check_options(lengths=lengths, depths=depths)
    check_out(out_dir, "needle", overwrite)
    context = getattr(backend, "context_length", lambda: None)()
    too_long = [L for L in lengths if context is not None and L > context]
    if too_long:        # every such cell would fail in the engine and score 0: an error, not a misleading grid
        raise ValueError(f"needle lengths {too_long} exceed the model's context of {context} tokens (a needle cell "
                         f"of length L is the whole context: prompt + answer); drop them, or extend the model first")
    text = Path(filler).read_text(encoding="utf-8", errors="replace")
    scores, records = needle_grid(backend, tokenizer, text, lengths, depths, seed=seed, add_bos=add_bos)
    n = len(records)
    metrics = dict(retrieval=sum(map(sum, scores)) / n, errors=sum("error" in r for r in records), n=n,
                   grid={str(L): dict(zip(map(str, depths), row)) for L, row in zip(lengths, scores)})
    config = dict(filler=str(filler), lengths=lengths, depths=depths, add_bos=add_bos, seed=seed)
    path = write_results(out_dir, "needle", metrics, records, NEEDLE_PROMPT_VERSION, config)
    heat_map(scores, lengths, depths, Path(out_dir) / "needle.png")
    print(table("needle", metrics))
    print(f"results: {path}; heat map: {Path(out_dir) / 'needle.png'}")
    return metrics


def _finish(out_dir, name: str, metrics: dict, records: list[dict], bad: list[dict] | None, version: str,
            config: dict) -> dict:
    """Bad rows counted and recorded, results written, the table printed."""
    if bad:
        metrics["bad_rows"] = len(bad)
        records = records + [dict(bad_row=b["where"], error=b["error"]) for b in bad]
        print(f"warning: {len(bad)} bad rows of {config['task']} skipped (the first: {bad[0]['error']}); "
              f"--strict makes them an error", file=sys.stderr)
    path = write_results(out_dir, name, metrics, records, version, config)
    print(table(name, metrics))
    print(f"results: {path}")
    return metrics
