"""Audit of answer checking on untrusted model text: a power tower or a huge exponent in a response (64 characters
are enough: 9^9^9^9) is rejected before sympy evaluates it, so one response cannot hang a GRPO step or an eval run,
while ordinary symbolic answers still match."""

import time

import pytest

from dsv3.posttrain.rewards import correctness_reward
from dsv3.verify.extract import equivalent


@pytest.mark.parametrize("hostile", ["9^9^9^9", "2^(2^(2^(2^5)))", "(10^10^7)", "((((x+1)^9)^9)^9)^9",
                                     "(9^9)^(9^9)", "(x+y+z)^40 - x"])
def test_hostile_powers_are_rejected_quickly(hostile):
    t = time.monotonic()
    assert not equivalent(hostile, "(x+1)^2")
    assert correctness_reward(f"<answer>{hostile}</answer>", "x^2 + 2x + 1") == 0.0
    assert time.monotonic() - t < 10          # before: 9^9^9^9 did not return within 60 s


@pytest.mark.parametrize("pred,gold", [("x^2+2x+1", "(x+1)^2"), ("x^(-3)", "1/x^3"), ("2^10 x", "1024x"),
                                       ("\\sqrt{2}^4 y", "4y"), ("(a+b)^16", "(b+a)^16")])
def test_ordinary_symbolic_answers_still_match(pred, gold):
    assert equivalent(pred, gold)
