"""Length-bias guard: flag or drop pairs where the chosen response is much longer and the win is small.

Judges, human and model, favour longer answers, so a preference dataset easily teaches "be longer"
rather than "be better" (Singhal et al., 2023; Dubois et al., 2024). A pair is length-biased when the
chosen response is at least ``max_ratio`` times as long as the rejected one and its margin is below
``margin_below`` (any margin when that is null): a narrow win that length alone may explain.
``action: drop`` removes such pairs, ``action: flag`` keeps them and marks them in
``record.annotations["flags"]``.

Chosen-versus-rejected length statistics before and after the guard are counted (sums, so they add up
across shards): ``length:<before|after>:pairs``, ``...:chosen_total``, ``...:rejected_total`` and
``...:chosen_longer``; the run report turns them into means and shares.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from synthpref.filters._common import keep_flagged, length, needs_pairs, remember_dropped
from synthpref.records import Pair, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage


class LengthBiasParams(StageParams):
    max_ratio: float = Field(
        1.5, gt=1, description="chosen/rejected length ratio from which a pair is suspect"
    )
    margin_below: float | None = Field(
        None, ge=0, description="only pairs with a smaller margin are suspect; null: any margin"
    )
    unit: Literal["chars", "words"] = Field("words", description="how length is measured")
    action: Literal["drop", "flag"] = Field(
        "drop", description="drop suspect pairs, or keep them marked in annotations['flags']"
    )


@register_stage
class LengthBiasFilter(Stage):
    """Flags or drops pairs whose chosen response is much longer but only narrowly preferred."""

    type_name = "length_bias_filter"
    kind = "filter"
    Params = LengthBiasParams
    params: LengthBiasParams

    def check(self, previous: list[Stage]) -> list[str]:
        return needs_pairs(previous)

    async def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            self._tally(record, "before")
            kept = []
            for pair in record.pairs:
                self.counters["pairs_in"] += 1
                ratio = self._ratio(record, pair)
                biased = ratio >= self.params.max_ratio and (
                    self.params.margin_below is None or pair.margin < self.params.margin_below
                )
                if not biased:
                    self.counters["kept"] += 1
                    kept.append(pair)
                elif self.params.action == "drop":
                    self.counters["dropped:length_bias"] += 1
                    remember_dropped(record, pair, self.name, "length_bias")
                else:
                    keep_flagged(
                        self,
                        record,
                        "length_bias",
                        chosen_id=pair.chosen_id,
                        rejected_id=pair.rejected_id,
                        ratio=round(ratio, 3),
                        margin=pair.margin,
                    )
                    kept.append(pair)
            record.pairs = kept
            self._tally(record, "after")
        return records

    def _lengths(self, record: Record, pair: Pair) -> tuple[int, int]:
        unit = self.params.unit
        return (
            length(record.candidate(pair.chosen_id).text, unit),
            length(record.candidate(pair.rejected_id).text, unit),
        )

    def _ratio(self, record: Record, pair: Pair) -> float:
        chosen, rejected = self._lengths(record, pair)
        if rejected == 0:
            return float("inf") if chosen > 0 else 1.0
        return chosen / rejected

    def _tally(self, record: Record, when: str) -> None:
        for pair in record.pairs:
            chosen, rejected = self._lengths(record, pair)
            self.counters[f"length:{when}:pairs"] += 1
            self.counters[f"length:{when}:chosen_total"] += chosen
            self.counters[f"length:{when}:rejected_total"] += rejected
            self.counters[f"length:{when}:chosen_longer"] += int(chosen > rejected)


def length_stats(counters: dict) -> dict[str, dict[str, float]]:
    """Means and shares from a length-bias filter's counters: {before|after: {...}}."""
    out = {}
    for when in ("before", "after"):
        n = counters.get(f"length:{when}:pairs", 0)
        if not n:
            continue
        chosen = counters.get(f"length:{when}:chosen_total", 0) / n
        rejected = counters.get(f"length:{when}:rejected_total", 0) / n
        out[when] = {
            "pairs": n,
            "mean_chosen": chosen,
            "mean_rejected": rejected,
            "ratio_of_means": chosen / rejected if rejected else float("inf"),
            "chosen_longer_share": counters.get(f"length:{when}:chosen_longer", 0) / n,
        }
    return out
