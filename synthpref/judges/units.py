"""What the judge kit hands a judge's hooks and takes back from them.

A :class:`Unit` is what one judgment covers, an :class:`Ask` one question about it, a :class:`Form` how
this shard's questions are asked given the backend, a :class:`Verdict` what the judge concludes from a
unit's answers, and :class:`Skip` the signal that a record cannot be judged at all. See
:mod:`synthpref.judges.base` for the kit that uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from synthpref.errors import SynthprefError
from synthpref.records import Candidate, Record


class Skip(SynthprefError):
    """Raised by :meth:`Judge.context`: the record cannot be judged (e.g. its reference answer is
    missing); each of its units gets a failed judgment with this message and no model call.
    ``counter`` names a stage counter to count each such judgment under, besides ``failed``."""

    def __init__(self, message: str, counter: str | None = None) -> None:
        super().__init__(message)
        self.counter = counter


@dataclass(frozen=True)
class Form:
    """How this shard's questions are asked, given what the backend supports."""

    json_output: bool
    prefill: str
    top_logprobs: int
    json_schema: dict[str, Any] | None


@dataclass(frozen=True)
class Unit:
    """What one judgment covers: a record and its candidate(s), in the order they are shown."""

    record: Record
    candidates: tuple[Candidate, ...]
    context: dict[str, Any] = field(default_factory=dict)
    order: str = "ab"

    @property
    def instruction(self) -> str:
        return instruction(self.record)

    def shown(self, order: str) -> Unit:
        """The pair as shown in ``order``: "ab" as judged, "ba" swapped."""
        if order == "ab":
            return replace(self, order=order)
        return replace(self, candidates=tuple(reversed(self.candidates)), order=order)


@dataclass(frozen=True)
class Ask:
    """One question for a unit: the rendered prompt, which question it is, and which draw."""

    prompt: str
    label: str = ""
    sample: int = 0


@dataclass
class Verdict:
    """A unit's judgment as the judge reads its answers.

    ``score`` None makes the judgment ``failed``. ``error`` / ``raw`` replace the kit's default
    (the answers' errors and replies, labelled when there are several). For a ``unit = "prompt"``
    judge, ``scores`` maps every candidate id to its score: each candidate gets its own judgment."""

    score: float | None
    scores: dict[str, float | None] = field(default_factory=dict)
    rationale: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    raw: str | None = None


def instruction(record: Record) -> str:
    """The prompt as a judge reads it: the last user turn, with earlier turns as context."""
    if len(record.prompt) == 1:
        return record.prompt[0].content
    return "\n\n".join(f"{m.role.upper()}: {m.content}" for m in record.prompt)
