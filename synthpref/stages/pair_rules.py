"""Pair rules beyond best-vs-worst, used by the ``pairs`` stage (``rule:`` in the recipe).

- ``best_random``: UltraFeedback-binarized (Tunstall et al., 2023, Zephyr): chosen is the best-scored
  candidate, rejected a random one of the candidates scored strictly lower (by at least
  ``min_margin``) whose text differs from the chosen one. Prompts whose scores all tie are skipped. The
  draw is seeded per prompt (``seed`` and the record id), so it does not depend on sharding or resume.
- ``all_pairs``: every pair of candidates whose scores differ by more than zero and at least
  ``min_margin``, higher-scored one chosen; identical texts are skipped.
- ``constructed``: one pair per constructed candidate (``Candidate.origin``, made by ``inject_errors``,
  ``refine`` or ``self_correct``) and its parent, the side ``origin.prefer`` names chosen, when the
  judge scored both and the chosen one strictly higher, by at least ``min_margin``. Sampled
  candidates are not paired with each other: a constructed pair differs only by its construction.
- ``listwise``: no pairs; the scored candidates ranked best first (identical texts kept once, at their
  best place) are stored as ``record.annotations["ranking"]`` = ``{judge, candidate_ids, scores}``, the
  input of the ``listwise`` dataset format. Pairs built by other pairs stages are left alone.

Each rule returns the reason counted for the record (``pairs`` when it produced something). The
``scores`` a rule receives no longer hold candidates cut off at max_tokens, unless the stage's
``allow_truncated`` is set (see :mod:`synthpref.stages.pairs`).
"""

from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING

from synthpref.records import Pair, Record

if TYPE_CHECKING:
    from synthpref.stages.pairs import BuildPairs

RANKING = "ranking"


def apply(stage: BuildPairs, record: Record, scores: dict[str, float]) -> str:
    return _RULES[stage.params.rule](stage, record, scores)


def _ranked(scores: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def _same_text(record: Record, a: str, b: str) -> bool:
    return record.candidate(a).text.strip() == record.candidate(b).text.strip()


def _pair(stage: BuildPairs, chosen: tuple[str, float], rejected: tuple[str, float]) -> Pair:
    return Pair(
        chosen_id=chosen[0],
        rejected_id=rejected[0],
        chosen_score=chosen[1],
        rejected_score=rejected[1],
        margin=chosen[1] - rejected[1],
        judge=stage.judge,
        rule=stage.params.rule,
    )


def best_random(stage: BuildPairs, record: Record, scores: dict[str, float]) -> str:
    ranked = _ranked(scores)
    best = ranked[0]
    if best[1] == ranked[-1][1]:
        return "skipped_all_tied"
    lower = [c for c in ranked if c[1] < best[1]]
    different = [c for c in lower if not _same_text(record, best[0], c[0])]
    if not different:
        return "skipped_identical_texts"
    pool = [c for c in different if best[1] - c[1] >= stage.params.min_margin]
    if not pool:
        return "skipped_below_margin"
    rng = random.Random(f"{stage.params.seed}:{record.id}")
    record.pairs.append(_pair(stage, best, rng.choice(sorted(pool))))
    return "pairs"


def all_pairs(stage: BuildPairs, record: Record, scores: dict[str, float]) -> str:
    ranked = _ranked(scores)
    if ranked[0][1] == ranked[-1][1]:
        return "skipped_all_tied"
    made = skipped_identical = 0
    for hi, lo in itertools.combinations(ranked, 2):
        gap = hi[1] - lo[1]
        if gap <= 0 or gap < stage.params.min_margin:
            continue
        if _same_text(record, hi[0], lo[0]):
            skipped_identical += 1
            continue
        record.pairs.append(_pair(stage, hi, lo))
        made += 1
    stage.counters["identical_text_pairs_skipped"] += skipped_identical
    if not made:
        return "skipped_identical_texts" if skipped_identical else "skipped_below_margin"
    stage.counters["pair_rows"] += made
    return "pairs"


def listwise(stage: BuildPairs, record: Record, scores: dict[str, float]) -> str:
    ranking: list[tuple[str, float]] = []
    seen: set[str] = set()
    for cid, score in _ranked(scores):
        text = record.candidate(cid).text.strip()
        if text in seen:
            stage.counters["identical_texts_merged"] += 1
            continue
        seen.add(text)
        ranking.append((cid, score))
    if len(ranking) < 2:
        return "skipped_identical_texts"
    if ranking[0][1] == ranking[-1][1]:
        return "skipped_all_tied"
    record.annotations[RANKING] = {
        "judge": stage.judge,
        "candidate_ids": [c for c, _ in ranking],
        "scores": [s for _, s in ranking],
    }
    return "rankings"


def constructed(stage: BuildPairs, record: Record, scores: dict[str, float]) -> str:
    made = 0
    reasons: list[str] = []
    for child in record.candidates:
        origin = child.origin
        if origin is None:
            continue
        if child.id not in scores or origin.parent not in scores:
            reasons.append("skipped_constructed_unscored")
            continue
        chosen, rejected = (
            (origin.parent, child.id) if origin.prefer == "parent" else (child.id, origin.parent)
        )
        gap = scores[chosen] - scores[rejected]
        if gap <= 0:
            reasons.append("skipped_constructed_not_better")
        elif gap < stage.params.min_margin:
            reasons.append("skipped_below_margin")
        elif _same_text(record, chosen, rejected):
            reasons.append("skipped_identical_texts")
        else:
            record.pairs.append(
                _pair(stage, (chosen, scores[chosen]), (rejected, scores[rejected]))
            )
            made += 1
    for reason in reasons:
        stage.counters[reason.removeprefix("skipped_")] += 1
    if made:
        stage.counters["pair_rows"] += made
        return "pairs"
    return reasons[0] if reasons else "skipped_no_constructed_candidates"


_RULES = {
    "best_random": best_random,
    "all_pairs": all_pairs,
    "listwise": listwise,
    "constructed": constructed,
}
