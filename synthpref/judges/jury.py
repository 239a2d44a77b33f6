"""A jury: several judges' verdicts combined into one, with their agreement reported.

A panel of different judges is less biased than one judge (Verga et al., 2024, "Replacing Judges with
Juries"), and how often the judges agree says how much a preference can be trusted. The jury does not
call models itself: it reads the judgments of earlier judge stages named in ``judges`` (rubric,
pairwise, checklist, Prometheus, scoring or custom judges alike) through the pair builder's
``candidate_scores`` (pairwise judges give each candidate its mean preference over its comparisons),
and writes one pointwise judgment per candidate that the pair builder can use.

Methods:

- ``mean``: the mean of the judges' normalised scores (0-1). A judge's score is normalised with its
  declared range (``score_range``: rubric 1-5, checklist 0-1, pairwise -1-1, ...), or, for judges that
  declare none (e.g. log-probability scores), min-max within the prompt's candidates.
- ``vote``: majority vote per pair of candidates (each judge votes for the one it scored higher),
  then each candidate's Copeland score: its mean over opponents of +1 (won the vote), 0 (tied vote),
  -1 (lost), in [-1, 1].
- ``borda``: each judge ranks the candidates; a candidate gets one point per candidate ranked below
  it (half a point per tie), summed over judges and divided by judges x (candidates - 1), in [0, 1].
- ``lexicographic``: the judges in the order listed, each deciding only among candidates the ones
  before it tie on (a verifier's correctness first, a rubric breaking ties among equally correct
  answers); a candidate's score is the share of the other candidates it beats on the first judge
  that separates them (half per full tie), in [0, 1]. ``min_judges`` still applies.

Agreement: for every pair of candidates each judge implies a winner (A, B or tie); per pair of judges
these labels are tallied as stage counters ``agreement:<judge1>|<judge2>:<label1><label2>``. Counters
add up over shards, so Cohen's kappa over the whole run follows from the run summary with
``synthpref.metrics.kappas_from_counters``; per prompt, ``details.agreement`` gives the share of
candidate pairs on which all judges agree. Only judges that scored every candidate of a prompt take part
in that prompt (counted as ``absent:<judge>`` otherwise).
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

from pydantic import Field

from synthpref.metrics import confusion_key, pairwise_labels, sign
from synthpref.records import Judgment, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.pairs import candidate_scores
from synthpref.stages.registry import register_stage


class JuryParams(StageParams):
    judges: list[str] = Field(
        min_length=2, description="names of earlier judge stages whose verdicts are combined"
    )
    method: Literal["mean", "vote", "borda", "lexicographic"] = Field(
        "mean",
        description="mean of normalised scores, pairwise majority vote, Borda count, or "
        "lexicographic (judges in the order listed, each breaking the ties of those before it)",
    )
    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="judge name -> [low, high] score range for normalisation, overriding what the "
        "judge declares",
    )
    min_judges: int = Field(
        2,
        ge=1,
        description="prompts where fewer judges scored every candidate get failed judgments",
    )


@register_stage
class Jury(Stage):
    """Combines earlier judges (mean / majority vote / Borda) and reports their agreement."""

    type_name = "jury"
    kind = "judge"
    Params = JuryParams
    params: JuryParams

    def __init__(self, name: str, params: JuryParams, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self._ranges: dict[str, tuple[float, float] | None] = dict(params.ranges)

    def check(self, previous: list[Stage]) -> list[str]:
        judges = {s.name: s for s in previous if s.kind == "judge"}
        problems = [
            f"judges: {name!r} is not a judge stage before this one "
            f"({', '.join(judges) or 'there is none'})"
            for name in self.params.judges
            if name not in judges
        ]
        if len(set(self.params.judges)) != len(self.params.judges):
            problems.append("judges: a judge is listed twice")
        if self.params.min_judges > len(self.params.judges):
            problems.append("min_judges is larger than the number of judges")
        return problems

    def bind(self, previous: list[Stage]) -> None:
        judges = {s.name: s for s in previous if s.kind == "judge"}
        for name in self.params.judges:
            declared = getattr(judges.get(name), "score_range", None)
            self._ranges[name] = self.params.ranges.get(name) or declared

    def fingerprint(self) -> dict:
        return {"ranges": {k: list(v) if v else None for k, v in self._ranges.items()}}

    async def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            self._judge(record)
        return records

    def _judge(self, record: Record) -> None:
        ids = [c.id for c in record.candidates]
        per_judge: dict[str, dict[str, float]] = {}
        for name in self.params.judges:
            scores = candidate_scores(record, name)
            if ids and all(c in scores for c in ids):
                per_judge[name] = scores
            else:
                self.counters[f"absent:{name}"] += 1
        if len(per_judge) < self.params.min_judges or len(ids) < 1:
            for c in ids:
                self._record(record, c, None, {}, {"judges_used": sorted(per_judge)}, failed=True)
            return

        labels = {name: pairwise_labels(s, ids) for name, s in per_judge.items()}
        for a, b in itertools.combinations(sorted(labels), 2):
            for pair in labels[a]:
                self.counters[confusion_key(a, b, labels[a][pair], labels[b][pair])] += 1
        pairs = list(itertools.combinations(ids, 2))
        unanimous = sum(1 for p in pairs if len({lab[p] for lab in labels.values()}) == 1)
        self.counters["candidate_pairs"] += len(pairs)
        self.counters["unanimous_pairs"] += unanimous

        normalised = {name: self._normalise(name, s, ids) for name, s in per_judge.items()}
        if self.params.method == "mean":
            combined = {c: sum(n[c] for n in normalised.values()) / len(normalised) for c in ids}
        elif self.params.method == "vote":
            combined = _copeland(ids, labels)
        elif self.params.method == "lexicographic":
            order = [name for name in self.params.judges if name in per_judge]
            combined = _lexicographic(ids, [per_judge[name] for name in order])
        else:
            combined = _borda(ids, per_judge)
        details_common = {
            "method": self.params.method,
            "judges_used": sorted(per_judge),
            "agreement": unanimous / len(pairs) if pairs else None,
        }
        for c in ids:
            self._record(
                record,
                c,
                combined[c],
                {name: n[c] for name, n in normalised.items()},
                {**details_common, "raw_scores": {name: s[c] for name, s in per_judge.items()}},
            )

    def _normalise(self, name: str, scores: dict[str, float], ids: list[str]) -> dict[str, float]:
        rng = self._ranges.get(name)
        if rng is not None and rng[1] > rng[0]:
            lo, hi = rng
        else:
            lo, hi = min(scores[c] for c in ids), max(scores[c] for c in ids)
        if hi == lo:
            return {c: 0.5 for c in ids}
        return {c: min(1.0, max(0.0, (scores[c] - lo) / (hi - lo))) for c in ids}

    def _record(self, record, cand_id, score, scores, details: dict[str, Any], failed=False):
        self.counters["judgments"] += 1
        if failed:
            self.counters["failed"] += 1
        record.judgments.append(
            Judgment(
                judge=self.name,
                candidate_ids=[cand_id],
                score=score,
                scores=scores,
                status="failed" if failed else "ok",
                error=(
                    f"fewer than {self.params.min_judges} judges scored every candidate "
                    f"(had: {', '.join(details['judges_used']) or 'none'})"
                )
                if failed
                else None,
                attempts=0,
                details=details,
            )
        )


def _copeland(ids: list[str], labels: dict[str, dict[tuple[str, str], int]]) -> dict[str, float]:
    """Each candidate's mean pairwise-majority outcome against every other candidate."""
    if len(ids) < 2:
        return {c: 0.0 for c in ids}
    total = {c: 0.0 for c in ids}
    for x, y in itertools.combinations(ids, 2):
        outcome = sign(sum(lab[(x, y)] for lab in labels.values()))
        total[x] += outcome
        total[y] -= outcome
    return {c: total[c] / (len(ids) - 1) for c in ids}


