"""Follow-up likelihood judge (FLR): how likely is the user's next turn to be pleased or puzzled?

After the candidate response, a follow-up utterance is appended as the next user turn and its
log-likelihood is read by teacher forcing. A good response makes positive follow-ups ("Thanks, that
answers it") likely and negative ones ("That is not what I asked") unlikely. Per dimension (relevance,
correctness, ...) the score is the mean log-likelihood of the positive follow-ups minus the mean of the
negative ones; each follow-up's log-likelihood is its per-token mean by default (``aggregate``).
The candidate's score is the weighted mean of its dimensions' scores.

Shipped follow-up sets (written for synthpref) live in ``prompts/followups/<dimension>.yaml`` with
``positive:`` and ``negative:`` lists; a recipe may pass its own, inline or as a file.

Every follow-up of one (prompt, response) shares the conversation prefix, and all of them go to the
backend in one call: vLLM's prefix caching and the transformers backend's prefix sharing then compute
that prefix once rather than once per follow-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from synthpref.backends.types import ScoreRequest, ScoreResult
from synthpref.judges.logprob import (
    content_hash,
    judged_response,
    load_yaml_file,
    record_failed,
    score_isolated,
)
from synthpref.records import Judgment, Message, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage

DIMENSIONS = (
    "understanding",
    "relevance",
    "correctness",
    "engagingness",
    "informativeness",
    "instruction_following",
)


class FollowupSet(StageParams):
    positive: list[str] = Field(min_length=1, description="follow-ups a good response invites")
    negative: list[str] = Field(min_length=1, description="follow-ups a poor response provokes")
    description: str = ""


@dataclass(frozen=True)
class Loaded:
    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    hash: str


def load_followups(
    dimension: str, source: str | FollowupSet | None, base_dir: str | Path | None = None
) -> Loaded:
    """A dimension's set: inline, from a YAML file, or shipped (prompts/followups/<dimension>.yaml)."""
    if isinstance(source, FollowupSet):
        fs = source
    else:
        path = source or f"followups/{dimension}.yaml"
        try:
            data = load_yaml_file(path, base_dir)
        except FileNotFoundError:
            if source is None:
                raise FileNotFoundError(
                    f"no follow-up set for dimension {dimension!r}: shipped dimensions are "
                    f"{', '.join(DIMENSIONS)}; give others under 'followups'"
                ) from None
            raise
        try:
            fs = FollowupSet.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"follow-up set {path}: {exc}") from None
    for kind in ("positive", "negative"):
        if any(not t.strip() for t in getattr(fs, kind)):
            raise ValueError(f"dimension {dimension!r}: an empty {kind} follow-up")
    digest = content_hash({"positive": fs.positive, "negative": fs.negative})
    return Loaded(dimension, tuple(fs.positive), tuple(fs.negative), digest)


class FollowupParams(StageParams):
    model: str = Field("default", description="the scoring model (a name under 'models')")
    dimensions: list[str] = Field(
        default_factory=lambda: list(DIMENSIONS),
        min_length=1,
        description=f"shipped: {', '.join(DIMENSIONS)}; others need a set under 'followups'",
    )
    followups: dict[str, str | FollowupSet] = Field(
        default_factory=dict,
        description="dimension -> a YAML file with positive/negative lists, or the lists inline; "
        "overrides the shipped set",
    )
    weights: dict[str, float] = Field(
        default_factory=dict, description="dimension -> weight in the score (default 1 each)"
    )
    aggregate: Literal["mean", "sum"] = Field(
        "mean", description="a follow-up's log-likelihood: per-token mean, or sum over its tokens"
    )
    include_end_of_turn: bool = Field(
        False, description="score the end-of-turn token after each follow-up too"
    )
    truncation: Literal["error", "left"] = Field(
        "error",
        description="a conversation over the context window: a failed judgment (error), or drop "
        "the oldest prompt tokens and record how many (left)",
    )


