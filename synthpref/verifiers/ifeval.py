"""IFEval's instruction checks (Zhou et al. 2023), run by the reference code as lm-eval ships it.

A verdict must equal the one the IFEval benchmark would give, so nothing here re-implements a
checker: each instruction goes through lm-eval's ``test_instruction_following_strict`` and
``test_instruction_following_loose`` (Google's ``instruction_following_eval`` code). This module
only maps a spec onto the reference's ``InputExample``, one instruction at a time so that an
instruction that raises is named, and turns the verdicts into a :class:`Check`.

What the reference leaves loose is made strict here, before it runs:

- an instruction id it does not know would be a ``KeyError``: the check fails naming the id;
- a keyword argument its checker takes that the record does not give (or gives as 0 or "", which
  the reference drops), or gives in a form the checker replaces (``letter: "#"`` for a letter
  count: two of IFEval's own 541 prompts), would be drawn at random by the reference, so the same
  response could pass one run and fail the next: the check fails naming the argument;
- ``langdetect`` (language and case checks) samples at random unless seeded: it is seeded once.

Importing lm-eval's IFEval code takes seconds (``lm_eval.tasks``' package init), so it happens once
per worker process, on its first check, never when synthpref is imported. NLTK's English Punkt
tables (sentence counts) ship in ``nltk_data`` beside this file and go first on NLTK's search path,
so lm-eval never tries to download them.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from synthpref.errors import ConfigError
from synthpref.judges.verifier import Check

NLTK_DATA = Path(__file__).parent / "nltk_data"
INSTALL_HINT = "pip install 'synthpref[ifeval]'"
EXTRA_MODULES = ("lm_eval", "nltk", "langdetect", "immutabledict")
"""Importable names of the ``ifeval`` extra's distributions (``find_spec`` checks them)."""

Level = Literal["prompt", "instruction"]
Mode = Literal["strict", "loose"]

_reference: tuple[ModuleType, dict[str, Any]] | None = None


class ReferenceMissing(ConfigError, ImportError):
    """lm-eval's IFEval code (or what it imports) is not installed."""


def reference() -> tuple[ModuleType, dict[str, Any]]:
    """(lm-eval's ``tasks.ifeval.utils``, its ``INSTRUCTION_DICT``), imported on first use."""
    global _reference
    if _reference is None:
        try:
            import langdetect
            import nltk

            if str(NLTK_DATA) not in nltk.data.path:
                nltk.data.path.insert(0, str(NLTK_DATA))
            from lm_eval.tasks.ifeval import instructions_registry, utils
        except ImportError as err:
            raise ReferenceMissing(
                f"IFEval checks need lm-eval's ifeval code ({err}); {INSTALL_HINT}"
            ) from err
        langdetect.DetectorFactory.seed = 0
        _reference = (utils, instructions_registry.INSTRUCTION_DICT)
    return _reference


def _arguments(checker: type) -> set[str]:
    """Keyword arguments of the checker's ``build_description``; ``prompt`` is the reference's own
    to give."""
    names = set(inspect.signature(checker.build_description).parameters)
    return names - {"self", "prompt"}


def _argument_problem(checker: type, kwargs: dict[str, Any]) -> str | None:
    given = {k for k, v in kwargs.items() if v}  # the reference drops falsy values the same way
    expected = _arguments(checker)
    unknown, missing = sorted(given - expected), sorted(expected - given)
    if unknown:
        return f"takes no argument {', '.join(map(repr, unknown))} (it takes {sorted(expected)})"
    if missing:
        return (
            f"needs {', '.join(map(repr, missing))} (missing, null, 0 or empty; the reference "
            "would draw a random value)"
        )
    return None


def _normal(value: Any) -> Any:
    """A value as checkers store it (strings stripped and lower-cased, lists sorted and
    de-duplicated), so that only a value the checker replaced compares unequal."""
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, (list, tuple)):
        return sorted({repr(_normal(v)) for v in value})
    return value


