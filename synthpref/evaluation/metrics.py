"""How well judges agree with human labels: verdicts, accuracy, ties, position consistency, kappa.

A judge's *verdict* on a labelled pair is +1 (it prefers the chosen response), 0 (a tie) or -1 (it
prefers the rejected one), or None when it produced no usable judgment (a failure). It is read through
the pair builder's :func:`~synthpref.stages.pairs.candidate_scores`, so it is exactly the preference a
run would turn into a pair: a pointwise judge's verdict compares its scores of the two responses (equal
scores are a tie); a pairwise judge's is the sign of its preference (``Judgment.score``).

Accuracy follows RewardBench: correct verdicts over all pairs, so ties and failures count as wrong.
Because a tie or a failure makes a run skip the prompt rather than emit a wrong pair, the accuracy on
decided pairs (correct / (correct + wrong)) is reported beside it: it is the share of the pairs a run
would emit that point the right way.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from synthpref.metrics import cohen_kappa, sign
from synthpref.records import Record
from synthpref.stages.pairs import candidate_scores

Verdict = int | None  # +1 chosen wins, 0 tie, -1 rejected wins, None failed


@dataclass(frozen=True)
class JudgeVerdict:
    verdict: Verdict
    chosen_score: float | None
    rejected_score: float | None
    pairwise: bool  # the judge compared the two responses in one judgment
    consistent: bool | None  # both orders named the same winner (pairwise judges that record it)
    position_bias: float | None
    error: str | None = None


def judge_verdict(record: Record, judge: str, chosen_id: str, rejected_id: str) -> JudgeVerdict:
    """The verdict of ``judge`` on one labelled pair held in ``record``."""
    own = record.judgments_by(judge)
    pairwise = any(len(j.candidate_ids) == 2 for j in own)
    consistent = bias = None
    for j in own:
        if len(j.candidate_ids) == 2 and j.status == "ok":
            agree = j.details.get("agree")
            consistent = agree if isinstance(agree, bool) else consistent
            pb = j.details.get("position_bias")
            bias = float(pb) if isinstance(pb, int | float) and not isinstance(pb, bool) else bias
    scores = candidate_scores(record, judge)
    if chosen_id not in scores or rejected_id not in scores:
        if not own:
            error = "no judgment"
        else:
            errors = [j.error for j in own if j.status != "ok" and j.error]
            error = errors[0] if errors else "no successful judgment"
        return JudgeVerdict(None, None, None, pairwise, consistent, bias, error)
    c, r = scores[chosen_id], scores[rejected_id]
    return JudgeVerdict(sign(c - r), c, r, pairwise, consistent, bias)


def longer_wins(chosen: str, rejected: str) -> int:
    """The length baseline: the longer response (in characters) wins; equal lengths tie."""
    return sign(len(chosen) - len(rejected))


def random_verdicts(n: int, seed: int) -> list[int]:
    """The random baseline: a fair coin per pair from a fixed seed (expected accuracy 0.5)."""
    rng = random.Random(f"synthpref-eval-random:{seed}")
    return [1 if rng.random() < 0.5 else -1 for _ in range(n)]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion; None for n = 0."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def summarize(
    verdicts: Sequence[Verdict],
    chosen_first: Sequence[bool] | None = None,
    consistent: Sequence[bool | None] | None = None,
    position_bias: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """Accuracy, ties, failures (and, given them, position figures) of one rater on n pairs."""
    n = len(verdicts)
    correct = sum(1 for v in verdicts if v == 1)
    wrong = sum(1 for v in verdicts if v == -1)
    ties = sum(1 for v in verdicts if v == 0)
    failures = sum(1 for v in verdicts if v is None)
    out: dict[str, Any] = {
        "n": n,
        "correct": correct,
        "wrong": wrong,
        "ties": ties,
        "failures": failures,
        "accuracy": _ratio(correct, n),
        "accuracy_ci95": wilson_interval(correct, n),
        "accuracy_decided": _ratio(correct, correct + wrong),
        "tie_rate": _ratio(ties, n),
        "failure_rate": _ratio(failures, n),
    }
    if chosen_first is not None:
        first = [v for v, f in zip(verdicts, chosen_first, strict=True) if f]
        second = [v for v, f in zip(verdicts, chosen_first, strict=True) if not f]
        out["accuracy_chosen_first"] = _ratio(sum(1 for v in first if v == 1), len(first))
        out["accuracy_chosen_second"] = _ratio(sum(1 for v in second if v == 1), len(second))
    if consistent is not None:
        known = [c for c in consistent if c is not None]
        out["position_consistency"] = _ratio(sum(known), len(known))
        out["position_consistency_n"] = len(known)
    if position_bias is not None:
        known_b = [b for b in position_bias if b is not None]
        out["position_bias"] = sum(known_b) / len(known_b) if known_b else None
    return out


def shown_order_labels(verdicts: Sequence[Verdict], chosen_first: Sequence[bool]) -> list[Verdict]:
    """Verdicts as winners in the listed order: +1 the first response (A), -1 the second, 0 a tie."""
    return [
        None if v is None else (v if f else -v) for v, f in zip(verdicts, chosen_first, strict=True)
    ]


def agreement(a: Sequence[Verdict], b: Sequence[Verdict]) -> dict[str, Any]:
    """Cohen's kappa and raw agreement of two raters on the pairs both gave a verdict for."""
    both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not both:
        return {"n": 0, "kappa": None, "agreement": None}
    xs, ys = zip(*both, strict=True)
    return {
        "n": len(both),
        "kappa": cohen_kappa(list(xs), list(ys)),
        "agreement": sum(1 for x, y in both if x == y) / len(both),
    }


def agreement_table(labels: Mapping[str, Sequence[Verdict]]) -> list[dict[str, Any]]:
    """Kappa for every pair of raters (labels in the listed A/B order, so it measures whether they
    pick the same response, independent of the human label)."""
    return [
        {"a": a, "b": b, **agreement(labels[a], labels[b])}
        for a, b in itertools.combinations(labels, 2)
    ]
