"""Code with execution (HumanEval / LiveCodeBench style): generate k programs a problem, run each against the
problem's tests in the sandbox the GRPO code reward uses (dsv3.verify.sandbox: time limit, memory limit, no network,
process group killed), and report unbiased pass@k.

Task rows (jsonl or parquet), two kinds, told apart by their fields:
- call-based, HumanEval's fields: `{"task_id", "prompt", "test", "entry_point"}`; `test` defines
  `check(candidate)`. The model continues the prompt (a signature and docstring); generation stops where a new
  top-level statement starts (Codex's stop sequences). The program is the prompt + the completion, then the tests,
  then `check(entry_point)`, then a per-run nonce that must be the last line printed (sandbox.run_tests: exiting
  early with status 0 does not pass).
- stdin/stdout, LiveCodeBench's: `{"question", "tests": [{"input", "output"}, ...]}` (also read:
  `question_content` and `public_test_cases`, a list or a JSON string of them; the `functional` test type and
  LiveCodeBench's pickled private tests are not read). The prompt asks for a program in a ```python block;
  generation stops at the closing fence. Each test runs the program once with its input on stdin; it passes when
  the output lines equal the expected ones, each compared without trailing whitespace and trailing blank lines
  ignored (LiveCodeBench's line-wise comparison, without its float tolerance). The first failing test ends it.
A completion holding a ```python block is read as that block (a chat model answers that way): call-based, it is
put after the prompt, so the prompt's imports stay and its function is redefined.

Every sample gets a verdict: "passed", "failed" (a test's assertion or output), "timeout", "error" (an exception,
with its last line), or the backend's error; none stops the run.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..verify.sandbox import SandboxResult, run_python, run_tests, self_check
from .backends import GenerateBackend, failure
from .multiple_choice import TaskError, encode_text, read_rows
from .stats import bootstrap_stderr, pass_at_k

CALL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]     # Chen et al. 2021 (Codex), HumanEval
STDIO_STOP = ["```"]
STDIO_INSTRUCTION = ("\n\nWrite a Python 3 program that reads the input from standard input and prints the answer to "
                     "standard output.\n```python\n")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|$)", re.S | re.I)     # an opened python block


@dataclass
class CodeProblem:
    task_id: str
    prompt: str                      # what the model continues
    kind: str                        # "call" | "stdio"
    test: str = ""                   # call: code defining check(candidate)
    entry_point: str = ""            # call: the function check() is given
    io: list[tuple[str, str]] = field(default_factory=list)     # stdio: (stdin, expected stdout)


def _stdio_tests(row: dict, where: str) -> list[tuple[str, str]]:
    tests = row.get("tests", row.get("public_test_cases"))
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            raise TaskError(f"{where}: 'public_test_cases' is not JSON") from None
    if not isinstance(tests, list) or not tests:
        raise TaskError(f"{where}: 'tests' must be a non-empty list of {{input, output}}")
    out = []
    for t in tests:
        if not (isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str)):
            raise TaskError(f"{where}: each test needs a string 'input' and 'output'")
        if t.get("testtype", "stdin") != "stdin":
            raise TaskError(f"{where}: test type {t['testtype']!r} is not read (stdin tests only)")
        out.append((t["input"], t["output"]))
    return out


def _problem(row, where: str, index: int) -> CodeProblem:
    if not isinstance(row, dict):
        raise TaskError(f"{where}: a row must be an object")
    task_id = str(row.get("task_id", row.get("question_id", index)))
    if "entry_point" in row or "test" in row:
        prompt, test, entry = row.get("prompt"), row.get("test"), row.get("entry_point")
        if not all(isinstance(x, str) and x.strip() for x in (prompt, test, entry)):
            raise TaskError(f"{where}: a call-based row needs string 'prompt', 'test' and 'entry_point'")
        if not entry.isidentifier():
            raise TaskError(f"{where}: 'entry_point' {entry!r} is not a Python name")
        return CodeProblem(task_id, prompt, "call", test=test, entry_point=entry)
    question = row.get("question", row.get("question_content"))
    if not isinstance(question, str) or not question.strip():
        raise TaskError(f"{where}: a row needs 'prompt', 'test' and 'entry_point' (call-based) or 'question' and "
                        "'tests' (stdin/stdout)")
    return CodeProblem(task_id, question.strip() + STDIO_INSTRUCTION, "stdio", io=_stdio_tests(row, where))


def read_code(path: str | Path, bad: list[dict] | None = None) -> list[CodeProblem]:
    """All problems of a jsonl or parquet task file; a bad row is an error naming it, or goes to `bad` (read_mc)."""
    return read_rows(path, "a code task", _problem, bad)


def program(problem: CodeProblem, completion: str) -> str:
    """The code a completion stands for (module docstring: a fenced block, else the prompt's continuation)."""
    m = _FENCE.search(completion)
    if problem.kind == "stdio":      # the prompt opened the block: the code ends where the model closes it
        return m.group(1) if m else completion.split("```")[0]
    return problem.prompt + "\n" + m.group(1) if m else problem.prompt + completion


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


def _last_line(result: SandboxResult) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1][:300] if lines else f"exit status {result.returncode}"


