"""TRL's conversational preference format: ``prompt``, ``chosen``, ``rejected`` as message lists.

Scores, margin and provenance ride along as extra columns; TRL's DPO and reward trainers ignore
columns they do not use. A constructed pair (one side made from the other: an injected error, a
refinement, a self-correction; see :mod:`synthpref.stages.constructed`) says how in
``construction`` (the operation) and ``edit_tokens``; both are null for pairs of sampled replies.
"""

from __future__ import annotations

import pyarrow as pa

from synthpref.export import register_format
from synthpref.export.messages import MESSAGES
from synthpref.records import Pair, Record

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
        ("construction", pa.string()),
        ("edit_tokens", pa.int64()),
    ]
)


def construction(record: Record, pair: Pair) -> dict[str, str | int | None]:
    """How the pair was constructed (the ``origin`` of whichever side was made from the other)."""
    for cid in (pair.chosen_id, pair.rejected_id):
        origin = record.candidate(cid).origin
        if origin is not None:
            return {"construction": origin.operation, "edit_tokens": origin.edit_tokens}
    return {"construction": None, "edit_tokens": None}


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
            **construction(record, pair),
        }
