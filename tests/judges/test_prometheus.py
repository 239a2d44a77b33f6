"""Prometheus-style absolute and relative grading with a recipe rubric and a reference answer."""

from __future__ import annotations

import pytest

from synthpref.judges.parsing import ParseError
from synthpref.judges.prometheus import (
    AbsoluteJudge,
    AbsoluteParams,
    RelativeJudge,
    RelativeParams,
    parse_ab,
    parse_result_score,
)
from synthpref.recipes.loader import RecipeError, parse_recipe
from tests.conftest import tiny_recipe
from tests.judge_doubles import ScriptedBackend, client_for, prompt_text, run_stage
from tests.judges.test_pairwise import make_record

RUBRIC = {
    "criteria": "Is the answer correct?",
    "scores": {
        1: "Wrong.",
        2: "Mostly wrong.",
        3: "Half right.",
        4: "Right with a slip.",
        5: "Exactly right.",
    },
}


def records():
    recs = [
        make_record("r1", "What is 3 + 4?", ["7", "3 + 4 = 8"]),
        make_record("r2", "Name a primary colour.", ["Red.", "Green is one."]),
    ]
    recs[0].metadata["reference"] = "3 + 4 = 7"
    return recs


def graded(policy, **params):
    backend = ScriptedBackend(policy, name=getattr(policy, "__name__", str(policy)))
    stage = AbsoluteJudge(
        "abs", AbsoluteParams(model="judge", rubric=RUBRIC, **{"max_tokens": 8, **params})
    )
    out = run_stage(stage, records(), {"judge": client_for(backend)})
    return stage, out, backend


# parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, leading, score",
    [
        ("Feedback: fine. [RESULT] 4", False, 4),
        ("The answer is wrong.\n[RESULT]: (2)", False, 2),
        ('{"feedback": "ok", "score": 5}', False, 5),
        ("Score: 3\nFeedback: partly", True, 3),
        ("Score: 3/5", False, 3),
        (" 4\nFeedback: good", True, 4),
    ],
)
def test_result_score_parser_accepts(text, leading, score):
    assert parse_result_score(text, 1, 5, leading=leading)[0] == score


@pytest.mark.parametrize(
    "text, leading",
    [
        ("1. The response is wrong. 2. It is long.", False),  # reasoning-first: no bare numbers
        ("[RESULT] 7", False),
        ("[RESULT] 3.5", False),
        ("Score: 8/10", False),
        ("[RESULT] The response is good", True),
        ("", True),
    ],
)
def test_result_score_parser_rejects(text, leading):
    with pytest.raises(ParseError):
        parse_result_score(text, 1, 5, leading=leading)


@pytest.mark.parametrize(
    "text, label",
    [
        ("Feedback: B is right. [RESULT] B", "B"),
        ("[RESULT] Response A\nFeedback: x", "A"),
        ('{"feedback": "x", "verdict": "B"}', "B"),
        ("Verdict: Response A", "A"),
    ],
)
def test_ab_parser_accepts(text, label):
    assert parse_ab(text).label == label


@pytest.mark.parametrize(
    "text", ["Response A is better.", "[RESULT] A or B", "[RESULT] C", "[RESULT] A ... [RESULT] B"]
)
def test_ab_parser_rejects(text):
    with pytest.raises(ParseError):
        parse_ab(text)


# absolute -------------------------------------------------------------------------------------


def grade_by_correctness(request):
    """Scores 5 when the response contains the reference's last token, else 1."""
    text = prompt_text(request)
    response = text.split("[Response to grade]\n")[1].split("\n[End of response]")[0]
    score = 5 if "7" in response or "Red" in response else 1
    return (
        f" {score}\nFeedback: scripted" if request.continue_final_message else f"[RESULT] {score}"
    )


def test_absolute_grades_with_rubric_and_reference():
    stage, out, backend = graded(grade_by_correctness, reference_field="reference")
    prompts = [prompt_text(r) for r in backend.requests]
    assert len(prompts) == 4
    with_ref = [p for p in prompts if "3 + 4 = 7\n[End of reference answer]" in p]
    assert len(with_ref) == 2  # r1 has a reference, r2 has none
    assert all("Score 5: Exactly right." in p and "Is the answer correct?" in p for p in prompts)
    scores = {j.candidate_ids[0]: j.score for r in out for j in r.judgments}
    assert scores == {"r1:c0": 5.0, "r1:c1": 1.0, "r2:c0": 5.0, "r2:c1": 1.0}
    details = {j.candidate_ids[0]: j.details["reference"] for r in out for j in r.judgments}
    assert details == {"r1:c0": True, "r1:c1": True, "r2:c0": False, "r2:c1": False}
    assert stage.counters["missing_reference"] == 1
    j = out[0].judgments[0]
    assert j.template_hash and j.model == "judge" and j.sampling["max_tokens"] == 8


