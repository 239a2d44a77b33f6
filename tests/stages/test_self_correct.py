"""self_correct: the model reviews its own answer in the same conversation and answers again; a
verifier's verdicts before and after decide what is kept (fixed by default, every revision with
``keep: all``) and the constructed pair is (revision, first answer); validation; the executor.

The verifier is defined here: an answer is right when it contains the record's ``answer`` field,
so each verdict can be checked by reading the text."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import polars as pl
import pytest

import synthpref
from synthpref.backends.types import GenerationRequest
from synthpref.judges.verifier import Check, Verifier, metadata_field
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Candidate, Message, Record
from synthpref.stages.pairs import BuildPairs, PairsParams
from synthpref.stages.self_correct import SelfCorrect, SelfCorrectParams, outcome
from tests.judge_doubles import POLICIES, ScriptedBackend, client_for, run_stage

REVIEW = "There might be an error in your answer above."


def contains_answer(spec: dict[str, Any], response: str) -> Check:
    if "???" in response:
        return Check(None, error="no answer to compare in the response")
    found = spec["answer"] in response
    return Check(1.0 if found else 0.0, evidence={"expected": spec["answer"], "found": found})


class AnswerVerifier(Verifier):
    """Right when the response contains the record's reference answer (tests only)."""

    type_name = "answer_verifier"
    execution = "threads"
    check_fn = contains_answer

    def spec(self, record: Record) -> dict[str, Any]:
        what = "the reference answer"
        return {"answer": metadata_field(record, "answer", stage=self.name, what=what)}


Reviser = Callable[[str], str]
"""The answer under review -> the reply to the review request."""


def policy(reviser: Reviser) -> Callable[[GenerationRequest], str]:
    def reply(request: GenerationRequest) -> str:
        if REVIEW in request.messages[-1].content:
            assert request.messages[-2].role == "assistant"
            return reviser(request.messages[-2].content)
        return "It is 8." if "wrong" in request.messages[-1].content else "It is 7."

    return reply


def record(rid: str = "r1", *texts: str, answer: str | None = "7") -> Record:
    return Record(
        id=rid,
        prompt=[Message(role="user", content="What is 3 + 4?")],
        metadata={"answer": answer} if answer else {},
        candidates=[
            Candidate(id=f"gen:m:{k}", model="m", text=t, stage="gen", finish_reason="stop")
            for k, t in enumerate(texts or ("It is 8.", "It is 7."))
        ],
    )


def verified(*records: Record) -> tuple[AnswerVerifier, list[Record]]:
    verifier = AnswerVerifier("math", AnswerVerifier.Params())
    return verifier, run_stage(verifier, list(records), {})


def correct(records, verifier, reviser: Reviser, **params):
    stage = SelfCorrect("self_correct", SelfCorrectParams(model="m", judge="math", **params))
    stage.bind([verifier])
    backend = ScriptedBackend(policy(reviser), name="reviser")
    return stage, run_stage(stage, records, {"m": client_for(backend, "m")}), backend


def score(rec: Record, cid: str) -> float | None:
    [j] = [j for j in rec.judgments if j.judge == "math" and j.candidate_ids == [cid]]
    return j.score


# outcomes ----------------------------------------------------------------------------------------


