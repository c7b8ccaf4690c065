"""Log-likelihood multiple choice (MMLU / ARC style), scored as lm-evaluation-harness scores it.

Task rows (jsonl or parquet): `{"question": str, "choices": [str, ...], "answer": int | "A".."Z"}` (MMLU's fields;
`answer` as an index or a letter). Also read: ARC's `{"question", "choices": {"text": [...], "label": [...]},
"answerKey"}` and GPQA's `{"Question", "Correct Answer", "Incorrect Answer 1".."3"}` (the four put in an order
seeded by the row's index, the same every run, as GPQA's own files leave the order to the evaluator). The prompt is
MMLU's: the question, one "A. choice" line per choice, "Answer:"; each choice is scored as the continuation " A"
(`continuation="letter"`) or " <choice text>" (`"text"`, ARC / HellaSwag style). Few-shot examples come from a separate
dev list, each shown with its answer, in the same format.

Scoring follows lm-eval's causal-LM conventions, so numbers are comparable with it (issue 19):
- `encode_pair`: trailing whitespace of the context moves onto the continuation, and the continuation's ids are the
  tail of the ids of context + continuation (not its own encoding: BPE merges across the boundary);
- BOS: the context starts with the tokenizer's BOS when `add_bos` is on, as lm-eval's `hf` backend does for a
  tokenizer with `add_bos_token` (ours: `tokenizer_config.json` says so); a model trained on documents that start
  with BOS scores very differently without it (up to 1.4 nats per choice on the tiny model);
- acc: the choice of highest summed log-likelihood is the answer (ties: the first); acc_norm: the same after dividing
  each by its choice's length in characters (lm-eval counts the choice without the delimiter, our leading space;
  counting it gave a different acc_norm on 1 question in 240 in benchmarks/eval_crosscheck.py).

A backend (dsv3.eval.backends) turns (context ids, continuation ids) pairs into summed log-likelihoods: a local model
through the engine, or any OpenAI-compatible server.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import string
from dataclasses import dataclass
from pathlib import Path

from ..data.records import RecordError, iter_records
from .backends import LoglikBackend, failure
from .stats import binomial_stderr

LETTERS = string.ascii_uppercase
PROMPT_LAYOUT = "mmlu-v1"      # mc_prompt's layout; bump when it changes (results.json records it)


class TaskError(ValueError):
    """A task file or row that cannot be used; the message names the file and row."""


@dataclass
class MCQuestion:
    question: str
    choices: list[str]
    answer: int


def _fields(row: dict, where: str, index: int) -> tuple:
    """(question, choices, answer) from MMLU's, ARC's or GPQA's field names."""
    if "Correct Answer" in row:                                          # GPQA
        wrong = [row.get(f"Incorrect Answer {i}") for i in (1, 2, 3)]
        choices = [row["Correct Answer"], *wrong]
        order = list(range(4))
        random.Random(index).shuffle(order)
        return row.get("Question"), [choices[i] for i in order], order.index(0)
    choices, ans = row.get("choices"), row.get("answer", row.get("answerKey"))
    if isinstance(choices, dict) and isinstance(choices.get("text"), list):      # ARC
        labels = [str(x) for x in choices.get("label") or []]
        if str(ans) not in labels:
            raise TaskError(f"{where}: 'answerKey' {ans!r} is not one of the labels {labels}")
        return row.get("question"), choices["text"], labels.index(str(ans))
    return row.get("question"), choices, ans


def _question(row, where: str, index: int = 0) -> MCQuestion:
    if not isinstance(row, dict):
        raise TaskError(f"{where}: a row must be an object with question, choices and answer")
    q, choices, ans = _fields(row, where, index)
    if not isinstance(q, str) or not q.strip():
        raise TaskError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
        raise TaskError(f"{where}: 'choices' must be a list of 2 to 26 strings")
    if isinstance(ans, str) and len(ans) == 1 and ans.upper() in LETTERS:
        ans = LETTERS.index(ans.upper())
    if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(choices):
        raise TaskError(f"{where}: 'answer' must be a choice index (0..{len(choices) - 1}) or letter, got {ans!r}")
    return MCQuestion(q, choices, ans)


