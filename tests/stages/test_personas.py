"""persona_prompts: persona files and their errors, which persona a record gets, what is kept, ids,
lineage in metadata, and the text-to-persona path."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from synthpref.backends.types import Completion, GenerationResult
from synthpref.errors import ConfigError
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Message, Record
from synthpref.sources import seed_records
from synthpref.stages.base import StageContext
from synthpref.stages.personas import (
    PersonaFileError,
    PersonaPrompts,
    PersonaPromptsParams,
    clean_reply,
    read_personas,
)

PERSONAS = [
    {"id": "nurse", "persona": "A nursing student.", "goal": "Pass the exam."},
    {"persona": "A retired bus driver."},
]


class Scripted:
    """A model client double: ``reply(request, k)`` -> (text, finish_reason) per sample."""

    def __init__(self, reply) -> None:
        self.reply = reply
        self.requests = []

    async def generate(self, requests):
        self.requests += requests
        out = []
        for r in requests:
            completions = []
            for k in range(r.params.n):
                text, finish = self.reply(r, k)
                completions.append(Completion(text=text, finish_reason=finish, completion_tokens=3))
            out.append(GenerationResult(completions=completions, prompt_tokens=5))
        return out


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _stage(tmp_path: Path, client, **params) -> PersonaPrompts:
    params.setdefault("personas", str(_write(tmp_path / "p.jsonl", PERSONAS)))
    stage = PersonaPrompts("persona_prompts", PersonaPromptsParams.model_validate(params))
    stage.base_dir = tmp_path
    stage.ctx = StageContext({"default": client})
    return stage


def _seed_recipe(tmp_path: Path, **stage) -> dict:
    return {
        "name": "p",
        "source": {"seeds": 3},
        "models": {"m": {"backend": "embedded"}},
        "stages": [{"type": "persona_prompts", "model": "m", **stage}],
        "output": {"dir": str(tmp_path / "run")},
    }


def _problems(recipe: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe, base_dir=Path(recipe["output"]["dir"]).parent)
    return info.value.problems


# --- persona files -----------------------------------------------------------------------------


def test_jsonl_and_txt_persona_files(tmp_path):
    jsonl = _write(tmp_path / "p.jsonl", [PERSONAS[0], "", PERSONAS[1]])
    got = read_personas(jsonl)
    assert [(p.text, p.goal, p.row, p.id) for p in got] == [
        ("A nursing student.", "Pass the exam.", 1, "nurse"),
        ("A retired bus driver.", None, 3, None),
    ]
    txt = tmp_path / "p.txt"
    txt.write_text("# synthetic personas\nA chess coach.\n\n  A baker.  \n")
    assert [(p.text, p.row) for p in read_personas(txt)] == [("A chess coach.", 2), ("A baker.", 4)]
    other = _write(tmp_path / "p2.jsonl", [{"who": "A pilot.", "aim": "Fly."}])
    [p] = read_personas(other, persona_field="who", goal_field="aim")
    assert (p.text, p.goal) == ("A pilot.", "Fly.")


@pytest.mark.parametrize(
    "rows, match",
    [
        ([], r"no personas in the file"),
        (["# only a comment"], None),  # .jsonl has no comments: not valid JSON
        ([PERSONAS[0], {"name": "x", "goal": "y"}], r"line 2: no 'persona' field \(the row has 'name', 'goal'\)"),
        ([PERSONAS[0], "{not json"], r"line 2: not valid JSON"),
        (['"just a string"'], r"line 1: expected a JSON object with a 'persona' field"),
        ([{"persona": "  "}], r"line 1: field 'persona' must be a non-empty string"),
        ([{"persona": 3}], r"line 1: field 'persona' must be a non-empty string"),
        ([{"persona": "A cook.", "goal": 7}], r"line 1: field 'goal' must be a string"),
    ],
)  # fmt: skip
def test_malformed_persona_files_name_the_row(tmp_path, rows, match):
    path = _write(tmp_path / "p.jsonl", rows)
    with pytest.raises(PersonaFileError, match=match or r"line 1: not valid JSON"):
        read_personas(path)


def test_persona_file_must_be_jsonl_or_txt(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("persona\nA baker.\n")
    with pytest.raises(PersonaFileError, match=r"expected a \.jsonl file .* or a \.txt file"):
        read_personas(path)


def test_recipe_errors_name_the_yaml_path_and_the_row(tmp_path):
    problems = _problems(_seed_recipe(tmp_path, personas="missing.jsonl"))
    assert any(
        p.startswith("stages[0]: personas: persona file 'missing.jsonl' not found")
        and str(tmp_path / "missing.jsonl") in p
        for p in problems
    ), problems

    _write(tmp_path / "empty.jsonl", [])
    problems = _problems(_seed_recipe(tmp_path, personas="empty.jsonl"))
    assert any(p.startswith("stages[0]: personas: ") and "empty" in p for p in problems), problems

    _write(tmp_path / "bad.jsonl", [PERSONAS[0], PERSONAS[1], {"text": "A pilot."}])
    problems = _problems(_seed_recipe(tmp_path, personas="bad.jsonl"))
    assert any(
        p.startswith("stages[0]: personas: ") and "bad.jsonl line 3: no 'persona' field" in p
        for p in problems
    ), problems


def test_exactly_one_origin_of_personas(tmp_path):
    problems = _problems(_seed_recipe(tmp_path))
    assert any(p.startswith("stages[0]") and "personas: <file>" in p for p in problems), problems
    _write(tmp_path / "p.jsonl", PERSONAS)
    problems = _problems(_seed_recipe(tmp_path, personas="p.jsonl", from_source=True))
    assert any(p.startswith("stages[0]") and "not both" in p for p in problems), problems


def test_shipped_recipe_persona_file_is_valid():
    root = Path(__file__).resolve().parents[2]
    personas = read_personas(root / "recipes" / "data" / "personas.jsonl")
    assert 15 <= len(personas) <= 30
    assert len({p.text for p in personas}) == len(personas)
    rows = [json.loads(line) for line in (root / "recipes/data/personas.jsonl").open()]
    assert all("synthetic" in row["source"] for row in rows)


# --- prompts from a persona file ---------------------------------------------------------------


def test_round_robin_personas_ids_lineage_and_drops(tmp_path):
    def reply(request, k):
        if "nursing" in request.messages[0].content and k == 1:
            return "   ", "stop"  # empty
        if "bus driver" in request.messages[0].content and k == 2:
            return "Person: a retired bus-driver", "stop"  # the persona echoed
        if "bus driver" in request.messages[0].content and k == 0:
            return "How do I", "length"  # cut at max_tokens
        return f'Prompt: "Question {k}?"', "stop"

    client = Scripted(reply)
    stage = _stage(tmp_path, client, n=3)
    out = asyncio.run(stage.process(seed_records(3)))
    # seed k gets persona k mod 2: 0 -> nurse, 1 -> driver, 2 -> nurse
    assert [r.id for r in out] == [
        "seed-000000.p0",
        "seed-000000.p2",
        "seed-000001.p1",
        "seed-000002.p0",
        "seed-000002.p2",
    ]
    assert all(r.prompt == [Message(role="user", content=f"Question {r.id[-1]}?")] for r in out)
    first, _, second, third, _ = out
    assert first.metadata == {
        "seed": 0,
        "parent": "seed-000000",
        "operation": "persona",
        "persona": "A nursing student.",
        "goal": "Pass the exam.",
        "persona_id": "nurse",
        "persona_row": 1,
    }
    assert second.metadata["persona"] == "A retired bus driver." and "goal" not in second.metadata
    assert third.metadata["persona_id"] == "nurse" and third.metadata["parent"] == "seed-000002"
    assert stage.counters == {"prompts": 5, "dropped_empty": 2, "dropped_cut": 1, "dropped_echo": 1}
    # one request per record, n samples, the persona and goal in it, a seed per record
    assert [r.params.n for r in client.requests] == [3, 3, 3]
    assert "A nursing student." in client.requests[0].messages[0].content
    assert "Goal: Pass the exam." in client.requests[0].messages[0].content
    seeds = [r.params.seed for r in client.requests]
    assert len(set(seeds)) == 3
    # a rerun asks exactly the same
    again = Scripted(reply)
    assert asyncio.run(_stage(tmp_path, again, n=3).process(seed_records(3))) == out
    assert again.requests == client.requests


def test_clean_reply():
    assert clean_reply('  Prompt: "What is a mortgage?" ') == "What is a mortgage?"
    assert clean_reply("**Message:** hi there") == "hi there"
    assert clean_reply("“Quoted”") == "Quoted"
    assert clean_reply("Why is 'x' odd?") == "Why is 'x' odd?"
    assert clean_reply("Prompt:") == ""


def test_fingerprint_follows_the_persona_file(tmp_path):
    path = str(_write(tmp_path / "mine.jsonl", PERSONAS))
    before = _stage(tmp_path, Scripted(None), personas=path).fingerprint()
    _write(tmp_path / "mine.jsonl", [*PERSONAS, {"persona": "A pilot."}])
    after = _stage(tmp_path, Scripted(None), personas=path).fingerprint()
    assert before["personas"] != after["personas"]
    assert before["template"] == after["template"]


# --- personas from source texts ----------------------------------------------------------------


def test_personas_from_source_texts(tmp_path):
    def reply(request, k):
        text = request.messages[0].content.lower()
        if "describe, in one sentence, a person" in text:
            if "tomatoes" in text:
                return "Persona: A gardener.", "stop"
            if "offside" in text:
                return "A football fan who", "length"
            return "", "stop"
        return (
            f"Question {k} from {request.messages[0].content.split('Person: ')[1].splitlines()[0]}",
            "stop",
        )

    client = Scripted(reply)
    stage = _stage(tmp_path, client, personas=None, from_source=True, n=1)
    records = [
        Record(id="t1", prompt=[Message(role="user", content="Tomatoes need sun.")], source_row=1),
        Record(id="t2", prompt=[Message(role="user", content="The offside rule.")], source_row=2),
        Record(id="t3", prompt=[Message(role="user", content="Nothing.")], source_row=3),
        Record(id="t4", prompt=[], source_row=4),
    ]
    out = asyncio.run(stage.process(records))
    assert [r.id for r in out] == ["t1.p0"]
    assert out[0].prompt[0].content == "Question 0 from A gardener."
    assert out[0].metadata == {
        "parent": "t1",
        "operation": "persona",
        "persona": "A gardener.",
        "persona_from": "source",
    }
    assert stage.counters == {
        "dropped_no_source_text": 1,
        "dropped_persona_cut": 1,
        "dropped_persona_empty": 1,
        "personas_written": 1,
        "prompts": 1,
    }
    # the prompt request also shows the source text
    assert "Tomatoes need sun." in client.requests[-1].messages[0].content


def test_from_source_on_seeds_is_refused(tmp_path):
    recipe = _seed_recipe(tmp_path, from_source=True)
    loaded = parse_recipe(recipe)
    [stage] = loaded.stages
    with pytest.raises(ConfigError, match=r"source\.seeds gives records with no text"):
        stage.prepare([], loaded.recipe)
