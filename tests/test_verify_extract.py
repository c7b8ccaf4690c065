"""Answer extraction and equivalence (dsv3.eval.extract) against hand-written cases."""

import pytest

from dsv3.verify.extract import equivalent, extract_answer, last_boxed, normalize, to_number


@pytest.mark.parametrize("text,strict,flexible", [
    ("<think>2+2</think><answer> 4 </answer>", "4", "4"),
    ("so \\boxed{\\frac{1}{2}} and then \\boxed{3}", "3", "3"),
    ("nested \\boxed{\\sqrt{\\frac{a}{b}}}.", "\\sqrt{\\frac{a}{b}}", "\\sqrt{\\frac{a}{b}}"),
    ("Natalia sold 48 clips. #### 72", "72", "72"),
    ("We get 5 apples. The answer is 12.", "12", "12"),
    ("Answer: $1,234$\n", "1,234", "1,234"),
    ("first 3 then 4 then -7.5 apples", None, "-7.5"),
    ("no numbers here", None, None),
    ("unbalanced \\boxed{12", None, "12"),
])
def test_extract(text, strict, flexible):
    assert extract_answer(text, flexible=False) == strict
    assert extract_answer(text, flexible=True) == flexible


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{{a}{b}}") == "{a}{b}" and last_boxed("none") is None


@pytest.mark.parametrize("pred,gold,same", [
    ("1,234", "1234", True), ("72.", "72", True), ("$5$", "5", True), ("50\\%", "50", True),
    ("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True), ("\\dfrac{3}{4}", "0.75", True), ("2", "3", False),
    ("1/3", "0.333", False), ("1/3", "0.3333333", True),
    ("2x+x", "3x", True), ("\\sqrt{4}", "2", False), ("964 - 494", "470", False), ("2", "\\sqrt{4}", True),
    ("x^2-1", "(x-1)(x+1)", True), ("x^2", "x^3", False),
    ("\\text{Paris}", "Paris", True), (None, "4", False), ("four", "4", False),
])
def test_equivalent(pred, gold, same):
    assert equivalent(pred, gold) is same


@pytest.mark.parametrize("hostile", ["__import__('os').system('echo pwned')", "exec(1)", "open(x)",
                                     "9^99999999", "(" * 40 + "1" + ")" * 40, "lambda: 1"])
def test_untrusted_text_never_reaches_the_parser_as_code(hostile, capfd):
    assert equivalent(hostile, "1") is False
    assert "pwned" not in capfd.readouterr().out


def test_numbers():
    assert to_number("-3/4") == -0.75 and to_number("1/0") is None and to_number("1e3") == 1000.0
    assert normalize(" 1,234,567. ") == "1234567"
