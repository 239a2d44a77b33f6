"""The ``math_verifier`` stage: judgments and counters on records, records it cannot check, worker
counts, recipes, ``eval-judges``, and a lexicographic jury with a tie-breaking judge."""

from __future__ import annotations

import asyncio
import json

import pytest
from typer.testing import CliRunner

import synthpref
import synthpref.judges.math_verifier
from synthpref.cli import app
from synthpref.judges.jury import Jury, JuryParams
from synthpref.judges.math_verifier import MathVerifier, MathVerifierParams
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Candidate, Judgment, Message, Record
from synthpref.stages.base import Stage, StageParams
from tests.conftest import tiny_recipe, write_recipe


def record(rid: str, texts: list[str], **metadata) -> Record:
    return Record(
        id=rid,
        prompt=[Message(role="user", content=f"question {rid}")],
        metadata=metadata,
        candidates=[
            Candidate(id=f"{rid}:c{k}", model="m", text=t, stage="gen") for k, t in enumerate(texts)
        ],
    )


def shard() -> list[Record]:
    return [
        record("add", ["3 + 5 = 8", "The answer is 9.", "\\boxed{8}"], answer="8"),
        record("half", ["It is $\\frac{1}{2}$.", "0.25", "I am not sure."], answer=0.5),
        record("nofield", ["7", "8"], question_type="arithmetic"),
        record("empty", [], answer="1"),
    ]


def run(stage: Stage, records: list[Record]) -> list[Record]:
    return asyncio.run(stage.process(records))


def by_candidate(records: list[Record], judge: str = "math") -> dict[str, Judgment]:
    return {j.candidate_ids[0]: j for r in records for j in r.judgments if j.judge == judge}


def test_each_candidate_gets_a_verdict_with_its_evidence_and_counters():
    stage = MathVerifier("math", MathVerifierParams(workers=2))
    out = by_candidate(run(stage, shard()))
    # 8 is right for "add" whether written as an equation or boxed; 9 is wrong; 1/2 is 0.5;
    # 0.25 is not; "I am not sure." has no number at all
    assert {c: (j.status, j.score) for c, j in out.items()} == {
        "add:c0": ("ok", 1.0),
        "add:c1": ("ok", 0.0),
        "add:c2": ("ok", 1.0),
        "half:c0": ("ok", 1.0),
        "half:c1": ("ok", 0.0),
        "half:c2": ("ok", 0.0),
        "nofield:c0": ("failed", None),
        "nofield:c1": ("failed", None),
    }
    assert out["half:c0"].details == {
        "reference_text": "0.5",
        "reference": "1/2",
        "extracted": "1/2",
        "extracted_text": "\\frac{1}{2}",
        "reason": "equivalent to the reference",
    }
    assert out["add:c1"].details["extracted"] == "9"
    assert out["half:c2"].details["reason"] == "no answer found"
    assert all(j.model is None and j.attempts == 0 for j in out.values())
    assert stage.counters == {"judgments": 8, "passed": 3, "failed": 2, "missing_field": 2}


def test_a_record_without_the_answer_field_fails_alone_naming_record_and_field():
    stage = MathVerifier("math", MathVerifierParams(workers=1, answer_field="solution"))
    records = [
        record("has", ["42"], solution="42"),
        record("lacks", ["42", "43"], answer="42"),  # the reference is under another name
    ]
    out = by_candidate(run(stage, records))
    assert out["has:c0"].score == 1.0
    for cid in ("lacks:c0", "lacks:c1"):
        assert out[cid].status == "failed" and out[cid].score is None
        assert "record 'lacks'" in out[cid].error and "'solution'" in out[cid].error
        assert "stage 'math'" in out[cid].error
    assert stage.counters["missing_field"] == 2 and stage.counters["passed"] == 1


