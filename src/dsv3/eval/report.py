"""Evaluation results on disk and on the terminal.

`out_dir/results.json`: {task: {"metrics": {...}, "prompt_version": str, "config": {...}}}, merged with what an
earlier run in the same directory wrote (one file collects a model's tasks); `out_dir/samples_<task>.jsonl`: one
record per question (prompt, choices, log-likelihoods or output, extracted answer, verdict); `out_dir/results.png`:
a bar chart of each task's main metric with its standard error. Each written whole (temp file, fsync, rename), with
the user's umask. A standard error that does not exist (one question) is written as null, never as NaN (not JSON).

Concurrent runs into one directory update results.json under a lock (`.results.lock`). A task already in
results.json is not replaced unless asked (`overwrite`): `check_out` says so before any question is
asked, and also refuses a results.json that cannot be read (it would otherwise fail only after the whole run).
"""

from __future__ import annotations

import fcntl
import json
import math
from pathlib import Path

from ..checkpoint.atomic import atomic_file, write_whole


class ResultsExist(ValueError):
    """The output directory already holds this task's results (or an unreadable results.json)."""


def _json_safe(x):
    """NaN / inf (a standard error of one question) as null: results.json stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _read_results(results_file: Path) -> dict:
    if not results_file.exists():
        return {}
    try:
        results = json.loads(results_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsExist(f"{results_file} is not a results file ({e}); move it away or choose another output "
                           f"directory") from None
    if not isinstance(results, dict) or not all(isinstance(v, dict) and isinstance(v.get("metrics"), dict)
                                                for v in results.values()):
        raise ResultsExist(f"{results_file} is not a results file (not an object of tasks and their metrics); move "
                           f"it away or choose another output directory")
    return results


def check_out(out_dir: str | Path, task: str, overwrite: bool = False) -> None:
    """Before a run: refuse an `out_dir` that is not a directory, a results.json that is not ours, and to replace
    `task`'s earlier results, or files of those names that no results.json entry accounts for (a user's), unless
    `overwrite`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ResultsExist(f"--out {out} is not a directory")
    results_file = out / "results.json"
    results = _read_results(results_file)
    if task in results and not overwrite:
        raise ResultsExist(f"{results_file} already holds results for task {task!r}; choose another output "
                           f"directory (--out) or replace them (--overwrite)")
    # the samples of a task results.json lists, and the chart of a results.json, are ours; the same names otherwise
    # are someone else's files
    theirs = [f for f, ours in ((out / f"samples_{task}.jsonl", task in results), (out / "results.png", results))
              if f.exists() and not ours]
    if theirs and not overwrite:
        raise ResultsExist(f"{out} holds {', '.join(f.name for f in theirs)}, which no results.json entry accounts "
                           f"for; choose another output directory (--out) or replace it (--overwrite)")


def write_results(out_dir: str | Path, task: str, metrics: dict, records: list[dict], prompt_version: str,
                  config: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    # two runs finishing into one directory (mc and gen side by side): the read-modify-write of results.json under
    # a lock, so neither task's entry is lost
    with open(out / ".results.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = _read_results(results_file)
        results[task] = _json_safe(dict(metrics=metrics, prompt_version=prompt_version, config=config))
        write_whole(results_file, json.dumps(results, indent=2, sort_keys=True, allow_nan=False) + "\n")
        write_whole(out / f"samples_{task}.jsonl", "".join(json.dumps(_json_safe(r), ensure_ascii=False,
                                                                 allow_nan=False) + "\n" for r in records))
        _chart(out, results)
    return results_file


def save_figure(fig, path: Path) -> None:
    """A PNG written whole (temp file + rename), like the results."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def main_metric(metrics: dict) -> str:
    """The metric a task is charted by: acc (mc), pass@1 (gen, code) or retrieval (needle). Not the first key:
    results.json is written with sorted keys, so a task read back from it would begin with "errors"."""
    named = [k for k in ("acc", "pass@1", "retrieval") if k in metrics]
    return named[0] if named else next(k for k, v in metrics.items() if not k.endswith("_stderr")
                                       and isinstance(v, float))


def _chart(out: Path, results: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:          # the chart is a convenience: results.json holds the numbers
        return
    names = sorted(results)
    main = [main_metric(results[n]["metrics"]) for n in names]
    vals = [results[n]["metrics"][m] for n, m in zip(names, main)]
    errs = [results[n]["metrics"].get(f"{m}_stderr") or 0.0 for n, m in zip(names, main)]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3))
    ax.bar([f"{n}\n{m}" for n, m in zip(names, main)], vals, yerr=errs, capsize=4)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    save_figure(fig, out / "results.png")
    plt.close(fig)


def table(task: str, metrics: dict) -> str:
    """One line a metric: `task  acc  0.4125 +- 0.0318`, then the counts (n, errors, ...) on one line."""
    rows = [(k, v, metrics.get(f"{k}_stderr")) for k, v in metrics.items()
            if not k.endswith("_stderr") and isinstance(v, float)]
    lines = [f"{task:<20} {k:<12} {v:.4f}" + (f" +- {e:.4f}" if isinstance(e, float) and math.isfinite(e) else "")
             for k, v, e in rows]
    counts = [f"{k} {v}" for k, v in metrics.items() if isinstance(v, int) and not isinstance(v, bool)]
    return "\n".join(lines + ([f"{task:<20} " + ", ".join(counts)] if counts else []))
