"""KTO / unpaired format: ``prompt``, ``completion``, ``label`` (True: desirable) in TRL's
conversational form, for TRL's ``KTOTrainer`` (and BCO).

Each response that appears in a prompt's pairs becomes one row, labelled by its record: desirable if
it was chosen more often than rejected, undesirable if rejected more often (with best-vs-worst pairs:
chosen -> True, rejected -> False, as ``trl.data_utils.unpair_preference_dataset`` does). A response
chosen and rejected equally often (possible with ``all_pairs``) carries no label and is left out.
KTO wants its desirable and undesirable weights set to the class balance; the run report gives the
counts and suggested weights.
"""

from __future__ import annotations

import pyarrow as pa

from synthpref.export import register_format
from synthpref.export.messages import MESSAGES
from synthpref.records import Record

KTO_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", MESSAGES),
        ("completion", MESSAGES),
        ("label", pa.bool_()),
        ("score", pa.float64()),
        ("model", pa.string()),
        ("judge", pa.string()),
    ]
)


@register_format(
    "kto",
    KTO_SCHEMA,
    "unpaired responses labelled desirable or not, for TRL's KTOTrainer (and BCO)",
)
def kto_rows(record: Record):
    prompt = [m.model_dump() for m in record.prompt]
    tally: dict[str, list] = {}  # candidate id -> [wins, losses, score, judge]
    for pair in record.pairs:
        for cid, won, score in (
            (pair.chosen_id, 1, pair.chosen_score),
            (pair.rejected_id, 0, pair.rejected_score),
        ):
            entry = tally.setdefault(cid, [0, 0, score, pair.judge])
            entry[0 if won else 1] += 1
    for cid, (wins, losses, score, judge) in tally.items():
        if wins == losses:
            continue
        candidate = record.candidate(cid)
        yield {
            "prompt_id": record.id,
            "prompt": prompt,
            "completion": [{"role": "assistant", "content": candidate.text}],
            "label": wins > losses,
            "score": score,
            "model": candidate.model,
            "judge": judge,
        }


def kto_balance(desirable: int, undesirable: int) -> dict:
    """Counts, share and KTO weights that put desirable:undesirable (weighted) at 1:1.

    The KTO paper (Ethayarajh et al., 2024) recommends desirable_weight * n_desirable /
    (undesirable_weight * n_undesirable) in [1, 4/3]; fixing undesirable_weight = 1 this suggests
    desirable_weight = n_undesirable / n_desirable (ratio 1).
    """
    total = desirable + undesirable
    out = {
        "desirable": desirable,
        "undesirable": undesirable,
        "desirable_share": desirable / total if total else None,
    }
    if desirable and undesirable:
        out["suggested_desirable_weight"] = round(undesirable / desirable, 3)
        out["suggested_undesirable_weight"] = 1.0
    return out
