"""Answer extraction and equivalence on hand-written cases (the original MergeLM rules)."""
from __future__ import annotations

import pytest

from utils.llm.scoring import (HUMAN_EVAL_CLEANING, MBPP_CLEANING, extract_gsm8k_answer, extract_math_answer,
                               gsm8k_gold, gsm8k_is_correct, human_eval_program, is_equiv, last_boxed_only_string,
                               math_gold, math_is_correct, mbpp_program, postprocess_code, remove_boxed,
                               split_generation, strip_string)


@pytest.mark.parametrize("completion, expected", [
    ("She has 18 eggs. The answer is: 18", 18),
    ("The answer is: 1,234 dollars", 1234),
    ("The answer is: 1,000,000", 1000),                 # one separator only: the original's quirk
    ("The answer is: -3 degrees", -3),
    ("The answer is: +7", 7),
    ("The answer is: 3/4", 1),                           # fraction, rounded half-to-even
    ("The answer is: -3/4", -1),
    ("The answer is: 1/2", 0),                           # round(0.5) == 0 (banker's rounding)
    ("The answer is: 5/0", 5),                           # zero denominator -> numerator
    ("The answer is: 2.5", 2),
    ("The answer is: 3.5", 4),
    ("The answer is: $12.75.", 13),
    ("The answer is: .5", 0),
    ("The answer is: 10 The answer is: 20", 20),         # last answer phrase wins
    ("The answer is: 6 apples and 7 pears", 6),          # first number after the phrase
    ("The answer is 18", None),                          # missing colon + space: no answer phrase
    ("18", None),
    ("The answer is: none", None),
    ("The answer is: /5", None),
])
def test_gsm8k_extraction(completion, expected):
    assert extract_gsm8k_answer(completion) == expected


def test_gsm8k_gold_and_comparison():
    assert gsm8k_gold("so 2 + 2 = 4\n#### 1,024") == 1024
    assert gsm8k_gold("#### -3") == -3
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no marker here")
    assert gsm8k_is_correct(1024, 1024) and not gsm8k_is_correct(1023, 1024)
    assert not gsm8k_is_correct(None, 0)


