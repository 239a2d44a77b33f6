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
from synthpref.judges.base import (
    JudgeParams,
    JudgeStage,
    ask_until_parsed,
    instruction,
    judge_request,
)
from synthpref.judges.pairwise import TwoOrderJudge, TwoOrderParams, Verdict
from synthpref.judges.parsing import ParseError, expected_rating, json_object
from synthpref.records import Judgment, Record
from synthpref.stages.base import StageParams
from synthpref.stages.registry import register_stage
from synthpref.templates import Template, load_template


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


def _reference(stage, record: Record) -> tuple[str | None, str | None]:
    """(reference text, error) for a record under the stage's reference settings."""
    field = stage.params.reference_field
    if field is None:
        return None, None
    value = record.metadata.get(field)
    if isinstance(value, str) and value.strip():
        return value, None
    stage.counters["missing_reference"] += 1
    if stage.params.missing_reference == "fail":
        return None, f"record has no reference answer in field {field!r}"
    return None, None


def _template_check(stage) -> list[str]:
    problems = []
    try:
        stage.template  # noqa: B018 - loads and validates the path
    except (FileNotFoundError, ValueError) as exc:
        problems.append(f"template: {exc}")
    return problems


# absolute ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grade:
    rating: float
    score: float
    feedback: str
    distribution: dict[int, float] | None


