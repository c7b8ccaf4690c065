"""Procedural tasks: reproducible, disjoint train/held-out splits; verifiers accept right and reject wrong,
unknown or reused numbers and anything but + - * / over integer literals."""

import random

import pytest

from dsv3.posttrain.tasks import (arithmetic_key, arithmetic_task, countdown_task, generate_tasks, split_of, verify,
                                  verify_countdown)


@pytest.mark.parametrize("kind,kw", [("arithmetic", {"digits": 2}), ("countdown", {"n_numbers": 3})])
def test_splits_are_disjoint_and_reproducible(kind, kw):
    train = {t.key for seed in (0, 1, 2) for t in generate_tasks(kind, "train", 200, seed, **kw)}
    held = {t.key for seed in (0, 1, 2) for t in generate_tasks(kind, "heldout", 50, seed, **kw)}
    assert not train & held
    assert all(split_of(k) == "train" for k in train) and all(split_of(k) == "heldout" for k in held)
    a, b = generate_tasks(kind, "train", 20, 7, **kw), generate_tasks(kind, "train", 20, 7, **kw)
    assert a == b and len({t.key for t in a}) == 20
    assert a != generate_tasks(kind, "train", 20, 8, **kw)
    with pytest.raises(ValueError, match="split"):
        generate_tasks(kind, "test", 1, 0)


def test_commuted_problems_share_a_key():
    assert arithmetic_key(12, "+", 34) == arithmetic_key(34, "+", 12)
    assert arithmetic_key(12, "*", 34) == arithmetic_key(34, "*", 12)
    assert arithmetic_key(12, "-", 34) != arithmetic_key(34, "-", 12)
    rng = random.Random(3)
    for _ in range(100):
        t = arithmetic_task(rng, digits=2)
        assert t.key == arithmetic_key(t.numbers[0], t.prompt.split()[2], t.numbers[1])


def test_split_share_is_about_ten_percent():
    keys = [f"k{i}" for i in range(5000)]
    share = sum(split_of(k) == "heldout" for k in keys) / len(keys)
    assert 0.08 < share < 0.12


def test_arithmetic_verifier():
    rng = random.Random(0)
    for _ in range(50):
        t = arithmetic_task(rng, digits=3)
        a, b = t.numbers
        op = t.prompt.split()[2]
        assert t.target == {"+": a + b, "-": a - b, "*": a * b}[op] and t.prompt.startswith(f"Compute {a} {op} {b}.")
        assert verify(t, f"<think>...</think><answer>{t.answer}</answer>") == 1.0
        assert verify(t, f"so it is {t.answer}") == 1.0
        assert verify(t, f"<answer>{t.target + 1}</answer>") == 0.0
        assert verify(t, "no idea") == 0.0


def test_countdown_generated_answer_verifies():
    rng = random.Random(0)
    for _ in range(100):
        t = countdown_task(rng)
        assert verify_countdown(t.answer, t.numbers, t.target), t
        assert verify(t, f"<think>x</think><answer>{t.answer}</answer>") == 1.0
        assert verify(t, str(t.target)) == 0.0              # no tag, and the target is no given number


def test_countdown_verifier_rejects():
    nums = (2, 3, 7, 7)
    assert verify_countdown("(7 + 7) * 3 - 2", nums, 40)
    assert verify_countdown("7 * 3 - 2 = 19", nums, 19)        # trailing '= value' ignored
    assert verify_countdown("7 / 2 * (7 - 3)", nums, 14)       # exact rationals (7/2 on the way)
    assert not verify_countdown("7 * 3 - 2", nums, 20)         # wrong value
    assert not verify_countdown("7 * 3 * 3", nums, 63)         # 3 reused
    assert not verify_countdown("7 + 7 + 7", nums, 21)         # 7 used three times, given twice
    assert not verify_countdown("8 * 5", nums, 40)             # unknown numbers
    assert not verify_countdown("7 / (3 - 3)", (7, 3, 3), 0)   # division by zero
    for bad in ["2 ** 3", "-2 + 7", "7 // 2", "7 % 3", "2.0 * 7", "True + 7", "abs(7)", "__import__('os')",
                "[7][0]", "x + 7", "7 if 2 else 3", "(lambda: 7)()", "7 +", "(" * 300 + "7" + ")" * 300, ""]:
        assert not verify_countdown(bad, (2, 3, 7), 7), bad
    assert verify_countdown("(" * 90 + "7" + ")" * 90, (7,), 7)     # deep but short: parsed, not refused
