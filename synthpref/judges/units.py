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
from synthpref.records import Candidate, Message, Record


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

    @property
    def history(self) -> list[Message]:
        """The messages before the user's final message (system prompt and earlier turns)."""
        return split_turns(self.record)[0]

    @property
    def final_message(self) -> str:
        """The user's final message, the one the candidates answer (the instruction alone)."""
        final = split_turns(self.record)[1]
        return instruction(self.record) if final is None else final

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


CONTEXT_NOTE = (
    "This instruction is the user's final message in a conversation; the earlier turns come first, "
    "as context."
)
"""The line that opens a conversation's instruction (see :func:`instruction`)."""
SYSTEM_NOTE = (
    "This instruction is the user's message; the system prompt the assistant was given comes "
    "first, as context."
)
"""The same line for a single user message after a system prompt."""


def split_turns(record: Record) -> tuple[list[Message], str | None]:
    """(every message before the user's final message, in order; that message's text), or
    (the whole prompt, None) when the prompt does not end with a user message."""
    prompt = list(record.prompt)
    if not prompt or prompt[-1].role != "user":
        return prompt, None
    return prompt[:-1], prompt[-1].content


def instruction(record: Record) -> str:
    """The prompt as a judge reads it: the last user turn, with earlier turns as context.

    A lone user message is its text. A conversation (earlier turns, a system prompt) becomes a note
    saying what is what, the earlier messages in order in a marked ``[Conversation so far]`` block
    (each under its role: ``[System]``, ``[User]``, ``[Assistant]``), then the user's final message,
    the one the candidates answer, in its own ``[Final user message]`` block. Candidates branch at
    the last turn, so every candidate of a record is judged in the same context. A prompt that does
    not end with a user message (never one a source or a stage writes) is shown as labelled turns.
    """
    if len(record.prompt) == 1:
        return record.prompt[0].content
    history, final = split_turns(record)
    if final is None:
        return "\n\n".join(f"{m.role.upper()}: {m.content}" for m in record.prompt)
    turns = "\n\n".join(f"[{m.role.capitalize()}]\n{m.content}" for m in history)
    note = CONTEXT_NOTE if any(m.role != "system" for m in history) else SYSTEM_NOTE
    return (
        f"{note}\n\n"
        f"[Conversation so far]\n{turns}\n[End of conversation so far]\n\n"
        f"[Final user message]\n{final}\n[End of final user message]"
    )
