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
from synthpref.judges.base import (
    JudgeParams,
    JudgeStage,
    ask_until_parsed,
    instruction,
    judge_request,
)
from synthpref.judges.parsing import expected_rating, parse_rating
from synthpref.records import Judgment, Record
from synthpref.stages.registry import register_stage
from synthpref.templates import load_template

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


@register_stage
class RubricJudge(JudgeStage):
    """Rates each candidate 1-5 per aspect, one call per aspect (UltraFeedback-style)."""

    type_name = "rubric_judge"
    Params = RubricParams
    params: RubricParams
    score_range = (1.0, 5.0)

    def template(self, aspect: str):
        name = self.params.templates.get(aspect, f"rubric/{aspect}.jinja")
        return load_template(name, self.base_dir)

    def check(self, previous) -> list[str]:
        problems = []
        for aspect in self.params.aspects:
            try:
                self.template(aspect)
            except (FileNotFoundError, ValueError) as exc:
                where = f"templates.{aspect}" if aspect in self.params.templates else "aspects"
                problems.append(f"{where}: {exc}")
        if not any(s.kind == "generator" for s in previous):
            problems.append("a judge needs candidates: put a generate stage before it")
        return problems

    def fingerprint(self) -> dict:
        return {a: self.template(a).hash for a in self.params.aspects}

    async def process(self, records: list[Record]) -> list[Record]:
        client = self.client()
        prefill = self.params.prefill if client.supports("prefill") else None
        weighted = self.params.score == "expected" and client.supports("top_logprobs")
        units, requests = [], []
        for record in records:
            asked = instruction(record)
            for cand in record.candidates:
                for aspect in self.params.aspects:
                    text = self.template(aspect).render(instruction=asked, response=cand.text)
                    requests.append(
                        judge_request(text, prefill or "", top_logprobs=20 if weighted else 0)
                    )
                    units.append((record, cand, aspect))
        answers = await ask_until_parsed(
            client, requests, _parse, self.params, prefix=prefill or ""
        )
        grouped: dict[tuple[str, str], list] = {}
        for (record, cand, aspect), answer in zip(units, answers, strict=True):
            grouped.setdefault((record.id, cand.id), []).append((aspect, answer))
        by_id = {r.id: r for r in records}
        for (record_id, cand_id), items in grouped.items():
            by_id[record_id].judgments.append(self._judgment(cand_id, items))
        return records

    def _judgment(self, cand_id: str, items) -> Judgment:
        scores = {a: (ans.value.score if ans.ok else None) for a, ans in items}
        failed = [a for a, ans in items if not ans.ok]
        self.counters["judgments"] += 1
        self.counters["retries"] += sum(ans.attempts - 1 for _, ans in items)
        if failed:
            self.counters["failed"] += 1
        raw = "\n\n".join(f"[{a}]\n{ans.raw}" for a, ans in items)
        return Judgment(
            judge=self.name,
            candidate_ids=[cand_id],
            score=None if failed else sum(scores.values()) / len(scores),
            scores=scores,
            status="failed" if failed else "ok",
            error="; ".join(f"{a}: {ans.error}" for a, ans in items if not ans.ok) or None,
            raw=raw if len(items) > 1 else items[0][1].raw,
            rationale=" ".join(
                ans.value.rationale for _, ans in items if ans.ok and ans.value.rationale
            ),
            template_hash=",".join(f"{a}={self.template(a).hash}" for a, _ in items),
            model=self.params.model,
            sampling=items[0][1].sampling or {},
            attempts=max(ans.attempts for _, ans in items),
            details={
                a: {"rating": ans.value.rating, "distribution": ans.value.distribution}
                for a, ans in items
                if ans.ok
            },
        )


@dataclass(frozen=True)
class Rating:
    rating: float
    score: float
    rationale: str
    distribution: dict[int, float] | None


def _parse(raw: str, completion: Completion) -> Rating:
    """The written rating must parse; the score is its probability-weighted version when available."""
    rating, rationale = parse_rating(raw)
    weighted = expected_rating(completion.top_logprobs)
    if weighted is None:
        return Rating(rating, rating, rationale, None)
    return Rating(rating, weighted[0], rationale, weighted[1])
