"""Pair building leaves out candidates cut off at max_tokens (``finish_reason == "length"``) unless
the recipe allows them: a truncated response is not a finished answer, so as chosen it teaches an
unfinished reply and as rejected it makes the pair about length."""

from __future__ import annotations

import asyncio
import json

import pytest

from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.report import build_report
from synthpref.stages.pairs import BuildPairs, PairsParams
from tests.curation_fixtures import FAKE, PROMPTS, record, run_recipe

TEXTS = {"a": "Alpha, cut off mid-", "b": "Beta.", "c": "Gamma.", "d": "Delta."}
SCORES = {"a": 5.0, "b": 4.0, "c": 2.0, "d": 1.0}


def _build(rule: str, records, **params):
    stage = BuildPairs("pairs", PairsParams(judge="j", rule=rule, **params))
    stage.judge = "j"
    return stage, asyncio.run(stage.process(records))


def _pairs(record):
    return {(p.chosen_id, p.rejected_id) for p in record.pairs}


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("best_worst", {("b", "c")}),
        ("best_random", {("b", "c")}),
        ("all_pairs", {("b", "c")}),
    ],
)
def test_truncated_candidates_are_neither_chosen_nor_rejected(rule, expected):
    # a (best) and d (worst) finished by length
    r = record("r", texts=TEXTS, scores={"j": SCORES}, truncated=("a", "d"))
    stage, (out,) = _build(rule, [r])
    assert _pairs(out) == expected
    assert stage.counters["truncated_candidates_excluded"] == 2
    assert stage.counters["pairs"] == 1


def test_listwise_ranking_leaves_truncated_candidates_out():
    r = record("r", texts=TEXTS, scores={"j": SCORES}, truncated=("a",))
    stage, (out,) = _build("listwise", [r])
    assert out.annotations["ranking"]["candidate_ids"] == ["b", "c", "d"]
    assert stage.counters["truncated_candidates_excluded"] == 1


@pytest.mark.parametrize("rule", ["best_worst", "best_random", "all_pairs", "listwise"])
def test_a_prompt_left_with_one_finished_candidate_is_skipped_with_a_reason(rule):
    r = record("r", texts=TEXTS, scores={"j": SCORES}, truncated=("a", "b", "c"))
    scored_once = record("s", texts=TEXTS, scores={"j": {"a": 3.0}}, truncated=("a",))
    stage, out = _build(rule, [r, scored_once])
    assert [o.pairs for o in out] == [[], []] and "ranking" not in out[0].annotations
    assert stage.counters["skipped_truncated"] == 1
    assert stage.counters["skipped_fewer_than_2_scored"] == 1  # too few scores, truncated or not
    assert stage.counters["truncated_candidates_excluded"] == 3


def test_allow_truncated_pairs_them_like_any_other():
    r = record("r", texts=TEXTS, scores={"j": SCORES}, truncated=("a", "d"))
    stage, (out,) = _build("best_worst", [r], allow_truncated=True)
    assert _pairs(out) == {("a", "d")}
    assert stage.counters == {"pairs": 1}


def test_unknown_finish_reasons_are_not_truncation():
    r = record("r", texts=TEXTS, scores={"j": SCORES})
    r.candidates[0].finish_reason = None  # candidates given in the input: no finish reason
    r.candidates[3].finish_reason = "content_filter"
    stage, (out,) = _build("best_worst", [r])
    assert _pairs(out) == {("a", "d")}
    assert "truncated_candidates_excluded" not in stage.counters


def _recipe(tmp_path, pairs: dict) -> dict:
    return {
        "source": {"path": "p.jsonl"},
        "stages": [
            {"type": FAKE + "FakeGenerate"},
            {"type": FAKE + "FakeJudge", "name": "j"},
            {"type": "pairs", **pairs},
        ],
        "output": {"dir": str(tmp_path / "run")},
    }


def test_allow_truncated_is_a_recipe_option_checked_at_validation(tmp_path):
    parse_recipe(_recipe(tmp_path, {"allow_truncated": True}), base_dir=tmp_path)
    with pytest.raises(RecipeError, match=r"stages\[2\].*allow_truncated"):
        parse_recipe(_recipe(tmp_path, {"allow_truncated": "sometimes"}), base_dir=tmp_path)


def test_truncation_is_counted_in_the_summary_and_shown_in_the_report(tmp_path):
    # candidates k of a prompt with (k + len(prompt)) even are cut off: two of three for five of the
    # six prompts (skipped), one of three for the last (paired)
    stages = [
        {"type": FAKE + "FakeGenerate", "name": "gen", "n": 3, "truncate_every": 2},
        {"type": FAKE + "FakeJudge", "name": "j"},
        {"type": "pairs"},
    ]
    cut = {p["id"]: [k for k in range(3) if (k + len(p["prompt"])) % 2 == 0] for p in PROMPTS}
    skipped = sum(len(v) == 2 for v in cut.values())
    assert 0 < skipped < len(PROMPTS)
    run_dir, _ = run_recipe(tmp_path, PROMPTS, stages, ["preference"])
    summary = json.loads((run_dir / "summary.json").read_text())
    counters = next(s for s in summary["stages"] if s["name"] == "pairs")["counters"]
    assert counters["skipped_truncated"] == skipped
    assert counters["truncated_candidates_excluded"] == sum(len(v) for v in cut.values())
    assert counters.get("pairs", 0) == len(PROMPTS) - skipped
    report = build_report(run_dir)
    data = json.loads(report.json.read_text())
    assert {"stage": "pairs", "reason": "truncated", "rows": skipped} in data["dropped"]
    md = report.markdown.read_text()
    excluded = counters["truncated_candidates_excluded"]
    assert f"`pairs` left out {excluded} candidate(s) cut off at max_tokens" in md
