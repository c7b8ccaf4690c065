"""Evaluation results on disk and on the terminal.

`out_dir/results.json`: {task: {"metrics": {...}, "prompt_version": str, "config": {...}}}, merged with what an
earlier run in the same directory wrote (one file collects a model's tasks); `out_dir/samples_<task>.jsonl`: one
record per question (prompt, choices, log-likelihoods or output, extracted answer, verdict); `out_dir/results.png`:
a bar chart of each task's main metric with its standard error. Each written whole (temp file + rename), with the
user's umask.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _write(path: Path, text: str) -> None:
    """Written whole or not at all; a new file, so it gets the user's umask."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(out_dir: str | Path, task: str, metrics: dict, records: list[dict], prompt_version: str,
                  config: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results[task] = dict(metrics=metrics, prompt_version=prompt_version, config=config)
    _write(results_file, json.dumps(results, indent=2, sort_keys=True) + "\n")
    _write(out / f"samples_{task}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    _chart(out, results)
    return results_file


def _chart(out: Path, results: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:          # the chart is a convenience: results.json holds the numbers
        return
    names = sorted(results)
    main = [next(iter(results[n]["metrics"])) for n in names]
    vals = [results[n]["metrics"][m] for n, m in zip(names, main)]
    errs = [results[n]["metrics"].get(f"{m}_stderr", 0.0) for n, m in zip(names, main)]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3))
    ax.bar([f"{n}\n{m}" for n, m in zip(names, main)], vals, yerr=errs, capsize=4)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)
    plt.close(fig)


def table(task: str, metrics: dict) -> str:
    """One line a metric: `task  acc  0.4125 +- 0.0318`, then the counts (n, errors, ...) on one line."""
    rows = [(k, v, metrics.get(f"{k}_stderr")) for k, v in metrics.items()
            if not k.endswith("_stderr") and isinstance(v, float)]
    lines = [f"{task:<20} {k:<12} {v:.4f}" + (f" +- {e:.4f}" if e is not None else "") for k, v, e in rows]
    counts = [f"{k} {v}" for k, v in metrics.items() if isinstance(v, int) and not isinstance(v, bool)]
    return "\n".join(lines + ([f"{task:<20} " + ", ".join(counts)] if counts else []))
