"""Reliability-aware filtering: keep the pairs from the score region where the judge can be trusted.

The idea of policy filtration (PF-PPO, Zhang et al., 2024, "Policy Filtration in RLHF to Fine-Tune LLM
for Code Generation"): a reward model is not equally reliable everywhere, so train only on samples from
the region where its verdicts agree with ground truth. Here the ground truth is a small gold-labelled
set of pairs (``prompt``, ``chosen``, ``rejected``; the columns ``synthpref eval-judges`` reads).

Once per run, before filtering the first shard, the stage has the recipe's judge score the gold pairs:
it replays the judge (and the judge and annotator stages before it that it may read from, such as a
jury's members) on records built from the gold pairs, through the same model clients and request cache,
so the numbers are the ones the run's judge gives. Then it evaluates candidate policies on the gold
pairs, each keeping a subset of them:

- ``all``: every pair the judge does not call a tie (the baseline);
- ``margin>=t``: the judge's score gap is at least ``t`` (``margins``, default: quantiles of the gold
  gaps);
- ``top in [lo, hi]``: the higher of the two scores lies in a band (``bands`` quantile bins of the gold
  scores, and every run of adjacent bins).

Agreement is the share of kept gold pairs where the judge prefers the human-chosen response. Among the
policies that keep at least ``min_keep`` of the gold pairs the most agreeing one is selected (ties: the
one keeping more), and applied to the run's pairs built from that judge.

The selected policy's agreement on the gold pairs it was selected on is optimistic: with a dozen gold
pairs and some fifteen policies, the best one agrees well by luck alone. The headline figure is
therefore out of sample, by ``folds``-fold cross-validation over the gold pairs (pair *i* in fold
*i mod k*; leave-one-out when there are no more pairs than folds): the whole selection, candidate
thresholds and bands included, is redone on the other folds and the chosen policy judged on the
held-out fold; the held-out pairs it keeps, pooled over the folds, give the agreement and its 95%
Wilson score interval. This estimates how well the selection procedure picks a reliable region, which
is what the policy applied to the run (selected on all gold pairs) relies on.

Both figures and the baseline's are reported in the counter key ``selected:<policy>
out_of_sample_agreement=... ci95=[lo,hi] held_out_kept=k/n folds=f in_sample_agreement=...
gold_kept=k/n baseline_agreement=...``. The gold evaluation is deterministic (same judge, same cached
calls), so every shard, resumed or not, uses the same policy.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import Field

from synthpref.filters._common import filter_pairs, judge_problems, needs_pairs, resolve
from synthpref.records import Pair, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.pairs import candidate_scores
from synthpref.stages.registry import register_stage

_EPS = 1e-9
_Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


class ReliabilityParams(StageParams):
    gold: str = Field(
        description="gold-labelled pairs (prompt, chosen, rejected): .jsonl/.json/.parquet/.csv, "
        "relative to the recipe"
    )
    judge: str | None = Field(None, description="the judge to calibrate; default: the last judge")
    margins: list[float] | None = Field(
        None, description="margin thresholds to try; default: quantiles of the gold margins"
    )
    bands: int = Field(
        3,
        ge=0,
        description="score bands to try: this many quantile bins (and adjacent runs); 0: none",
    )
    min_keep: float = Field(
        0.3, gt=0, le=1, description="a policy must keep at least this share of the gold pairs"
    )
    seed: int = Field(0, description="seed of which gold response is shown first to the judge")
    folds: int = Field(
        10,
        ge=2,
        description="cross-validation folds for the out-of-sample agreement (leave-one-out when the "
        "gold set has no more pairs)",
    )


@dataclass(frozen=True)
class Policy:
    kind: str  # "all", "margin" or "band"
    low: float = 0.0
    high: float = 0.0

    def describe(self) -> str:
        if self.kind == "margin":
            return f"margin>={self.low:g}"
        if self.kind == "band":
            return f"top in [{self.low:g}, {self.high:g}]"
        return "all"

    def keeps(self, margin: float, top: float) -> bool:
        if abs(margin) <= _EPS:
            return False
        if self.kind == "margin":
            return abs(margin) >= self.low - _EPS
        if self.kind == "band":
            return self.low - _EPS <= top <= self.high + _EPS
        return True


@dataclass(frozen=True)
class PolicyResult:
    policy: Policy
    kept: int
    agree: int
    total: int

    @property
    def agreement(self) -> float | None:
        return self.agree / self.kept if self.kept else None

    @property
    def kept_share(self) -> float:
        return self.kept / self.total if self.total else 0.0


def evaluate_policies(
    gold: list[tuple[float, float]],
    margins: list[float] | None = None,
    bands: int = 3,
    min_keep: float = 0.3,
) -> tuple[PolicyResult, list[PolicyResult]]:
    """Pick the policy whose kept gold pairs agree best with the labels.

    ``gold`` holds, per scored gold pair, (chosen score minus rejected score, higher of the two scores).
    Returns the selected result and every candidate's result (the baseline ``all`` first).
    """
    total = len(gold)
    policies = [Policy("all")]
    gaps = sorted({round(abs(m), 9) for m, _ in gold if abs(m) > _EPS})
    thresholds = margins if margins is not None else _quantiles(gaps, 10)
    policies += [Policy("margin", t) for t in sorted(set(thresholds)) if t > 0]
    tops = sorted(t for _, t in gold)
    if bands > 1 and tops:
        edges = sorted(set(_quantiles(tops, bands, include_ends=True)))
        for i in range(len(edges) - 1):
            for j in range(i + 1, len(edges)):
                if (i, j) != (0, len(edges) - 1):  # the whole range is the baseline
                    policies.append(Policy("band", edges[i], edges[j]))
    results = []
    for policy in policies:
        kept = [(m, t) for m, t in gold if policy.keeps(m, t)]
        results.append(PolicyResult(policy, len(kept), sum(m > 0 for m, _ in kept), total))
    eligible = [r for r in results if r.kept and r.kept_share >= min_keep - _EPS] or results[:1]
    best = max(eligible, key=lambda r: (r.agreement or 0.0, r.kept, -results.index(r)))
    return best, results


def wilson_interval(successes: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion: unlike the normal approximation it stays inside [0, 1]
    and is not degenerate at 0/n or n/n, which matters on small gold sets. (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class CrossValidation:
    """Held-out gold pairs kept by the policy selected on the other folds, pooled over the folds."""

    kept: int
    agree: int
    total: int
    folds: int

    @property
    def agreement(self) -> float | None:
        return self.agree / self.kept if self.kept else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.agree, self.kept)


def cross_validate(
    gold: list[tuple[float, float]],
    margins: list[float] | None = None,
    bands: int = 3,
    min_keep: float = 0.3,
    folds: int = 10,
) -> CrossValidation:
    """Out-of-sample agreement of :func:`evaluate_policies`' selection, by k-fold cross-validation.

    Pair *i* is in fold *i mod k* (k = min(folds, pairs): leave-one-out on small gold sets).
    """
    k = min(folds, len(gold))
    if k < 2:
        return CrossValidation(kept=0, agree=0, total=len(gold), folds=0)
    kept = agree = 0
    for fold in range(k):
        train = [g for i, g in enumerate(gold) if i % k != fold]
        best, _ = evaluate_policies(train, margins, bands, min_keep)
        for margin, top in gold[fold::k]:
            if best.policy.keeps(margin, top):
                kept += 1
                agree += margin > 0
    return CrossValidation(kept=kept, agree=agree, total=len(gold), folds=k)


def _quantiles(values: list[float], k: int, include_ends: bool = False) -> list[float]:
    if not values:
        return []
    if len(values) <= k and not include_ends:
        return list(values)
    out = []
    lo, hi = (0, k) if include_ends else (0, k - 1)
    for q in range(lo, hi + 1):
        pos = q / k * (len(values) - 1)
        out.append(values[round(pos)])
    return out


@register_stage
class ReliabilityFilter(Stage):
    """Keeps the score band / margin threshold where the judge agrees best with gold labels (PF-PPO)."""

    type_name = "reliability_filter"
    kind = "filter"
    Params = ReliabilityParams
    params: ReliabilityParams

    def __init__(self, name: str, params: ReliabilityParams, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self.judge: str | None = params.judge
        self._chain: list[tuple[Stage, list[Stage]]] = []
        self._gold_path = None
        self._gold_hash: str | None = None
        self.selected: PolicyResult | None = None
        self.results: list[PolicyResult] = []
        self.baseline: PolicyResult | None = None
        self.cv: CrossValidation | None = None

    def check(self, previous: list[Stage]) -> list[str]:
        return needs_pairs(previous) + judge_problems(
            [self.params.judge] if self.params.judge else [], previous, key="judge"
        )

    def bind(self, previous: list[Stage]) -> None:
        judges = [s.name for s in previous if s.kind == "judge"]
        if self.judge is None and judges:
            self.judge = judges[-1]
        if self.judge in judges:
            last = max(i for i, s in enumerate(previous) if s.name == self.judge)
            self._chain = [
                (s, previous[:i])
                for i, s in enumerate(previous[: last + 1])
                if s.kind in ("judge", "annotator")
            ]

    prepare_streams = True  # its pre-pass checks the gold file and reads no record

    def prepare(self, records: Iterable[Record], recipe=None) -> None:
        self._gold_path = resolve(self.params.gold, recipe)
        if not self._gold_path.is_file():
            raise ValueError(f"gold: no such file {self._gold_path}")
        self._gold_hash = hashlib.sha256(self._gold_path.read_bytes()).hexdigest()

    def fingerprint(self) -> dict:
        return {"judge": self.judge, "gold": self._gold_hash}

    async def calibrate(self) -> PolicyResult:
        from synthpref.evaluation.data import load_pairs, to_items

        path = self._gold_path or resolve(self.params.gold, None)
        pairs, errors = load_pairs(path)
        if errors:
            raise ValueError(f"gold: {len(errors)} malformed row(s) in {path}; first: {errors[0]}")
        if not pairs:
            raise ValueError(f"gold: {path} holds no pair")
        items = to_items(pairs, seed=self.params.seed)
        records = [item.record.model_copy(deep=True) for item in items]
        for stage, previous in self._chain:
            replay = type(stage)(stage.name, stage.params, stage.ctx)
            replay.bind(previous)
            records = await replay.process(records)
        by_id = {r.id: r for r in records}
        gold = []
        for item in items:
            scores = candidate_scores(by_id[item.record.id], self.judge)
            if item.chosen_id in scores and item.rejected_id in scores:
                chosen, rejected = scores[item.chosen_id], scores[item.rejected_id]
                gold.append((chosen - rejected, max(chosen, rejected)))
        if not gold:
            raise ValueError(f"judge {self.judge!r} scored none of the {len(items)} gold pairs")
        self.selected, self.results = evaluate_policies(
            gold, self.params.margins, self.params.bands, self.params.min_keep
        )
        self.baseline = self.results[0]
        self.cv = cross_validate(
            gold, self.params.margins, self.params.bands, self.params.min_keep, self.params.folds
        )
        return self.selected

    async def process(self, records: list[Record]) -> list[Record]:
        if self.selected is None:
            await self.calibrate()
        self.counters[self.summary_key()] += sum(len(r.pairs) for r in records)
        return filter_pairs(self, records, self._decide)

    def summary_key(self) -> str:
        """The counter key that carries the calibration into the run summary and report."""
        sel, base, cv = self.selected, self.baseline, self.cv
        lo, hi = cv.interval
        return (
            f"selected:{sel.policy.describe()} out_of_sample_agreement={_fmt(cv.agreement)} "
            f"ci95=[{lo:.3f},{hi:.3f}] held_out_kept={cv.kept}/{cv.total} folds={cv.folds} "
            f"in_sample_agreement={_fmt(sel.agreement)} gold_kept={sel.kept}/{sel.total} "
            f"baseline_agreement={_fmt(base.agreement)}"
        )

    def _decide(self, record: Record, pair: Pair) -> str | None:
        if pair.judge != self.judge:
            return None
        policy = self.selected.policy
        if policy.keeps(pair.margin, pair.chosen_score):
            return None
        return "unreliable_margin" if policy.kind == "margin" else "unreliable_band"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
