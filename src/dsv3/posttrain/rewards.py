"""Rule-based rewards for GRPO (spec 7: "rule-based (e.g. boxed final answers for math)") and style terms.

- correctness: dsv3.verify.extract's answer and equivalence, the same functions evaluation scores with (the
  <answer> tag, else \boxed{}, else the last number; exact, numeric within a tolerance, or symbolic).
- format: <think>...</think><answer>...</answer> and nothing else (DeepSeek-R1's template, arXiv 2501.12948).
- length: DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13).
- language consistency: the share of the response in the prompt's script (R1 §2.3.3 rewards the share of
  target-language words in the chain of thought), Latin vs CJK by Unicode ranges.
- RewardModel: the protocol a model-based reward implements (a dsv3 model with a scalar head is one); score_with
  checks what it returns.
Each reward is a pure function of strings / counts returning a float.
"""

from __future__ import annotations

import math
import re
from typing import Protocol, Sequence, runtime_checkable

from ..verify.extract import equivalent, extract_answer

_FORMAT = re.compile(r"\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?think>|</?answer>).)*"
                     r"</answer>\s*", re.DOTALL)


def correctness_reward(response: str, truth: str, rel_tol: float = 1e-6) -> float:
    return 1.0 if equivalent(extract_answer(response, flexible=True), truth, rel_tol) else 0.0


def format_reward(response: str) -> float:
    """1 for exactly one think block followed by exactly one answer block (whitespace around allowed), else 0."""
    return 1.0 if _FORMAT.fullmatch(response) else 0.0


def length_penalty(n_tokens: int, max_len: int, cache_len: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - cache_len, then linear down to -1 at max_len, -1 beyond.
    A graded penalty tells the policy which of two long answers was longer, where a hard cut says nothing."""
    assert 0 < cache_len <= max_len, (cache_len, max_len)
    free = max_len - cache_len
    if n_tokens <= free:
        return 0.0
    if n_tokens <= max_len:
        return (free - n_tokens) / cache_len
    return -1.0


# Latin letters: ASCII, Latin-1 Supplement (less x and /), Latin Extended-A/B; CJK: Han (unified + extension A +
# compatibility), Japanese kana, Hangul syllables.
_LATIN_WORD = re.compile(r"[A-Za-z\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u024F]+")
_CJK_CHAR = re.compile(r"[\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF\uAC00-\uD7AF]")


def script_counts(text: str) -> tuple[int, int]:
    """(Latin words, CJK characters): a CJK character is about one word, so the two counts are comparable units."""
    return len(_LATIN_WORD.findall(text)), len(_CJK_CHAR.findall(text))


def language_consistency_reward(prompt: str, response: str) -> float:
    """The share of the response's units (Latin words, CJK characters) in the prompt's majority script. 1.0 when the
    prompt has no letters (nothing to be consistent with); 0.0 when the response has none."""
    p_latin, p_cjk = script_counts(prompt)
    if p_latin + p_cjk == 0:
        return 1.0
    r_latin, r_cjk = script_counts(response)
    if r_latin + r_cjk == 0:
        return 0.0
    return (r_latin if p_latin >= p_cjk else r_cjk) / (r_latin + r_cjk)


@runtime_checkable
class RewardModel(Protocol):
    """A model-based reward (spec 7: trained from SFT checkpoints, judges against ground truth or rates open-ended
    answers): one scalar per (prompt, response) pair, higher is better."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Sequence[float]: ...


def score_with(model: RewardModel, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Call a reward model and check its answer: one finite float per pair, or a clear error (a NaN reward would
    poison every advantage of its group)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    try:
        scores = [float(s) for s in model(prompts, responses)]
    except Exception as e:       # the user's callable: its failure named as such, not a trace deep in a GRPO step
        raise ValueError(f"reward model raised {type(e).__name__}: {e}") from e
    if len(scores) != len(prompts):
        raise ValueError(f"reward model returned {len(scores)} scores for {len(prompts)} pairs")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"reward model returned non-finite scores at {bad[:5]}")
    return scores