def _replaced(checker: type, iid: str, kwargs: dict[str, Any]) -> str | None:
    """The reference's checker built from ``kwargs`` as it will be for the check; a given value
    it does not use (it drew a random one instead) is named."""
    given = {k: v for k, v in kwargs.items() if v}
    built = checker(iid)
    built.build_description(**given)
    used = built.get_instruction_args() or {}
    for name, value in given.items():
        if _normal(used.get(name)) != _normal(value):
            return (
                f"cannot use {name}={value!r}: the reference replaces it with a random value "
                f"({used.get(name)!r} this time), so its verdict would be chance"
            )
    return None


def _where(spec: dict[str, Any], field_key: str, index: int) -> str:
    return (
        f"record {spec['record']!r} (source row {spec.get('source_row', -1)}) field "
        f"{spec[field_key]!r}[{index}]"
    )


def _failed(error: str, counter: str, rows: list[dict[str, Any]]) -> Check:
    return Check(None, evidence={"instructions": rows}, error=error, counters=(counter,))


def check_ifeval(spec: dict[str, Any], response: str) -> Check:
    """Check ``response`` against the spec's IFEval instructions (see the module docstring).

    ``spec``: ``record``, ``source_row``, ``prompt`` (the user's final message),
    ``instruction_id_list``, ``kwargs`` (one dict per instruction), ``level``, ``mode`` and the
    record's field names (``instructions_field``, ``kwargs_field``) for error messages."""
    try:
        utils, registry = reference()
    except ReferenceMissing as err:
        return Check(None, error=str(err), counters=("reference_missing",))
    ids, kwargs = spec["instruction_id_list"], spec["kwargs"]
    if not ids or len(ids) != len(kwargs):
        return Check(
            None,
            error=f"record {spec['record']!r}: {len(ids)} instruction ids and {len(kwargs)} kwargs "
            "dicts; IFEval needs at least one instruction and one kwargs dict for each",
            counters=("malformed_field",),
        )
    rows: list[dict[str, Any]] = []
    for i, (iid, kw) in enumerate(zip(ids, kwargs, strict=True)):
        checker = registry.get(iid)
        if checker is None:
            return _failed(
                f"{_where(spec, 'instructions_field', i)}: unknown IFEval instruction id {iid!r} "
                f"(the reference knows {len(registry)}: {', '.join(sorted(registry))})",
                "unknown_instruction",
                rows,
            )
        problem = _argument_problem(checker, kw)
        if problem:
            return _failed(
                f"{_where(spec, 'kwargs_field', i)}: instruction {iid!r} {problem}",
                "bad_kwargs",
                rows,
            )
        try:
            replaced = _replaced(checker, iid, kw)
        except Exception as err:
            return _failed(
                f"{_where(spec, 'kwargs_field', i)}: IFEval checker {iid!r} refused its arguments: "
                f"{type(err).__name__}: {err}",
                "checker_error",
                rows,
            )
        if replaced:
            return _failed(
                f"{_where(spec, 'kwargs_field', i)}: instruction {iid!r} {replaced}",
                "bad_kwargs",
                rows,
            )
        one = utils.InputExample(
            key=spec.get("source_row", -1),
            instruction_id_list=[iid],
            prompt=spec["prompt"],
            kwargs=[kw],
        )
        try:
            strict = utils.test_instruction_following_strict(one, response)
            loose = utils.test_instruction_following_loose(one, response)
        except Exception as err:
            return _failed(
                f"{_where(spec, 'instructions_field', i)}: IFEval checker {iid!r} raised "
                f"{type(err).__name__}: {err}",
                "checker_error",
                rows,
            )
        rows.append(
            {
                "id": iid,
                "kwargs": kw,
                "strict": strict.follow_instruction_list[0],
                "loose": loose.follow_instruction_list[0],
            }
        )
    scores = summary(rows)
    return Check(
        scores[f"{spec['level']}_{spec['mode']}"],
        evidence={"instructions": rows},
        scores=scores,
    )


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The four IFEval numbers of one response: prompt level (all instructions followed: 1.0/0.0)
    and instruction level (the fraction followed), strict and loose."""
    out = {}
    for mode in ("strict", "loose"):
        followed = [bool(r[mode]) for r in rows]
        out[f"prompt_{mode}"] = 1.0 if all(followed) else 0.0
        out[f"instruction_{mode}"] = sum(followed) / len(followed) if followed else 0.0
    return out