def test_a_reference_that_cannot_be_used_is_a_failed_judgment():
    stage = MathVerifier("math", MathVerifierParams(workers=1))
    records = [
        record("words", ["42"], answer="see the worked solution"),
        record("listed", ["42"], answer=[42, 43]),
        record("fine", ["42"], answer=42),
    ]
    out = by_candidate(run(stage, records))
    assert out["words:c0"].status == "failed"
    assert "'see the worked solution'" in out["words:c0"].error
    assert out["listed:c0"].status == "failed"
    assert "record 'listed'" in out["listed:c0"].error and "'answer'" in out["listed:c0"].error
    assert "list" in out["listed:c0"].error
    assert out["fine:c0"].score == 1.0
    assert stage.counters["bad_reference"] == 2 and stage.counters["failed"] == 2


def test_more_workers_give_the_same_judgments():
    def view(workers: int):
        stage = MathVerifier("math", MathVerifierParams(workers=workers))
        out = run(stage, shard())
        judged = [
            (j.candidate_ids, j.status, j.score, j.error, j.details)
            for r in out
            for j in r.judgments
        ]
        return judged, dict(stage.counters)

    assert view(1) == view(3)


def test_verdict_options_are_in_the_fingerprint_and_libraries_too():
    from synthpref.backends.specs import fingerprint_fields

    base = fingerprint_fields(MathVerifierParams())
    assert fingerprint_fields(MathVerifierParams(workers=4)) == base
    assert fingerprint_fields(MathVerifierParams(strict=False)) != base
    assert fingerprint_fields(MathVerifierParams(answer_field="solution")) != base
    libs = MathVerifier("math", MathVerifierParams()).fingerprint()["libraries"]
    assert set(libs) == {"math-verify", "latex2sympy2_extended"} and all(libs.values())


# recipes ----------------------------------------------------------------------------------------

PROMPTS = [
    {"id": "p1", "prompt": "What is 3 + 4?", "answer": "7"},
    {"id": "p2", "prompt": "What is 10 - 6?", "answer": 4},
]


def math_recipe(tmp_path, **verifier) -> dict:
    recipe = tiny_recipe(tmp_path, prompts=PROMPTS)
    recipe["stages"] = [
        {"type": "generate", "models": ["a", "b"], "n": 1, "max_tokens": 24},
        {"type": "math_verifier", "name": "correct", "answer_field": "answer", **verifier},
        {"type": "pairs", "judge": "correct", "allow_truncated": True},
    ]
    return recipe


def test_the_stage_in_a_recipe(tmp_path):
    loaded = parse_recipe(math_recipe(tmp_path, strict=False, float_rounding=3))
    stage = loaded.stages[1]
    assert isinstance(stage, MathVerifier) and stage.name == "correct"
    assert (stage.params.strict, stage.params.float_rounding) == (False, 3)
    assert synthpref.validate(write_recipe(tmp_path, math_recipe(tmp_path))) == []


def test_unknown_or_bad_params_are_refused_with_their_yaml_path(tmp_path):
    with pytest.raises(RecipeError) as info:
        parse_recipe(math_recipe(tmp_path, answer_feild="answer", float_rounding=-1))
    problems = info.value.problems
    assert any(p.startswith("stages[1].answer_feild: unknown key") for p in problems), problems
    assert any(p.startswith("stages[1].float_rounding:") for p in problems), problems


def test_a_verifier_needs_candidates(tmp_path):
    recipe = math_recipe(tmp_path)
    recipe["stages"] = recipe["stages"][1:2]
    with pytest.raises(RecipeError, match="put a generate stage before it"):
        parse_recipe(recipe)


# eval-judges ------------------------------------------------------------------------------------


