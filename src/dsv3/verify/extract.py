"""Answers out of model text, and whether two answers are the same: GSM8K / MATH-style scoring in dsv3.eval and the
GRPO correctness reward in dsv3.posttrain use these same functions, so training and evaluation agree on what counts
as right.

Extraction, first match wins:
  strict:   <answer>...</answer>, the last \\boxed{...}, "The answer is X" / "Answer: X", GSM8K's "#### X"
  flexible: the same, then the last number in the text (lm-eval's gsm8k "flexible-extract")
None when nothing is found: a failed extraction is a wrong answer and is counted as such, never an error.

Equivalence: equal strings after normalisation (spaces, a trailing period, \\text{}, $ and \\%, thousands commas);
else, for a numeric reference, equal numbers (int, decimal, fraction a/b, LaTeX \\frac, within rel_tol:
an expression is no value); else symbolic: both sides parsed by
sympy and their difference simplifies to 0. Model output is untrusted and sympy's parser evaluates Python, so only
a whitelisted arithmetic alphabet (digits, + - * / ^ ( ), single-letter symbols, sqrt, pi) of at most 64 characters,
with no exponent above 3 digits, ever reaches it; and it is read unevaluated first, so that no power tower
(9^9^9^9 fits in 64 characters and hangs evaluation) and no high-degree nesting is ever evaluated (`_degree`).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# thousands-separated form first ("1,234" is one number, "1,2,3" ends in 3); "3 / 4" is one fraction
_NUMBER = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+"
MAX_NUMBER_CHARS = 64   # a policy can print 5000 digits: beyond this it is no number
_STRICT = [re.compile(r"<answer>(.*?)</answer>", re.S | re.I),
           re.compile(r"(?:the (?:final )?answer is|answer:)\s*\$?([^\n$]+?)\$?\s*(?:\.\s*)?(?:\n|$)", re.I),
           re.compile(r"####\s*([^\n]+)")]


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


def tagged_answer(text: str) -> str | None:
    """The last <answer>...</answer> block's content, stripped; None without one."""
    m = _STRICT[0].findall(text)
    return m[-1].strip() if m else None


def extract_answer(text: str, flexible: bool = True) -> str | None:
    tagged = tagged_answer(text)
    if tagged is not None:
        return tagged
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in _STRICT[1:]:
        m = pattern.findall(text)
        if m:
            return m[-1].strip()
    if flexible:
        nums = re.findall(_NUMBER, text)
        if nums:
            return re.sub(r"\s*/\s*", "/", nums[-1])
    return None


def normalize(ans: str) -> str:
    s = ans.strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "").replace("$", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"(\d),(\d{3})\b", r"\1\2", s)
    s = re.sub(r"(\d),(\d{3})\b", r"\1\2", s)           # twice: 1,234,567
    s = s.rstrip(".").strip()
    return re.sub(r"\s+", " ", s)


def to_number(ans: str) -> float | None:
    s = normalize(ans).replace(" ", "")
    if len(s) > MAX_NUMBER_CHARS:
        return None
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    try:
        if m:
            return float(Fraction(int(m.group(1)), int(m.group(2))))
        return float(s) if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)(e-?\d+)?", s) else None
    except (ZeroDivisionError, ValueError, OverflowError):
        return None


def _latex_to_expr(s: str) -> str:
    for _ in range(4):          # nested \frac / \sqrt
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    return s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi").replace("{", "(").replace("}", ")")


# numbers, operators, sqrt, pi, and lone letters (no other names: "exec" or "open" never reach the parser)
_SAFE = re.compile(r"(?:\d+\.?\d*|sqrt|pi|(?<![a-z])[a-z](?![a-z])|[+\-*/^()\s])+")


MAX_DEGREE = 16        # nested powers of a non-number multiply up to at most this: (x + y + z)^16 simplifies fast
MAX_NUMBER_EXPONENT = 999    # a number to a number: 2^999 is cheap; 10^(10^7) (9 s) and 9^9^9^9 (hangs) are not


def _bounded_powers(expr) -> bool:
    """No power reaches evaluation that would take long (model text is untrusted; a hung verifier hangs a GRPO step
    or an evaluation): no exponent holds a power (a tower), a number's exponent is at most MAX_NUMBER_EXPONENT, and
    along nested powers of anything else the numeric exponents multiply to at most MAX_DEGREE."""
    return _degree(expr) <= MAX_DEGREE


def _degree(e) -> float:
    import sympy
    inner = max((_degree(a) for a in e.args), default=1.0)
    if not isinstance(e, sympy.Pow):
        return inner
    x = e.exp
    if x.has(sympy.Pow):
        return math.inf
    k = abs(float(x.evalf())) if not x.free_symbols else 1.0     # a symbolic exponent expands nothing
    if e.base.is_Number:
        return 1.0 if k <= MAX_NUMBER_EXPONENT else math.inf
    return inner * max(k, 1.0)


def _symbolic_equal(a: str, b: str) -> bool:
    exprs = []
    for s in (a, b):
        s = _latex_to_expr(normalize(s))
        if len(s) > 64 or not _SAFE.fullmatch(s) or re.search(r"(\^|\*\*)\s*\(?\s*\d{4,}", s):
            return False
        exprs.append(s.replace("^", "**"))
    try:
        import sympy
        from sympy.parsing.sympy_parser import (implicit_multiplication_application, parse_expr,
                                                standard_transformations)
        tr = standard_transformations + (implicit_multiplication_application,)
        # read unevaluated first: a power tower (9^9^9^9, 64 characters) would hang evaluation itself
        if not all(_bounded_powers(parse_expr(e, transformations=tr, evaluate=False)) for e in exprs):
            return False
        x, y = (parse_expr(e, transformations=tr, evaluate=True) for e in exprs)
        return bool(sympy.simplify(x - y) == 0)
    except Exception:            # anything sympy cannot read or decide is not shown equal
        return False


def equivalent(pred: str | None, gold: str, rel_tol: float = 1e-6) -> bool:
    if pred is None:
        return False
    if normalize(pred) == normalize(gold):
        return True
    p, g = to_number(pred), to_number(gold)
    if g is not None:       # a numeric reference wants a value: "964 - 494" is not an answer of 470 (nor a reward)
        return p is not None and math.isclose(p, g, rel_tol=rel_tol, abs_tol=1e-12)
    return _symbolic_equal(pred, gold)
