"""Agreement statistics shared by juries, reports and judge evaluations.

Plain arithmetic on purpose: the formulas are short, and a dependency on scikit-learn for them would
weigh more than the code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Cohen's kappa between two raters' labels of the same items.

    ``(p_o - p_e) / (1 - p_e)``: observed agreement corrected for the agreement expected by chance from
    each rater's label frequencies. 1 is perfect agreement, 0 chance level, below 0 worse than chance.
    Returns None when there are no items. When both raters use one and the same label throughout,
    chance agreement is 1 and kappa is undefined; this returns 1.0 then (they agree on every item),
    matching the convention of most reports, and 0.0 if they each use a different single label.
    """
    if len(a) != len(b):
        raise ValueError(f"the raters labelled different numbers of items ({len(a)} vs {len(b)})")
    return kappa_from_confusion(Counter(zip(a, b, strict=True)))


def kappa_from_confusion(confusion: Mapping[tuple[Hashable, Hashable], float]) -> float | None:
    """Cohen's kappa from a confusion matrix given as {(label_a, label_b): count}."""
    n = sum(confusion.values())
    if n == 0:
        return None
    observed = sum(c for (x, y), c in confusion.items() if x == y) / n
    rows: Counter = Counter()
    cols: Counter = Counter()
    for (x, y), c in confusion.items():
        rows[x] += c
        cols[y] += c
    expected = sum(rows[k] * cols.get(k, 0) for k in rows) / (n * n)
    if expected >= 1.0:
        return 1.0 if observed >= 1.0 else 0.0
    return (observed - expected) / (1.0 - expected)


def sign(x: float, tol: float = 1e-9) -> int:
    return 0 if abs(x) <= tol else (1 if x > 0 else -1)


def pairwise_labels(scores: Mapping[str, float], ids: Iterable[str]) -> dict[tuple[str, str], int]:
    """The winner implied by per-candidate scores for every pair (x, y) of ``ids`` in that order.

    +1: x scored higher, -1: y scored higher, 0: a tie. Only pairs where both have a score are listed.
    """
    ids = [i for i in ids if i in scores]
    out = {}
    for k, x in enumerate(ids):
        for y in ids[k + 1 :]:
            out[(x, y)] = sign(scores[x] - scores[y])
    return out


CONFUSION_PREFIX = "agreement"
_LABEL = {1: "A", 0: "=", -1: "B"}
_UNLABEL = {v: k for k, v in _LABEL.items()}


def confusion_key(judge_a: str, judge_b: str, label_a: int, label_b: int) -> str:
    """A stage-counter key for one cell of two judges' confusion matrix on pairwise winners.

    Counters add up across shards, so kappa over a whole run can be recomputed from the run summary
    with :func:`kappas_from_counters`.
    """
    return f"{CONFUSION_PREFIX}:{judge_a}|{judge_b}:{_LABEL[label_a]}{_LABEL[label_b]}"


def kappas_from_counters(counters: Mapping[str, float]) -> dict[tuple[str, str], float | None]:
    """Cohen's kappa per pair of judges from counters written with :func:`confusion_key`."""
    tables: dict[tuple[str, str], Counter] = {}
    for key, count in counters.items():
        if not key.startswith(CONFUSION_PREFIX + ":"):
            continue
        judges, _, cell = key[len(CONFUSION_PREFIX) + 1 :].rpartition(":")
        if "|" not in judges or len(cell) != 2 or not set(cell) <= set(_UNLABEL):
            continue
        a, _, b = judges.partition("|")
        tables.setdefault((a, b), Counter())[(_UNLABEL[cell[0]], _UNLABEL[cell[1]])] += count
    return {pair: kappa_from_confusion(table) for pair, table in sorted(tables.items())}