def test_absolute_missing_reference_can_fail():
    _, out, _ = graded(grade_by_correctness, reference_field="reference", missing_reference="fail")
    statuses = {j.candidate_ids[0]: j.status for r in out for j in r.judgments}
    assert statuses == {"r1:c0": "ok", "r1:c1": "ok", "r2:c0": "failed", "r2:c1": "failed"}
    assert "no reference answer" in out[1].judgments[0].error


def test_absolute_result_first_is_prefilled():
    _, _, backend = graded(grade_by_correctness, reasoning="after")
    assert backend.requests[0].continue_final_message
    assert backend.requests[0].messages[-1].content == "Score:"


def test_absolute_unparseable_is_failed():
    stage, out, backend = graded("garbage", max_retries=1)
    assert len(backend.requests) == 8
    assert all(j.status == "failed" and j.raw for r in out for j in r.judgments)
    assert stage.counters["failed"] == 4


@pytest.mark.parametrize(
    "rubric, message",
    [
        ({"criteria": "x"}, "rubric.scores"),
        ({"criteria": "x", "scores": {1: "a", 3: "b"}}, "consecutive"),
        ({"criteria": "x", "scores": {1: "a", 10: "b"}}, "consecutive"),
        ({"scores": {1: "a", 2: "b"}}, "criteria"),
    ],
)
def test_rubric_validation(tmp_path, rubric, message):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1] = {"type": "absolute_judge", "model": "a", "rubric": rubric}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)


# relative -------------------------------------------------------------------------------------


def relative(policy, **params):
    backend = ScriptedBackend(policy)
    stage = RelativeJudge(
        "rel", RelativeParams(model="judge", rubric={"criteria": "Correct?"}, **params)
    )
    return stage, run_stage(stage, records(), {"judge": client_for(backend)}), backend


def test_relative_both_orders_exposes_position_bias():
    stage, out, backend = relative("always_a", reasoning="after")
    assert backend.requests[0].messages[-1].content == "[RESULT] Response"
    assert stage.counters["inconsistent"] == 2
    for r in out:
        (j,) = r.judgments
        assert j.score == 0.0 and j.details["agree"] is False
        assert j.details["orders"]["ab"]["verdicts"] == ["A"]


def test_relative_consistent_judge():
    stage, out, _ = relative("prefers_longer")
    assert stage.counters["consistent"] == 2
    for r in out:
        (j,) = r.judgments
        assert abs(j.score) == 1.0


def test_relative_schema_is_binary():
    stage = RelativeJudge("rel", RelativeParams(model="judge", rubric={"criteria": "x"}))
    schema = stage.json_schema()
    assert schema["properties"]["verdict"]["enum"] == ["A", "B"]
    assert "feedback" in schema["properties"]


# the embedded model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_absolute_and_relative(embedded_dir):
    from synthpref.backends.builtin import EmbeddedSpec

    backend = EmbeddedSpec().build()
    client = {"judge": client_for(backend)}
    stage = AbsoluteJudge(
        "abs",
        AbsoluteParams(
            model="judge",
            rubric=RUBRIC,
            reference_field="reference",
            reasoning="after",
            max_tokens=4,
            max_retries=1,
        ),
    )
    out = run_stage(stage, records()[:1], client)
    judgments = out[0].judgments
    assert len(judgments) == 2
    for j in judgments:
        assert j.raw.startswith("Score:")
        if j.status == "ok":
            assert 1.0 <= j.score <= 5.0
            assert j.details["distribution"]  # probability-weighted from the score token
    rel = RelativeJudge(
        "rel",
        RelativeParams(
            model="judge", rubric={"criteria": "Correct?"}, reasoning="after", max_tokens=3
        ),
    )
    out = run_stage(rel, records()[:1], client)
    (j,) = out[0].judgments
    assert rel.counters["verdicts"] == 2
    assert j.status == "failed" or j.score in (-1.0, 0.0, 1.0)
