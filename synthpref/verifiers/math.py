"""A math response's final answer against a reference answer, with Hugging Face's math-verify.

Extraction and equivalence are math-verify's (``parse`` and ``verify``), not ours: it reads
``\\boxed{}`` answers, LaTeX environments and plain numbers or expressions, takes the last answer of
the text when several compete at the same level, and compares symbolically and numerically, so
``0.5``, ``1/2`` and ``\\frac{1}{2}`` agree, ``1,000`` is ``1000`` and ``50%`` is ``0.5``. What this
module adds is what a preference dataset needs around it: a verdict that is either checked (1 or 0,
with the evidence) or visibly not checked (a failed check with the reason), never a silent 0.

Reference columns hold bare answers (``42``, ``\\frac{1}{2}``, ``[1, 2)``), which math-verify only
reads as LaTeX inside math delimiters; :func:`reference_values` says which way a reference is read.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

from synthpref.errors import DataError
from synthpref.judges.verifier import Check

# math-verify's own defaults for verify(); the stage's params default to these.
FLOAT_ROUNDING = 6
NUMERIC_PRECISION = 15
STRICT = True


@functools.cache
def _mv() -> SimpleNamespace:
    """math-verify and sympy, imported on first use: every synthpref process imports this module
    (it registers the shipped stages), and importing them costs about 0.6 s at start-up."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException
    from sympy import Basic, MatrixBase

    return SimpleNamespace(
        parse=parse,
        verify=verify,
        Timeout=TimeoutException,
        math_types=(Basic, MatrixBase),
        # A boxed answer is the convention for "this is my final answer": ranked first
        # (math-verify's default ranks it level with "final answer ... is" phrases).
        response_config=(LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()),
        text_config=(LatexExtractionConfig(), ExprExtractionConfig()),
        latex_only=(LatexExtractionConfig(),),
    )


_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed")
_WORD = re.compile(r"[A-Za-z]{2,}")

NO_ANSWER = "no answer found"


class BadReference(DataError, ValueError):
    """The reference answer cannot be used: the check is failed, never scored 0."""


def _timeouts() -> int | None:
    """math-verify's timeout (5 s, its default) where it works, None elsewhere.

    math-verify bounds each parse and comparison with ``signal.alarm``, which Python allows only in
    the main thread: called from any other thread, ``parse`` and ``verify`` raise instead of
    checking. Worker processes run checks in their main thread and keep the bound; a caller that
    runs checks in threads gets them unbounded (no sympy call known to hang on such short answers).
    """
    return 5 if threading.current_thread() is threading.main_thread() else None