def test_a_fixed_answer_is_kept_with_its_verdicts_and_pairs_over_the_first_answer():
    verifier, recs = verified(record())
    stage, [out], backend = correct(recs, verifier, lambda answer: "Let me recheck: it is 7.")
    # only the wrong answer was reviewed, in its own conversation
    [request] = backend.requests
    assert [(m.role, m.content) for m in request.messages[:2]] == [
        ("user", "What is 3 + 4?"),
        ("assistant", "It is 8."),
    ]
    assert request.messages[2].role == "user" and REVIEW in request.messages[2].content
    [kept] = [c for c in out.candidates if c.origin]
    assert kept.text == "Let me recheck: it is 7." and kept.id == "self_correct:gen:m:0:0"
    o = kept.origin
    assert (o.operation, o.parent, o.prefer, o.stage) == (
        "self_correction", "gen:m:0", "self", "self_correct",
    )  # fmt: skip
    assert o.evidence["outcome"] == "fixed" and o.evidence["reviser"] == "m"
    assert o.evidence["verdict_before"] == {"score": 0.0, "passed": False, "error": None}
    assert o.evidence["verdict_after"] == {"score": 1.0, "passed": True, "error": None}
    assert score(out, kept.id) == 1.0  # the verifier's judgment, under its name
    assert stage.counters["skipped:right"] == 1 and stage.counters["outcome:fixed"] == 1
    assert stage.counters["judge_passed"] == 1

    pairs = BuildPairs("pairs", PairsParams(judge="math", rule="constructed"))
    pairs.bind([verifier])
    [paired] = run_stage(pairs, [out], {})
    assert [(p.chosen_id, p.rejected_id, p.margin) for p in paired.pairs] == [
        (kept.id, "gen:m:0", 1.0)
    ]


def test_a_revision_that_did_not_fix_the_answer_is_counted_not_kept():
    verifier, recs = verified(record())
    stage, [out], _ = correct(recs, verifier, lambda answer: "On reflection it is 9.")
    assert [c.id for c in out.candidates] == ["gen:m:0", "gen:m:1"]
    assert len(out.judgments) == 2
    assert stage.counters["outcome:not_fixed"] == 1 and stage.counters["kept"] == 0


def test_keep_all_keeps_every_revision_with_its_verdict_but_only_fixed_ones_pair():
    def reviser(answer: str) -> str:
        return {"It is 8.": "It is 7.", "It is 7.": "It is 6.", "It is 5.": "It is ??? now"}[answer]

    verifier, recs = verified(record("r1", "It is 8.", "It is 7.", "It is 5."))
    _, [out], _ = correct(recs, verifier, reviser, candidates="all", keep="all")
    kept = {c.origin.parent: c for c in out.candidates if c.origin}
    outcomes = {p: c.origin.evidence["outcome"] for p, c in kept.items()}
    assert outcomes == {"gen:m:0": "fixed", "gen:m:1": "broken", "gen:m:2": "unverified"}
    assert kept["gen:m:1"].origin.evidence["verdict_after"]["passed"] is False
    unverified = kept["gen:m:2"].origin.evidence["verdict_after"]
    assert unverified["score"] is None and "no answer to compare" in unverified["error"]
    [failed] = [j for j in out.judgments if j.candidate_ids == [kept["gen:m:2"].id]]
    assert failed.status == "failed" and "no answer to compare" in failed.error
    for parent, child in kept.items():  # every verdict matches the text
        if outcomes[parent] != "unverified":
            assert score(out, child.id) == float("7" in child.text)

    pairs = BuildPairs("pairs", PairsParams(judge="math", rule="constructed"))
    pairs.bind([verifier])
    [paired] = run_stage(pairs, [out], {})
    assert [(p.chosen_id, p.rejected_id) for p in paired.pairs] == [(kept["gen:m:0"].id, "gen:m:0")]
    skipped = {k.rsplit("constructed_", 1)[-1]: n for k, n in pairs.counters.items()}
    assert skipped["not_better"] == 1 and skipped["unscored"] == 1


def test_an_unchanged_revision_is_dropped_before_the_verifier():
    verifier, recs = verified(record())
    stage, [out], _ = correct(recs, verifier, lambda answer: f"\n{answer}  ", keep="all")
    assert len(out.candidates) == 2 and len(out.judgments) == 2
    assert stage.counters["dropped:unchanged"] == 1 and stage.counters["judge_judgments"] == 0


def test_records_the_verifier_could_not_check_are_skipped_and_counted():
    verifier, recs = verified(record("r9", answer=None))
    assert all("'r9'" in j.error and "'answer'" in j.error for j in recs[0].judgments)
    stage, [out], backend = correct(recs, verifier, lambda answer: "It is 7.")
    assert backend.requests == [] and stage.counters["skipped:unverified"] == 2
    assert len(out.candidates) == 2


