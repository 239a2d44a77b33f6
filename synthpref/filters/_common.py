"""Helpers shared by the filters: pair bookkeeping, prompt text and tokenisation, gold-file paths."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synthpref.records import Pair, Record

if TYPE_CHECKING:
    from synthpref.recipes.schema import Recipe
    from synthpref.stages.base import Stage

DROPPED_PAIRS = "dropped_pairs"
FLAGS = "flags"


def needs_pairs(previous: list[Stage]) -> list[str]:
    if not any(s.kind == "pairs" for s in previous):
        return ["a pair filter needs pairs: put a 'pairs' stage before it"]
    return []


def judge_problems(
    names: list[str] | None, previous: list[Stage], key: str = "judges"
) -> list[str]:
    judges = [s.name for s in previous if s.kind == "judge"]
    return [
        f"{key}: {name!r} is not a judge stage before this one ({', '.join(judges) or 'there is none'})"
        for name in names or []
        if name not in judges
    ]


def filter_pairs(
    stage: Stage, records: list[Record], decide: Callable[[Record, Pair], str | None]
) -> list[Record]:
    """Keep the pairs for which ``decide`` returns None; drop the others with the reason it returns.

    Counts ``pairs_in``, ``kept`` and ``dropped:<reason>``; dropped pairs are remembered in the record's
    annotations with the stage name and reason.
    """
    for record in records:
        kept = []
        for pair in record.pairs:
            stage.counters["pairs_in"] += 1
            reason = decide(record, pair)
            if reason is None:
                stage.counters["kept"] += 1
                kept.append(pair)
            else:
                stage.counters[f"dropped:{reason}"] += 1
                remember_dropped(record, pair, stage.name, reason)
        record.pairs = kept
    return records


def remember_dropped(record: Record, pair: Pair, stage: str, reason: str) -> None:
    record.annotations.setdefault(DROPPED_PAIRS, []).append(
        {**pair.model_dump(), "stage": stage, "reason": reason}
    )


def flag(record: Record, stage: str, flag_name: str, **info: Any) -> None:
    record.annotations.setdefault(FLAGS, []).append({"flag": flag_name, "stage": stage, **info})


def prompt_text(record: Record, roles: tuple[str, ...] = ("user",)) -> str:
    return "\n".join(m.content for m in record.prompt if m.role in roles)


_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation and whitespace differences do not matter)."""
    return _WORD.findall(text.casefold())


def normalise(text: str) -> str:
    return " ".join(words(text))


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def length(text: str, unit: str) -> int:
    return len(words(text)) if unit == "words" else len(text)


def resolve(path: str, recipe: Recipe | None) -> Path:
    """A path from a stage parameter: relative to the recipe's folder (or the working directory)."""
    if recipe is not None:
        return recipe.resolve(path)
    return Path(path).expanduser()
