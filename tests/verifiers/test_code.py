"""Code checks: finding the code in a reply, the tests' shapes, assert and stdio runs, the score."""

from __future__ import annotations

import dataclasses

import pytest

from synthpref.verifiers.code import (
    CodeTests,
    MalformedTests,
    check_code,
    extract_code,
    normalise_output,
    parse_tests,
    run_asserts,
    run_stdio_case,
)
from synthpref.verifiers.sandbox import Limits

LIMITS = Limits(wall_seconds=3, memory_mb=256)
ADD_TESTS = ("assert add(2, 2) == 4", "assert add(1, 2) == 3", "assert add(0, 5) == 5")


def trusted_outcomes(solution: str, tests: tuple[str, ...]) -> list[bool]:
    """The same tests run here, in-process, on a solution known to be harmless."""
    outcomes = []
    for test in tests:
        scope: dict = {}
        exec(solution, scope)
        try:
            exec(test, scope)
        except AssertionError:
            outcomes.append(False)
        else:
            outcomes.append(True)
    return outcomes


# extracting code ------------------------------------------------------------------------------


def test_the_last_python_block_wins_over_other_blocks():
    reply = (
        "Use it like this:\n```\nadd(1, 2)\n```\nFirst try:\n```python\ndef add(a, b):\n    pass\n"
        "```\nBetter:\n```py\ndef add(a, b):\n    return a + b\n```\nDone."
    )
    assert extract_code(reply) == ("def add(a, b):\n    return a + b\n", "python-fence")
    assert extract_code(reply, "first") == ("def add(a, b):\n    pass\n", "python-fence")
    code, source = extract_code(reply, "all")
    assert source == "python-fence" and code.count("def add") == 2 and "add(1, 2)" not in code


def test_without_a_python_block_the_last_block_then_the_whole_text():
    assert extract_code("```text\nnot this\n```\n```\nx = 1\n```") == ("x = 1\n", "fence")
    assert extract_code("x = 1\nprint(x)") == ("x = 1\nprint(x)", "whole-text")


def test_a_block_cut_off_by_the_token_limit_runs_to_the_end():
    assert extract_code("Here:\n```python\ndef f():\n    return 1") == (
        "def f():\n    return 1\n",
        "python-fence",
    )


# the tests field ------------------------------------------------------------------------------


def test_each_accepted_shape_parses():
    assert parse_tests(["assert f() == 1"]) == CodeTests(asserts=("assert f() == 1",))
    assert parse_tests([{"input": "1\n", "output": "2\n"}]) == CodeTests(stdio=(("1\n", "2\n"),))
    mapping = {"asserts": ["assert g(2) == 4"], "setup": "import math", "stdio": []}
    assert parse_tests(mapping) == CodeTests(("assert g(2) == 4",), "import math", ())
    assert parse_tests('["assert f() == 1"]') == CodeTests(asserts=("assert f() == 1",))
    tests = parse_tests({"asserts": ["assert 1"], "stdio": [{"input": "", "output": "x"}]})
    assert CodeTests.from_dict(tests.as_dict()) == tests


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("assert f() == 1", "a string that is not JSON"),
        ([], "got an empty list"),
        (["assert f()", {"input": "", "output": ""}], "got a list of dict, str"),
        (
            [{"input": "1"}],
            "the list[0] must be {'input': str, 'output': str} (got {'input': str})",
        ),
        ([{"input": 1, "output": "2"}], "(got {'input': int, 'output': str})"),
        ({"asserts": "assert f()"}, "'asserts' must be a list of strings (got a str)"),
        ({"tests": ["assert f()"]}, "unknown keys ['tests']"),
        ({"setup": "import os"}, "no tests in it"),
        (42, "got an int"),
    ],
)
def test_a_malformed_tests_field_says_what_it_has_and_what_is_expected(value, says):
    with pytest.raises(MalformedTests) as err:
        parse_tests(value)
    assert says in str(err.value)
    if "must be" not in str(err.value):  # a part of the field: the message says which
        assert "expected a list of assert statements" in str(err.value)