def read_mc(path: str | Path, bad: list[dict] | None = None) -> list[MCQuestion]:
    """All questions of a jsonl or parquet task file. A bad row is a TaskError naming it, or, when `bad` is a list,
    appended there ({where, error}) and skipped (what `dsv3 eval` does: counted, reported, never the end of a run)."""
    return read_rows(path, "a multiple-choice task", _question, bad)


def read_rows(path: str | Path, what: str, parse, bad: list[dict] | None = None) -> list:
    """parse(row, where, row index) over a task file's rows; bad rows raise or go to `bad` (see read_mc). A file that
    cannot be read, or has no usable row, is a TaskError either way."""
    out = []
    for i, (where, row) in enumerate(task_rows(path, what, lenient=bad is not None)):
        try:
            if isinstance(row, RecordError):
                raise TaskError(f"{where}: {row}")
            out.append(parse(row, where, i))
        except TaskError as e:
            if bad is None:
                raise
            bad.append(dict(where=where, error=str(e)))
    if not out:
        raise TaskError(f"{path} holds no usable rows" + (f" ({len(bad)} bad; the first: {bad[0]['error']})"
                                                         if bad else ""))
    return out


def task_rows(path: str | Path, what: str, lenient: bool = False) -> list[tuple[str, object]]:
    """(where, row) of a task file; an unreadable file is a TaskError, and so is a row that is not JSON unless
    `lenient` (then it comes back as its RecordError)."""
    if not Path(path).exists() and not Path(path).suffix:       # `--task mmlu`: a benchmark's name, not a file
        raise TaskError(f"{path} is not a file: dsv3 eval reads task files (.jsonl / .parquet); to run "
                        f"lm-evaluation-harness's {Path(path).name!r} by name, serve the model (dsv3 serve) and run "
                        f"lm_eval --model local-completions against it (README, Evaluate)")
    try:
        rows = list(iter_records(path, what))
    except RecordError as e:
        raise TaskError(str(e)) from None
    for where, row in rows:
        if isinstance(row, RecordError) and not lenient:
            raise TaskError(f"{where}: {row}")
    if not rows:
        raise TaskError(f"{path} holds no questions")
    return rows


def mc_prompt(q: MCQuestion, fewshot: list[MCQuestion] = ()) -> str:
    def block(x: MCQuestion) -> str:
        return x.question.strip() + "\n" + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(x.choices)) + \
            "Answer:"
    shots = "".join(f"{block(x)} {LETTERS[x.answer]}\n\n" for x in fewshot)
    return shots + block(q)


def lm_eval_yaml(name: str, data_file: str | Path, continuation: str = "letter", cache_dir: str | Path | None = None
                 ) -> str:
    """An lm-evaluation-harness task (YAML) that prompts and scores a task file exactly as `score_mc` does:
    doc_to_text builds mc_prompt's string, the choices are `continuations`' without their leading space (lm-eval's
    target_delimiter adds it). `answer` must be an index there. Paths are written absolute: `datasets` resolves
    relative ones against the cwd."""
    if continuation not in ("letter", "text"):
        raise ValueError(f"continuation must be 'letter' or 'text', got {continuation!r}")
    letters = "[" + ",".join(f"'{x}'" for x in LETTERS) + "]"
    choice = "{{choices}}" if continuation == "text" else "{{ " + letters + "[:choices|length] }}"
    cache = f"  cache_dir: {json.dumps(str(Path(cache_dir).resolve()))}\n" if cache_dir else ""
    text = "{{question.strip()}}\\n{% for c in choices %}{{ 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[loop.index0] }}. {{c}}" \
           "\\n{% endfor %}Answer:"
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n{cache}  data_files:\n"
            f"    test: {json.dumps(str(Path(data_file).resolve()))}\ntest_split: test\noutput_type: multiple_choice\n"
            f'doc_to_text: "{text}"\ntarget_delimiter: " "\ndoc_to_choice: "{choice}"\n'
            f'doc_to_target: "{{{{answer}}}}"\nmetric_list:\n'
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
            f"metadata:\n  version: 1.0\n  dsv3_prompt: {PROMPT_LAYOUT}\n")


