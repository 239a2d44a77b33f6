"""Reward-model pairs with margin: TRL's ``RewardTrainer`` format with implicit prompts.

``chosen`` and ``rejected`` are whole conversations (the prompt messages followed by the response), and
``margin`` is the judge's score gap, which ``RewardTrainer`` subtracts inside its loss
(``-logsigmoid(r_chosen - r_rejected - margin)``, as in Llama 2's reward model) when the column is
present. The margin is in the judge's units (rubric points, or preference in [-1, 1] for pairwise
judges); rescale it in your training script if the judge's scale is large. ``construction`` and
``edit_tokens`` say how a constructed pair was made (null for sampled pairs), as in ``preference``.
"""

from __future__ import annotations

import pyarrow as pa

from synthpref.export import register_format
from synthpref.export.messages import MESSAGES
from synthpref.export.preference import construction
from synthpref.records import Record

REWARD_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("margin", pa.float64()),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
        ("judge", pa.string()),
        ("rule", pa.string()),
        ("construction", pa.string()),
        ("edit_tokens", pa.int64()),
    ]
)


@register_format(
    "reward",
    REWARD_SCHEMA,
    "whole chosen/rejected conversations with the judge's margin, for TRL's RewardTrainer",
)
def reward_rows(record: Record):
    prompt = [m.model_dump() for m in record.prompt]
    for pair in record.pairs:
        yield {
            "prompt_id": record.id,
            "chosen": [
                *prompt,
                {"role": "assistant", "content": record.candidate(pair.chosen_id).text},
            ],
            "rejected": [
                *prompt,
                {"role": "assistant", "content": record.candidate(pair.rejected_id).text},
            ],
            "margin": pair.margin,
            "score_chosen": pair.chosen_score,
            "score_rejected": pair.rejected_score,
            "judge": pair.judge,
            "rule": pair.rule,
            **construction(record, pair),
        }
