"""Checking the Python code in a response against a record's tests, every program run in the
sandbox (:mod:`synthpref.verifiers.sandbox`).

The tests field of a record takes one of these shapes:

- a list of strings: assert-style tests, each a Python statement run after the solution, e.g.
  ``["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]``;
- a list of ``{"input": str, "output": str}``: stdin/stdout cases; the solution runs once per case
  as a program with ``input`` on its standard input, and passes when it exits with code 0 and its
  standard output equals ``output`` after both are normalised (``\\r\\n`` and ``\\r`` read as
  ``\\n``, trailing whitespace dropped from each line and trailing blank lines from the end);
- a mapping ``{"asserts": [...], "setup": "...", "stdio": [...]}`` with either list or both;
  ``setup`` (optional) is code run after the solution and before the assert tests (imports,
  helpers the tests use);
- any of these as a JSON string (a CSV column).

The code is the last fenced block tagged ``python`` (or ``py``) in the response, else the last
fenced block of any kind, else the whole response (``which`` picks the first block or all blocks
joined instead); a block left open by a reply cut off at its token limit runs to the end.
``code_source`` in the evidence says which.

Assert-style tests run in one program: the solution is loaded as a module named ``solution`` (so an
``if __name__ == "__main__":`` demo does not run, nor read standard input), then each test is run
on its own, its exception caught, under its own time limit (``SIGALRM``). Results go to a file whose
name is drawn at random for each run, never to standard output, so a solution printing lines that
look like results changes nothing. A test the program never reported (it hung, ran out of memory,
or exited: ``sys.exit()`` or ``os._exit()`` before the tests) fails with the reason; nothing counts
as passed unless the harness reported it passed.

The score is the fraction of tests passed.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from synthpref.errors import DataError
from synthpref.judges.verifier import Check
from synthpref.verifiers.sandbox import Limits, Outcome, run_python

Which = Literal["last", "first", "all"]

MAX_ERROR_CHARS = 300
MAX_TEST_CHARS = 200
STDERR_TAIL_CHARS = 2000
PYTHON_TAGS = {"python", "py", "python3", "py3"}
_FENCE = re.compile(r"^[ \t]{0,3}```[ \t]*(\S*)")

EXPECTED_SHAPE = (
    "expected a list of assert statements (strings), a list of {'input': str, 'output': str}, "
    "or a mapping {'asserts': [...], 'setup': str, 'stdio': [...]}"
)


class MalformedTests(DataError, ValueError):
    """A record's tests field has none of the accepted shapes (the message says what it has)."""


@dataclass(frozen=True)
class CodeTests:
    """A record's tests in one form: assert statements with their setup, and stdio cases."""

    asserts: tuple[str, ...] = ()
    setup: str = ""
    stdio: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"asserts": list(self.asserts), "setup": self.setup, "stdio": list(self.stdio)}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> CodeTests:
        stdio = tuple((i, o) for i, o in value.get("stdio", ()))
        return cls(tuple(value.get("asserts", ())), value.get("setup", ""), stdio)


def parse_tests(value: Any) -> CodeTests:
    """The tests a record's field holds, or :class:`MalformedTests` saying what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise MalformedTests(f"a string that is not JSON; {EXPECTED_SHAPE}") from None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"asserts", "setup", "stdio"})
        if unknown:
            raise MalformedTests(f"unknown keys {unknown}; {EXPECTED_SHAPE}")
        setup = value.get("setup") or ""
        if not isinstance(setup, str):
            raise MalformedTests(f"'setup' is {_a(type(setup).__name__)}, not a string")
        tests = CodeTests(
            _asserts(value.get("asserts") or [], "'asserts'"),
            setup,
            _stdio(value.get("stdio") or [], "'stdio'"),
        )
    elif isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        tests = CodeTests(asserts=_asserts(value, "the list"))
    elif isinstance(value, list | tuple) and value and all(isinstance(v, dict) for v in value):
        tests = CodeTests(stdio=_stdio(value, "the list"))
    else:
        raise MalformedTests(f"got {_shape(value)}; {EXPECTED_SHAPE}")
    if not tests.asserts and not tests.stdio:
        raise MalformedTests(f"no tests in it; {EXPECTED_SHAPE}")
    return tests


def _shape(value: Any) -> str:
    if isinstance(value, list | tuple):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {', '.join(kinds)}" if kinds else "an empty list"
    return _a(type(value).__name__)


def _a(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _asserts(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise MalformedTests(f"{where} must be a list of strings (got {_shape(value)})")
    return tuple(value)


def _stdio(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list | tuple):
        raise MalformedTests(
            f"{where} must be a list of {{'input', 'output'}} (got {_shape(value)})"
        )
    cases = []
    for k, case in enumerate(value):
        if (
            not isinstance(case, dict)
            or set(case) != {"input", "output"}
            or not all(isinstance(case[key], str) for key in ("input", "output"))
        ):
            raise MalformedTests(
                f"{where}[{k}] must be {{'input': str, 'output': str}} (got {_describe(case)})"
            )
        cases.append((case["input"], case["output"]))
    return tuple(cases)


def _describe(case: Any) -> str:
    if isinstance(case, dict):
        return "{" + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in case.items()) + "}"
    return _a(type(case).__name__)


# extracting the code ---------------------------------------------------------------------------


def extract_code(text: str, which: Which = "last") -> tuple[str, str]:
    """(the code, where it came from: ``python-fence``, ``fence`` or ``whole-text``)."""
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        fence = _FENCE.match(line)
        if current is None and fence:
            current = []
            blocks.append((fence.group(1).lower(), current))
        elif current is not None and fence and not fence.group(1):
            current = None
        elif current is not None:
            current.append(line)
    python = [body for tag, body in blocks if tag in PYTHON_TAGS]
    chosen, source = (python, "python-fence") if python else ([b for _, b in blocks], "fence")
    if not chosen:
        return text, "whole-text"
    if which == "all":
        return "\n\n".join("\n".join(b) for b in chosen) + "\n", source
    body = chosen[0] if which == "first" else chosen[-1]
    return "\n".join(body) + "\n", source


# assert-style tests ----------------------------------------------------------------------------

HARNESS = r"""
import json, os, signal


