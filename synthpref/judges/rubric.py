"""Rubric rating judge (UltraFeedback-style): each aspect rated 1-5 in its own call.

Rating aspects separately, as UltraFeedback does, keeps one aspect's verdict from colouring another's.
The candidate's score is the mean of its aspect ratings; if any aspect stays unparseable after the
re-asks, the judgment is ``failed`` (the parsed aspects are kept in ``scores`` for inspection) rather
than an average over fewer aspects that would not be comparable with its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from synthpref.backends.types import Completion
from synthpref.judges.base import Answer, Ask, Form, Judge, JudgeParams, Unit, Verdict
from synthpref.judges.parsing import expected_rating, parse_rating
from synthpref.stages.registry import register_stage

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")


class RubricParams(JudgeParams):
    aspects: list[str] = Field(
        default_factory=lambda: ["helpfulness"],
        description=f"shipped aspects: {', '.join(ASPECTS)}; or any name with a template below",
        min_length=1,
    )
    templates: dict[str, str] = Field(
        default_factory=dict,
        description="aspect -> template path, overriding prompts/rubric/<aspect>.jinja",
    )
    score: Literal["expected", "parsed"] = Field(
        "expected",
        description="expected: probability-weighted rating from the rating token's log-probabilities "
        "where the backend returns them (else the parsed rating); parsed: the rating as written",
    )
    prefill: str | None = Field(
        "Rating:",
        description="start of the reply written for the model where the backend allows it, so even "
        "small models answer in the expected form; null to let the model write freely",
    )


@dataclass(frozen=True)
class Rating:
    rating: float
    score: float
    rationale: str
    distribution: dict[int, float] | None


@register_stage
class RubricJudge(Judge):
    """Rates each candidate 1-5 per aspect, one call per aspect (UltraFeedback-style)."""

    type_name = "rubric_judge"
    Params = RubricParams
    params: RubricParams
    score_range = (1.0, 5.0)

    def template_sources(self) -> dict[str, tuple[str, str]]:
        given = self.params.templates
        return {
            a: (given.get(a, f"rubric/{a}.jinja"), f"templates.{a}" if a in given else "aspects")
            for a in self.params.aspects
        }

    def prefix(self) -> str:
        return self.params.prefill or ""

    def wants_logprobs(self) -> bool:
        return self.params.score == "expected"

    def asks(self, unit: Unit, form: Form) -> list[Ask]:
        templates = self.templates()
        return [Ask(self.render(unit, form, templates[a]), a) for a in self.params.aspects]

    def parse(self, reply: str, completion: Completion) -> Rating:
        """The written rating must parse; the score is its probability-weighted version when
        available."""
        rating, rationale = parse_rating(reply)
        weighted = expected_rating(completion.top_logprobs)
        if weighted is None:
            return Rating(rating, rating, rationale, None)
        return Rating(rating, weighted[0], rationale, weighted[1])

    def verdict(self, unit: Unit, answers: list[Answer[Rating]]) -> Verdict:
        scores = {a.label: (a.value.score if a.ok else None) for a in answers}
        ok = [a for a in answers if a.ok]
        return Verdict(
            score=sum(scores.values()) / len(scores) if len(ok) == len(answers) else None,
            scores=scores,
            rationale=" ".join(a.value.rationale for a in ok if a.value.rationale),
            details={
                a.label: {"rating": a.value.rating, "distribution": a.value.distribution}
                for a in ok
            },
        )
