"""What each dataset format needs from a run, checked before anything runs or uploads.

A format built from pairs is empty when the recipe builds no pairs, and one built from scores cannot
exist without a judge; rather than writing an empty file after an hour of generation (or uploading it),
these checks name the missing stage up front: statically against a recipe, and against a finished run's
records before ``synthpref push`` builds a format the run did not write.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from synthpref.errors import DataError

if TYPE_CHECKING:
    from synthpref.records import Record
    from synthpref.stages.base import Stage

Need = Literal["pairs", "ranking", "scores"]

NEEDS: dict[str, Need] = {
    "preference": "pairs",
    "kto": "pairs",
    "reward": "pairs",
    "listwise": "ranking",
    "pointwise": "scores",
}

_HOW = {
    "pairs": "preference pairs: add a 'pairs' stage (rule: best_worst, best_random or all_pairs) "
    "after a judge",
    "ranking": "per-prompt rankings: add a 'pairs' stage with 'rule: listwise' after a judge",
    "scores": "judge scores: add a judge stage (e.g. rubric_judge or pairwise_judge)",
}


class MissingData(DataError, ValueError):
    """A format needs scores, pairs or rankings that the run did not produce."""


def _stage_provides(stage: Stage) -> set[Need]:
    if stage.kind == "judge":
        return {"scores"}
    if stage.kind == "pairs":
        rule = getattr(stage.params, "rule", None)
        return {"ranking"} if rule == "listwise" else {"pairs"}
    return set()


def recipe_problems(formats: Iterable[str], stages: list[Stage]) -> list[str]:
    """Problems with a recipe's output formats: unknown names, or data no stage produces."""
    from synthpref.export import FORMATS
    from synthpref.registry import UnknownName

    provided: set[Need] = set().union(*(_stage_provides(s) for s in stages)) if stages else set()
    problems = []
    for name in formats:
        try:
            FORMATS.get(name)
        except UnknownName as exc:
            problems.append(f"output.formats: {exc}")
            continue
        if NEEDS.get(name) and NEEDS[name] not in provided:
            problems.append(f"output.formats: format {name!r} needs {_HOW[NEEDS[name]]}")
    return problems


def record_provides(record: Record) -> set[Need]:
    out: set[Need] = set()
    if record.pairs:
        out.add("pairs")
    if record.annotations.get("ranking"):
        out.add("ranking")
    if any(j.status == "ok" and j.score is not None for j in record.judgments):
        out.add("scores")
    return out


def missing_data(formats: Iterable[str], records: Iterable[Record]) -> dict[str, str]:
    """Format name -> what it needs and no record has (only formats with a need)."""
    wanted = {name: NEEDS[name] for name in formats if name in NEEDS}
    found: set[Need] = set()
    for record in records:
        found |= record_provides(record)
        if set(wanted.values()) <= found:
            break
    return {
        name: f"format {name!r} needs {_HOW[need].split(':')[0]}, which the run did not produce "
        f"(to get them, {_HOW[need].split(': ', 1)[1]})"
        for name, need in wanted.items()
        if need not in found
    }
