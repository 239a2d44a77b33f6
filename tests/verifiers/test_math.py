"""The math answer check (math-verify underneath): known right and wrong answers, the evidence,
references that cannot be used, timeouts and calls from threads.

Every expected verdict below is reasoned out by hand (the arithmetic, or the rule math-verify
documents), never computed by calling math-verify."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from synthpref.verifiers import math as math_check
from synthpref.verifiers.math import NO_ANSWER, check, check_answer, reference_text

LONG_SOLUTION = (
    "First, the train covers 60 km in the first hour and 45 km in the second hour, so it has "
    "gone 60 + 45 = 105 km. It still has 20 km to go, which takes 20 minutes.\n"
    "Total distance: $105 + 20 = 125$ km.\n\n"
    "Therefore the answer is \\boxed{125}. (Check: 125 - 20 = 105.)"
)

# (reference, response, expected score, why)
VERDICTS = [
    ("1/2", "0.5", 1.0, "0.5 is one half"),
    ("0.5", "\\frac{1}{2}", 1.0, "a LaTeX fraction without $ is still read"),
    ("\\frac{1}{2}", "The answer is 0.5.", 1.0, "a LaTeX reference without $ parses"),
    ("0.5", "The answer is $\\frac{1}{3}$.", 0.0, "one third is not one half"),
    ("125", LONG_SOLUTION, 1.0, "the boxed answer wins over the numbers after it"),
    ("105", LONG_SOLUTION, 0.0, "an intermediate result is not the answer"),
    ("42", "The answer is 42.", 1.0, "the sentence's final period is not a decimal point"),
    (42, "The answer is 42.", 1.0, "a number as the reference"),
    ("1000", "There are 1,000 apples.", 1.0, "thousands separator"),
    ("1,000", "1000", 1.0, "thousands separator in the reference"),
    ("0.5", "50%", 1.0, "50 percent is one half"),
    ("25%", "The discount is 25%.", 1.0, "percent on both sides"),
    ("25%", "The discount is 30%.", 0.0, "a different percentage"),
    ("[1, 2)", "The solution set is $[1, 2)$.", 1.0, "same half-open interval"),
    ("[1, 2)", "The solution set is $(1, 2)$.", 0.0, "open vs half-open interval"),
    ("3, 5", "$\\boxed{\\{5, 3\\}}$", 1.0, "a set is unordered"),
    ("3, 5", "$\\boxed{\\{3, 6\\}}$", 0.0, "one element differs"),
    ("x^2+1", "$\\boxed{1 + x^2}$", 1.0, "the same polynomial, terms reordered"),
    ("-3", "x = -3", 1.0, "negative number"),
    ("-3", "The answer is 3.", 0.0, "the sign matters"),
    (
        "8",
        "She had 3 apples and bought 5 more, so she has 8.",
        1.0,
        "the last number is the answer",
    ),
    ("3", "She had 3 apples and bought 5 more, so she has 8.", 0.0, "an earlier number is not"),
    ("42", "The answer is 421.", 0.0, "shares the digits 4 and 2 but is another number"),
    ("42", "The answer is 24.", 0.0, "same digits, other order"),
    ("0.1", "0.1", 1.0, "decimal equals itself"),
    (0.1, "1/10", 1.0, "a float reference: one tenth"),
    (5.0, "5", 1.0, "a float reference equal to an integer"),
    (1e-7, "0.0000001", 1.0, "a tiny float reference is written out, not as 1e-07"),
]


@pytest.mark.parametrize(("reference", "response", "expected", "why"), VERDICTS)
def test_known_answers(reference, response, expected, why):
    got = check_answer(reference, response)
    assert got.score == expected, (why, got.evidence)
    assert got.error is None and got.counters == ()
    want = "equivalent to the reference" if expected else "not equivalent to the reference"
    assert got.evidence["reason"] == want


def test_units_are_dropped_by_math_verify():
    # math-verify's LaTeX normalisation removes known units and its number pattern ignores the words
    # after a number: "5 cm" reads as 5, whichever side it is on, and "5 kg" equals "5 cm".
    assert check_answer("5", "The side is 5 cm.").score == 1.0
    assert check_answer("5 cm", "5").score == 1.0
    assert check_answer("5", "$5\\text{ cm}$").score == 1.0
    assert check_answer("5 cm", "5 kg").score == 1.0
    assert check_answer("5 cm", "6 cm").score == 0.0


def test_an_integer_equals_its_percentage_in_math_verify():
    # math-verify compares "9%" with 9 by the number before the sign (grader.sympy_numeric_eq: "If
    # it's 9% == 9, we can use integer comparison"), so 50% passes for 50 as well as for 0.5.
    assert check_answer("50", "50%").score == 1.0
    assert check_answer("0.5", "50%").score == 1.0
    assert check_answer("50", "0.5").score == 0.0


def test_evidence_names_what_was_compared():
    got = check_answer("0.5", "Half of it, i.e. $\\frac{1}{2}$ of the cake.")
    assert got.evidence == {
        "reference_text": "0.5",
        "reference": "1/2",  # the reference read as LaTeX: 0.5 becomes a rational
        "extracted": "1/2",
        "extracted_text": "\\frac{1}{2}",
        "reason": "equivalent to the reference",
    }
    wrong = check_answer("7", "3 + 4 = 8")
    assert (wrong.score, wrong.evidence["extracted"], wrong.evidence["extracted_text"]) == (
        0.0,
        "8",
        "8",
    )


@pytest.mark.parametrize("response", ["I don't know.", "", "Let me think about it."])
def test_no_answer_is_a_zero_saying_so(response):
    got = check_answer("7", response)
    assert got.score == 0.0 and got.error is None
    assert got.evidence["reason"] == NO_ANSWER == "no answer found"
    assert got.evidence["extracted"] is None and got.evidence["reference"] == "7"


@pytest.mark.parametrize("reference", ["see the worked solution", "unknown", "nan"])
def test_an_unparseable_reference_is_a_failed_check_not_a_zero(reference):
    got = check_answer(reference, "42")
    assert got.score is None and not got.passed
    assert repr(reference) in got.error and "does not parse" in got.error
    assert got.counters == ("bad_reference",)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (True, "is a bool"),
        ([1, 2], "is a list"),
        ({"a": 1}, "is a dict"),
        (float("inf"), "not a finite number"),
        (float("nan"), "not a finite number"),
    ],
)
def test_a_reference_that_is_not_a_string_or_number_is_a_failed_check(value, says):
    got = check_answer(value, "1")
    assert got.score is None and says in got.error and got.counters == ("bad_reference",)


def test_reference_text_writes_numbers_out_in_decimal():
    assert reference_text(1e-7) == "0.0000001"  # repr: 1e-07
    assert reference_text(1.5e20) == "150000000000000000000"  # repr: 1.5e+20
    assert reference_text(0.1) == "0.1"
    assert reference_text(-12) == "-12"
    assert reference_text("  1,000 \n") == "1,000"


def test_options_reach_math_verify():
    # strict: variables are matched by name; non-strict matches them by position
    assert check({"reference": "x+1"}, "$y+1$").score == 0.0
    assert check({"reference": "x+1", "strict": False}, "$y+1$").score == 1.0
    # float_rounding: 0.33 and 1/3 agree to 2 decimals, not to 6
    assert check({"reference": "0.33"}, "1/3").score == 0.0
    assert check({"reference": "0.33", "float_rounding": 2}, "1/3").score == 1.0
    # numeric_precision: pi and pi + 1e-20 differ only beyond 15 significant digits
    near_pi = "$\\pi + 10^{-20}$"
    assert check({"reference": "\\pi"}, near_pi).score == 1.0
    assert check({"reference": "\\pi", "numeric_precision": 40}, near_pi).score == 0.0


def test_math_verify_alone_cannot_run_in_a_thread_but_the_check_can():
    from math_verify import parse

    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="threaded environment"):
            pool.submit(parse, "1/2").result()
        got = pool.submit(check_answer, "1/2", "The answer is 0.5.").result()
        wrong = pool.submit(check_answer, "1/2", "The answer is 0.6.").result()
    assert (got.score, wrong.score) == (1.0, 0.0)


def test_a_comparison_that_times_out_is_a_failed_check(monkeypatch):
    """math-verify's own alarm fires (shortened to 1 s) on a comparison that hangs; math-verify
    alone would call that "not equal"."""
    import math_verify.grader
    from sympy import Integer, Rational

    def hang(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(math_verify.grader, "sympy_expr_eq", hang)
    monkeypatch.setattr(math_check, "_timeouts", lambda: 1)
    seven = "The answer is $\\frac{14}{2}$."  # equal to 7 only by computation, not as text
    assert math_verify.grader.verify(Integer(7), Rational(14, 2), timeout_seconds=1) is False
    got = check_answer("7", seven)
    assert got.score is None and "timed out" in got.error and got.counters == ("timeout",)
