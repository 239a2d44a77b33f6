"""Margin filter: keep pairs whose score gap is at least ``min_margin``.

By default the gap is the pair's own margin (chosen minus rejected score of the judge that built it).
With ``judges``, each named judge's scores of the two responses are compared instead: ``combine: each``
keeps a pair only if every judge's margin reaches ``min_margin`` (a judge that prefers the rejected
response has a negative margin), ``combine: mean`` compares the judges' mean margin. Judges score on
different scales (rubric 1-5, pairwise -1..1); ``normalize: true`` divides each judge's margin by the
width of its declared score range so margins are comparable (0-1).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from synthpref.filters._common import filter_pairs, judge_problems, needs_pairs
from synthpref.records import Pair, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.pairs import candidate_scores
from synthpref.stages.registry import register_stage

_EPS = 1e-9  # float noise in score means must not decide a threshold


class MarginParams(StageParams):
    min_margin: float = Field(ge=0, description="smallest score gap a kept pair may have")
    judges: list[str] | None = Field(
        None, description="judges whose margins count; default: the pair's own margin"
    )
    combine: Literal["each", "mean"] = Field(
        "each", description="each: every judge's margin >= min_margin; mean: their mean margin"
    )
    normalize: bool = Field(
        False, description="divide each judge's margin by its score range (margins in 0-1 units)"
    )


@register_stage
class MarginFilter(Stage):
    """Keeps pairs whose score margin (per judge, or combined) reaches a threshold."""

    type_name = "margin_filter"
    kind = "filter"
    Params = MarginParams
    params: MarginParams

    def __init__(self, name: str, params: MarginParams, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self._width: dict[str, float] = {}

    def check(self, previous: list[Stage]) -> list[str]:
        problems = needs_pairs(previous) + judge_problems(self.params.judges, previous)
        stages = {s.name: s for s in previous}
        for name in self.params.judges or []:
            rng = getattr(stages.get(name), "score_range", None)
            if self.params.normalize and name in stages and (not rng or rng[1] <= rng[0]):
                problems.append(
                    f"normalize: judge {name!r} declares no score range to normalise by"
                )
        return problems

    def bind(self, previous: list[Stage]) -> None:
        stages = {s.name: s for s in previous}
        for name in self.params.judges or []:
            rng = getattr(stages.get(name), "score_range", None)
            if self.params.normalize and name in stages and rng and rng[1] > rng[0]:
                self._width[name] = float(rng[1] - rng[0])

    def fingerprint(self) -> dict:
        return {"widths": self._width}

    async def process(self, records: list[Record]) -> list[Record]:
        return filter_pairs(self, records, self._decide)

    def _decide(self, record: Record, pair: Pair) -> str | None:
        m = self.params.min_margin
        if not self.params.judges:
            return None if pair.margin >= m - _EPS else "below_margin"
        margins = {}
        for judge in self.params.judges:
            scores = candidate_scores(record, judge)
            if pair.chosen_id not in scores or pair.rejected_id not in scores:
                return f"unscored_by:{judge}"
            gap = scores[pair.chosen_id] - scores[pair.rejected_id]
            margins[judge] = gap / self._width.get(judge, 1.0) if self.params.normalize else gap
        if self.params.combine == "mean":
            return None if sum(margins.values()) / len(margins) >= m - _EPS else "below_margin:mean"
        for judge, gap in margins.items():
            if gap < m - _EPS:
                return f"below_margin:{judge}"
        return None
