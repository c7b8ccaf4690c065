"""Generate -> extract -> match (GSM8K / MATH style), with pass@k and maj@k over k samples per problem.

Task rows (jsonl or parquet): `{"question": str, "answer": str}`; GSM8K's worked answers ("... #### 72") are read
through the same strict extraction as model outputs, so the gold answer is "72". The prompt is "Question: ...
\\nAnswer:" after the few-shot examples (each with its full worked answer), and generation stops at the next
"Question:". Every sample's record keeps the output, the extracted answer (None when extraction failed: counted as
wrong, never a crash), the verdict and the backend's error if it had one (counted as wrong too).
"""

from __future__ import annotations

from pathlib import Path

from .backends import GenerateBackend, failure
from ..verify.extract import equivalent, extract_answer, normalize
from .multiple_choice import TaskError, read_rows
from .stats import binomial_stderr, bootstrap_stderr, majority_answer, pass_at_k


def _qa(r, where: str, index: int = 0) -> dict:
    if not (isinstance(r, dict) and isinstance(r.get("question"), str)
            and isinstance(r.get("answer"), (str, int, float))):
        raise TaskError(f"{where}: a row needs a string 'question' and an 'answer'")
    gold = extract_answer(str(r["answer"]), flexible=False) or str(r["answer"]).strip()
    return dict(question=r["question"], answer=str(r["answer"]), gold=gold)


def read_qa(path: str | Path, bad: list[dict] | None = None) -> list[dict]:
    """All rows of a question-answer task file; a bad row is an error naming it, or goes to `bad` (read_mc)."""
    return read_rows(path, "a question-answer task", _qa, bad)


def qa_prompt(q: dict, fewshot: list[dict] = ()) -> str:
    shots = "".join(f"Question: {x['question'].strip()}\nAnswer: {x['answer'].strip()}\n\n" for x in fewshot)
    return shots + f"Question: {q['question'].strip()}\nAnswer:"


def score_generation(backend: GenerateBackend, tokenizer, questions: list[dict], fewshot: list[dict] = (), k: int = 1,
                     temperature: float = 0.0, max_tokens: int = 256, add_bos: bool = True, seed: int = 0,
                     flexible: bool = True) -> tuple[dict, list[dict]]:
    """({pass@1, pass@k, maj@k with standard errors, extraction_failures, errors (backend), n}, one record per
    question)."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    prompts = [qa_prompt(q, fewshot) for q in questions]
    outs = backend.generate([bos + tokenizer.encode(p) for p in prompts], k, temperature, max_tokens,
                            ["Question:"], seed)
    records, p1, pk, mk, failed, errored = [], [], [], [], 0, 0
    for q, prompt, texts in zip(questions, prompts, outs):
        errors = [failure(t) for t in texts]
        answers = [None if e else extract_answer(t, flexible) for t, e in zip(texts, errors)]
        verdicts = [equivalent(a, q["gold"]) for a in answers]
        failed += sum(a is None and e is None for a, e in zip(answers, errors))
        errored += sum(e is not None for e in errors)
        c = sum(verdicts)
        p1.append(pass_at_k(k, c, 1))
        pk.append(pass_at_k(k, c, k))
        mk.append(float(equivalent(majority_answer([None if a is None else normalize(a) for a in answers]),
                                   q["gold"])))
        records.append(dict(prompt=prompt, gold=q["gold"], outputs=[str(t) for t in texts], extracted=answers,
                            correct=verdicts, **({"errors": errors} if any(errors) else {})))
    n = len(records)
    mean = lambda xs: sum(xs) / n
    metrics = {"pass@1": mean(p1), "pass@1_stderr": bootstrap_stderr(p1) if k > 1 else binomial_stderr(mean(p1), n)}
    if k > 1:
        metrics.update({f"pass@{k}": mean(pk), f"pass@{k}_stderr": binomial_stderr(mean(pk), n),
                        f"maj@{k}": mean(mk), f"maj@{k}_stderr": binomial_stderr(mean(mk), n)})
    metrics.update(extraction_failures=failed, errors=errored, n=n)
    return metrics, records