def continuations(q: MCQuestion, continuation: str = "letter") -> list[str]:
    if continuation not in ("letter", "text"):
        raise ValueError(f"continuation must be 'letter' or 'text', got {continuation!r}")
    return [" " + (LETTERS[i] if continuation == "letter" else c) for i, c in enumerate(q.choices)]


def encode_text(tokenizer, text: str) -> list[int]:
    """Task text as text: a special-token string in a question, a choice, a code prompt or a haystack becomes
    ordinary tokens, never a control token (a question quoting `<｜end▁of▁sentence｜>` does not end the document;
    lm-eval's `hf` backend would read it as the control token, the one place the two can differ). A tokenizer without
    the switch (a test's stand-in) encodes as it does."""
    if "split_special_tokens" in inspect.signature(tokenizer.encode).parameters:
        return tokenizer.encode(text, split_special_tokens=True)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = encode_text(tokenizer, context + continuation), encode_text(tokenizer, context)
    cont = whole[len(ctx):]
    if not cont:
        raise TaskError(f"continuation {continuation!r} adds no token after its context")
    if add_bos and tokenizer.bos_id is not None:
        ctx = [tokenizer.bos_id] + ctx
    return ctx, cont


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def score_mc(backend: LoglikBackend, tokenizer, questions: list[MCQuestion], fewshot: list[MCQuestion] = (),
             add_bos: bool = True, continuation: str = "letter") -> tuple[dict, list[dict]]:
    """({acc, acc_stderr, acc_norm, acc_norm_stderr, errors, n}, one record per question: prompt, log-likelihoods,
    predictions, verdicts; a question the backend failed on is wrong, its record holds the error)."""
    pairs, spans = [], []
    for q in questions:
        ctx, conts = mc_prompt(q, fewshot), continuations(q, continuation)
        spans.append((len(pairs), ctx, conts))
        pairs += [encode_pair(tokenizer, ctx, c, add_bos) for c in conts]
    lls = backend.loglikelihoods(pairs)
    records, errored = [], 0
    for q, (start, ctx, conts) in zip(questions, spans):
        ll = lls[start:start + len(conts)]
        errors = [e for e in map(failure, ll) if e]
        if errors:                   # a choice the backend could not score: the question counts as wrong
            errored += 1
            records.append(dict(prompt=ctx, choices=conts, loglikelihoods=None, answer=q.answer, prediction=None,
                                prediction_norm=None, correct=False, correct_norm=False, error=errors[0]))
            continue
        # lm-eval's acc_norm divides by the choice's length without the target delimiter (our leading space); an
        # empty choice ("" scored as text) is -inf there (numpy's x / 0), never the answer, not a ZeroDivisionError
        pred = _argmax(ll)
        pred_norm = _argmax([x / len(c[1:]) if c[1:] else -math.inf for x, c in zip(ll, conts)])
        records.append(dict(prompt=ctx, choices=conts, loglikelihoods=ll, answer=q.answer, prediction=pred,
                            prediction_norm=pred_norm, correct=pred == q.answer, correct_norm=pred_norm == q.answer))
    n = len(records)
    acc = sum(r["correct"] for r in records) / n
    acc_norm = sum(r["correct_norm"] for r in records) / n
    return dict(acc=acc, acc_stderr=binomial_stderr(acc, n), acc_norm=acc_norm,
                acc_norm_stderr=binomial_stderr(acc_norm, n), errors=errored, n=n), records