@register_stage
class FollowupJudge(Stage):
    """Scores each candidate by how likely pleased vs puzzled follow-ups become after it (FLR)."""

    type_name = "followup_likelihood"
    kind = "judge"
    Params = FollowupParams
    params: FollowupParams
    model_params = ("model",)
    model_capability = "score"

    def sets(self) -> list[Loaded]:
        if not hasattr(self, "_sets"):
            self._sets = [
                load_followups(d, self.params.followups.get(d), self.base_dir)
                for d in self.params.dimensions
            ]
        return self._sets

    def check(self, previous: list[Stage]) -> list[str]:
        problems = []
        if not any(s.kind == "generator" for s in previous):
            problems.append("a judge needs candidates: put a generate stage before it")
        for d in self.params.followups:
            if d not in self.params.dimensions:
                problems.append(f"followups: {d!r} is not listed under 'dimensions'")
        for d, w in self.params.weights.items():
            if d not in self.params.dimensions:
                problems.append(f"weights: {d!r} is not listed under 'dimensions'")
            elif w < 0:
                problems.append(f"weights: {d!r} is negative")
        if self.params.weights and not any(
            self.params.weights.get(d, 1.0) > 0 for d in self.params.dimensions
        ):
            problems.append("weights: every dimension has weight 0")
        try:
            self.sets()
        except (FileNotFoundError, ValueError) as exc:
            problems.append(str(exc))
        return problems

    def followup_hash(self) -> str:
        return content_hash({s.name: s.hash for s in self.sets()})

    def fingerprint(self) -> dict:
        return {s.name: s.hash for s in self.sets()}

    async def process(self, records: list[Record]) -> list[Record]:
        client = self.model_client(self.params.model)
        sets = self.sets()
        utterances = [(s.name, kind, t) for s in sets for kind in ("positive", "negative")
                      for t in getattr(s, kind)]  # fmt: skip
        units, requests = [], []
        for record in records:
            for cand in record.candidates:
                if not cand.text.strip():
                    units.append((record, cand, None))
                    continue
                units.append((record, cand, len(requests)))
                conversation = judged_response(record, cand.text)
                for _, _, text in utterances:
                    requests.append(
                        ScoreRequest(
                            messages=[*conversation, Message(role="user", content=text)],
                            include_end_of_turn=self.params.include_end_of_turn,
                            truncation=self.params.truncation,
                        )
                    )
        results = await score_isolated(client, requests)
        common = {"template_hash": self.followup_hash(), "model": self.params.model}
        for record, cand, k in units:
            self.counters["judgments"] += 1
            if k is None:
                record_failed(self, record, cand.id, "empty response", "empty_response", **common)
                continue
            mine = results[k : k + len(utterances)]
            errors = [r for r in mine if isinstance(r, str)]
            if errors:
                more = f" (and {len(errors) - 1} more follow-ups)" if len(errors) > 1 else ""
                record_failed(self, record, cand.id, errors[0] + more, **common)
                continue
            record.judgments.append(self._judgment(cand.id, utterances, mine, common))  # type: ignore[arg-type]
        return records

    def _value(self, result: ScoreResult) -> float:
        return result.mean if self.params.aggregate == "mean" else result.total

    def _judgment(self, cand_id, utterances, results: list[ScoreResult], common) -> Judgment:
        per: dict[str, dict[str, list[float]]] = {}
        for (dim, kind, _), result in zip(utterances, results, strict=True):
            per.setdefault(dim, {"positive": [], "negative": []})[kind].append(self._value(result))
        scores: dict[str, float | None] = {}
        for dim, v in per.items():
            scores[dim] = sum(v["positive"]) / len(v["positive"]) - sum(v["negative"]) / len(
                v["negative"]
            )
        weights = {d: self.params.weights.get(d, 1.0) for d in per}
        total = sum(weights.values())
        score = sum(weights[d] * scores[d] for d in per) / total  # type: ignore[operator]
        truncated = max(r.truncated_tokens for r in results)
        if truncated:
            self.counters["truncated"] += 1
        return Judgment(
            judge=self.name,
            candidate_ids=[cand_id],
            score=score,
            scores=scores,
            details={
                "aggregate": self.params.aggregate,
                "weights": weights,
                "followups": per,
                "followup_tokens": sum(len(r.token_logprobs) for r in results),
                "truncated_tokens": truncated,
            },
            **common,
        )