def test_eval_judges_on_labelled_math_pairs(tmp_path):
    pairs = [
        ("What is 2 + 3?", "2 + 3 = 5", "2 + 3 = 6", "5"),
        ("Half of 1?", "It is \\boxed{\\frac{1}{2}}.", "It is 0.25.", "0.5"),
        ("How many apples are 600 plus 400?", "There are 1,000 apples.", "There are 100.", 1000),
        ("What is 4 - 7?", "4 - 7 = -3", "4 - 7 = 3", "-3"),
        ("12 times 12?", "The answer is 144.", "The answer is 124.", 144),
        ("What is 1 divided by 4?", "25%", "0.4", "0.25"),
    ]
    data = tmp_path / "math_pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": c, "rejected": r, "answer": a}) + "\n"
            for p, c, r, a in pairs
        )
    )
    path = write_recipe(tmp_path, math_recipe(tmp_path))
    args = ["eval-judges", str(path), "--data", str(data), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(
        (tmp_path / "run" / "eval-judges" / "math_pairs" / "report.json").read_text()
    )
    (judge,) = report["judges"]
    assert (judge["name"], judge["type"], judge["kind"]) == (
        "correct",
        "math_verifier",
        "pointwise",
    )
    overall = judge["overall"]
    assert (overall["n"], overall["correct"], overall["accuracy"]) == (6, 6, 1.0)
    (stage,) = report["run"]["stages"]
    assert stage["calls"] == 0 and stage["counters"]["passed"] == 6
    assert stage["counters"]["judgments"] == 12


# jury -------------------------------------------------------------------------------------------


class Brevity(Stage):
    """A deterministic pointwise judge for the test: fewer words score higher."""

    type_name = "brevity_test"
    kind = "judge"
    Params = StageParams
    score_range = None

    async def process(self, records: list[Record]) -> list[Record]:
        for rec in records:
            for c in rec.candidates:
                words = len(c.text.split())
                rec.judgments.append(Judgment(judge=self.name, candidate_ids=[c.id], score=-words))
        return records


def test_lexicographic_jury_correctness_first_then_the_tie_breaker():
    texts = [
        "3 + 5 = 8",  # correct, 5 words
        "Tom has 3 apples, buys 5 more, so he has 8 apples.",  # correct, 11 words
        "7",  # wrong, 1 word: the shortest of all
        "He has 9 apples in total now.",  # wrong, 7 words
    ]
    records = [record("r", texts, answer="8")]
    math = MathVerifier("math", MathVerifierParams(workers=1))
    brevity = Brevity("brevity", StageParams())
    jury = Jury("jury", JuryParams(judges=["math", "brevity"], method="lexicographic"))
    assert jury.check([math, brevity]) == []
    jury.bind([math, brevity])
    for stage in (math, brevity, jury):
        records = run(stage, records)
    scores = {c: j.score for c, j in by_candidate(records, "jury").items()}
    # pairs, decided by correctness unless both are equally correct, then by fewer words:
    # c0>c1 (tie, 5<11 words), c0>c2, c0>c3, c1>c2, c1>c3 (correct), c2>c3 (tie, 1<7 words)
    # wins out of 3 opponents: c0 3, c1 2, c2 1, c3 0
    assert scores == pytest.approx({"r:c0": 1.0, "r:c1": 2 / 3, "r:c2": 1 / 3, "r:c3": 0.0})
    brevity_alone = {c: j.score for c, j in by_candidate(records, "brevity").items()}
    assert max(brevity_alone, key=brevity_alone.get) == "r:c2"  # what correctness overrules


@pytest.mark.slow
def test_a_run_on_the_embedded_model(tmp_path, embedded_dir):
    from synthpref.executor.local import LocalExecutor

    result = LocalExecutor(parse_recipe(math_recipe(tmp_path)), progress=False).run()
    counters = next(s for s in result.stages if s.name == "correct").counters
    assert counters["judgments"] == 4  # 2 prompts x 2 models x n=1, each checked once
    assert counters.get("failed", 0) == 0  # both references parse; every answer was checked
    import pyarrow.parquet as pq

    from synthpref.records import records_from_arrow

    records = records_from_arrow(pq.read_table(result.outputs["records"]))
    judged = [j for r in records for j in r.judgments if j.judge == "correct"]
    assert len(judged) == 4 and all(j.score in (0.0, 1.0) for j in judged)
    assert all(j.details["reference"] in ("7", "4") and "reason" in j.details for j in judged)