@pytest.mark.parametrize("text, boxed", [
    ("so $\\boxed{5}$.", "\\boxed{5}"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}} end", "\\boxed{\\frac{1}{2}}"),
    ("nested \\boxed{\\sqrt{x^{2}}+{1}}", "\\boxed{\\sqrt{x^{2}}+{1}}"),
    ("fbox \\fbox{7}", "\\fbox{7}"),
    ("unbalanced \\boxed{\\frac{1}{2}", None),
    ("nothing here", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed_only_string(text) == boxed


def test_math_gold():
    assert math_gold("Thus $x = \\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"
    assert math_gold("a \\boxed{2} b \\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert math_gold("answer \\fbox{7}") is None      # remove_boxed only strips \boxed{...}
    assert math_gold("answer \\boxed 7") is None      # \boxed not followed by {
    assert remove_boxed(None) is None


@pytest.mark.parametrize("completion, expected", [
    ("The answer is: \\frac{3}{4}.", "\\frac{3}{4}"),
    ("The answer is: 5.\nMore text.", "5"),
    ("The answer is:  42 ", "42"),
    ("The answer is: 3.14", "3.14"),
    ("Nothing to see", None),
])
def test_math_extraction(completion, expected):
    assert extract_math_answer(completion) == expected


@pytest.mark.parametrize("first, second", [
    ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("\\tfrac34", "\\frac{3}{4}"),
    ("\\frac12", "\\frac{1}{2}"),
    ("\\frac1{72}", "\\frac{1}{72}"),
    ("0.5", "\\frac{1}{2}"),
    ("3/4", "\\frac{3}{4}"),
    (".5", "0.5"),
    ("x = 5", "5"),
    ("\\sqrt3", "\\sqrt{3}"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("90^\\circ", "90"),
    ("\\$5", "5"),
    ("50\\%", "50"),
    ("10 \\text{ cm}", "10"),
    ("1\\\\2", "1\\2"),
])
def test_math_equivalent(first, second):
    assert is_equiv(first, second)


@pytest.mark.parametrize("first, second", [
    ("\\frac{3}{4}", "\\frac{4}{3}"),
    ("-5", "5"),
    ("x/y", "\\frac{x}{y}"),        # a/b only for integers; raises -> raw equality, like the original
    ("\\sqrt", "\\sqrt{}"),         # bare \sqrt raises -> raw equality
    ("1 \\text{ m} 2 \\text{ s}", "1"),
])
def test_math_not_equivalent(first, second):
    assert not is_equiv(first, second)


def test_strip_string_steps():
    assert strip_string("\\left(\\dfrac{1}{2}, .5\\right)") == "(\\frac{1}{2},0.5)"
    assert strip_string("k = \\frac{3}{4}") == "\\frac{3}{4}"
    assert strip_string("abc = 4") == "abc=4"           # lhs longer than 2 characters is kept
    assert strip_string("") == ""
    with pytest.raises(ValueError):
        strip_string("x/y")


def test_math_correctness():
    assert math_is_correct("\\dfrac{3}{4}", "\\frac{3}{4}")
    assert not math_is_correct(None, None)               # no answer phrase is always wrong
    assert not math_is_correct("4", None)                # gold without \boxed{} is never matched
    assert is_equiv(None, None)


def test_human_eval_postprocessing():
    generation = "Here it is:\n```python\ndef f(x):\n\treturn x + 1\n```\nExplanation follows."
    completion, all_code = split_generation(generation)
    assert all_code == "Here it is:\n```python\ndef f(x):\n    return x + 1\n```\nExplanation follows."
    assert postprocess_code(completion, HUMAN_EVAL_CLEANING) == "def f(x):\n    return x + 1"
    main_guard = 'def f():\n    return 1\n\nif __name__ == "__main__":\n    print(f())'
    assert postprocess_code(main_guard, HUMAN_EVAL_CLEANING) == "def f():\n    return 1"
    example = "def f():\n    return 1\n# Example usage\nprint(f())"
    assert postprocess_code(example, HUMAN_EVAL_CLEANING) == "def f():\n    return 1"
    alpaca = "The solution is:\ndef f():\n    return 2\n\nThe answer is: 2"
    assert postprocess_code(alpaca, HUMAN_EVAL_CLEANING) == "def f():\n    return 2"
    assert postprocess_code("line\r\nnext\r\n", HUMAN_EVAL_CLEANING) == "line\nnext"
    assert split_generation("x ### Response: y")[0] == " y"


def test_mbpp_postprocessing_differs_where_the_original_does():
    fenced = "```python\ndef g():\n    s = '```'\n    return s\n```"
    assert postprocess_code(fenced, MBPP_CLEANING) == "def g():\n    s = '```'\n    return s"   # closed at "\n```"
    assert postprocess_code(fenced, HUMAN_EVAL_CLEANING) == "def g():\n    s = '"             # closed at "```"
    tests = "def h():\n    return 0\n# Test examples\nassert h() == 0"
    assert postprocess_code(tests, MBPP_CLEANING) == "def h():\n    return 0"
    assert postprocess_code(tests, HUMAN_EVAL_CLEANING) == tests
    assert postprocess_code("a\r\nb", MBPP_CLEANING) == "a\r\nb"                               # no \r removal for MBPP


def test_programs():
    problem = {"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "f"}
    marker = "#@mergelm-sandbox: the tests start here"   # the runner compiles the tests apart (sandbox.py)
    assert human_eval_program(problem, "    return x + 1") == \
        f"def f(x):\n    return x + 1\n{marker}\ndef check(c):\n    assert c(1) == 2\n\ncheck(f)"
    record = {"test_list": ["assert g() == 1", "assert g() != 2"]}
    assert mbpp_program(record, "def g():\n    return 1") == f"def g():\n    return 1\n{marker}\nassert g() == 1\nassert g() != 2"
