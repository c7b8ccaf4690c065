"""Tasks with verifiable answers for GRPO: seeded procedural ones (issue 18's demo: multi-digit arithmetic and
Countdown) and code problems read from a file, judged by running the program against the problem's tests in
dsv3.verify.sandbox (time limit, RLIMIT_AS, no network, a temporary directory, the process group killed).

Countdown (as in TinyZero's RL demo): reach a target with + - * / and parentheses, each given number used at most
once. The answer is checked by walking the expression's `ast` with exact rational arithmetic; nothing is ever
evaluated by Python (a model's output is untrusted text), and any node other than numbers and the four operators
is rejected.

Splits: a problem's split is a function of the problem itself (sha256 of its canonical key), not of the seed, so the
train and held-out sets cannot share a problem whatever seeds or sizes are asked for; the seed only picks which
problems of a split are drawn (reproducibly: random.Random seeded by a string). A code task file is used whole
(its rows are the user's training split).

Code tasks (`read_code_tasks`): jsonl / parquet rows `{"prompt", "tests"}` (tests: asserts run after the program)
or HumanEval's `{"prompt", "test", "entry_point"}` (then `check(entry_point)` is the test). The program is the
response's first fenced ```python block, else its <answer> content, else the whole response; the reward is 1 when
the program followed by the tests runs to the end (sandbox.run_tests), else 0 (a failed assert, an exception, the
time or memory limit).
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from ..data.records import RecordError, iter_records
from ..verify.extract import equivalent, extract_answer, tagged_answer
from ..verify.sandbox import run_tests

HELDOUT_PER_MILLE = 100          # 10% of all problems are held out
MAX_EXPR_CHARS = 200             # bounds the parser's work on untrusted text
INSTRUCTION = "Think inside <think></think>, then give only the final answer inside <answer></answer>."


@dataclass(frozen=True)
class Task:
    kind: str                    # "arithmetic" | "countdown" | "code"
    prompt: str
    answer: str                  # arithmetic: the value; countdown: one valid expression (any valid one is accepted)
    numbers: tuple[int, ...]
    target: int
    key: str                     # canonical problem identity, decides the split (code: the row's file:line)
    tests: str = ""              # code: the asserts run after the program


def split_of(key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 1000
    return "heldout" if bucket < HELDOUT_PER_MILLE else "train"


def arithmetic_key(a: int, op: str, b: int) -> str:
    """12+34 and 34+12 are one problem, so they get one key (and one split); a-b and b-a are two."""
    x, y = (min(a, b), max(a, b)) if op in "+*" else (a, b)
    return f"arith:{x}{op}{y}"


def arithmetic_task(rng: random.Random, digits: int = 3, ops: str = "+-*") -> Task:
    """a op b with a, b of exactly `digits` digits, op one of `ops` (a subset of + - *)."""
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Task("arithmetic", f"Compute {a} {op} {b}. {INSTRUCTION}", str(value), (a, b), value,
                arithmetic_key(a, op, b))


def countdown_task(rng: random.Random, n_numbers: int = 4, max_number: int = 25) -> Task:
    """Numbers 1..max_number and a target built from all of them by random exact operations (so one solution
    exists); targets that are one of the numbers or not positive are redrawn."""
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(n_numbers)]
        pool = [(n, str(n)) for n in numbers]
        rng.shuffle(pool)
        while len(pool) > 1:
            (a, ea), (b, eb) = pool.pop(), pool.pop()
            if a < b:
                (a, ea), (b, eb) = (b, eb), (a, ea)
            ops = ["+", "-", "*"] + (["/"] if b > 1 and a % b == 0 else [])
            op = rng.choice(ops)
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
            pool.append((value, f"({ea} {op} {eb})"))
        target, expr = pool[0]
        if target > 0 and target not in numbers:
            break
    nums = tuple(sorted(numbers))
    prompt = (f"Using the numbers {list(nums)}, each at most once, with + - * / and parentheses, write an expression "
              f"equal to {target}. {INSTRUCTION}")
    return Task("countdown", prompt, expr[1:-1], nums, target, f"countdown:{nums}->{target}")


MAKERS = {"arithmetic": arithmetic_task, "countdown": countdown_task}


def generate_tasks(kind: str, split: str, n: int, seed: int, **kwargs) -> list[Task]:
    """n distinct problems of `split` ("train" | "heldout"), reproducible from (kind, split, seed, kwargs)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"{kind}:{split}:{seed}")
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        task = MAKERS[kind](rng, **kwargs)
        if task.key not in seen and split_of(task.key) == split:
            seen.add(task.key)
            out.append(task)
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct {split} {kind} problems with {kwargs}: the space is too small")