def _lexicographic(ids: list[str], ordered: list[dict[str, float]]) -> dict[str, float]:
    """Per candidate, the share of others it beats on the first judge (in priority order) whose
    scores for the two differ, half a point for a pair no judge separates."""
    if len(ids) < 2:
        return {c: 0.5 for c in ids}
    points = {c: 0.0 for c in ids}
    for x, y in itertools.combinations(ids, 2):
        first = next((s for s in ordered if s[x] != s[y]), None)
        if first is None:
            points[x] += 0.5
            points[y] += 0.5
        elif first[x] > first[y]:
            points[x] += 1.0
        else:
            points[y] += 1.0
    return {c: points[c] / (len(ids) - 1) for c in ids}


def _borda(ids: list[str], per_judge: dict[str, dict[str, float]]) -> dict[str, float]:
    """Borda count with ties sharing points: one per candidate ranked below, half per tie."""
    if len(ids) < 2:
        return {c: 0.5 for c in ids}
    points = {c: 0.0 for c in ids}
    for scores in per_judge.values():
        for x in ids:
            for y in ids:
                if x != y:
                    points[x] += (
                        1.0 if scores[x] > scores[y] else 0.5 if scores[x] == scores[y] else 0
                    )
    return {c: points[c] / (len(per_judge) * (len(ids) - 1)) for c in ids}
