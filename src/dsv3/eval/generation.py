"""Generate -> extract -> match (GSM8K / MATH / SimpleQA style), with pass@k and maj@k over k samples per problem.

Task rows (jsonl or parquet): `{"question": str, "answer": str}` (also read: MATH's and SimpleQA's `problem`, MATH's
`solution`); worked answers (GSM8K's "... #### 72", MATH's "... \\boxed{72}") are read through the same strict
extraction as model outputs, so the gold answer is "72".

Two ways to match (`match`):
- "math": dsv3.verify's extraction (tags, \\boxed, "Answer: X", ####, else the last number) and equivalence
  (numeric, symbolic): the GRPO reward's rules;
- "text" (factual QA, English or Chinese): the answer is the strict extraction if any, else the output's first
  non-empty line; it matches when equal to the gold after lowercasing and dropping punctuation, English articles
  and whitespace (SQuAD's normalisation, with every Unicode punctuation mark, so "巴黎。" matches "巴黎"). SimpleQA
  grades with a model; this is the exact-match proxy, so it under-counts paraphrases. The prompt is "Question: ...
\\nAnswer:" after the few-shot examples (each with its full worked answer), and generation stops at the next
"Question:". With a chat template (`chat`, a dsv3.data.chat.ChatTemplate: a post-trained chat model, the GRPO
demo's policy) the question is instead one user turn rendered as the server renders it (few-shot examples as
earlier user / assistant turns), with the template's own BOS and generation prompt, and generation stops at EOS.
Every sample's record keeps the output, the extracted answer (None when extraction failed: counted as
wrong, never a crash), the verdict and the backend's error if it had one (counted as wrong too).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from .backends import GenerateBackend, failure
from ..verify.extract import equivalent, extract_answer, normalize
from .multiple_choice import TaskError, encode_text, read_rows
from .stats import binomial_stderr, bootstrap_stderr, majority_answer, pass_at_k


def _qa(r, where: str, index: int = 0) -> dict:
    q = r.get("question", r.get("problem")) if isinstance(r, dict) else None
    a = r.get("answer", r.get("solution")) if isinstance(r, dict) else None
    if not isinstance(q, str) or not q.strip() or not isinstance(a, (str, int, float)) or isinstance(a, bool):
        raise TaskError(f"{where}: a row needs a string 'question' (or 'problem') and an 'answer' (or 'solution')")
    gold = extract_answer(str(a), flexible=False) or str(a).strip()
    return dict(question=q, answer=str(a), gold=gold)


def text_key(ans: str) -> str:
    """SQuAD's answer normalisation, for any script: lowercase, no punctuation, no English articles, no spaces."""
    s = "".join(" " if unicodedata.category(c).startswith("P") else c for c in ans.lower())
    return "".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def text_answer(output: str) -> str | None:
    """The strict extraction, else the first non-empty line; None for an empty output."""
    got = extract_answer(output, flexible=False)
    if got is not None:
        return got
    lines = [x.strip() for x in output.splitlines() if x.strip()]
    return lines[0] if lines else None


def _judge(answers: list, gold: str, match: str) -> tuple[list[bool], bool]:
    """(each answer's verdict, the majority answer's verdict)."""
    if match == "text":
        keys = [None if a is None else text_key(a) for a in answers]
        return [k is not None and k == text_key(gold) for k in keys], majority_answer(keys) == text_key(gold)
    major = majority_answer([None if a is None else normalize(a) for a in answers])
    return [equivalent(a, gold) for a in answers], equivalent(major, gold)


def read_qa(path: str | Path, bad: list[dict] | None = None) -> list[dict]:
    """All rows of a question-answer task file; a bad row is an error naming it, or goes to `bad` (read_mc)."""
    return read_rows(path, "a question-answer task", _qa, bad)


def qa_prompt(q: dict, fewshot: list[dict] = ()) -> str:
    shots = "".join(f"Question: {x['question'].strip()}\nAnswer: {x['answer'].strip()}\n\n" for x in fewshot)
    return shots + f"Question: {q['question'].strip()}\nAnswer:"


def chat_messages(q: dict, fewshot: list[dict] = ()) -> list[dict]:
    """The question as the last user turn of a conversation whose earlier turns are the few-shot examples."""
    shots = [m for x in fewshot for m in ({"role": "user", "content": x["question"].strip()},
                                          {"role": "assistant", "content": x["answer"].strip()})]
    return shots + [{"role": "user", "content": q["question"].strip()}]


def score_generation(backend: GenerateBackend, tokenizer, questions: list[dict], fewshot: list[dict] = (), k: int = 1,
                     temperature: float = 0.0, max_tokens: int = 256, add_bos: bool = True, seed: int = 0,
                     flexible: bool = True, match: str = "math", chat=None) -> tuple[dict, list[dict]]:
    """({pass@1, pass@k, maj@k with standard errors, extraction_failures and errors (backend) counted in samples,
    samples, n}, one record per question). `chat`: a ChatTemplate (module docstring; `add_bos` is then the
    template's business)."""
    if match not in ("math", "text"):
        raise ValueError(f"match must be 'math' or 'text', got {match!r}")
    if chat is not None:
        convs = [chat_messages(q, fewshot) for q in questions]
        prompts = [chat.render(c) for c in convs]
        outs = backend.generate([chat.encode(tokenizer, c) for c in convs], k, temperature, max_tokens, [], seed)
    else:
        bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
        prompts = [qa_prompt(q, fewshot) for q in questions]
        outs = backend.generate([bos + encode_text(tokenizer, p) for p in prompts], k, temperature, max_tokens,
                                ["Question:"], seed)
    records, p1, pk, mk, failed, errored = [], [], [], [], 0, 0
    for q, prompt, texts in zip(questions, prompts, outs):
        errors = [failure(t) for t in texts]
        extract = text_answer if match == "text" else (lambda t: extract_answer(t, flexible))
        answers = [None if e else extract(t) for t, e in zip(texts, errors)]
        verdicts, major_ok = _judge(answers, q["gold"], match)
        failed += sum(a is None and e is None for a, e in zip(answers, errors))
        errored += sum(e is not None for e in errors)
        c = sum(verdicts)
        p1.append(pass_at_k(k, c, 1))
        pk.append(pass_at_k(k, c, k))
        mk.append(float(major_ok))
        records.append(dict(prompt=prompt, gold=q["gold"], outputs=[str(t) for t in texts], extracted=answers,
                            correct=verdicts, **({"errors": errors} if any(errors) else {})))
    n = len(records)
    mean = lambda xs: sum(xs) / n
    metrics = {"pass@1": mean(p1), "pass@1_stderr": bootstrap_stderr(p1) if k > 1 else binomial_stderr(mean(p1), n)}
    if k > 1:
        metrics.update({f"pass@{k}": mean(pk), f"pass@{k}_stderr": binomial_stderr(mean(pk), n),
                        f"maj@{k}": mean(mk), f"maj@{k}_stderr": binomial_stderr(mean(mk), n)})
    metrics.update(extraction_failures=failed, errors=errored, samples=n * k, n=n)
    return metrics, records