class _Rejected(ValueError):
    pass


def _evaluate(node: ast.AST, available: list[int]) -> Fraction:
    """Exact value of a +-*/ expression over integer literals; each literal consumes one of `available`."""
    if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
        a, b = _evaluate(node.left, available), _evaluate(node.right, available)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if b == 0:
            raise _Rejected("division by zero")
        return a / b
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if node.value not in available:
            raise _Rejected(f"{node.value} is not an available number")
        available.remove(node.value)          # used at most once
        return Fraction(node.value)
    raise _Rejected(f"{type(node).__name__} is not allowed")


def verify_countdown(expr: str, numbers: tuple[int, ...], target: int) -> bool:
    """True iff `expr` uses only + - * /, parentheses and the given numbers (each at most once) and equals target.
    A trailing '= value' is ignored."""
    expr = expr.split("=")[0].strip()
    if not expr or len(expr) > MAX_EXPR_CHARS:
        return False
    try:
        tree = ast.parse(expr, mode="eval")
        return _evaluate(tree.body, list(numbers)) == target
    except (SyntaxError, _Rejected, RecursionError, ValueError):
        return False


def _code_task(where: str, row) -> Task:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a code task row must be a JSON object")
    prompt, tests = row.get("prompt"), row.get("tests")
    if tests is None and isinstance(row.get("test"), str) and isinstance(row.get("entry_point"), str):
        tests = f"{row['test']}\n\ncheck({row['entry_point']})"         # HumanEval's fields
    if not isinstance(prompt, str) or not prompt.strip() or not isinstance(tests, str) or not tests.strip():
        raise ValueError(f"{where}: a code task row needs a non-empty 'prompt' and 'tests' (or HumanEval's 'test' "
                         f"and 'entry_point')")
    return Task("code", prompt, "", (), 0, where, tests)


def read_code_tasks(path: str | Path) -> list[Task]:
    """Every row of a code task file (module docstring); a bad row is an error naming its file:line."""
    out = []
    for where, row in iter_records(path, "a code task file"):
        if isinstance(row, RecordError):
            raise ValueError(f"{where}: {row}")
        out.append(_code_task(where, row))
    if not out:
        raise ValueError(f"{path}: no code tasks")
    return out


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def program_of(response: str) -> str:
    """The code a response stands for: its first fenced block, else its <answer> content, else all of it."""
    m = _FENCE.search(response)
    if m:
        return m.group(1)
    tagged = tagged_answer(response)
    return tagged if tagged is not None else response


def verify(task: Task, response: str, timeout_s: float = 5.0, memory_mb: int = 512) -> float:
    """1.0 when the response's answer solves the task. Countdown needs an <answer> tag (a bare last number is no
    expression); arithmetic takes extract_answer's fallbacks; code runs in the sandbox within the limits."""
    if task.kind == "code":
        return 1.0 if run_tests(program_of(response), task.tests, timeout_s=timeout_s, memory_mb=memory_mb)[0] else 0.0
    if task.kind == "countdown":
        expr = tagged_answer(response)
        return 1.0 if expr is not None and verify_countdown(expr, task.numbers, task.target) else 0.0
    return 1.0 if equivalent(extract_answer(response), task.answer) else 0.0
