"""Rule-based rewards: extraction, numeric/exact match, format, length penalty, language consistency, the
reward-model hook."""

import math

import pytest

from dsv3.posttrain.rewards import (RewardModel, correctness_reward, format_reward, language_consistency_reward,
                                    length_penalty, score_with)
from dsv3.verify.extract import equivalent, extract_answer


def test_extract_answer():
    """The answer cases the GRPO reward must read (dsv3.verify.extract is the one implementation)."""
    assert extract_answer("<think>2+2 is 4, or 5?</think><answer> 4 </answer>") == "4"
    assert extract_answer("<answer>1</answer> then <answer>x + 1</answer>") == "x + 1"    # the last tag
    assert extract_answer(r"so the result is \boxed{7/3}.") == "7/3"
    assert extract_answer("first 12, then -3.5 and finally 41") == "41"
    assert extract_answer("it is 3 / 4") == "3/4"
    assert extract_answer("no number here") is None
    assert extract_answer("the total is 1,234") == "1,234" and extract_answer("1,2,3") == "3"
    assert equivalent(extract_answer(r"so \boxed{\frac{1}{2}}"), "1/2") and extract_answer(r"\boxed{x^{2}}") == "x^{2}"
    assert extract_answer(r"\boxed{3") == "3"                           # unbalanced: falls back to the last number


def test_numeric_and_exact_match():
    assert equivalent("42", "42") and equivalent("42.0", "42") and equivalent("0.5", "1/2")
    assert equivalent("2/4", "1/2") and equivalent("0.3333333", "1/3")       # tolerance 1e-6 relative
    assert not equivalent("0.333", "1/3") and not equivalent("41", "42") and not equivalent("-42", "42")
    assert equivalent("0.1234567", "0.12345671", rel_tol=1e-6)
    assert not equivalent("0.1234567", "0.12345671", rel_tol=1e-9)
    assert equivalent("x  + 1", "x + 1") and not equivalent("X + 1", "x + 1")
    assert not equivalent(None, "1") and not equivalent("1/0", "1") and not equivalent("nan", "1")
    # a policy can print absurd numbers: no match, never an exception
    assert not equivalent("1" + "0" * 400, "5") and not equivalent("1" * 5000, "5")
    assert correctness_reward("<answer>" + "9" * 400 + "</answer>", "0.5") == 0.0
    assert correctness_reward(r"\boxed{\frac{2}{4}}", "0.5") == 1.0
    assert correctness_reward("<think>..</think><answer>1/2</answer>", "0.5") == 1.0
    assert correctness_reward("I think 3", "4") == 0.0


def test_format_reward():
    assert format_reward("<think>a\nb</think><answer>3</answer>") == 1.0
    assert format_reward("  <think>a</think>\n<answer>3</answer>\n") == 1.0
    assert format_reward("<think>a</think>") == 0.0
    assert format_reward("<answer>3</answer><think>a</think>") == 0.0
    assert format_reward("<think>a</think><answer>3</answer> and more") == 0.0
    assert format_reward("<think>a<think>b</think><answer>3</answer>") == 0.0
    assert format_reward("<think>a</think><answer>3</answer><answer>4</answer>") == 0.0


def test_length_penalty_dapo():
    # max 100, cache 20: free up to 80, then (80 - L) / 20, -1 beyond 100
    assert length_penalty(50, 100, 20) == 0.0 and length_penalty(80, 100, 20) == 0.0
    assert length_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert length_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert length_penalty(150, 100, 20) == -1.0


def test_language_consistency():
    en = "What is the sum of these numbers?"
    zh = "这些数字的和是多少？"
    assert language_consistency_reward(en, "The sum is twelve.") == 1.0
    assert language_consistency_reward(zh, "和是十二。") == 1.0
    assert language_consistency_reward(en, "和是十二。") == 0.0
    # 3 Latin words + 2 CJK characters; Latin prompt -> 3/5, CJK prompt -> 2/5
    mixed = "the answer is 数字"
    assert language_consistency_reward(en, mixed) == pytest.approx(3 / 5)
    assert language_consistency_reward(zh, mixed) == pytest.approx(2 / 5)
    assert language_consistency_reward("Élan café", "naïve résumé") == 1.0     # accented Latin is Latin
    assert language_consistency_reward("日本語のテスト", "テストです") == 1.0        # kana counts as CJK
    assert language_consistency_reward("12 + 3", "15") == 1.0                   # no script in the prompt
    assert language_consistency_reward(en, "15") == 0.0


def test_reward_model_hook():
    class LengthRM:
        def __call__(self, prompts, responses):
            return [float(len(r)) for r in responses]

    assert isinstance(LengthRM(), RewardModel)
    assert score_with(LengthRM(), ["p", "q"], ["ab", "abc"]) == [2.0, 3.0]
    with pytest.raises(ValueError, match="2 prompts but 1"):
        score_with(LengthRM(), ["p", "q"], ["ab"])
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        score_with(lambda p, r: [1.0], ["p", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        score_with(lambda p, r: [1.0, math.nan], ["p", "q"], ["a", "b"])