# assert-style tests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solution",
    [
        "def add(a, b):\n    return a + b\n",
        "def add(a, b):\n    return a * b\n",  # right only for add(2, 2)
        "def add(a, b):\n    return a - b if a else b\n",  # right only for add(0, 5)
    ],
)
def test_assert_results_match_the_tests_run_in_process(solution):
    results, outcome = run_asserts(solution, CodeTests(asserts=ADD_TESTS), LIMITS, 1)
    assert [r.passed for r in results] == trusted_outcomes(solution, ADD_TESTS)
    assert [r.test for r in results] == list(ADD_TESTS)
    assert all(r.error == "AssertionError" for r in results if not r.passed)
    assert outcome.exit_code == 0 and outcome.limit is None


def test_setup_runs_between_the_solution_and_the_tests():
    tests = CodeTests(asserts=("assert add(HALF, HALF) == 1.0",), setup="HALF = 0.5")
    results, _ = run_asserts("def add(a, b):\n    return a + b\n", tests, LIMITS, 1)
    assert results[0].passed


def test_exiting_with_code_0_before_the_tests_passes_nothing():
    results, outcome = run_asserts(
        "import os\nos._exit(0)\n", CodeTests(asserts=ADD_TESTS), LIMITS, 1
    )
    assert outcome.exit_code == 0
    assert [r.passed for r in results] == [False] * 3
    assert {r.error for r in results} == {"exited early with code 0 before this test ran"}


def test_sys_exit_while_loading_passes_nothing():
    solution = "import sys\ndef add(a, b):\n    return a + b\nsys.exit(0)\n"
    results, _ = run_asserts(solution, CodeTests(asserts=ADD_TESTS), LIMITS, 1)
    assert [r.passed for r in results] == [False] * 3
    assert results[0].error == (
        "the solution raised SystemExit: 0 while loading, before any test ran"
    )


def test_an_exit_inside_one_test_fails_it_and_every_later_test():
    solution = "import os\ndef add(a, b):\n    if a == 1:\n        os._exit(0)\n    return a + b\n"
    results, _ = run_asserts(solution, CodeTests(asserts=ADD_TESTS), LIMITS, 1)
    assert [r.passed for r in results] == [True, False, False]
    assert results[1].kind == "exit" and "exited early with code 0" in results[1].error


def test_a_test_that_hangs_times_out_alone_and_the_others_still_run():
    solution = "def add(a, b):\n    while a == 1:\n        pass\n    return a + b\n"
    results, outcome = run_asserts(solution, CodeTests(asserts=ADD_TESTS), LIMITS, 0.5)
    assert [r.passed for r in results] == [True, False, True]
    assert (results[1].kind, results[1].error) == ("timeout", "timeout: took longer than 0.5 s")
    assert outcome.limit is None


def test_code_that_ignores_the_test_alarm_is_stopped_by_the_wall_limit():
    solution = (
        "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n"
    )
    limits = Limits(wall_seconds=1, cpu_seconds=60)
    results, outcome = run_asserts(solution, CodeTests(asserts=ADD_TESTS), limits, 0.5)
    assert outcome.limit == "wall"
    assert {r.kind for r in results} == {"timeout"}
    assert results[0].error == "timeout: passed its 1 s wall-clock limit before this test reported"


def test_a_test_that_allocates_too_much_fails_as_memory():
    solution = "def add(a, b):\n    if a == 1:\n        bytearray(1024 ** 3)\n    return a + b\n"
    results, _ = run_asserts(solution, CodeTests(asserts=ADD_TESTS), Limits(memory_mb=128), 1)
    assert [r.passed for r in results] == [True, False, True]
    assert (results[1].kind, results[1].error) == ("memory", "MemoryError")


def test_printed_lines_that_look_like_results_count_for_nothing():
    fake = '{"test": %d, "passed": true}'
    solution = (
        "import json\n"
        + "".join(f"print('{fake % i}')\n" for i in range(3))
        + "def add(a, b):\n    print('"
        + fake % 1
        + "')\n    return 0\n"
    )
    results, outcome = run_asserts(solution, CodeTests(asserts=ADD_TESTS), LIMITS, 1)
    assert outcome.stdout.count('"passed": true') == 6  # printed (3, then 1 per call): ignored
    assert [r.passed for r in results] == [False, False, False]