@register_stage
class AbsoluteJudge(JudgeStage):
    """Grades each candidate against the recipe's rubric (Prometheus absolute grading)."""

    type_name = "absolute_judge"
    Params = AbsoluteParams
    params: AbsoluteParams
    result_prefix: ClassVar[str] = "Score:"

    @property
    def score_range(self) -> tuple[float, float]:
        keys = list(self.params.rubric.scores or {1: "", 5: ""})
        return float(min(keys)), float(max(keys))

    @property
    def template(self) -> Template:
        return load_template(self.params.template or "prometheus/absolute.jinja", self.base_dir)

    def check(self, previous) -> list[str]:
        problems = _template_check(self)
        if not self.params.rubric.scores:
            problems.append(
                "rubric.scores: absolute grading needs a description of every score, e.g. "
                "{1: ..., 2: ..., 3: ..., 4: ..., 5: ...}"
            )
        if not any(s.kind == "generator" for s in previous):
            problems.append("a judge needs candidates: put a generate stage before it")
        return problems

    def fingerprint(self) -> dict:
        return {"template": self.template.hash}

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

    async def process(self, records: list[Record]) -> list[Record]:
        client = self.client()
        json_output = self.params.structured == "auto" and client.supports("json_schema")
        first = self.params.reasoning == "after"
        prefill = (
            self.result_prefix if first and not json_output and client.supports("prefill") else None
        )
        weighted = self.params.score == "expected" and first and client.supports("top_logprobs")
        low, high = (int(v) for v in self.score_range)
        units, requests, failed = [], [], []
        for record in records:
            reference, error = _reference(self, record)
            for cand in record.candidates:
                if error:
                    failed.append((record, cand.id, error))
                    continue
                text = self.template.render(
                    instruction=instruction(record),
                    response=cand.text,
                    reference=reference,
                    rubric=self.params.rubric.model_dump(),
                    reasoning=self.params.reasoning,
                    json_output=json_output,
                )
                requests.append(
                    judge_request(
                        text,
                        prefill,
                        top_logprobs=20 if weighted else 0,
                        json_schema=self.json_schema() if json_output else None,
                    )
                )
                units.append((record, cand.id, reference is not None))

        def parse(raw: str, completion: Completion) -> Grade:
            rating, feedback = parse_result_score(raw, low, high, leading=first)
            dist = expected_rating(completion.top_logprobs, low, high) if weighted else None
            if dist is None:
                return Grade(rating, rating, feedback, None)
            return Grade(rating, dist[0], feedback, dist[1])

        answers = await ask_until_parsed(client, requests, parse, self.params, prefix=prefill or "")
        for (record, cand_id, with_ref), ans in zip(units, answers, strict=True):
            self.counters["judgments"] += 1
            self.counters["retries"] += ans.attempts - 1
            if not ans.ok:
                self.counters["failed"] += 1
            record.judgments.append(
                Judgment(
                    judge=self.name,
                    candidate_ids=[cand_id],
                    score=ans.value.score if ans.ok else None,
                    scores={"rating": ans.value.rating} if ans.ok else {},
                    status="ok" if ans.ok else "failed",
                    error=ans.error,
                    raw=ans.raw,
                    rationale=ans.value.feedback if ans.ok else "",
                    template_hash=self.template.hash,
                    model=self.params.model,
                    sampling=ans.sampling or {},
                    attempts=ans.attempts,
                    details={
                        "reference": with_ref,
                        "distribution": ans.value.distribution if ans.ok else None,
                    },
                )
            )
        for record, cand_id, error in failed:
            self.counters["judgments"] += 1
            self.counters["failed"] += 1
            record.judgments.append(
                Judgment(
                    judge=self.name,
                    candidate_ids=[cand_id],
                    status="failed",
                    error=error,
                    attempts=0,
                    template_hash=self.template.hash,
                    model=self.params.model,
                )
            )
        return records


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
class RelativeJudge(TwoOrderJudge):
    """Compares pairs of candidates on the recipe's rubric in both orders (Prometheus relative)."""

    type_name = "relative_judge"
    Params = RelativeParams
    params: RelativeParams
    verdict_values: ClassVar[dict[str, float]] = {"A": 1.0, "B": -1.0}
    verdict_prefix: ClassVar[str] = "[RESULT] Response"
    reason_key: ClassVar[str] = "feedback"
    default_template = "prometheus/relative.jinja"

    async def process(self, records: list[Record]) -> list[Record]:
        self._refs: dict[str, str | None] = {}
        keep = []
        for record in records:
            reference, error = _reference(self, record)
            self._refs[record.id] = reference
            if error:
                for x, y in self.pairs_of(record):
                    self.counters["judgments"] += 1
                    self.counters["failed"] += 1
                    record.judgments.append(
                        Judgment(
                            judge=self.name,
                            candidate_ids=[x.id, y.id],
                            status="failed",
                            error=error,
                            attempts=0,
                            template_hash=self.template.hash,
                            model=self.params.model,
                        )
                    )
            else:
                keep.append(record)
        await super().process(keep)
        return records

    def render(self, record: Record, response_a: str, response_b: str, json_output: bool) -> str:
        reference = self._refs.get(record.id)
        return self.template.render(
            instruction=instruction(record),
            response_a=response_a,
            response_b=response_b,
            reference=reference,
            rubric=self.params.rubric.model_dump(),
            reasoning=self.params.reasoning,
            json_output=json_output,
        )

    def parse(self, raw: str, completion: Completion) -> Verdict:
        return parse_ab(raw)


_AB_RESULT = re.compile(r"\[\s*RESULT\s*\]\s*[:=\-]?\s*[\[(*\"']*\s*(?:response\s+)?([AB])\b", re.I)
_AB_LABEL = re.compile(
    r"(?:verdict|winner|result|better response|choice)\s*\**\s*[:=]\s*[\[(*\"']*\s*"
    r"(?:response\s+)?([AB])\b",
    re.IGNORECASE,
)


def parse_ab(text: str) -> Verdict:
    """A or B from ``[RESULT] A``, JSON ``{"verdict": "A"}`` or a labelled ``Verdict: B``; else
    ParseError. Prose such as "Response A is better" is not read: it is too easy to misread."""
    obj = json_object(text)
    if obj is not None:
        for key in ("verdict", "result", "winner", "choice"):
            value = obj.get(key)
            if isinstance(value, str):
                label = value.strip().upper().removeprefix("RESPONSE").strip()
                if label in ("A", "B"):
                    return Verdict(label, str(obj.get("feedback") or obj.get("reasoning") or ""))
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
            return Verdict(m.group(1).upper(), _feedback(text, m))
    raise ParseError(f"no '[RESULT] A' or '[RESULT] B' found in {text[:160]!r}")
