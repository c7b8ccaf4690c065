"""Post-training / evaluation audit: defects of `dsv3 eval`'s scoring and report a user hits with ordinary task
files, each test failing on the code before its fix."""

from __future__ import annotations

import json

import matplotlib.axes
import pytest

from dsv3.eval import run
from dsv3.eval.report import write_results


class CharTokenizer:
    bos_id = 1

    def encode(self, text):
        return [ord(c) % 250 + 3 for c in text]


class Loglik:
    """Every continuation scores -(its tokens): the shortest choice is acc's answer."""

    def loglikelihoods(self, pairs):
        return [-float(len(cont)) for _, cont in pairs]


class Constant:
    def generate(self, prompts, k, temperature, max_tokens, stop, seed):
        return [[" 4"] * k for _ in prompts]


def _bars(monkeypatch) -> list:
    """The (labels, heights) of every bar chart drawn."""
    drawn, bar = [], matplotlib.axes.Axes.bar

    def spy(self, x, height, *args, **kwargs):
        drawn.append((list(x), list(height)))
        return bar(self, x, height, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy)
    return drawn


def test_results_chart_keeps_each_tasks_main_metric_after_another_task(tmp_path, monkeypatch):
    """results.json is written with sorted keys, so a task read back had "errors" as its first metric: the chart of
    a directory holding gen / code / needle results drew their error counts, not pass@1 / retrieval."""
    drawn = _bars(monkeypatch)
    out = tmp_path / "o"
    write_results(out, "gsm", {"pass@1": 0.5, "pass@1_stderr": 0.1, "extraction_failures": 3, "errors": 0,
                               "samples": 4, "n": 4}, [], "v", {})
    write_results(out, "needle", {"retrieval": 0.75, "errors": 0, "n": 4, "grid": {}}, [], "v", {})
    write_results(out, "mmlu", {"acc": 0.25, "acc_stderr": 0.1, "acc_norm": 0.5, "errors": 0, "n": 4}, [], "v", {})
    assert drawn[-1] == (["gsm\npass@1", "mmlu\nacc", "needle\nretrieval"], [0.5, 0.25, 0.75])


def test_an_empty_choice_scored_as_text_is_never_the_acc_norm_answer(tmp_path):
    """--continuation text with a choice "" divided its log-likelihood by 0 characters: a ZeroDivisionError after
    every question was scored, no results written. lm-eval's acc_norm (numpy) makes it -inf: never picked."""
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"question": "2+2?", "choices": ["four", "", "5"], "answer": 0}) + "\n" +
                    json.dumps({"question": "1+1?", "choices": ["22", "two"], "answer": 1}) + "\n")
    m = run.evaluate_mc(Loglik(), CharTokenizer(), task, tmp_path / "o", continuation="text")
    records = [json.loads(x) for x in (tmp_path / "o" / "samples_t.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in records] == [1, 0]          # acc: the fewest tokens, the empty choice included
    assert [r["prediction_norm"] for r in records] == [0, 1]     # per character: -5/4 > -2/1 > -1/0; -4/3 > -3/2
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0


def test_more_fewshot_examples_than_the_file_holds_is_named(tmp_path):
    """dsv3 eval gen --fewshot 5 with a 2-row --fewshot-file failed with random.sample's "Sample larger than
    population or is negative"; mc takes what the file holds (and records how many): gen now does the same."""
    task = tmp_path / "qa.jsonl"
    task.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n" +
                    json.dumps({"question": "3+1?", "answer": "4"}) + "\n")
    m = run.evaluate_generation(Constant(), CharTokenizer(), task, tmp_path / "o", fewshot_file=task, fewshot=5)
    assert m["pass@1"] == 1.0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["qa"]["config"]["fewshot"] == 2


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
