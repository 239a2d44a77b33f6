"""Consistency filter: keep pairs on whose winner enough judges agree.

For every pair each judge gives one of: ``agree`` (it also prefers the chosen response), ``disagree``,
``tie``, ``order_inconsistent`` (a pairwise judge whose two presentation orders named different winners;
only with ``both_orders: true``) or ``unscored``. A pairwise judge that compared exactly these two
responses is read from that comparison; any other judge from its per-candidate scores
(:func:`~synthpref.stages.pairs.candidate_scores`). A pair is kept when at least ``min_agree`` judges
agree (default: all of them). With one pairwise judge and the default settings this keeps exactly the
pairs whose both orders agree.

Counters: ``judge:<name>:<status>`` per judge and pair, and ``dropped:<reason>`` with the reason the
pair fell short: ``judges_disagree`` if a judge preferred the rejected response, else
``order_inconsistent``, ``judge_tie`` or ``unscored``.
"""

from __future__ import annotations

from pydantic import Field

from synthpref.filters._common import filter_pairs, judge_problems, needs_pairs
from synthpref.metrics import sign
from synthpref.records import Pair, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.pairs import candidate_scores
from synthpref.stages.registry import register_stage

_REASONS = (
    ("disagree", "judges_disagree"),
    ("order_inconsistent", "order_inconsistent"),
    ("tie", "judge_tie"),
    ("unscored", "unscored"),
)


class ConsistencyParams(StageParams):
    judges: list[str] | None = Field(
        None, description="judges that vote; default: every judge stage before this one but juries"
    )
    min_agree: int | None = Field(
        None, ge=1, description="judges that must prefer the chosen response; default: all"
    )
    both_orders: bool = Field(
        True,
        description="a pairwise judge counts as agreeing only if both presentation orders agree",
    )


@register_stage
class ConsistencyFilter(Stage):
    """Keeps pairs where at least j judges (and both orders of pairwise judges) agree on the winner."""

    type_name = "consistency_filter"
    kind = "filter"
    Params = ConsistencyParams
    params: ConsistencyParams

    def __init__(self, name: str, params: ConsistencyParams, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self.judges: list[str] = list(params.judges or [])

    def check(self, previous: list[Stage]) -> list[str]:
        problems = needs_pairs(previous) + judge_problems(self.params.judges, previous)
        judges = self._voters(previous)
        if self.params.judges is None and not judges:
            problems.append("a consistency filter needs at least one judge stage before it")
        if self.params.min_agree is not None and self.params.min_agree > len(judges):
            problems.append(
                f"min_agree: {self.params.min_agree} is more than the {len(judges)} judge(s) "
                f"that vote ({', '.join(judges)})"
            )
        return problems

    def bind(self, previous: list[Stage]) -> None:
        self.judges = self._voters(previous)

    def _voters(self, previous: list[Stage]) -> list[str]:
        """The judges that vote: those named, or every judge before this stage but a jury."""
        if self.params.judges is not None:
            return list(self.params.judges)
        return [s.name for s in previous if s.kind == "judge" and s.type_name != "jury"]

    def fingerprint(self) -> dict:
        return {"judges": self.judges}

    async def process(self, records: list[Record]) -> list[Record]:
        return filter_pairs(self, records, self._decide)

    def _decide(self, record: Record, pair: Pair) -> str | None:
        statuses = {
            judge: judge_status(record, pair, judge, self.params.both_orders)
            for judge in self.judges
        }
        for judge, status in statuses.items():
            self.counters[f"judge:{judge}:{status}"] += 1
        need = self.params.min_agree or len(self.judges)
        if sum(s == "agree" for s in statuses.values()) >= need:
            return None
        for status, reason in _REASONS:
            if status in statuses.values():
                return reason
        return "judges_disagree"


def judge_status(record: Record, pair: Pair, judge: str, both_orders: bool = True) -> str:
    """How one judge sees a pair: agree, disagree, tie, order_inconsistent or unscored."""
    direct = [
        j
        for j in record.judgments
        if j.judge == judge
        and j.status == "ok"
        and j.score is not None
        and sorted(j.candidate_ids) == sorted([pair.chosen_id, pair.rejected_id])
        and len(j.candidate_ids) == 2
    ]
    if direct:
        prefs = []
        for j in direct:
            if both_orders and j.details.get("agree") is False:
                return "order_inconsistent"
            prefs.append(j.score if j.candidate_ids[0] == pair.chosen_id else -j.score)
        preference = sum(prefs) / len(prefs)
    else:
        scores = candidate_scores(record, judge)
        if pair.chosen_id not in scores or pair.rejected_id not in scores:
            return "unscored"
        preference = scores[pair.chosen_id] - scores[pair.rejected_id]
    return {1: "agree", 0: "tie", -1: "disagree"}[sign(preference)]
