"""Pointwise ratings: one row per response and judge, with the judge's score.

TRL's conversational prompt-completion form (``prompt``, ``completion``) plus ``score`` (the judge's
mean score for the response; for pairwise judges its mean preference over its comparisons, in
[-1, 1]) and ``aspects`` (per-aspect scores of rubric-style judges, averaged over the judgments of the
response). For regression reward models, rejection sampling or score-conditioned SFT.
"""

from __future__ import annotations

import pyarrow as pa

from synthpref.export import register_format
from synthpref.export.messages import MESSAGES
from synthpref.records import Record
from synthpref.stages.pairs import candidate_scores

POINTWISE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", MESSAGES),
        ("completion", MESSAGES),
        ("score", pa.float64()),
        ("aspects", pa.list_(pa.struct([("name", pa.string()), ("score", pa.float64())]))),
        ("judge", pa.string()),
        ("model", pa.string()),
        ("candidate_id", pa.string()),
    ]
)


@register_format(
    "pointwise",
    POINTWISE_SCHEMA,
    "one row per response and judge with the judge's score, for regression reward models",
)
def pointwise_rows(record: Record):
    prompt = [m.model_dump() for m in record.prompt]
    judges = list(dict.fromkeys(j.judge for j in record.judgments))
    for judge in judges:
        scores = candidate_scores(record, judge)
        for candidate in record.candidates:
            if candidate.id not in scores:
                continue
            yield {
                "prompt_id": record.id,
                "prompt": prompt,
                "completion": [{"role": "assistant", "content": candidate.text}],
                "score": scores[candidate.id],
                "aspects": _aspects(record, judge, candidate.id),
                "judge": judge,
                "model": candidate.model,
                "candidate_id": candidate.id,
            }


def _aspects(record: Record, judge: str, candidate_id: str) -> list[dict]:
    sums: dict[str, list[float]] = {}
    for j in record.judgments:
        if j.judge == judge and j.status == "ok" and j.candidate_ids == [candidate_id]:
            for name, value in j.scores.items():
                if isinstance(value, int | float):
                    sums.setdefault(name, []).append(float(value))
    return [{"name": k, "score": sum(v) / len(v)} for k, v in sorted(sums.items())]
