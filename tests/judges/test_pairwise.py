"""Pairwise judge: both orders, k verdicts, calibration, the length rule, parsing, pair building."""

from __future__ import annotations

import pytest

from synthpref.judges.pairwise import (
    PairwiseJudge,
    PairwiseParams,
    apply_length_rule,
    parse_five_level,
)
from synthpref.judges.parsing import ParseError
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Candidate, Judgment, Message, Record
from synthpref.stages.pairs import BuildPairs, PairsParams, candidate_scores
from tests.judge_doubles import ScriptedBackend, client_for, run_stage


def make_record(rid: str, prompt: str, texts: list[str]) -> Record:
    return Record(
        id=rid,
        prompt=[Message(role="user", content=prompt)],
        candidates=[
            Candidate(id=f"{rid}:c{k}", model="m", text=t, stage="gen") for k, t in enumerate(texts)
        ],
    )


def records() -> list[Record]:
    return [
        make_record("r1", "Name a primary colour.", ["Red.", "Red is a primary colour of paint."]),
        make_record("r2", "What is 3 + 4?", ["3 + 4 = 7, since adding 4 to 3 gives 7.", "7"]),
    ]


def judge(backend, **params) -> tuple[PairwiseJudge, list[Record]]:
    stage = PairwiseJudge("pw", PairwiseParams(model="judge", **params))
    out = run_stage(stage, records(), {"judge": client_for(backend)})
    return stage, out


# calibration ----------------------------------------------------------------------------------


def test_always_a_judge_is_fully_inconsistent():
    stage, out = judge(ScriptedBackend("always_a"), samples=3, temperature=0.7)
    judgments = [j for r in out for j in r.judgments]
    assert len(judgments) == 2
    for j in judgments:
        assert j.status == "ok"
        assert j.details["orders"]["ab"]["verdicts"] == ["A++"] * 3
        assert j.details["orders"]["ba"]["verdicts"] == ["A++"] * 3
        assert j.details["agree"] is False
        assert j.details["position_bias"] == 1.0
        assert j.score == 0.0  # the position preference cancels exactly
        assert j.scores == {"ab": 1.0, "ba": -1.0}
    assert stage.counters["inconsistent"] == 2
    assert stage.counters["consistent"] == 0
    assert stage.counters["verdicts"] == stage.counters["picked_first"] == 2 * 2 * 3


def test_consistent_judge_agrees_and_keeps_its_preference():
    stage, out = judge(ScriptedBackend("prefers_longer"))
    for r in out:
        (j,) = r.judgments
        longer = max(r.candidates, key=lambda c: len(c.text)).id
        assert j.details["agree"] is True
        assert j.details["position_bias"] == 0.0
        expected = 0.5 if j.candidate_ids[0] == longer else -0.5
        assert j.score == expected
    assert stage.counters["consistent"] == 2


def test_both_orders_and_k_samples_are_asked_with_distinct_seeds():
    backend = ScriptedBackend("always_a")
    judge(backend, samples=3, temperature=0.7)
    asked = backend.requests
    assert len(asked) == 2 * 2 * 3  # pairs x orders x samples
    first_pair = [r for r in asked if "Name a primary colour." in r.messages[0].content]
    assert len({r.params.seed for r in first_pair}) == 3
    shown_first = {
        r.messages[0].content.split("[Response A]\n")[1].split("\n")[0] for r in first_pair
    }
    assert shown_first == {"Red.", "Red is a primary colour of paint."}


def test_judgment_records_provenance():
    _, out = judge(ScriptedBackend("always_a"))
    j = out[0].judgments[0]
    assert j.template_hash and len(j.template_hash) == 16
    assert j.model == "judge"
    assert j.sampling["temperature"] == 0.0
    assert j.candidate_ids == ["r1:c0", "r1:c1"]
    assert "[ab]" in j.raw and "[ba]" in j.raw


def test_samples_without_temperature_is_a_recipe_error(tmp_path):
    from tests.conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1] = {"type": "pairwise_judge", "model": "a", "samples": 3}
    with pytest.raises(RecipeError, match="temperature"):
        parse_recipe(recipe)


def test_max_pairs_caps_comparisons_deterministically():
    texts = ["a", "bb", "ccc", "dddd"]
    stage = PairwiseJudge("pw", PairwiseParams(model="judge", max_pairs=2))
    rec = make_record("r", "q", texts)
    chosen = [(x.id, y.id) for x, y in stage.units(rec)]
    assert len(chosen) == 2
    assert chosen == [(x.id, y.id) for x, y in stage.units(rec)]
    full = PairwiseJudge("pw", PairwiseParams(model="judge"))
    assert len(full.units(rec)) == 6


# length rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label, la, lb, k, out",
    [
        ("A+", 500, 100, 300, "A=B"),  # slight win by a much longer A -> tie
        ("A+", 300, 100, 300, "A+"),  # not longer by *more than* K
        ("A++", 900, 100, 300, "A++"),  # a clear win stands
        ("B+", 100, 500, 300, "A=B"),
        ("B+", 500, 100, 300, "B+"),  # the shorter one won: no change
        ("A+", 500, 100, None, "A+"),  # rule off
    ],
)
def test_length_rule(label, la, lb, k, out):
    assert apply_length_rule(label, la, lb, k) == out


def test_length_rule_flips_are_counted():
    # the scripted judge always gives the longer response a slight win; every gap here is > 5 chars
    stage, out = judge(ScriptedBackend("prefers_longer"), length_rule_chars=5)
    assert stage.counters["length_rule_flips"] == stage.counters["verdicts"] == 4
    for r in out:
        (j,) = r.judgments
        assert j.score == 0.0
        assert j.details["length_rule"] == {"chars": 5, "flips": 2, "of": 2}
        assert j.details["orders"]["ab"]["calibrated"] == ["A=B"]
    stage, _ = judge(ScriptedBackend("prefers_longer"), length_rule_chars=10_000)
    assert stage.counters["length_rule_flips"] == 0


