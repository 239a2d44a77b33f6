"""TRL's conversational preference format: ``prompt``, ``chosen``, ``rejected`` as message lists.

Scores, margin and provenance ride along as extra columns; TRL's DPO and reward trainers ignore
columns they do not use.
"""

from __future__ import annotations

import pyarrow as pa

from synthpref.export import register_format
from synthpref.export.messages import MESSAGES
from synthpref.records import Record

PREFERENCE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
        ("margin", pa.float64()),
        ("chosen_model", pa.string()),
        ("rejected_model", pa.string()),
        ("judge", pa.string()),
        ("rule", pa.string()),
    ]
)


@register_format(
    "preference",
    PREFERENCE_SCHEMA,
    "TRL conversational preference pairs (prompt, chosen, rejected), for DPO, ORPO, CPO",
)
def preference_rows(record: Record):
    prompt = [m.model_dump() for m in record.prompt]
    for pair in record.pairs:
        chosen = record.candidate(pair.chosen_id)
        rejected = record.candidate(pair.rejected_id)
        yield {
            "prompt_id": record.id,
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen.text}],
            "rejected": [{"role": "assistant", "content": rejected.text}],
            "score_chosen": pair.chosen_score,
            "score_rejected": pair.rejected_score,
            "margin": pair.margin,
            "chosen_model": chosen.model,
            "rejected_model": rejected.model,
            "judge": pair.judge,
            "rule": pair.rule,
        }
