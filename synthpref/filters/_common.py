"""Helpers shared by the filters: pair bookkeeping, prompt text and tokenisation, gold-file paths."""

from __future__ import annotations

import re
import unicodedata
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


def keep_flagged(stage: Stage, record: Record, reason: str, **info: Any) -> None:
    """What ``action: flag`` does with an item ``action: drop`` would drop: it is kept, counted as
    ``kept`` and ``flagged:<reason>``, and the record's annotations get a flag with ``info``."""
    stage.counters["kept"] += 1
    stage.counters[f"flagged:{reason}"] += 1
    record.annotations.setdefault(FLAGS, []).append({"flag": reason, "stage": stage.name, **info})


def prompt_text(record: Record, roles: tuple[str, ...] = ("user",)) -> str:
    """The text the prompt filters compare: the messages of ``roles`` (default the user's), in
    order, one per line. For a multi-turn record that is every user turn, so ``dedup`` compares
    conversations by their whole user side: an exact duplicate repeats every user turn, and a shared
    opening turn alone does not make two conversations duplicates (though a long shared turn with
    short, different follow-ups can make them near duplicates). Assistant turns, model output, do
    not count unless ``roles`` names them (``decontaminate`` also tests each user turn alone)."""
    return "\n".join(m.content for m in record.prompt if m.role in roles)


_WORD = re.compile(r"\w+", re.UNICODE)
_WORD_OR_SYMBOL = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def fold(text: str) -> str:
    """Unicode NFKC and case folding, so full-width, ligature and case variants compare equal."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def words(text: str) -> list[str]:
    """Folded word tokens (punctuation and whitespace differences do not matter)."""
    return _WORD.findall(fold(text))


def words_and_symbols(text: str) -> list[str]:
    """Folded word tokens plus every punctuation or symbol character as a token of its own.

    For comparisons where ``>`` versus ``<`` or ``+`` versus ``-`` changes the meaning; whitespace
    still does not matter (``3+4`` and ``3 + 4`` give the same tokens).
    """
    return _WORD_OR_SYMBOL.findall(fold(text))


def exact_text(text: str) -> str:
    """The text up to case, Unicode compatibility forms and runs of whitespace; nothing else."""
    return " ".join(fold(text).split())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def length(text: str, unit: str) -> int:
    return len(words(text)) if unit == "words" else len(text)


def resolve(path: str, recipe: Recipe | None) -> Path:
    """A path from a stage parameter: relative to the recipe's folder (or the working directory)."""
    if recipe is not None:
        return recipe.resolve(path)
    return Path(path).expanduser()
