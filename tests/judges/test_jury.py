"""Jury: mean / vote / Borda over earlier judges, agreement counters, Cohen's kappa."""

from __future__ import annotations

import asyncio

import pytest

from synthpref.judges.jury import Jury, JuryParams
from synthpref.metrics import cohen_kappa, kappa_from_confusion, kappas_from_counters
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Judgment
from tests.conftest import tiny_recipe
from tests.judges.test_pairwise import make_record

# kappa ----------------------------------------------------------------------------------------


def test_cohen_kappa_known_values():
    # p_o = 0.75; p_e = 0.5 * 0.25 + 0.5 * 0.75 = 0.5 -> kappa = 0.5
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.5)
    assert cohen_kappa(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    # systematic disagreement on a balanced binary label: -1
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    # the classic 50-item example (Cohen 1960 style): 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa([], []) is None
    assert cohen_kappa(["x", "x"], ["x", "x"]) == 1.0  # one shared label: perfect agreement
    with pytest.raises(ValueError):
        cohen_kappa([1], [1, 2])


def test_kappa_from_confusion_matches():
    conf = {("y", "y"): 20, ("y", "n"): 5, ("n", "y"): 10, ("n", "n"): 15}
    assert kappa_from_confusion(conf) == pytest.approx(0.4)


# jury -----------------------------------------------------------------------------------------


def judged_record():
    """Three candidates; rating (1-5) and checklist (0-1) agree on the best, disagree on the rest;
    the pairwise judge compares all pairs."""
    rec = make_record("r", "q", ["x", "y", "z"])
    a, b, c = (cand.id for cand in rec.candidates)
    rec.judgments = [
        Judgment(judge="rating", candidate_ids=[a], score=5.0),
        Judgment(judge="rating", candidate_ids=[b], score=3.0),
        Judgment(judge="rating", candidate_ids=[c], score=1.0),
        Judgment(judge="tick", candidate_ids=[a], score=1.0),
        Judgment(judge="tick", candidate_ids=[b], score=0.0),
        Judgment(judge="tick", candidate_ids=[c], score=0.5),
        Judgment(judge="pw", candidate_ids=[a, b], score=1.0),
        Judgment(judge="pw", candidate_ids=[a, c], score=0.5),
        Judgment(judge="pw", candidate_ids=[b, c], score=0.0),
    ]
    return rec


class _Judge:
    kind = "judge"

    def __init__(self, name, score_range):
        self.name, self.score_range = name, score_range


def jury(method, judges=("rating", "tick"), **params):
    stage = Jury("jury", JuryParams(judges=list(judges), method=method, **params))
    ranges = {"rating": (1.0, 5.0), "tick": (0.0, 1.0), "pw": (-1.0, 1.0)}
    previous = [_Judge(n, ranges[n]) for n in judges]
    assert stage.check(previous) == []
    stage.bind(previous)
    (rec,) = asyncio.run(stage.process([judged_record()]))
    return stage, {j.candidate_ids[0]: j for j in rec.judgments if j.judge == "jury"}


def test_mean_of_normalised_scores():
    _, out = jury("mean")
    # rating 5,3,1 -> 1, .5, 0 ; tick 1, 0, .5
    assert out["r:c0"].score == pytest.approx(1.0)
    assert out["r:c1"].score == pytest.approx(0.25)
    assert out["r:c2"].score == pytest.approx(0.25)
    assert out["r:c1"].scores == {"rating": 0.5, "tick": 0.0}
    assert out["r:c1"].details["raw_scores"] == {"rating": 3.0, "tick": 0.0}


def test_pairwise_judge_takes_part_through_mean_preferences():
    _, out = jury("mean", judges=("rating", "pw"))
    # pw candidate scores: a = (1 + .5)/2 = .75, b = (-1 + 0)/2 = -.5, c = (-.5 - 0)/2 = -.25
    assert out["r:c0"].scores["pw"] == pytest.approx((0.75 + 1) / 2)
    assert out["r:c2"].scores["pw"] == pytest.approx((-0.25 + 1) / 2)


def test_majority_vote_copeland():
    _, out = jury("vote", judges=("rating", "tick", "pw"))
    # a beats b and c for all three judges
    assert out["r:c0"].score == 1.0
    # b vs c: rating says b (3 > 1), tick says c (.5 > 0), pw says c (-.25 > -.5): c wins 2-1
    assert out["r:c1"].score == -1.0
    assert out["r:c2"].score == 0.0


def test_borda_count():
    _, out = jury("borda")
    # rating ranks a > b > c, tick a > c > b: a 2+2, b 1+0, c 0+1 over 2 judges x 2
    assert out["r:c0"].score == 1.0
    assert out["r:c1"].score == 0.25
    assert out["r:c2"].score == 0.25


def test_agreement_counters_give_kappa():
    stage, out = jury("mean")
    assert stage.counters["candidate_pairs"] == 3
    assert stage.counters["unanimous_pairs"] == 2  # a>b and a>c; b vs c split
    assert out["r:c0"].details["agreement"] == pytest.approx(2 / 3)
    assert stage.counters["agreement:rating|tick:AA"] == 2
    assert stage.counters["agreement:rating|tick:AB"] == 1
    kappas = kappas_from_counters(stage.counters)
    labels_rating, labels_tick = [1, 1, 1], [1, 1, -1]
    assert kappas[("rating", "tick")] == pytest.approx(cohen_kappa(labels_rating, labels_tick))


def test_absent_judge_and_min_judges():
    stage = Jury("jury", JuryParams(judges=["rating", "missing"], min_judges=2))
    stage.bind([_Judge("rating", (1, 5)), _Judge("missing", None)])
    (rec,) = asyncio.run(stage.process([judged_record()]))
    jury_j = [j for j in rec.judgments if j.judge == "jury"]
    assert all(j.status == "failed" for j in jury_j)
    assert stage.counters["absent:missing"] == 1


def test_min_max_when_no_range_is_declared():
    stage = Jury("jury", JuryParams(judges=["rating", "tick"]))
    stage.bind([_Judge("rating", None), _Judge("tick", None)])
    (rec,) = asyncio.run(stage.process([judged_record()]))
    out = {j.candidate_ids[0]: j for j in rec.judgments if j.judge == "jury"}
    assert out["r:c0"].scores == {"rating": 1.0, "tick": 1.0}


def test_jury_recipe_checks(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"].insert(2, {"type": "jury", "judges": ["rating", "nope"]})
    with pytest.raises(RecipeError, match="'nope' is not a judge stage"):
        parse_recipe(recipe)


# end to end on the embedded model -------------------------------------------------------------


@pytest.mark.slow
def test_jury_recipe_on_the_embedded_model(tmp_path, embedded_dir):
    from synthpref.executor.local import LocalExecutor

    recipe = tiny_recipe(tmp_path, prompts=[{"id": "p1", "prompt": "What is 3 + 4?"}])
    recipe["stages"] = [
        {"type": "generate", "models": ["a", "b"], "n": 1, "max_tokens": 12},
        {"type": "rubric_judge", "name": "rating", "model": "a", "max_tokens": 3},
        {
            "type": "absolute_judge",
            "name": "prometheus",
            "model": "a",
            "reasoning": "after",
            "max_tokens": 3,
            "rubric": {"criteria": "Is the answer correct?", "scores": {1: "No.", 2: "Yes."}},
        },
        {"type": "jury", "judges": ["rating", "prometheus"], "method": "mean"},
        {"type": "pairs", "allow_truncated": True},  # 12-token generations may be cut off
    ]
    loaded = parse_recipe(recipe)
    assert any("self-preference" in w for w in loaded.warnings)
    result = LocalExecutor(loaded, progress=False).run()
    jury_summary = next(s for s in result.stages if s.name == "jury")
    assert jury_summary.counters["judgments"] == 2
    pairs = next(s for s in result.stages if s.name == "pairs")
    assert sum(pairs.counters.values()) == 1


def test_lexicographic_first_judge_decides_later_ones_break_ties():
    # tick (first) scores a=1, b=0, c=.5: all differ, so rating never decides
    _, out = jury("lexicographic", judges=("tick", "rating"))
    assert [out[c].score for c in ("r:c0", "r:c1", "r:c2")] == [1.0, 0.0, 0.5]


def test_lexicographic_ties_on_the_first_judge_go_to_the_second():
    rec = make_record("r", "q", ["x", "y", "z"])
    a, b, c = (cand.id for cand in rec.candidates)
    rec.judgments = [
        Judgment(judge="tick", candidate_ids=[a], score=1.0),  # correct
        Judgment(judge="tick", candidate_ids=[b], score=1.0),  # correct
        Judgment(judge="tick", candidate_ids=[c], score=0.0),  # wrong, but rated best
        Judgment(judge="rating", candidate_ids=[a], score=1.0),
        Judgment(judge="rating", candidate_ids=[b], score=4.0),
        Judgment(judge="rating", candidate_ids=[c], score=5.0),
    ]
    stage = Jury("jury", JuryParams(judges=["tick", "rating"], method="lexicographic"))
    stage.bind([_Judge("tick", (0.0, 1.0)), _Judge("rating", (1.0, 5.0))])
    (rec,) = asyncio.run(stage.process([rec]))
    out = {j.candidate_ids[0]: j.score for j in rec.judgments if j.judge == "jury"}
    # by hand: b beats a (tie on tick, 4 > 1) and c (1 > 0); a beats c; c beats nobody
    assert out == {a: 0.5, b: 1.0, c: 0.0}
    # the mean cannot tell the correct answer a from the wrong c: (1 + 0) / 2 vs (0 + 1) / 2
    mean = Jury("jury", JuryParams(judges=["tick", "rating"]))
    mean.bind([_Judge("tick", (0.0, 1.0)), _Judge("rating", (1.0, 5.0))])
    rec.judgments = [j for j in rec.judgments if j.judge != "jury"]
    (rec,) = asyncio.run(mean.process([rec]))
    by_mean = {j.candidate_ids[0]: j.score for j in rec.judgments if j.judge == "jury"}
    assert by_mean[c] == by_mean[a] == 0.5


def test_lexicographic_full_tie_shares_half_a_point():
    rec = make_record("r", "q", ["x", "y"])
    a, b = (cand.id for cand in rec.candidates)
    rec.judgments = [
        Judgment(judge=j, candidate_ids=[cid], score=1.0)
        for j in ("tick", "rating")
        for cid in (a, b)
    ]
    stage = Jury("jury", JuryParams(judges=["tick", "rating"], method="lexicographic"))
    stage.bind([_Judge("tick", (0.0, 1.0)), _Judge("rating", (1.0, 5.0))])
    (rec,) = asyncio.run(stage.process([rec]))
    assert {j.score for j in rec.judgments if j.judge == "jury"} == {0.5}
