"""Checklist (TICK): questions written once per prompt, answered per candidate, pass rate and P(YES)."""

from __future__ import annotations

import math

import pytest

from synthpref.judges.checklist import (
    ChecklistJudge,
    ChecklistJudgeParams,
    ChecklistWriter,
    ChecklistWriterParams,
    p_yes,
    parse_checklist,
    parse_yes_no,
)
from synthpref.judges.parsing import ParseError
from synthpref.recipes.loader import RecipeError, parse_recipe
from tests.conftest import tiny_recipe
from tests.judge_doubles import ScriptedBackend, client_for, prompt_text, run_stage
from tests.judges.test_pairwise import make_record

# parsing --------------------------------------------------------------------------------------


def test_checklist_from_a_numbered_list():
    text = (
        "1. Does the response name a colour?\n"
        "2) Is the colour a primary colour?\n"
        "- Is the answer one word?\n"
        "Here are some notes.\n"
        "3. Does the response name a colour?\n"
        "4. Does the response ...?\n"
        "5. Is the response <something>?\n"
        "6. Is the answer cut"
    )
    assert parse_checklist(text) == [
        "Does the response name a colour?",
        "Is the colour a primary colour?",
        "Is the answer one word?",
    ]


def test_checklist_from_json():
    assert parse_checklist('{"questions": ["Is it red?", "Is it short?"]}') == [
        "Is it red?",
        "Is it short?",
    ]
    assert parse_checklist('Sure: ["Is it red?", "Is it short?"]') == ["Is it red?", "Is it short?"]


@pytest.mark.parametrize(
    "text", ["", "1. Does the response ...?\n2. Is the response ...?", "1. It is red.\n2. Short."]
)
def test_checklist_rejects(text):
    with pytest.raises(ParseError):
        parse_checklist(text)


@pytest.mark.parametrize(
    "text, yes",
    [
        ("Answer: YES", True),
        ("Answer: no, it does not", False),
        (" Yes", True),
        ("**NO**", False),
        ('{"answer": "YES"}', True),
    ],
)
def test_yes_no_accepts(text, yes):
    assert parse_yes_no(text) is yes


@pytest.mark.parametrize(
    "text", ["", "Answer: maybe", "I think the answer is yes", "Nope", '{"answer": "perhaps"}']
)
def test_yes_no_rejects(text):
    with pytest.raises(ParseError):
        parse_yes_no(text)


def test_p_yes_reads_the_answer_token():
    lp = math.log
    # " YES" is split into " Y" + "ES" by SmolLM2's tokenizer: prefixes count for their word
    top = [
        {" Y": lp(0.4), " yes": lp(0.1), " no": lp(0.2), " N": lp(0.1), " maybe": lp(0.2)},
        {"ES": lp(0.99)},
    ]
    assert p_yes(top) == pytest.approx(0.5 / 0.8)
    assert p_yes([{"\n": lp(0.9)}, {"No": lp(0.6), "Yes": lp(0.2)}]) == pytest.approx(0.25)
    assert p_yes([{"The": 0.0}]) is None
    assert p_yes(None) is None


# stages with a scripted model -----------------------------------------------------------------

QUESTIONS = "1. Does the response give a number?\n2. Is the number 7?\n3. Is it short?"


def scripted(request):
    text = prompt_text(request)
    if "evaluation checklist" in text:
        return QUESTIONS[2:] if request.continue_final_message else QUESTIONS
    response = text.split("[Response]\n")[1].split("\n[End of response]")[0]
    question = text.split("Question: ")[1].split("\n")[0]
    yes = {"give a number": any(ch.isdigit() for ch in response), "7": "7" in response}
    answer = next((v for k, v in yes.items() if k in question), len(response) < 10)
    return " YES" if answer else " NO"


def checklist_run(policy=scripted, **judge_params):
    backend = ScriptedBackend(policy, name="tick")
    clients = {"judge": client_for(backend)}
    recs = [
        make_record("r1", "What is 3 + 4?", ["7", "It is eight, I believe."]),
        make_record("r2", "What is 2 + 5?", ["7", "Seven."]),
    ]
    writer = ChecklistWriter("checklist", ChecklistWriterParams(model="judge"))
    recs = run_stage(writer, recs, clients)
    judge = ChecklistJudge("tick", ChecklistJudgeParams(model="judge", **judge_params))
    recs = run_stage(judge, recs, clients)
    return writer, judge, recs, backend


def test_checklist_written_once_per_prompt_and_reused():
    writer, _, recs, backend = checklist_run()
    writes = [r for r in backend.requests if "evaluation checklist" in prompt_text(r)]
    assert len(writes) == 2  # one per prompt, not per candidate
    for r in recs:
        ann = r.annotations["checklist"]
        assert ann["questions"] == [
            "Does the response give a number?",
            "Is the number 7?",
            "Is it short?",
        ]
        assert ann["status"] == "ok" and ann["writer"] == "checklist" and ann["template_hash"]
        hashes = {j.details["checklist_hash"] for j in r.judgments}
        assert len(hashes) == 1  # every candidate answered the same questions
    answers = [r for r in backend.requests if "Question:" in prompt_text(r)]
    assert len(answers) == 2 * 2 * 3  # prompts x candidates x questions
    assert writer.counters["questions"] == 6


