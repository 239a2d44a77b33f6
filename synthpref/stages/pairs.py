"""Pair building: turn a judge's scores into chosen/rejected pairs.

``best_worst``: chosen is the best-scored candidate, rejected the worst. Prompts are skipped (and the
reason counted) when fewer than two candidates have a score, when all scores tie, when the two texts are
identical, or when the margin is below ``min_margin``. Scores come from :func:`candidate_scores`: the
mean of a pointwise judge's scores, or for a pairwise judge each candidate's mean preference over its
comparisons.

Candidates cut off at ``max_tokens`` (``finish_reason == "length"``) take part in no rule unless
``allow_truncated`` is set: as chosen, an unfinished reply would be taught as the better one, and as
rejected it makes the pair about being cut off rather than about quality. They are counted
(``truncated_candidates_excluded``), and a prompt left with fewer than two finished, scored candidates
is skipped as ``skipped_truncated``. A missing finish reason (candidates given in the input) is not
truncation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from synthpref.records import Pair, Record
from synthpref.stages import pair_rules
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage

TRUNCATED = "length"  # the finish reason of a generation cut off at max_tokens


def _truncated(record: Record, candidate_id: str) -> bool:
    return record.candidate(candidate_id).finish_reason == TRUNCATED


def candidate_scores(record: Record, judge: str) -> dict[str, float]:
    """Mean score per candidate over the judge's successful judgments.

    Pointwise judgments score their one candidate. A pairwise judgment (candidate_ids = [a, b], score
    = preference for a in [-1, 1]) counts +score for a and -score for b, so a candidate's score is its
    mean preference over the comparisons it took part in: a Copeland / win-rate style score in
    [-1, 1] (with verdicts of +-1 and 0 it is 2 x win rate - 1, ties counting half).
    """
    sums: dict[str, list[float]] = {}
    for j in record.judgments:
        if j.judge != judge or j.status != "ok" or j.score is None:
            continue
        if len(j.candidate_ids) == 1:
            sums.setdefault(j.candidate_ids[0], []).append(j.score)
        elif len(j.candidate_ids) == 2:
            a, b = j.candidate_ids
            sums.setdefault(a, []).append(j.score)
            sums.setdefault(b, []).append(-j.score)
    return {c: sum(v) / len(v) for c, v in sums.items()}


class PairsParams(StageParams):
    judge: str | None = Field(
        None, description="the judge stage whose scores decide; default: the last judge"
    )
    rule: Literal["best_worst", "best_random", "all_pairs", "constructed", "listwise"] = Field(
        "best_worst",
        description="best_worst | best_random (UltraFeedback-binarized) | all_pairs (every pair above "
        "min_margin) | constructed (each constructed candidate with its parent) | listwise (a ranking "
        "in annotations['ranking']); see synthpref.stages.pair_rules",
    )
    min_margin: float = Field(0.0, ge=0, description="skip pairs whose score gap is smaller")
    seed: int = Field(0, description="seed of best_random's draw of the rejected response")
    allow_truncated: bool = Field(
        False,
        description="also pair candidates cut off at max_tokens (finish_reason 'length'); by default "
        "they are left out and counted",
    )


@register_stage
class BuildPairs(Stage):
    """Turns a judge's scores into chosen/rejected pairs by a rule (best_worst, best_random,
    all_pairs, listwise), leaving out candidates cut off at max_tokens unless allowed."""

    type_name = "pairs"
    kind = "pairs"
    Params = PairsParams
    params: PairsParams

    def check(self, previous: list[Stage]) -> list[str]:
        judges = [s.name for s in previous if s.kind == "judge"]
        if not judges:
            return ["building pairs needs scores: put a judge stage before it"]
        if self.params.judge is not None and self.params.judge not in judges:
            return [
                f"judge {self.params.judge!r} is not a judge stage before this one ({', '.join(judges)})"
            ]
        return []

    def bind(self, previous: list[Stage]) -> None:
        judges = [s.name for s in previous if s.kind == "judge"]
        if self.params.judge is None:
            self.judge = judges[-1]
        else:
            self.judge = self.params.judge

    def fingerprint(self) -> dict:
        return {"judge": self.judge}

    async def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            if self.params.rule != "listwise":  # a ranking leaves other stages' pairs alone
                record.pairs = [p for p in record.pairs if p.judge != self.judge]
            reason = self._pair(record)
            self.counters[reason] += 1
        return records

    def _pair(self, record: Record) -> str:
        scores = candidate_scores(record, self.judge)
        if len(scores) < 2:
            return "skipped_fewer_than_2_scored"
        if not self.params.allow_truncated:
            finished = {c: s for c, s in scores.items() if not _truncated(record, c)}
            if len(finished) < len(scores):
                self.counters["truncated_candidates_excluded"] += len(scores) - len(finished)
                scores = finished
            if len(scores) < 2:
                return "skipped_truncated"
        if self.params.rule != "best_worst":
            return pair_rules.apply(self, record, scores)
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
