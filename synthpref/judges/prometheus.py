"""Prometheus-style grading against a user's rubric: absolute (1-5) and relative (A vs B).

Prometheus (Kim et al., 2023, 2024) grades a response against a rubric written for the task, a
criterion plus a description of every score, optionally with a reference answer that earns the top
score. ``absolute_judge`` does that per candidate; ``relative_judge`` compares two candidates on the
criterion and, unlike Prometheus's own relative grading (one order only), asks in both orders and
averages (balanced position calibration, see ``synthpref.judges.pairwise``).

The rubric comes from the recipe::

    rubric:
      criteria: Is the explanation correct and easy to follow for a beginner?
      scores:
        1: Wrong or incomprehensible.
        2: ...
        5: Correct, complete and clear to a beginner.

``reference_field`` names a column of the input (a record metadata field) holding a reference answer.
The reply format follows Prometheus's ``... [RESULT] <score>`` convention so Prometheus-trained judges
work with the shipped templates; ``reasoning: after`` puts the result first (pre-filled where the
backend allows), which small judges and small ``max_tokens`` need, and which lets the score be the
probability-weighted rating read from the score token's log-probabilities.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from synthpref.backends.types import Completion
from synthpref.judges.base import Answer, Judge, JudgeParams, Skip, Unit, Verdict
from synthpref.judges.pairwise import Choice, TwoOrderJudge, TwoOrderParams
from synthpref.judges.parsing import ParseError, expected_rating, json_object
from synthpref.records import Record
from synthpref.stages.base import StageParams
from synthpref.stages.registry import register_stage


class ScoreRubric(StageParams):
    criteria: str = Field(min_length=1, description="what the responses are graded on")
    scores: dict[int, str] | None = Field(
        None,
        description="score -> what a response with that score looks like; consecutive integers "
        "(Prometheus uses 1-5); required by absolute_judge, optional context for relative_judge",
    )

    @field_validator("scores")
    @classmethod
    def _consecutive(cls, scores: dict[int, str] | None) -> dict[int, str] | None:
        if scores is None:
            return None
        keys = sorted(scores)
        if len(keys) < 2 or keys != list(range(keys[0], keys[-1] + 1)):
            raise ValueError(f"scores need two or more consecutive integers, got {keys}")
        if keys[0] < 0 or keys[-1] > 9:
            raise ValueError("scores must lie within 0-9 (single digits), e.g. 1-5")
        return {k: scores[k] for k in keys}


class _ReferenceParams(StageParams):
    rubric: ScoreRubric = Field(
        description="criteria (what is graded) and scores (a description of every score, e.g. 1-5)"
    )
    reference_field: str | None = Field(
        None,
        description="input column (record metadata field) holding a reference answer; null: none",
    )
    missing_reference: Literal["grade_without", "fail"] = Field(
        "grade_without",
        description="when a record lacks the reference: grade it without one (counted), or record "
        "failed judgments",
    )


class AbsoluteParams(JudgeParams, _ReferenceParams):
    reasoning: Literal["before", "after"] = Field(
        "before",
        description="before: feedback, then '[RESULT] <score>' (Prometheus's format); after: the "
        "result first (pre-filled where the backend allows), then feedback",
    )
    structured: Literal["auto", "off"] = Field(
        "auto", description="auto: JSON constrained by a schema where the backend supports it"
    )
    score: Literal["expected", "parsed"] = Field(
        "expected",
        description="expected: probability-weighted score from the score token's log-probabilities "
        "when the result comes first and the backend returns them; parsed: the score as written",
    )
    template: str | None = Field(None, description="a template path overriding the shipped one")


class RelativeParams(TwoOrderParams, _ReferenceParams):
    pass


class _Graded:
    """What absolute and relative grading share: the rubric and the reference answer as template
    variables, and the record-level reference check."""

    params: AbsoluteParams | RelativeParams

    def context(self, record: Record) -> dict[str, Any]:
        field = self.params.reference_field
        if field is None:
            return {"reference": None}
        value = record.metadata.get(field)
        if isinstance(value, str) and value.strip():
            return {"reference": value}
        self.counters["missing_reference"] += 1
        if self.params.missing_reference == "fail":
            raise Skip(f"record has no reference answer in field {field!r}")
        return {"reference": None}

    def variables(self, unit: Unit) -> dict[str, Any]:
        return {"rubric": self.params.rubric.model_dump(), "reasoning": self.params.reasoning}


# absolute ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grade:
    rating: float
    score: float
    feedback: str
    distribution: dict[int, float] | None


@register_stage
class AbsoluteJudge(_Graded, Judge):
    """Grades each candidate against the recipe's rubric (Prometheus absolute grading)."""

    type_name = "absolute_judge"
    Params = AbsoluteParams
    params: AbsoluteParams
    default_template = "prometheus/absolute.jinja"

    @property
    def score_range(self) -> tuple[float, float]:
        keys = list(self.params.rubric.scores or {1: "", 5: ""})
        return float(min(keys)), float(max(keys))

    def check(self, previous) -> list[str]:
        problems = super().check(previous)
        if not self.params.rubric.scores:
            problems.append(
                "rubric.scores: absolute grading needs a description of every score, e.g. "
                "{1: ..., 2: ..., 3: ..., 4: ..., 5: ...}"
            )
        return problems

    def prefix(self) -> str:
        return "Score:" if self.params.reasoning == "after" else ""

    def wants_logprobs(self) -> bool:
        return self.params.score == "expected" and self.params.reasoning == "after"

    def json_schema(self) -> dict[str, Any]:
        low, high = (int(v) for v in self.score_range)
        score = {"type": "integer", "enum": list(range(low, high + 1))}
        feedback = {"type": "string"}
        props = (
            {"feedback": feedback, "score": score}
            if self.params.reasoning == "before"
            else {"score": score, "feedback": feedback}
        )
        return {
            "title": "grade",
            "type": "object",
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        }

    def parse(self, reply: str, completion: Completion) -> Grade:
        low, high = (int(v) for v in self.score_range)
        rating, feedback = parse_result_score(
            reply, low, high, leading=self.params.reasoning == "after"
        )
        dist = expected_rating(completion.top_logprobs, low, high)
        if dist is None:
            return Grade(rating, rating, feedback, None)
        return Grade(rating, dist[0], feedback, dist[1])

    def verdict(self, unit: Unit, answers: list[Answer[Grade]]) -> Verdict:
        (ans,) = answers
        details = {
            "reference": unit.context["reference"] is not None,
            "distribution": ans.value.distribution if ans.ok else None,
        }
        if not ans.ok:
            return Verdict(None, details=details)
        grade = ans.value
        return Verdict(grade.score, {"rating": grade.rating}, grade.feedback, details)


