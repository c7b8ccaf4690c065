"""Scores and their uncertainty, as evaluation papers and lm-evaluation-harness report them.

- `pass_at_k(n, c, k)`: the unbiased estimator of Chen et al. 2021 (HumanEval): the chance that at least one of k
  samples drawn without replacement from n generations, c of them correct, is correct: 1 - C(n-c, k) / C(n, k),
  computed as a running product (no big binomials).
- `majority_answer(answers)`: the most frequent of k answers (ties: the first seen; None, a failed extraction, never
  wins); maj@k is whether it is correct.
- `binomial_stderr(p, n)`: sqrt(p (1 - p) / (n - 1)), lm-eval's standard error of a mean of 0/1 scores.
- `bootstrap_stderr(scores, resamples, seed)`: for other means (pass@k per problem, acc_norm, ...).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:              # every draw of k holds a correct one
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):   # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
        fail *= 1.0 - k / i
    return 1.0 - fail


def majority_answer(answers: Sequence[Hashable]) -> Hashable | None:
    counts = Counter(a for a in answers if a is not None)
    return counts.most_common(1)[0][0] if counts else None


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def bootstrap_stderr(scores: Sequence[float], resamples: int = 1000, seed: int = 0) -> float:
    if len(scores) < 2:
        return float("nan")
    rng, n = random.Random(seed), len(scores)
    means = [sum(scores[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples)]
    mu = sum(means) / resamples
    return math.sqrt(sum((m - mu) ** 2 for m in means) / (resamples - 1))
