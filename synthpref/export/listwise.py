"""Listwise format: each prompt with its responses ranked best first, and their scores.

Built from the rankings a ``pairs`` stage with ``rule: listwise`` stores per record. ``completions`` is
a list of conversational completions (each a one-message assistant list, as TRL writes completions),
``scores`` and ``models`` follow the same order. For listwise objectives (ListMLE, LiPO, PRO), or to
derive any pairs later.
"""

from __future__ import annotations

import pyarrow as pa

from synthpref.export import register_format
from synthpref.export.messages import MESSAGES
from synthpref.records import Record

LISTWISE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", MESSAGES),
        ("completions", pa.list_(MESSAGES)),
        ("scores", pa.list_(pa.float64())),
        ("models", pa.list_(pa.string())),
        ("judge", pa.string()),
    ]
)


@register_format(
    "listwise",
    LISTWISE_SCHEMA,
    "each prompt with its responses ranked best first and their scores (ListMLE, LiPO, PRO)",
)
def listwise_rows(record: Record):
    ranking = record.annotations.get("ranking")
    if not ranking:
        return
    candidates = [record.candidate(cid) for cid in ranking["candidate_ids"]]
    yield {
        "prompt_id": record.id,
        "prompt": [m.model_dump() for m in record.prompt],
        "completions": [[{"role": "assistant", "content": c.text}] for c in candidates],
        "scores": list(ranking["scores"]),
        "models": [c.model for c in candidates],
        "judge": ranking["judge"],
    }