def _main():
    with open("harness.json", encoding="utf-8") as f:
        cfg = json.load(f)
    os.remove("harness.json")
    out = os.open(cfg["results"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    dumps, write, limit, cap = json.dumps, os.write, cfg["test_seconds"], cfg["error_chars"]

    def emit(**row):
        write(out, (dumps(row) + "\n").encode("utf-8"))

    class TestTimeout(BaseException):
        pass

    def on_alarm(signum, frame):
        raise TestTimeout

    def describe(exc):
        if isinstance(exc, TestTimeout):
            return "timeout", f"timeout: took longer than {limit:g} s"
        try:
            text = str(exc)
        except BaseException:
            text = "<unprintable>"
        kind = "memory" if isinstance(exc, MemoryError) else (
            "exit" if isinstance(exc, SystemExit) else "exception")
        message = type(exc).__name__ + (f": {text}" if text else "")
        return kind, message[:cap]

    def run(source, name, scope):
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            exec(compile(source, name, "exec"), scope)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    signal.signal(signal.SIGALRM, on_alarm)
    scope = {"__name__": "solution", "__builtins__": __builtins__}
    for phase, source, name in (("solution", cfg["solution"], "solution.py"),
                                ("setup", cfg["setup"], "setup.py")):
        try:
            run(source, name, scope)
        except BaseException as exc:
            kind, error = describe(exc)
            emit(phase=phase, kind=kind, error=error)
            return
    emit(phase="loaded")
    for i, test in enumerate(cfg["tests"]):
        try:
            run(test, f"test_{i}.py", scope)
        except BaseException as exc:
            kind, error = describe(exc)
            emit(test=i, passed=False, kind=kind, error=error)
        else:
            emit(test=i, passed=True)
    emit(phase="done")


_main()
"""
"""The program an assert-style check runs: loads the solution, runs each test apart, and writes one
JSON line per test to the results file (``os.write``, unbuffered: a later ``os._exit`` loses
nothing already reported)."""


@dataclass(frozen=True)
class CaseResult:
    test: str
    passed: bool
    error: str | None = None
    kind: str | None = None
    """Why it failed: ``timeout``, ``memory``, ``output``, ``exit``, ``exception``, ``wrong``."""

    def evidence(self) -> dict[str, Any]:
        return {"test": _cut(self.test, MAX_TEST_CHARS), "passed": self.passed, "error": self.error}


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _unreported(outcome: Outcome) -> tuple[str, str]:
    """(kind, reason) for a test the program ended without reporting."""
    kinds = {"wall": "timeout", "cpu": "timeout", "memory": "memory", "output": "output"}
    if outcome.limit in kinds:
        return kinds[outcome.limit], f"{outcome.reason()} before this test reported"
    if outcome.exit_code < 0:
        return "exit", f"{outcome.reason()} before this test ran"
    return "exit", f"exited early with code {outcome.exit_code} before this test ran"


def run_asserts(
    code: str, tests: CodeTests, limits: Limits, test_seconds: float, network: str = "auto"
) -> tuple[list[CaseResult], Outcome]:
    """Each assert test of ``tests`` against ``code``, in one sandboxed program."""
    results_name = f".results-{secrets.token_hex(8)}.jsonl"
    config = {
        "results": results_name,
        "solution": code,
        "setup": tests.setup,
        "tests": list(tests.asserts),
        "test_seconds": test_seconds,
        "error_chars": MAX_ERROR_CHARS,
    }
    outcome = run_python(
        HARNESS,
        limits=limits,
        files={"harness.json": json.dumps(config)},
        collect=[results_name],
        network=network,
    )
    rows = []
    for line in outcome.files.get(results_name, b"").decode("utf-8", "replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line of a program killed while writing it
    reported = {row["test"]: row for row in rows if "test" in row}
    load_failure = next((row for row in rows if row.get("phase") in ("solution", "setup")), None)
    results = []
    for i, test in enumerate(tests.asserts):
        row = reported.get(i)
        if row is not None:
            results.append(CaseResult(test, row["passed"], row.get("error"), row.get("kind")))
        elif load_failure is not None:
            what = "the solution" if load_failure["phase"] == "solution" else "the setup"
            error = f"{what} raised {load_failure['error']} while loading, before any test ran"
            results.append(CaseResult(test, False, error, load_failure["kind"]))
        else:
            kind, reason = _unreported(outcome)
            results.append(CaseResult(test, False, reason, kind))
    return results, outcome


# stdin/stdout tests ----------------------------------------------------------------------------


def normalise_output(text: str) -> str:
    """Output as compared: newlines unified, trailing whitespace per line and at the end dropped."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).rstrip("\n")


def run_stdio_case(
    code: str, given: str, expected: str, limits: Limits, network: str = "auto"
) -> tuple[CaseResult, Outcome]:
    """One stdin/stdout case: ``code`` run as a program with ``given`` on its standard input."""
    label = f"stdin: {given!r}"
    outcome = run_python(code, limits=limits, stdin=given, network=network)
    reason = outcome.reason()
    if outcome.limit is not None:
        kinds = {"wall": "timeout", "cpu": "timeout", "memory": "memory", "output": "output"}
        return CaseResult(label, False, reason, kinds[outcome.limit]), outcome
    if reason is not None:
        last = outcome.stderr.strip().splitlines()[-1:] or [""]
        error = f"{reason}: {last[0]}" if last[0] else reason
        return CaseResult(label, False, _cut(error, MAX_ERROR_CHARS), "exit"), outcome
    got, want = normalise_output(outcome.stdout), normalise_output(expected)
    if got != want:
        error = f"wrong output: expected {_cut(want, 120)!r}, got {_cut(got, 120)!r}"
        return CaseResult(label, False, error, "wrong"), outcome
    return CaseResult(label, True), outcome


# the check -------------------------------------------------------------------------------------

_COUNTED = {"timeout": "timeout", "memory": "memory", "output": "output_limit", "exit": "exited"}


def check_code(spec: dict[str, Any], response: str) -> Check:
    """The code verifier's ``check_fn``: ``spec`` holds ``tests`` (:meth:`CodeTests.as_dict`),
    ``limits`` (:class:`Limits` fields), ``test_seconds``, ``extract`` and ``network``."""
    tests = CodeTests.from_dict(spec["tests"])
    limits = Limits(**spec["limits"])
    network = spec.get("network", "auto")
    code, source = extract_code(response, spec.get("extract", "last"))
    results: list[CaseResult] = []
    scores: dict[str, float | None] = {}
    runs: dict[str, Any] = {}
    outcomes: list[Outcome] = []
    stderr_tail = ""
    try:
        if tests.asserts:
            found, outcome = run_asserts(code, tests, limits, spec["test_seconds"], network)
            results += found
            scores["asserts"] = sum(r.passed for r in found) / len(found)
            runs["asserts"] = outcome.evidence()
            stderr_tail = outcome.stderr[-STDERR_TAIL_CHARS:]
            outcomes.append(outcome)
        for given, expected in tests.stdio:
            result, outcome = run_stdio_case(code, given, expected, limits, network)
            results.append(result)
            runs.setdefault("stdio", []).append(outcome.evidence())
            outcomes.append(outcome)
            if not result.passed and not stderr_tail:
                stderr_tail = outcome.stderr[-STDERR_TAIL_CHARS:]
        if tests.stdio:
            found = results[len(tests.asserts) :]
            scores["stdio"] = sum(r.passed for r in found) / len(found)
    except OSError as exc:
        return Check(
            None,
            error=f"the sandbox could not run the code: {exc}",
            counters=("sandbox_error",),
        )
    passed = sum(r.passed for r in results)
    evidence = {
        "code_source": source,
        "code_lines": len(code.splitlines()),
        "passed": passed,
        "total": len(results),
        "tests": [r.evidence() for r in results],
        "sandbox": {"network": outcomes[-1].network, "limits": limits.as_dict(), "runs": runs},
        "stderr_tail": stderr_tail,
    }
    counters = tuple(sorted({_COUNTED[r.kind] for r in results if r.kind in _COUNTED}))
    return Check(passed / len(results), evidence=evidence, scores=scores, counters=counters)