def reference_text(value: Any) -> str:
    """A reference answer as text: strings as given, numbers in plain decimal notation (``1e-07``
    would read as ``1 * e - 7``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadReference(
            f"reference answer {value!r} is a {type(value).__name__}, not a string or number"
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadReference(f"reference answer {value!r} is not a finite number")
        return format(Decimal(repr(value)), "f")
    return value.strip()


def reference_values(text: str, timeout: int | None = None) -> list[Any]:
    """math-verify's parse of a reference answer.

    Text with math delimiters (``$``, ``\\(``, ``\\[``, ``\\boxed``) or with words and no LaTeX
    command (``18 dollars``, ``see the solution``) is read as math-verify reads a response. Anything
    else is a bare answer and read as LaTeX inside ``$...$``: that is how ``\\frac{1}{2}``,
    ``[1, 2)``, ``3, 5`` and ``x^2+1`` parse at all, and words must not take that road, since LaTeX
    reads ``see`` as the product ``s*e*e``."""
    mv = _mv()
    if _DELIMITED.search(text) or (_WORD.search(text) and "\\" not in text):
        return mv.parse(text, list(mv.text_config), parsing_timeout=timeout, raise_on_error=True)
    return mv.parse(f"${text}$", list(mv.latex_only), parsing_timeout=timeout, raise_on_error=True)


def _math(values: list[Any]) -> list[Any]:
    return [v for v in values if isinstance(v, _mv().math_types)]


def _text(values: list[Any]) -> str | None:
    return next((v for v in values if isinstance(v, str)), None)


def _failed(error: str, evidence: dict[str, Any], counter: str) -> Check:
    return Check(None, evidence={**evidence, "reason": error}, error=error, counters=(counter,))


def check_answer(
    reference: Any,
    response: str,
    *,
    float_rounding: int = FLOAT_ROUNDING,
    numeric_precision: int = NUMERIC_PRECISION,
    strict: bool = STRICT,
) -> Check:
    """``response``'s final answer against ``reference``: 1.0 equivalent, 0.0 not (or no answer
    found); a failed check (score None) when the reference does not parse or math-verify timed out.
    """
    mv = _mv()
    timeout = _timeouts()
    try:
        ref_text = reference_text(reference)
    except BadReference as exc:
        return _failed(str(exc), {"reference": None}, "bad_reference")
    evidence: dict[str, Any] = {"reference_text": ref_text}
    try:
        gold = reference_values(ref_text, timeout)
    except mv.Timeout:
        return _failed(f"parsing reference answer {ref_text!r} timed out", evidence, "timeout")
    except Exception as exc:  # math-verify's own failure, reported with the text it failed on
        msg = f"math-verify could not parse reference answer {ref_text!r}: {exc}"
        return _failed(msg, evidence, "bad_reference")
    if not _math(gold):
        msg = f"reference answer {ref_text!r} does not parse as math (math-verify found no value)"
        return _failed(msg, {**evidence, "reference": None}, "bad_reference")
    evidence["reference"] = str(_math(gold)[0])
    try:
        answer = mv.parse(
            response, list(mv.response_config), parsing_timeout=timeout, raise_on_error=True
        )
    except mv.Timeout:
        return _failed("parsing the response timed out", evidence, "timeout")
    except Exception as exc:
        return _failed(f"math-verify could not parse the response: {exc}", evidence, "check_error")
    found = _math(answer)
    evidence["extracted"] = str(found[0]) if found else None
    evidence["extracted_text"] = _text(answer)
    if not answer:
        return Check(0.0, {**evidence, "reason": NO_ANSWER})
    options = dict(
        float_rounding=float_rounding, numeric_precision=numeric_precision, strict=strict
    )
    equal, timed_out = _compare(gold, answer, options, timeout)
    if equal:
        return Check(1.0, {**evidence, "reason": "equivalent to the reference"})
    if timed_out:
        return _failed("comparing with the reference timed out", evidence, "timeout")
    reason = "not equivalent to the reference" if found else "answer does not parse as math"
    return Check(0.0, {**evidence, "reason": reason})


def _compare(
    gold: list[Any], answer: list[Any], options: dict[str, Any], timeout: int | None
) -> tuple[bool, bool]:
    """(equivalent, a comparison timed out): ``verify`` over every (gold, answer) value as
    ``verify(gold, answer)`` does, one pair at a time so that a timeout is seen, not read as
    "different". An error inside one comparison counts as "different", as in math-verify."""
    mv = _mv()
    timed_out = False
    for g in gold:
        for a in answer:
            try:
                if mv.verify(g, a, timeout_seconds=timeout, raise_on_error=True, **options):
                    return True, timed_out
            except mv.Timeout:
                timed_out = True
            except Exception:
                continue
    return False, timed_out


def check(spec: dict[str, Any], response: str) -> Check:
    """The verifier kit's ``check_fn``: ``spec`` holds ``reference`` and the verify options."""
    return check_answer(
        spec["reference"],
        response,
        float_rounding=spec.get("float_rounding", FLOAT_ROUNDING),
        numeric_precision=spec.get("numeric_precision", NUMERIC_PRECISION),
        strict=spec.get("strict", STRICT),
    )
