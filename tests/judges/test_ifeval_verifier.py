"""The ifeval_verifier judge: judgments on records, failed judgments for records that cannot be
checked, the missing-extra message, recipe validation, the shipped recipe and its data."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval", reason="the ifeval extra is not installed")

import synthpref.judges.ifeval_verifier  # noqa: F401  (registers the stage until builtin_stages does)
from synthpref.judges.ifeval_verifier import IFEvalParams, IFEvalVerifier
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Message, Record
from synthpref.verifiers.ifeval import reference
from tests.conftest import tiny_recipe
from tests.judges.test_pairwise import make_record

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "ifeval.yaml"
DATA = ROOT / "recipes" / "data" / "ifeval_prompts.jsonl"
SHARED_IFEVAL = ROOT.parent / "shared" / "evaldata" / "prompts" / "ifeval.jsonl"

NO_COMMA_END = ["punctuation:no_comma", "startend:end_checker"]
BYE = [{}, {"end_phrase": "Bye."}]


def verifier(**params) -> IFEvalVerifier:
    return IFEvalVerifier("ifeval", IFEvalParams(workers=1, **params))


def with_constraints(rid: str, texts: list[str], ids=NO_COMMA_END, kwargs=BYE) -> Record:
    record = make_record(rid, "Answer without commas and end with 'Bye.'", texts)
    record.metadata.update(instruction_id_list=ids, kwargs=kwargs)
    return record


def judged(stage: IFEvalVerifier, records: list[Record]) -> dict[str, object]:
    out = asyncio.run(stage.process(records))
    return {j.candidate_ids[0]: j for r in out for j in r.judgments_by(stage.name)}


class _Generator:
    kind = "generator"


# judging --------------------------------------------------------------------------------------


def test_each_candidate_gets_a_judgment_with_scores_and_evidence():
    texts = ["Red and blue. Bye.", "Red, blue. Bye.", "Red, blue."]
    stage = verifier(level="instruction")
    out = judged(stage, [with_constraints("r1", texts)])
    # by hand: both followed; the comma breaks one of two; both broken
    assert [out[f"r1:c{k}"].score for k in range(3)] == [1.0, 0.5, 0.0]
    middle = out["r1:c1"]
    assert middle.status == "ok" and middle.model is None and middle.attempts == 0
    assert middle.scores == {
        "prompt_strict": 0.0,
        "instruction_strict": 0.5,
        "prompt_loose": 0.0,
        "instruction_loose": 0.5,
    }
    assert middle.details["instructions"] == [
        {"id": "punctuation:no_comma", "kwargs": {}, "strict": False, "loose": False},
        {
            "id": "startend:end_checker",
            "kwargs": {"end_phrase": "Bye."},
            "strict": True,
            "loose": True,
        },
    ]
    assert stage.counters["judgments"] == 3 and stage.counters["passed"] == 1
    assert stage.counters["failed"] == 0


def test_level_and_mode_choose_the_score():
    text = "Red and blue. Bye.\nSee you"  # the end phrase is followed only without the last line
    scores = {}
    for level in ("prompt", "instruction"):
        for mode in ("strict", "loose"):
            out = judged(verifier(level=level, mode=mode), [with_constraints("r", [text])])
            scores[(level, mode)] = out["r:c0"].score
    assert scores == {
        ("prompt", "strict"): 0.0,
        ("prompt", "loose"): 1.0,
        ("instruction", "strict"): 0.5,
        ("instruction", "loose"): 1.0,
    }


def test_the_prompt_given_to_the_reference_is_the_final_user_message_and_fields_are_renamed():
    record = Record(
        id="conv",
        prompt=[
            Message(role="system", content="Be brief."),
            Message(role="user", content="Name a colour."),
            Message(role="assistant", content="Red."),
            Message(role="user", content="Another one, without commas."),
        ],
        metadata={"ids": ["punctuation:no_comma"], "args": [{}]},
    )
    stage = verifier(instructions_field="ids", kwargs_field="args")
    spec = stage.spec(record)
    assert spec["prompt"] == "Another one, without commas."
    assert spec["instruction_id_list"] == ["punctuation:no_comma"] and spec["kwargs"] == [{}]


def test_records_that_cannot_be_checked_fail_naming_record_and_field_and_the_rest_are_judged():
    good = with_constraints("good", ["Fine. Bye."])
    uneven = with_constraints("uneven", ["Fine. Bye."], kwargs=[{}])
    missing = make_record("missing", "Answer.", ["Fine."])
    not_a_dict = with_constraints("nodict", ["Fine. Bye."], kwargs=[{}, "Bye."])
    unknown = with_constraints(
        "unknown", ["Fine. Bye."], ids=["punctuation:no_comma", "startend:ender"]
    )
    stage = verifier()
    out = judged(stage, [good, uneven, missing, not_a_dict, unknown])
    assert out["good:c0"].status == "ok" and out["good:c0"].score == 1.0

    def error(rid):
        judgment = out[f"{rid}:c0"]
        assert judgment.status == "failed" and judgment.score is None
        return judgment.error

    assert "record 'uneven'" in error("uneven") and "field 'kwargs'" in error("uneven")
    assert "1 kwargs dicts for 2 instructions" in error("uneven")
    assert "record 'missing'" in error("missing") and "'instruction_id_list'" in error("missing")
    assert "record 'nodict'" in error("nodict") and "field 'kwargs[1]'" in error("nodict")
    assert "record 'unknown'" in error("unknown")
    assert "field 'instruction_id_list'[1]" in error("unknown") and "'startend:ender'" in error(
        "unknown"
    )
    assert stage.counters["failed"] == 4 and stage.counters["judgments"] == 5
    assert stage.counters["malformed_field"] == 2
    assert stage.counters["missing_field"] == 1
    assert stage.counters["unknown_instruction"] == 1


# recipe checks --------------------------------------------------------------------------------


def test_a_missing_extra_is_reported_with_the_install_command(monkeypatch):
    stage = verifier()
    assert stage.check([_Generator()]) == []
    assert stage.check([]) == ["a judge needs candidates: put a generate stage before it"]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    (problem,) = stage.check([_Generator()])
    assert "pip install 'synthpref[ifeval]'" in problem and "lm_eval" in problem


def test_the_fingerprint_holds_the_libraries_and_the_sentence_tables():
    from importlib.metadata import version

    fp = verifier().fingerprint()
    assert fp["libraries"] == {
        "lm-eval": version("lm-eval"),
        "nltk": version("nltk"),
        "langdetect": version("langdetect"),
    }
    assert len(fp["nltk_data"]) == 64


def test_recipe_parameters_are_validated_with_their_yaml_paths(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1] = {"type": "ifeval_verifier", "name": "ifeval", "level": "instruction"}
    recipe["stages"][2]["judge"] = "ifeval"
    loaded = parse_recipe(recipe)
    assert loaded.stages[1].type_name == "ifeval_verifier"
    assert (loaded.stages[1].params.level, loaded.stages[1].params.mode) == (
        "instruction",
        "strict",
    )
    recipe["stages"][1].update(level="response", mode="lenient", kwargs_field="")
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe)
    problems = err.value.problems
    for key in ("level", "mode", "kwargs_field"):
        assert any(p.startswith(f"stages[1].{key}") for p in problems), problems


def test_the_shipped_recipe_validates():
    import synthpref

    warnings = synthpref.validate(RECIPE)
    assert warnings == []
    recipe = yaml.safe_load(RECIPE.read_text())
    assert [s["type"] for s in recipe["stages"]] == ["generate", "ifeval_verifier", "pairs"]
    assert recipe["stages"][0]["n"] == 4 and recipe["stages"][0]["temperature"] == 0.8


def test_the_shipped_prompts_follow_the_stated_rule():
    """The first 16 IFEval rows without length_constraints:* / combination:* instructions whose
    arguments the reference uses as given, each row's fields kept and its provenance named."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert len(rows) == 16
    for row in rows:
        key = row["id"].removeprefix("ifeval-")
        assert row["source"] == (
            "google-research instruction_following_eval input_data.jsonl via "
            f"../shared/evaldata/prompts/ifeval.jsonl (Apache-2.0), key {key}"
        )
    if not SHARED_IFEVAL.is_file():
        pytest.skip(f"the shared IFEval prompts are not at {SHARED_IFEVAL} (../shared is absent)")
    _, registry = reference()
    chosen = []
    for line in SHARED_IFEVAL.read_text().splitlines():
        row = json.loads(line)
        ids = row["instruction_id_list"]
        if any(i.split(":")[0] in ("length_constraints", "combination") for i in ids):
            continue
        # the reference keeps every given argument: build each checker and read them back
        kept = True
        for iid, kwargs in zip(ids, row["kwargs"], strict=True):
            built = registry[iid](iid)
            built.build_description(**kwargs)
            used = built.get_instruction_args() or {}
            if any(
                str(used.get(k)).lower() != str(v).lower()
                for k, v in kwargs.items()
                if not isinstance(v, list)
            ):
                kept = False
        if kept:
            chosen.append(row)
        if len(chosen) == 16:
            break
    assert [{**r, "source": None} for r in rows] == [{**r, "source": None} for r in chosen]


