"""Pair building: turn a judge's scores into chosen/rejected pairs.

``best_worst``: chosen is the best-scored candidate, rejected the worst. Prompts are skipped (and the
reason counted) when fewer than two candidates have a score, when all scores tie, when the two texts are
identical, or when the margin is below ``min_margin``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from synthpref.records import Pair, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage


def candidate_scores(record: Record, judge: str) -> dict[str, float]:
    """Mean score per candidate over the judge's successful pointwise judgments."""
    sums: dict[str, list[float]] = {}
    for j in record.judgments:
        if (
            j.judge == judge
            and j.status == "ok"
            and j.score is not None
            and len(j.candidate_ids) == 1
        ):
            sums.setdefault(j.candidate_ids[0], []).append(j.score)
    return {c: sum(v) / len(v) for c, v in sums.items()}


class PairsParams(StageParams):
    judge: str | None = Field(
        None, description="the judge stage whose scores decide; default: the last judge"
    )
    rule: Literal["best_worst"] = "best_worst"
    min_margin: float = Field(0.0, ge=0, description="skip pairs whose score gap is smaller")


@register_stage
class BuildPairs(Stage):
    type_name = "pairs"
    kind = "pairs"
    Params = PairsParams
    params: PairsParams

    def check(self, previous: list[Stage]) -> list[str]:
        judges = [s.name for s in previous if s.kind == "judge"]
        if not judges:
            return ["building pairs needs scores: put a judge stage before it"]
        if self.params.judge is None:
            self.judge = judges[-1]
        elif self.params.judge not in judges:
            return [
                f"judge {self.params.judge!r} is not a judge stage before this one ({', '.join(judges)})"
            ]
        else:
            self.judge = self.params.judge
        return []

    def fingerprint(self) -> dict:
        return {"judge": self.judge}

    async def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            record.pairs = [p for p in record.pairs if p.judge != self.judge]
            reason = self._pair(record)
            self.counters[reason] += 1
        return records

    def _pair(self, record: Record) -> str:
        scores = candidate_scores(record, self.judge)
        if len(scores) < 2:
            return "skipped_fewer_than_2_scored"
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
        (best, hi), (worst, lo) = ranked[0], ranked[-1]
        if hi == lo:
            return "skipped_all_tied"
        if record.candidate(best).text.strip() == record.candidate(worst).text.strip():
            return "skipped_identical_texts"
        if hi - lo < self.params.min_margin:
            return "skipped_below_margin"
        record.pairs.append(
            Pair(
                chosen_id=best,
                rejected_id=worst,
                chosen_score=hi,
                rejected_score=lo,
                margin=hi - lo,
                judge=self.judge,
                rule=self.params.rule,
            )
        )
        return "pairs"
