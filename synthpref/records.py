"""The record schema that flows between stages, and its Arrow form for checkpoints.

One :class:`Record` per prompt. Stages append to it: generators add :class:`Candidate` s, judges add
:class:`Judgment` s (pointwise judgments name one candidate, pairwise ones two), pair builders add
:class:`Pair` s. Free-form mappings (sampling parameters, per-aspect scores, judge details, input
metadata) are stored as JSON text in Arrow so that every checkpoint shares one fixed schema, whatever
the judges put in them.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str


class Origin(BaseModel):
    """How a constructed candidate was made from its ``parent`` (another candidate of the record).

    Constructed pairs (an injected error, a checklist-guided refinement, a self-correction) differ
    from sampled ones in how they were made, and a dataset's user needs to know which is which:
    ``operation`` names the construction, ``prefer`` which side of the (parent, constructed) pair is
    chosen, ``evidence`` what confirmed it (the verifier's or judge's verdicts before and after, the
    error kind asked for), ``edit_tokens`` the size of the edit where it matters (RISE)."""

    model_config = ConfigDict(extra="forbid")

    operation: str
    parent: str = Field(description="id of the candidate this one was made from")
    prefer: Literal["parent", "self"] = Field(
        description="parent: the parent is chosen, this one rejected (an injected error); self: "
        "this one is chosen (a refinement that raised the score)"
    )
    stage: str = ""
    edit_tokens: int | None = None
    round: int = 1
    evidence: dict[str, Any] = Field(default_factory=dict)


class Candidate(BaseModel):
    """One response to a record's prompt."""

    id: str
    model: str = Field(description="name of the model spec in the recipe")
    text: str
    sampling: dict[str, Any] = Field(default_factory=dict)
    sample_index: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    stage: str = ""
    reasoning: str | None = Field(
        None, description="a reasoning model's reasoning; ``text`` is the answer alone"
    )
    origin: Origin | None = Field(
        None, description="how a constructed candidate was made; None for a model's sampled reply"
    )


class Judgment(BaseModel):
    """A judge's verdict on one candidate (pointwise) or on two (pairwise, candidate_ids = [a, b]).

    ``score`` is the judge's headline number (higher is better for pointwise judges; for pairwise judges
    it is the preference for the first candidate in [-1, 1]). ``status`` is ``"failed"`` when the judge
    could not produce a score; ``raw`` then still holds what the model said.
    """

    judge: str
    candidate_ids: list[str]
    score: float | None = None
    scores: dict[str, float | None] = Field(default_factory=dict)
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None
    raw: str = ""
    rationale: str = ""
    template_hash: str | None = None
    model: str | None = None
    sampling: dict[str, Any] = Field(default_factory=dict)
    attempts: int = 1
    details: dict[str, Any] = Field(default_factory=dict)


class Pair(BaseModel):
    chosen_id: str
    rejected_id: str
    chosen_score: float
    rejected_score: float
    margin: float
    judge: str
    rule: str


class Record(BaseModel):
    """Everything synthpref knows about one prompt."""

    id: str
    prompt: list[Message]
    source_row: int = -1
    metadata: dict[str, Any] = Field(default_factory=dict)
    annotations: dict[str, Any] = Field(
        default_factory=dict,
        description="per-prompt artefacts of stages (e.g. checklists, domains)",
    )
    candidates: list[Candidate] = Field(default_factory=list)
    judgments: list[Judgment] = Field(default_factory=list)
    pairs: list[Pair] = Field(default_factory=list)

    def candidate(self, candidate_id: str) -> Candidate:
        for c in self.candidates:
            if c.id == candidate_id:
                return c
        raise KeyError(f"record {self.id!r} has no candidate {candidate_id!r}")

    def judgments_by(self, judge: str) -> list[Judgment]:
        return [j for j in self.judgments if j.judge == judge]


_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_CANDIDATE = pa.struct(
    [
        ("id", pa.string()),
        ("model", pa.string()),
        ("text", pa.string()),
        ("sampling", pa.string()),
        ("sample_index", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("stage", pa.string()),
        ("reasoning", pa.string()),  # absent from checkpoints written before it: read as None
        ("origin", pa.string()),  # JSON or null; absent from older checkpoints: read as None
    ]
)
_JUDGMENT = pa.struct(
    [
        ("judge", pa.string()),
        ("candidate_ids", pa.list_(pa.string())),
        ("score", pa.float64()),
        ("scores", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("raw", pa.string()),
        ("rationale", pa.string()),
        ("template_hash", pa.string()),
        ("model", pa.string()),
        ("sampling", pa.string()),
        ("attempts", pa.int64()),
        ("details", pa.string()),
    ]
)
_PAIR = pa.struct(
    [
        ("chosen_id", pa.string()),
        ("rejected_id", pa.string()),
        ("chosen_score", pa.float64()),
        ("rejected_score", pa.float64()),
        ("margin", pa.float64()),
        ("judge", pa.string()),
        ("rule", pa.string()),
    ]
)
RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.list_(_MESSAGE)),
        ("source_row", pa.int64()),
        ("metadata", pa.string()),
        ("annotations", pa.string()),
        ("candidates", pa.list_(_CANDIDATE)),
        ("judgments", pa.list_(_JUDGMENT)),
        ("pairs", pa.list_(_PAIR)),
    ]
)
_JSON_FIELDS = {
    "record": ("metadata", "annotations"),
    "candidates": ("sampling",),
    "judgments": ("scores", "sampling", "details"),
}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def records_to_arrow(records: list[Record]) -> pa.Table:
    rows = []
    for r in records:
        row = r.model_dump()
        for key in _JSON_FIELDS["record"]:
            row[key] = _dumps(row[key])
        for part in ("candidates", "judgments"):
            for item in row[part]:
                for key in _JSON_FIELDS[part]:
                    item[key] = _dumps(item[key])
        for item in row["candidates"]:
            item["origin"] = None if item["origin"] is None else _dumps(item["origin"])
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def records_from_arrow(table: pa.Table) -> list[Record]:
    out = []
    for row in table.to_pylist():
        for key in _JSON_FIELDS["record"]:
            row[key] = json.loads(row[key])
        for part in ("candidates", "judgments"):
            for item in row[part]:
                for key in _JSON_FIELDS[part]:
                    item[key] = json.loads(item[key])
        for item in row["candidates"]:
            if item.get("origin") is not None:
                item["origin"] = json.loads(item["origin"])
        out.append(Record.model_validate(row))
    return out