_RESULT = re.compile(r"\[\s*RESULT\s*\]\s*[:=\-]?\s*[\[(*]*\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_SCORE_LABEL = re.compile(
    r"(?:score|rating|grade|result)\s*\**\s*[:=]\s*\**\s*[\[(]?\s*(-?\d+(?:\.\d+)?)"
    r"(?:\s*(?:/|out of)\s*(\d+))?",
    re.IGNORECASE,
)
_LEADING = re.compile(r"^\W*(-?\d+(?:\.\d+)?)\b")
_FEEDBACK = re.compile(r"(?:feedback|rationale|reason(?:ing)?)\s*\**\s*[:=]\s*\**\s*", re.I)


def parse_result_score(
    text: str, low: int = 1, high: int = 5, leading: bool = False
) -> tuple[float, str]:
    """(score, feedback) from a Prometheus-style reply, or ParseError.

    Accepted, in order: ``[RESULT] 4`` (Prometheus), JSON with ``score``, a labelled ``Score: 4``
    (``/5`` allowed), and, only when the result was asked for first, a bare leading number. A reply
    that reasons first may mention numbers ("1. The response ..."), so a bare number is not read then.
    """
    obj = json_object(text)
    if obj is not None:
        for key in ("score", "result", "rating"):
            value = obj.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return _in_range(float(value), low, high, text), str(obj.get("feedback") or "")
    m = _RESULT.search(text)
    if m:
        return _in_range(float(m.group(1)), low, high, text), _feedback(text, m)
    m = _SCORE_LABEL.search(text)
    if m:
        if m.group(2) and int(m.group(2)) != high:
            raise ParseError(f"score given out of {m.group(2)}, expected out of {high}: {text!r}")
        return _in_range(float(m.group(1)), low, high, text), _feedback(text, m)
    if leading:
        m = _LEADING.search(text)
        if m:
            return _in_range(float(m.group(1)), low, high, text), _feedback(text, m)
    raise ParseError(f"no '[RESULT] <{low}-{high}>' found in {text[:160]!r}")