# parsing and failures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, label",
    [
        ("Verdict: A++", "A++"),
        (" Verdict:  B+ \nReasoning: shorter", "B+"),
        ("Verdict: **A=B**", "A=B"),
        ("Verdict: A = B", "A=B"),
        ('{"reasoning": "x", "verdict": "B++"}', "B++"),
        ('```json\n{"choice": "A+"}\n```', "A+"),
        ("My final verdict is [[B>>A]].", "B++"),
        ("[[A>B]]", "A+"),
        ("It is a tie.", "A=B"),
        ("Reasoning: A is right but B+ says more.\nVerdict: A+", "A+"),
    ],
)
def test_verdict_parser_accepts(text, label):
    assert parse_five_level(text).label == label


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Both are nice.",
        "Verdict: A",  # no strength
        "Verdict: A++, A+ or B++",  # copied the scale
        "Verdict: [A++, A+, A=",
        "A+ or B+",
        '{"verdict": "C"}',
        "the sum a+b",
    ],
)
def test_verdict_parser_rejects(text):
    with pytest.raises(ParseError):
        parse_five_level(text)


def test_unparseable_verdicts_are_retried_then_kept_as_failed():
    backend = ScriptedBackend("garbage")
    stage, out = judge(backend, max_retries=2)
    assert len(backend.requests) == 2 * 2 * 3  # pairs x orders x (1 + 2 retries)
    for r in out:
        (j,) = r.judgments
        assert j.status == "failed" and j.score is None
        assert "cannot decide" in j.raw
        assert j.attempts == 3
        assert "no parseable verdict" in j.error
    assert stage.counters["failed"] == 2
    assert stage.counters["failed_verdicts"] == 4
    assert stage.counters["retries"] == 8


def test_retry_recovers_a_verdict():
    calls = {"n": 0}

    def flaky(request):
        calls["n"] += 1
        return "Verdict: B++" if request.params.temperature > 0 else "hmm"

    _, out = judge(ScriptedBackend(flaky, name="flaky"))
    j = out[0].judgments[0]
    assert j.status == "ok" and j.attempts == 2
    assert j.details["agree"] is False  # B++ in both orders: total bias towards B
    assert j.details["position_bias"] == -1.0


def test_structured_output_sends_a_schema():
    backend = ScriptedBackend("always_a", extra=["json_schema"], name="json")
    _, out = judge(backend, reasoning="before")
    request = backend.requests[0]
    schema = request.json_schema
    assert schema["properties"]["verdict"]["enum"] == ["A++", "A+", "A=B", "B+", "B++"]
    assert list(schema["properties"]) == ["reasoning", "verdict"]
    assert not request.continue_final_message  # no prefill with JSON
    assert "JSON object" in request.messages[0].content
    assert out[0].judgments[0].details["orders"]["ab"]["verdicts"] == ["A++"]


def test_prefill_only_for_verdict_first_replies():
    backend = ScriptedBackend("always_a")
    judge(backend, reasoning="after")
    assert backend.requests[0].continue_final_message
    assert backend.requests[0].messages[-1].content == "Verdict:"
    backend = ScriptedBackend("always_a")
    judge(backend, reasoning="before")
    assert not backend.requests[0].continue_final_message


# pair building --------------------------------------------------------------------------------


def test_candidate_scores_of_a_pairwise_judge_are_mean_preferences():
    rec = make_record("r", "q", ["x", "yy", "zzz"])
    a, b, c = (cand.id for cand in rec.candidates)
    rec.judgments = [
        Judgment(judge="pw", candidate_ids=[a, b], score=1.0),
        Judgment(judge="pw", candidate_ids=[a, c], score=-0.5),
        Judgment(judge="pw", candidate_ids=[b, c], score=0.0),
        Judgment(judge="pw", candidate_ids=[b, c], score=None, status="failed"),
        Judgment(judge="other", candidate_ids=[a], score=5.0),
    ]
    assert candidate_scores(rec, "pw") == {a: 0.25, b: -0.5, c: 0.25}
    assert candidate_scores(rec, "other") == {a: 5.0}


def test_pairs_from_a_pairwise_judge():
    import asyncio

    _, out = judge(ScriptedBackend("prefers_longer"))
    builder = BuildPairs("pairs", PairsParams(judge="pw"))
    builder.judge = "pw"
    out = asyncio.run(builder.process(out))
    for r in out:
        (pair,) = r.pairs
        assert pair.chosen_id == max(r.candidates, key=lambda c: len(c.text)).id
        assert pair.margin == 1.0

    _, out = judge(ScriptedBackend("always_a"))
    builder.counters.clear()
    out = asyncio.run(builder.process(out))
    assert all(not r.pairs for r in out)
    assert builder.counters["skipped_all_tied"] == 2


# the embedded model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_pairwise(embedded_dir):
    from synthpref.backends.builtin import EmbeddedSpec

    spec = EmbeddedSpec()
    backend = spec.build()
    stage = PairwiseJudge(
        "pw", PairwiseParams(model="judge", reasoning="after", max_tokens=6, max_retries=1)
    )
    out = run_stage(stage, records(), {"judge": client_for(backend)})
    judgments = [j for r in out for j in r.judgments]
    assert len(judgments) == 2
    for j in judgments:
        assert j.raw.count("Verdict:") >= 2  # the pre-filled prefix is part of the raw text
        if j.status == "ok":
            assert -1.0 <= j.score <= 1.0
            assert isinstance(j.details["agree"], bool)
        else:
            assert j.error
    assert stage.counters["verdicts"] == 4