def judge(problem: CodeProblem, completion: str, **limits) -> tuple[str, str]:
    """(verdict, detail) of one completion: passed / failed / timeout / error."""
    code = program(problem, completion)
    if problem.kind == "call":
        ok, r = run_tests(code, f"{problem.test}\n\ncheck({problem.entry_point})", **limits)
        if ok:
            return "passed", ""
        if r.timed_out:
            return "timeout", ""
        last = _last_line(r)
        return ("failed" if last.startswith("AssertionError") or r.returncode == 0 else "error"), last
    for i, (stdin, want) in enumerate(problem.io):
        r = run_python(code, stdin=stdin, **limits)
        if r.timed_out:
            return "timeout", f"test {i}"
        if r.returncode != 0:
            return "error", f"test {i}: {_last_line(r)}"
        if _lines(r.stdout) != _lines(want):
            return "failed", f"test {i}: expected {want[:80]!r}, got {r.stdout[:80]!r}"
    return "passed", ""


def score_code(backend: GenerateBackend, tokenizer, problems: list[CodeProblem], k: int = 1,
               temperature: float = 0.0, max_tokens: int = 512, add_bos: bool = True, seed: int = 0,
               workers: int = 2, **limits) -> tuple[dict, list[dict]]:
    """({pass@1, pass@k with standard errors, samples_<verdict> counts, errors (backend), samples, n}, one record
    per problem)."""
    self_check(**limits)       # a sandbox that cannot run print() is the machine's fault: one error, not n zeros
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    calls = [p for p in problems if p.kind == "call"]
    stdio = [p for p in problems if p.kind == "stdio"]
    outs = {}
    for group, stop in ((calls, CALL_STOP), (stdio, STDIO_STOP)):
        if group:
            texts = backend.generate([bos + encode_text(tokenizer, p.prompt) for p in group], k, temperature,
                                     max_tokens, stop, seed)
            outs.update({id(p): t for p, t in zip(group, texts)})
    jobs = [(p, t) for p in problems for t in outs[id(p)]]

    def run(job):
        p, t = job
        err = failure(t)
        return ("backend-error", err) if err is not None else judge(p, t, **limits)
    with ThreadPoolExecutor(max(1, workers)) as pool:       # each job waits on a child process
        verdicts = list(pool.map(run, jobs))
    records, p1, pk, counts = [], [], [], {}
    for i, p in enumerate(problems):
        vs = verdicts[i * k:(i + 1) * k]
        c = sum(v == "passed" for v, _ in vs)
        p1.append(pass_at_k(k, c, 1))
        pk.append(pass_at_k(k, c, k))
        for v, _ in vs:
            counts[v] = counts.get(v, 0) + 1
        records.append(dict(task_id=p.task_id, kind=p.kind, prompt=p.prompt,
                            outputs=[str(t) for t in outs[id(p)]], verdicts=[v for v, _ in vs],
                            details=[d for _, d in vs], correct=[v == "passed" for v, _ in vs]))
    n = len(problems)
    metrics = {"pass@1": sum(p1) / n, "pass@1_stderr": bootstrap_stderr(p1)}
    if k > 1:
        metrics.update({f"pass@{k}": sum(pk) / n, f"pass@{k}_stderr": bootstrap_stderr(pk)})
    metrics.update({f"samples_{v}": c for v, c in sorted(counts.items())}, errors=counts.get("backend-error", 0),
                   samples=len(jobs), n=n)
    return metrics, records