def _in_range(value: float, low: int, high: int, text: str) -> float:
    if not low <= value <= high or value != int(value):
        raise ParseError(f"score {value:g} is not a whole number in {low}-{high}: {text[:160]!r}")
    return value


def _feedback(text: str, m: re.Match) -> str:
    label = _FEEDBACK.search(text)
    if label:
        end = m.start() if m.start() > label.end() else None
        return text[label.end() : end].strip()
    before, after = text[: m.start()].strip(), text[m.end() :].strip()
    return before or after


# relative ---------------------------------------------------------------------------------------


@register_stage
class RelativeJudge(_Graded, TwoOrderJudge):
    """Compares pairs of candidates on the recipe's rubric in both orders (Prometheus relative)."""

    type_name = "relative_judge"
    Params = RelativeParams
    params: RelativeParams
    verdict_values: ClassVar[dict[str, float]] = {"A": 1.0, "B": -1.0}
    verdict_prefix: ClassVar[str] = "[RESULT] Response"
    reason_key: ClassVar[str] = "feedback"
    default_template = "prometheus/relative.jinja"

    def parse(self, reply: str, completion: Completion) -> Choice:
        return parse_ab(reply)


_AB_RESULT = re.compile(r"\[\s*RESULT\s*\]\s*[:=\-]?\s*[\[(*\"']*\s*(?:response\s+)?([AB])\b", re.I)
_AB_LABEL = re.compile(
    r"(?:verdict|winner|result|better response|choice)\s*\**\s*[:=]\s*[\[(*\"']*\s*"
    r"(?:response\s+)?([AB])\b",
    re.IGNORECASE,
)


def parse_ab(text: str) -> Choice:
    """A or B from ``[RESULT] A``, JSON ``{"verdict": "A"}`` or a labelled ``Verdict: B``; else
    ParseError. Prose such as "Response A is better" is not read: it is too easy to misread."""
    obj = json_object(text)
    if obj is not None:
        for key in ("verdict", "result", "winner", "choice"):
            value = obj.get(key)
            if isinstance(value, str):
                label = value.strip().upper().removeprefix("RESPONSE").strip()
                if label in ("A", "B"):
                    return Choice(label, str(obj.get("feedback") or obj.get("reasoning") or ""))
                raise ParseError(f"{key} {value!r} is neither A nor B")
    for pattern in (_AB_RESULT, _AB_LABEL):
        matches = list(pattern.finditer(text))
        labels = {m.group(1).upper() for m in matches}
        if len(labels) > 1:
            raise ParseError(f"both A and B given as the result: {text[:160]!r}")
        if matches:
            m = matches[0]
            if re.match(r"\s*(?:or|/|,)\s*(?:response\s+)?[AB]\b", text[m.end() :], re.I):
                raise ParseError(f"the result line names both A and B: {text[:160]!r}")
            return Choice(m.group(1).upper(), _feedback(text, m))
    raise ParseError(f"no '[RESULT] A' or '[RESULT] B' found in {text[:160]!r}")