def test_a_test_printing_forever_is_stopped_at_the_output_cap():
    solution = "def add(a, b):\n    while a == 1:\n        print('spam')\n    return a + b\n"
    limits = dataclasses.replace(LIMITS, max_output_bytes=4096)
    results, outcome = run_asserts(solution, CodeTests(asserts=ADD_TESTS), limits, 2)
    assert outcome.limit == "output" and len(outcome.stdout) == 4096
    assert [r.passed for r in results] == [True, False, False]
    assert results[2].error == (
        "output limit: printed more than 4096 bytes before this test reported"
    )


# stdin/stdout tests ---------------------------------------------------------------------------

SUM_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"


def test_output_is_normalised_for_line_endings_and_trailing_whitespace():
    assert normalise_output("1 \r\n2\t\r\n\n\n") == "1\n2"
    assert normalise_output(" 1\n2") == " 1\n2"  # leading whitespace counts


@pytest.mark.parametrize(
    ("given", "expected", "passed"),
    [("1 2\n", "3\n", True), ("40 2", "42", True), ("1 2", "3  \r\n\n", True), ("1 2", "4", False)],
)
def test_stdio_cases_compare_normalised_output(given, expected, passed):
    result, _ = run_stdio_case(SUM_PROGRAM, given, expected, LIMITS)
    a, b = map(int, given.split())
    assert result.passed is passed is (str(a + b) == expected.strip())
    if not passed:
        assert result.error == "wrong output: expected '4', got '3'"


def test_a_stdio_program_that_crashes_fails_with_its_last_error_line():
    result, outcome = run_stdio_case(SUM_PROGRAM, "", "3", LIMITS)
    assert not result.passed and outcome.exit_code == 1
    assert result.error == "exited with code 1: EOFError: EOF when reading a line"


def test_a_stdio_program_that_hangs_fails_as_timeout():
    result, _ = run_stdio_case("while True:\n    pass\n", "", "", Limits(wall_seconds=1))
    assert (result.passed, result.kind) == (False, "timeout")


# the check ------------------------------------------------------------------------------------


def spec(tests, **limits) -> dict:
    return {
        "tests": parse_tests(tests).as_dict(),
        "limits": dataclasses.asdict(dataclasses.replace(LIMITS, **limits)),
        "test_seconds": 1,
        "extract": "last",
        "network": "auto",
    }


def test_the_score_is_the_fraction_passed_with_per_test_evidence():
    reply = "Sure:\n```python\ndef add(a, b):\n    return a * b\n```"
    check = check_code(spec(list(ADD_TESTS)), reply)
    expected = trusted_outcomes("def add(a, b):\n    return a * b\n", ADD_TESTS)
    assert check.score == pytest.approx(sum(expected) / len(expected))
    assert check.scores == {"asserts": check.score}
    assert [t["passed"] for t in check.evidence["tests"]] == expected
    assert check.evidence["code_source"] == "python-fence"
    assert (check.evidence["passed"], check.evidence["total"]) == (sum(expected), 3)
    sandbox = check.evidence["sandbox"]
    assert sandbox["network"] in ("namespace", "audit-hook")
    assert sandbox["limits"]["wall_seconds"] == 3 and sandbox["runs"]["asserts"]["exit_code"] == 0


def test_both_kinds_of_tests_score_together_and_apart():
    reply = (
        "```python\ndef add(a, b):\n    return a + b\nprint(add(*map(int, input().split())))\n```"
    )
    tests = {"asserts": list(ADD_TESTS), "stdio": [{"input": "1 1", "output": "2"}]}
    # the asserts load the solution as a module: its stdin-reading line runs, and EOFError ends it
    check = check_code(spec(tests), reply)
    assert check.scores == {"asserts": 0.0, "stdio": 1.0}
    assert check.score == pytest.approx(1 / 4)
    assert "EOFError" in check.evidence["tests"][0]["error"]


def test_limits_hit_are_counted():
    hang = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    assert check_code(spec(list(ADD_TESTS)), hang).counters == ("timeout",)
    early = "```python\nimport os\nos._exit(3)\n```"
    check = check_code(spec(list(ADD_TESTS)), early)
    assert (check.score, check.counters) == (0.0, ("exited",))
    assert check.evidence["tests"][0]["error"] == "exited early with code 3 before this test ran"