def test_pass_rate_is_the_share_of_yes():
    _, judge, recs, _ = checklist_run()
    scores = {j.candidate_ids[0]: j.score for r in recs for j in r.judgments}
    assert scores == {
        "r1:c0": 1.0,  # "7": number, 7, short
        "r1:c1": 0.0,  # no digit, no 7, long
        "r2:c0": 1.0,
        "r2:c1": pytest.approx(1 / 3),  # "Seven.": short only
    }
    j = recs[0].judgments[0]
    assert [a["answer"] for a in j.details["answers"]] == ["YES", "YES", "YES"]
    assert j.scores["p_yes_mean"] is None  # the scripted model gives no log-probabilities
    assert j.template_hash and j.model == "judge"
    assert judge.counters["questions"] == 12


def test_unanswerable_questions_fail_the_judgment():
    def never_answers(request):
        if "evaluation checklist" in prompt_text(request):
            return scripted(request)
        return " Perhaps."

    _, judge, recs, _ = checklist_run(never_answers, max_retries=1)
    assert all(j.status == "failed" and j.raw for r in recs for j in r.judgments)
    assert judge.counters["failed_answers"] == 12


def test_failed_checklist_gives_failed_judgments():
    def no_questions(request):
        return "I am not sure what you mean." if "checklist" in prompt_text(request) else " YES"

    writer, judge, recs, _ = checklist_run(no_questions)
    assert writer.counters["failed"] == 2
    assert recs[0].annotations["checklist"]["status"] == "failed"
    assert all(
        j.status == "failed" and "no checklist" in j.error for r in recs for j in r.judgments
    )
    assert judge.counters["no_checklist"] == 4


def test_checklists_from_an_input_column():
    backend = ScriptedBackend(scripted, name="tick")
    rec = make_record("r1", "What is 3 + 4?", ["7"])
    rec.metadata["checks"] = ["Is the answer 7?", "Is it a number?"]
    writer = ChecklistWriter(
        "checklist", ChecklistWriterParams(model="judge", source_field="checks")
    )
    (rec,) = run_stage(writer, [rec], {"judge": client_for(backend)})
    assert backend.requests == []
    assert rec.annotations["checklist"]["questions"] == ["Is the answer 7?", "Is it a number?"]
    assert writer.counters["from_source"] == 1


def test_checklist_judge_needs_a_writer(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1] = {"type": "checklist_judge", "model": "a"}
    with pytest.raises(RecipeError, match="checklist_writer"):
        parse_recipe(recipe)


def test_writer_schema_and_prefill():
    backend = ScriptedBackend(scripted, extra=["json_schema"], name="json")
    rec = make_record("r1", "What is 3 + 4?", ["7"])
    writer = ChecklistWriter("checklist", ChecklistWriterParams(model="judge", max_questions=5))
    run_stage(writer, [rec], {"judge": client_for(backend)})
    schema = backend.requests[0].json_schema
    assert schema["properties"]["questions"]["maxItems"] == 5
    assert not backend.requests[0].continue_final_message
    backend = ScriptedBackend(scripted, name="plain")
    run_stage(writer, [make_record("r1", "q", ["7"])], {"judge": client_for(backend)})
    assert backend.requests[0].messages[-1].content == "1."


# the embedded model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_writes_and_answers(embedded_dir):
    from synthpref.backends.builtin import EmbeddedSpec

    clients = {"judge": client_for(EmbeddedSpec().build())}
    recs = [make_record("r1", "Name a primary colour.", ["Red.", "Bananas are yellow fruit."])]
    recs[0].metadata["checks"] = ["Does the response name a colour?", "Is the answer short?"]
    writer = ChecklistWriter(
        "checklist", ChecklistWriterParams(model="judge", max_tokens=48, max_retries=1)
    )
    judge = ChecklistJudge("tick", ChecklistJudgeParams(model="judge", max_tokens=2))
    written = run_stage(writer, [r.model_copy(deep=True) for r in recs], clients)
    ann = written[0].annotations["checklist"]
    assert ann["raw"].startswith("1.")
    assert ann["status"] == "failed" or 2 <= len(ann["questions"]) <= 8
    # answering: fixed questions, so the check does not depend on the writer's luck
    given = run_stage(
        ChecklistWriter("checklist", ChecklistWriterParams(model="judge", source_field="checks")),
        recs,
        clients,
    )
    out = run_stage(judge, given, clients)
    judgments = out[0].judgments
    assert len(judgments) == 2
    for j in judgments:
        assert j.raw.startswith("[Q1] Answer:")
        if j.status == "ok":
            assert 0.0 <= j.score <= 1.0
            assert 0.0 <= j.scores["p_yes_mean"] <= 1.0  # the embedded model returns logprobs
            assert all(a["p_yes"] is not None for a in j.details["answers"])