@pytest.mark.parametrize(
    "score_before, score_after, status, expected",
    [
        (0.0, 1.0, "ok", "fixed"),
        (0.5, 0.9, "ok", "not_fixed"),
        (1.0, 0.0, "ok", "broken"),
        (1.0, 1.0, "ok", "still_right"),
        (0.0, None, "failed", "unverified"),
    ],
)
def test_outcome(score_before, score_after, status, expected):
    from synthpref.records import Judgment

    before = Judgment(judge="v", candidate_ids=["a"], score=score_before)
    after = Judgment(judge="v", candidate_ids=["b"], score=score_after, status=status)
    assert outcome(before, after) == expected


# validation --------------------------------------------------------------------------------------

VERIFIER = {"type": "tests.stages.test_self_correct:AnswerVerifier", "name": "math"}
GEN = {"type": "generate", "models": ["m"], "n": 1}
RUBRIC = {"type": "rubric_judge", "name": "rating", "model": "m"}


@pytest.mark.parametrize(
    "stages, text",
    [
        ([GEN, RUBRIC, {"type": "self_correct", "model": "m", "judge": "rating"}],
         "stages[2]: judge: 'rating' is a rubric_judge, not a Verifier stage"),
        ([GEN, {"type": "self_correct", "model": "m", "judge": "math"}, VERIFIER],
         "stages[1]: judge: 'math' is not a judge stage before this one"),
        ([GEN, VERIFIER, {"type": "self_correct", "model": "m", "judge": "math", "keep": "some"}],
         "stages[2].keep"),
        ([GEN, VERIFIER, {"type": "self_correct", "model": "nope", "judge": "math"}],
         "uses model 'nope'"),
    ],
)  # fmt: skip
def test_misplaced_or_misconfigured_self_correct_is_refused(tmp_path, stages, text):
    raw = {
        "name": "v",
        "source": {"path": "p.jsonl"},
        "models": {"m": {"backend": "embedded"}},
        "stages": stages,
    }
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, base_dir=tmp_path)
    assert any(text in p for p in info.value.problems), info.value.problems


# through the executor ----------------------------------------------------------------------------


def test_self_correct_through_the_executor(tmp_path):
    POLICIES["self_correct_world"] = policy(lambda answer: "Checked again: it is 7.")
    data = tmp_path / "q.jsonl"
    rows = [{"id": "q1", "prompt": "Add 3 and 4 (wrong)", "answer": "7"},
            {"id": "q2", "prompt": "Add 3 and 4", "answer": "7"}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": "sc",
        "source": {"path": str(data), "id_field": "id"},
        "models": {"m": {"backend": "scripted", "policy": "self_correct_world"}},
        "stages": [
            {"type": "generate", "models": ["m"], "n": 1},
            VERIFIER,
            {"type": "self_correct", "model": "m", "judge": "math"},
            {"type": "pairs", "judge": "math", "rule": "constructed"},
        ],
        "output": {"dir": str(tmp_path / "run"), "formats": ["preference"]},
    }
    synthpref.run(recipe, progress=False)
    out = {r["id"]: r for r in pl.read_parquet(tmp_path / "run/data/records.parquet").to_dicts()}
    [child] = [c for c in out["q1"]["candidates"] if c["origin"]]
    origin = json.loads(child["origin"])
    assert origin["evidence"]["outcome"] == "fixed" and origin["parent"] == "generate:m:0"
    assert [(p["chosen_id"], p["rejected_id"]) for p in out["q1"]["pairs"]] == [
        (child["id"], "generate:m:0")
    ]
    assert not any(c["origin"] for c in out["q2"]["candidates"]) and out["q2"]["pairs"] == []
    assert pl.read_parquet(tmp_path / "run/data/preference.parquet").height == 1