# the shipped recipe on the embedded model -------------------------------------------------------


@pytest.mark.slow
def test_the_shipped_recipe_end_to_end_on_the_embedded_model(tmp_path, embedded_dir):
    import pyarrow.parquet as pq

    import synthpref
    from synthpref.records import records_from_arrow

    utils, _ = reference()
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["source"]["path"] = str(ROOT / "recipes" / recipe["source"]["path"])
    recipe["source"]["limit"] = 2
    recipe["stages"][0].update(n=2, max_tokens=32)
    recipe["stages"][1]["workers"] = 1  # one worker process imports lm-eval, not one per core
    recipe["stages"][2]["allow_truncated"] = True  # 32-token replies are cut off by design
    recipe["output"]["dir"] = str(tmp_path / "run")
    synthpref.run(recipe, progress=False)

    records = records_from_arrow(pq.read_table(tmp_path / "run" / "data" / "records.parquet"))
    assert [r.id for r in records] == ["ifeval-1001", "ifeval-1005"]
    for record in records:
        inp = utils.InputExample(
            key=0,
            instruction_id_list=record.metadata["instruction_id_list"],
            prompt=record.prompt[-1].content,
            kwargs=record.metadata["kwargs"],
        )
        judgments = {j.candidate_ids[0]: j for j in record.judgments_by("ifeval")}
        assert set(judgments) == {c.id for c in record.candidates} and len(judgments) == 2
        for candidate in record.candidates:
            judgment = judgments[candidate.id]
            followed = utils.test_instruction_following_strict(inp, candidate.text)
            expected = sum(followed.follow_instruction_list) / len(followed.follow_instruction_list)
            assert judgment.status == "ok" and judgment.score == expected
        for pair in record.pairs:
            assert pair.chosen_score > pair.rejected_score
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    counters = next(s for s in summary["stages"] if s["name"] == "ifeval")["counters"]
    assert counters["judgments"] == 4 and counters.get("failed", 0) == 0
