"""The code_verifier judge: opt-in, tests from the record, failed judgments for bad records, the
same verdicts in parallel, and the shipped recipe end to end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

import synthpref.judges.code_verifier  # noqa: F401  (registers the stage until builtin_stages does)
from synthpref.judges.code_verifier import OPT_IN, CodeVerifier, CodeVerifierParams
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Record
from synthpref.verifiers.code import parse_tests
from tests.conftest import tiny_recipe
from tests.judges.test_pairwise import make_record

ROOT = Path(__file__).resolve().parents[2]

ADD = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"]
RIGHT = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
TIMES = "```python\ndef add(a, b):\n    return a * b\n```"  # passes add(2, 2) only
NOTHING = "I cannot write code."


def verifier(**params) -> CodeVerifier:
    quick = {"allow_code_execution": True, "timeout_seconds": 3, "test_timeout_seconds": 1}
    return CodeVerifier("code", CodeVerifierParams(**{**quick, **params}))


def judged(stage: CodeVerifier, records: list[Record]) -> dict[str, object]:
    out = asyncio.run(stage.process(records))
    return {j.candidate_ids[0]: j for r in out for j in r.judgments_by(stage.name)}


def with_tests(rid: str, texts: list[str], tests) -> Record:
    record = make_record(rid, "Write add(a, b).", texts)
    record.metadata["tests"] = tests
    return record


def code_stage(**params) -> dict:
    return {"type": "code_verifier", "name": "code", **params}


# opting in ------------------------------------------------------------------------------------


def test_a_recipe_that_does_not_opt_in_is_refused(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1] = code_stage()
    recipe["stages"][2]["judge"] = "code"
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe)
    assert "stages[1]" in str(err.value) and OPT_IN in str(err.value)
    assert "set allow_code_execution: true to opt in" in OPT_IN
    recipe["stages"][1] = code_stage(allow_code_execution=True)
    assert parse_recipe(recipe).stages[1].params.allow_code_execution is True


def test_without_the_opt_in_no_code_runs_even_when_called_directly(tmp_path):
    marker = tmp_path / "ran"
    text = f"```python\nopen({str(marker)!r}, 'w').write('x')\n```"
    stage = CodeVerifier("code", CodeVerifierParams())
    (judgment,) = judged(stage, [with_tests("r", [text], ADD)]).values()
    assert (judgment.status, judgment.error) == ("failed", OPT_IN)
    assert stage.counters["not_allowed"] == 1
    assert not marker.exists()


def test_only_network_deny_is_accepted():
    with pytest.raises(ValueError, match="deny"):
        CodeVerifierParams(allow_code_execution=True, network="allow")


# verdicts ---------------------------------------------------------------------------------------


def test_scores_are_the_fraction_of_tests_passed():
    stage = verifier()
    out = judged(stage, [with_tests("r", [RIGHT, TIMES, NOTHING], ADD)])
    assert [out[f"r:c{k}"].score for k in range(3)] == [1.0, pytest.approx(1 / 3), 0.0]
    assert all(j.status == "ok" and j.model is None and j.attempts == 0 for j in out.values())
    evidence = out["r:c1"].details
    assert [t["passed"] for t in evidence["tests"]] == [False, True, False]
    assert (evidence["code_source"], out["r:c2"].details["code_source"]) == (
        "python-fence",
        "whole-text",
    )
    assert out["r:c2"].details["tests"][0]["error"] == (
        "the solution raised SyntaxError: invalid syntax (solution.py, line 1) while loading, "
        "before any test ran"
    )
    assert stage.counters["passed"] == 1 and stage.counters["judgments"] == 3


def test_stdio_tests_and_the_mapping_shape_from_the_record():
    program = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    tests = {"stdio": [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "5"}]}
    out = judged(verifier(), [with_tests("r", [program], tests)])
    assert out["r:c0"].score == 0.5 and out["r:c0"].scores == {"stdio": 0.5}
    assert out["r:c0"].details["tests"][1]["error"] == "wrong output: expected '5', got '4'"


def test_a_custom_tests_field_is_read():
    record = make_record("r", "Write add(a, b).", [RIGHT])
    record.metadata["unit_tests"] = json.dumps(ADD)  # a CSV column holds JSON text
    out = judged(verifier(tests_field="unit_tests"), [record])
    assert out["r:c0"].score == 1.0


@pytest.mark.parametrize(
    ("tests", "says"),
    [
        (None, "has no 'tests' field (the tests the code is run against)"),
        ([1, 2], "field 'tests' is malformed: got a list of int; expected a list of assert"),
        ({"asserts": "assert add(1, 2) == 3"}, "'asserts' must be a list of strings"),
    ],
)
def test_a_record_without_usable_tests_gets_failed_judgments_naming_it(tests, says):
    bad = make_record("bad-1", "Write add(a, b).", [RIGHT, TIMES])
    if tests is not None:
        bad.metadata["tests"] = tests
    good = with_tests("good", [RIGHT], ADD)
    stage = verifier()
    out = judged(stage, [bad, good])
    assert out["good:c0"].score == 1.0  # the run goes on
    for cid in ("bad-1:c0", "bad-1:c1"):
        assert out[cid].status == "failed" and out[cid].score is None
        assert "'bad-1'" in out[cid].error and says in out[cid].error
    counter = "missing_field" if tests is None else "malformed_field"
    assert stage.counters[counter] == 2 and stage.counters["failed"] == 2


def test_parallel_checks_give_the_same_judgments_as_one_at_a_time():
    texts = [RIGHT, TIMES, NOTHING, "```python\nimport os\nos._exit(0)\n```"]

    def records() -> list[Record]:
        return [with_tests(f"r{k}", texts, ADD) for k in range(3)]

    one = judged(verifier(workers=1), records())
    many = judged(verifier(workers=4), records())
    assert list(one) == list(many)
    assert [j.model_dump() for j in one.values()] == [j.model_dump() for j in many.values()]
    assert [j.score for j in one.values()] == [1.0, pytest.approx(1 / 3), 0.0, 0.0] * 3


def test_the_fingerprint_covers_the_python_version_and_the_harness():
    fp = verifier().fingerprint()
    assert set(fp) >= {"python", "harness"} and len(fp["harness"]) == 16


# the shipped recipe -----------------------------------------------------------------------------


def shipped_recipe() -> dict:
    return yaml.safe_load((ROOT / "recipes" / "code_tests.yaml").read_text())


def test_every_shipped_problem_has_well_formed_tests_and_provenance():
    rows = [json.loads(line) for line in (ROOT / "recipes" / "data" / "code_problems.jsonl").open()]
    assert len(rows) >= 12 and len({r["id"] for r in rows}) == len(rows)
    kinds = [parse_tests(r["tests"]) for r in rows]
    assert sum(bool(k.stdio) for k in kinds) >= 2 and sum(bool(k.asserts) for k in kinds) >= 9
    assert {r["source"] for r in rows} == {"synthetic: written for synthpref's example recipes"}


def test_the_shipped_recipe_opts_in_and_validates():
    import synthpref

    recipe = shipped_recipe()
    stages = {s["type"]: s for s in recipe["stages"]}
    assert stages["code_verifier"]["allow_code_execution"] is True
    assert stages["pairs"] == {"type": "pairs", "judge": "tests", "rule": "best_worst"}
    synthpref.validate(ROOT / "recipes" / "code_tests.yaml")


@pytest.mark.slow
def test_the_shipped_recipe_end_to_end_on_the_embedded_model(tmp_path, embedded_dir):
    import pyarrow.parquet as pq

    import synthpref
    from synthpref.records import records_from_arrow

    recipe = shipped_recipe()
    recipe["source"]["path"] = str(ROOT / "recipes" / recipe["source"]["path"])
    recipe["source"]["limit"] = 2
    for stage_ in recipe["stages"]:
        if stage_["type"] == "generate":
            stage_.update(n=2, max_tokens=48)
    recipe["output"]["dir"] = str(tmp_path / "run")
    synthpref.run(recipe, progress=False)

    records = records_from_arrow(pq.read_table(tmp_path / "run" / "data" / "records.parquet"))
    assert [r.id for r in records] == ["code-01", "code-02"]
    for record in records:
        assert len(record.candidates) == 2
        judgments = {j.candidate_ids[0]: j for j in record.judgments_by("tests")}
        assert set(judgments) == {c.id for c in record.candidates}
        total = len(parse_tests(record.metadata["tests"]).asserts)
        for j in judgments.values():
            assert j.status == "ok" and 0.0 <= j.score <= 1.0
            assert j.details["total"] == total == len(j.details["tests"])
            assert j.score == pytest.approx(j.details["passed"] / total)
            assert j.details["sandbox"]["network"] in ("namespace", "audit-hook")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    counters = next(s for s in summary["stages"] if s["name"] == "tests")["counters"]
    assert counters["judgments"] == 4
