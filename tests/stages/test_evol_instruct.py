"""Evol-Instruct: lineage, the operation choice, each elimination rule, keep modes, determinism, and
recipes/evol.yaml end to end on the embedded model."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from synthpref.backends.types import Completion, GenerationRequest, GenerationResult
from synthpref.records import Message, Record
from synthpref.stages.base import StageContext
from synthpref.stages.evol_instruct import (
    OPERATIONS,
    EvolInstruct,
    EvolInstructParams,
    choose_operation,
)
from synthpref.templates import load_template

ROOT = Path(__file__).resolve().parents[2]

Reply = str | tuple[str, str]  # text, or (text, finish_reason)


class Scripted:
    """A model client double: evolution requests, judge questions and plain prompts each answered
    by their own function of the text they carry."""

    def __init__(
        self,
        evolve: Callable[[str, str], Reply],
        respond: Callable[[str], str] = lambda prompt: "Here is a full answer with real content.",
        judge: Callable[[str, str], str] = lambda parent, evolved: "Yes",
    ) -> None:
        self.evolve, self.respond, self.judge = evolve, respond, judge
        self.requests: list[GenerationRequest] = []

    def _reply(self, text: str) -> Reply:
        m = re.search(r"#Given Prompt#:\n(.*)\n\n#(Rewritten|Created) Prompt#:$", text, re.S)
        if m:
            return self.evolve(m.group(1), operation_of(text))
        m = re.search(r"First prompt:\n(.*)\n\nSecond prompt:\n(.*)\n\nDoes the second", text, re.S)
        if m:
            return self.judge(m.group(1), m.group(2))
        return self.respond(text)

    async def generate(self, requests):
        out = []
        for request in requests:
            self.requests.append(request)
            reply = self._reply(request.messages[-1].content)
            text, finish = (reply, "stop") if isinstance(reply, str) else reply
            out.append(
                GenerationResult(
                    completions=[Completion(text=text, finish_reason=finish, completion_tokens=9)],
                    prompt_tokens=9,
                )
            )
        return out


def _method_sentence(operation: str) -> str:
    """The text that only this operation's template renders (its method, or breadth's opening)."""
    text = load_template(f"evol/{operation}.jinja").render(prompt="X")
    if operation == "breadth":
        return "Act as a prompt creator."
    return re.search(r"How to make it harder: (.*)", text).group(1)


def operation_of(text: str) -> str:
    found = [op for op in OPERATIONS if _method_sentence(op) in text]
    assert len(found) == 1, found
    return found[0]


def add_words(parent: str, operation: str) -> str:
    return f"{parent} Also explain each step for a reader new to the topic ({operation})."


def records(*prompts: str) -> list[Record]:
    return [
        Record(id=f"p{i}", prompt=[Message(role="user", content=text)], metadata={"k": i})
        for i, text in enumerate(prompts, start=1)
    ]


def stage(client: Scripted, judge: bool = False, **params) -> EvolInstruct:
    clients = {"m": client, **({"j": client} if judge else {})}
    s = EvolInstruct(
        "evol",
        EvolInstructParams.model_validate(
            {"model": "m", **({"judge_model": "j"} if judge else {}), **params}
        ),
    )
    s.ctx = StageContext(clients)  # type: ignore[arg-type]
    return s


def run(s: EvolInstruct, recs: list[Record]) -> list[Record]:
    return asyncio.run(s.process(recs))


def by_id(out: list[Record]) -> dict[str, Record]:
    return {r.id: r for r in out}


# lineage -----------------------------------------------------------------------------------------


def test_lineage_ids_parents_roots_operations_and_rounds():
    client = Scripted(add_words)
    s = stage(client, rounds=3, response_check=False, seed=7)
    out = run(s, records("Name a primary colour.", "What is 3 + 4?"))
    assert [r.id for r in out] == [
        "p1", "p1.e1", "p1.e1.e2", "p1.e1.e2.e3",
        "p2", "p2.e1", "p2.e1.e2", "p2.e1.e2.e3",
    ]  # fmt: skip
    got = by_id(out)
    assert got["p1"].metadata == {
        "k": 1,
        "lineage": {"parent": None, "root": "p1", "operation": None, "round": 0},
    }
    for child_id in ("p1.e1", "p1.e1.e2", "p1.e1.e2.e3", "p2.e1.e2"):
        child = got[child_id]
        parent_id, round_ = child_id.rsplit(".e", 1)
        lineage = child.metadata["lineage"]
        expected_op = choose_operation(7, parent_id, int(round_), s._weights())
        assert lineage == {
            "parent": parent_id,
            "root": child_id.split(".")[0],
            "operation": expected_op,
            "round": int(round_),
            "stage": "evol",
        }
        # the prompt is the parent's, evolved with that operation's template
        parent_text = got[parent_id].prompt[-1].content
        assert child.prompt == [Message(role="user", content=add_words(parent_text, expected_op))]
        assert child.source_row == got[parent_id].source_row
    # every evolution request used the template of the operation recorded on its child
    asked = [operation_of(r.messages[-1].content) for r in client.requests]
    made = [got[i].metadata["lineage"]["operation"] for i in got if ".e" in i]
    assert sorted(asked) == sorted(made)
    assert s.counters["evolved:round3"] == 2 and s.counters["output"] == 8


def test_the_operation_is_a_seeded_choice_by_record_round_and_weights():
    weights = dict.fromkeys(OPERATIONS, 1.0)
    picks = {choose_operation(0, f"r{i}", 1, weights) for i in range(200)}
    assert picks == set(OPERATIONS)  # all six reachable with equal weights
    assert choose_operation(0, "r1", 1, weights) == choose_operation(0, "r1", 1, weights)
    draws = [choose_operation(s, "r1", r, weights) for s in range(5) for r in range(1, 5)]
    assert len(set(draws)) > 1  # seed and round both enter the stream
    only = {**dict.fromkeys(OPERATIONS, 0.0), "deepen": 2.0, "breadth": 0.0}
    assert {choose_operation(0, f"r{i}", 1, only) for i in range(50)} == {"deepen"}
    breadth_share = sum(choose_operation(3, f"x{i}", 1, weights) == "breadth" for i in range(3000))
    assert 400 < breadth_share < 600  # one in six


def test_a_multi_turn_record_keeps_its_earlier_messages():
    rec = Record(
        id="c1",
        prompt=[
            Message(role="system", content="Be brief."),
            Message(role="user", content="Hi."),
            Message(role="assistant", content="Hello!"),
            Message(role="user", content="Name a planet."),
        ],
    )
    out = run(stage(Scripted(add_words), rounds=1, response_check=False), [rec])
    child = by_id(out)["c1.e1"]
    assert child.prompt[:3] == rec.prompt[:3]
    assert child.prompt[3].content.startswith("Name a planet. Also explain")


@pytest.mark.parametrize(
    ("keep", "ids"),
    [
        ("all", ["p1", "p1.e1", "p1.e1.e2", "p2", "p2.e1"]),
        ("final", ["p1.e1.e2", "p2.e1"]),
        ("input+final", ["p1", "p1.e1.e2", "p2", "p2.e1"]),
    ],
)
def test_keep_modes(keep, ids):
    def evolve(parent: str, operation: str) -> str:
        # p2's lineage fails in round 2 (a copy of its parent): its last survivor is round 1
        return parent if parent.startswith("Say hi") and "Also" in parent else add_words(parent, "")

    out = run(stage(Scripted(evolve), rounds=2, keep=keep, response_check=False), records(
        "Name a primary colour.", "Say hi in French."))  # fmt: skip
    assert [r.id for r in out] == ids


# elimination ----------------------------------------------------------------------------------------

FAILURES = {
    # parent prompt -> (what the evolution, judge or response check does, the counted reason)
    "empty": "",
    "truncated": ("A long rewrite that ran out of tokens and was cut in the mid", "length"),
    "template_phrasing": "#Rewritten Prompt#: Name three primary colours and explain why.",
    "template_phrasing_lower": "Here is the rewritten prompt: name three colours and explain why.",
    "refused": "I'm sorry, but I cannot rewrite this prompt for you.",
    "no_information_gain": "Name one primary colour, please.",
}


def _elimination_evolve(parent: str, operation: str) -> Reply:
    key = parent.split(":")[0]
    if key in FAILURES:
        return FAILURES[key]
    return add_words(parent, "")


def test_each_elimination_rule_drops_the_evolution_and_stops_its_lineage():
    prompts = [f"{key}: Name one primary colour." for key in FAILURES]
    prompts += [
        "judge_no: Name one primary colour.",
        "cannot_respond: Name one primary colour.",
        "response_empty: Name one primary colour.",
        "healthy: Name one primary colour.",
    ]

    def judge(parent: str, evolved: str) -> str:
        return "No." if parent.startswith("judge_no") else "Yes"

    def respond(prompt: str) -> str:
        if prompt.startswith("cannot_respond"):
            return "Sorry, I cannot help with that request."
        if prompt.startswith("response_empty"):
            return "... the, of and ?!"
        return "A perfectly fine answer about colours."

    client = Scripted(_elimination_evolve, respond=respond, judge=judge)
    s = stage(client, judge=True, rounds=2, operations={"breadth": 0.0})
    out = run(s, records(*prompts))
    dropped = {k.split(":", 1)[1]: v for k, v in s.counters.items() if k.startswith("dropped:")}
    assert dropped == {
        "empty": 1,
        "truncated": 1,
        "template_phrasing": 2,
        "refused": 1,
        "no_information_gain": 1,
        "judge_not_more_complex": 1,
        "model_cannot_respond": 1,
        "response_empty": 1,
    }
    healthy = f"p{len(prompts)}"
    assert [r.id for r in out if ".e" in r.id] == [f"{healthy}.e1", f"{healthy}.e1.e2"]
    # every input is still there (keep: all), and no dropped evolution was evolved again
    assert [r.id for r in out if ".e" not in r.id] == [f"p{i}" for i in range(1, len(prompts) + 1)]
    evolved_parents = [
        re.search(r"#Given Prompt#:\n(.*)\n\n#", r.messages[-1].content, re.S).group(1)
        for r in client.requests
        if "#Given Prompt#" in r.messages[-1].content
    ]
    assert len(evolved_parents) == len(prompts) + 1  # round 2: the healthy lineage only


def test_no_information_gain_counts_new_words_outside_the_common_subsequence():
    s = stage(Scripted(add_words))
    assert s.new_words("Name a primary colour.", "Name a primary colour.") == 0
    assert s.new_words("Name a primary colour.", "name A PRIMARY colour!") == 0
    assert s.new_words("Name a primary colour.", "Name one primary color.") == 2
    assert s.new_words("Name a colour.", "Name a colour and say why you like it.") == 6
    assert s.new_words("Name a colour.", "日本語") is None  # no word rouge-score can see


def test_the_judge_is_not_asked_about_breadth_and_an_unreadable_answer_keeps_the_prompt():
    asked = []

    def judge(parent: str, evolved: str) -> str:
        asked.append(parent)
        return "Hmm, both are fine."

    only_breadth = {op: 0.0 for op in OPERATIONS if op != "breadth"}
    client = Scripted(
        lambda p, op: "Describe a festival held on a small Pacific island.", judge=judge
    )
    s = stage(client, judge=True, rounds=1, operations=only_breadth, response_check=False)
    out = run(s, records("Describe a festival in Paris."))
    assert [r.id for r in out] == ["p1", "p1.e1"] and asked == []
    s = stage(Scripted(add_words, judge=judge), judge=True, rounds=1, operations={"breadth": 0})
    out = run(s, records("Describe a festival in Paris."))
    assert [r.id for r in out] == ["p1", "p1.e1"] and asked == ["Describe a festival in Paris."]
    assert s.counters["judge_unparsed"] == 1


def test_records_without_a_user_message_pass_through_unevolved():
    empty = Record(id="seed-000000", prompt=[], metadata={"seed": 0})
    s = stage(Scripted(add_words), rounds=1, response_check=False)
    out = run(s, [empty, *records("Name a primary colour.")])
    assert [r.id for r in out] == ["seed-000000", "p1", "p1.e1"]
    assert s.counters["skipped:no_user_message"] == 1


# determinism, templates, checks ------------------------------------------------------------------


def _evolve_by_hash(parent: str, operation: str) -> str:
    return f"{parent} Consider the {operation.replace('_', ' ')} angle in {len(parent) % 7} ways."


def test_same_outputs_twice_and_another_seed_changes_the_choices():
    prompts = [f"Question number {i}: explain topic {i}." for i in range(12)]

    def once(seed: int) -> list[dict]:
        s = stage(Scripted(_evolve_by_hash), rounds=2, seed=seed)
        return [r.model_dump() for r in run(s, records(*prompts))]

    first = once(0)
    assert first == once(0)
    assert json.dumps(first) == json.dumps(once(0))
    assert once(1) != first


def test_fingerprint_covers_the_templates_in_use_and_check_names_bad_ones(tmp_path):
    s = stage(Scripted(add_words))
    assert set(s.fingerprint()) == {f"template:{op}" for op in OPERATIONS}
    s = stage(Scripted(add_words), judge=True, operations={"breadth": 0})
    assert "template:judge" in s.fingerprint() and "template:breadth" not in s.fingerprint()
    s = stage(Scripted(add_words), templates={"deepen": "evol/nope.jinja"})
    assert any(p.startswith("templates.deepen:") for p in s.check([]))
    s = stage(Scripted(add_words), operations=dict.fromkeys(OPERATIONS, 0))
    assert any(p.startswith("operations:") for p in s.check([]))


# the shipped recipe, on the embedded model --------------------------------------------------------


def test_the_shipped_recipe_validates_with_the_prompt_filters_after_the_evolution():
    import yaml

    import synthpref

    path = ROOT / "recipes" / "evol.yaml"
    warnings = synthpref.validate(path)
    assert all("self-preference" in w for w in warnings), warnings
    types = [s["type"] for s in yaml.safe_load(path.read_text())["stages"]]
    assert types[:3] == ["evol_instruct", "dedup", "decontaminate"]


@pytest.mark.slow
def test_evol_recipe_end_to_end_on_the_embedded_model(tmp_path, embedded_dir):
    """The shipped recipe on its first 4 prompts (it takes 8; the suite's time budget), the
    evolution as shipped, shorter candidates. Each evolution is sampled from its own seeded stream,
    so a prompt evolves as it would beside the other 4; what is checked holds per prompt: every
    operation drawn is counted, every evolution asked for is kept or dropped by reason, and the
    lineage reaches the dataset through the prompt filters, generation, the judge and pairs."""
    import polars as pl
    import pyarrow.parquet as pq

    import synthpref
    from synthpref.records import records_from_arrow

    recipe = yaml.safe_load((ROOT / "recipes" / "evol.yaml").read_text())
    recipe["source"]["path"] = str(ROOT / "recipes" / recipe["source"]["path"])
    recipe["source"]["limit"] = 4
    for stage_ in recipe["stages"]:
        if "eval_prompts" in stage_:
            stage_["eval_prompts"] = [str(ROOT / "recipes" / p) for p in stage_["eval_prompts"]]
        if stage_["type"] == "generate":
            stage_["max_tokens"] = 32
    recipe["output"]["dir"] = str(tmp_path / "run")
    result = synthpref.run(recipe, progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    counters = next(s for s in summary["stages"] if s["name"] == "evol_instruct")["counters"]
    assert counters["input"] == 4

    # every operation drawn is the seeded draw for its record and round, and every evolution asked
    # for is either kept or dropped by reason
    (evol_params,) = [s for s in recipe["stages"] if s["type"] == "evol_instruct"]
    params = EvolInstructParams.model_validate(
        {k: v for k, v in evol_params.items() if k != "type"}
    )
    weights = params.operations.model_dump()
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("*-evol_instruct-*")
    evol_out = [
        r
        for f in sorted(checkpoint.glob("*.parquet"))
        for r in records_from_arrow(pq.read_table(f))
    ]
    rounds = {r.id: r.metadata["lineage"]["round"] for r in evol_out}
    asked = [(rid, 1) for rid, round_ in rounds.items() if round_ == 0]
    asked += [(rid, 2) for rid, round_ in rounds.items() if round_ == 1]
    drawn = Counter(choose_operation(params.seed, rid, n, weights) for rid, n in asked)
    assert {k: v for k, v in counters.items() if k.startswith("op:")} == {
        f"op:{op}": n for op, n in drawn.items()
    }
    dropped = sum(v for k, v in counters.items() if k.startswith("dropped:"))
    kept = [counters.get(f"evolved:round{n}", 0) for n in (1, 2)]
    assert sum(drawn.values()) == dropped + sum(kept)
    assert kept == [sum(1 for r in rounds.values() if r == n) for n in (1, 2)]

    records_ = pl.read_parquet(tmp_path / "run" / "data" / "records.parquet").to_dicts()
    lineages = [json.loads(r["metadata"])["lineage"] for r in records_]
    evolved = [x for x in lineages if x["round"] >= 1]
    assert evolved, "the embedded model evolved nothing"
    assert all(x["operation"] in OPERATIONS and x["root"].startswith("qs-") for x in evolved)
    preference = pl.read_parquet(tmp_path / "run" / "data" / "preference.parquet")
    assert preference.height >= 1
    assert result is not None


# through the executor: checkpoints keep the lineage, a resumed run equals an uninterrupted one ----

CRASH = {"after": None, "calls": 0}


def _executor_writer(request: GenerationRequest) -> str:
    CRASH["calls"] += 1
    if CRASH["after"] is not None and CRASH["calls"] > CRASH["after"]:
        raise RuntimeError("killed")
    text = request.messages[-1].content
    m = re.search(r"#Given Prompt#:\n(.*)\n\n#", text, re.S)
    if m is None:  # the response check
        return "An answer with some real content in it."
    parent = m.group(1)
    if "colour" in parent and "Also" in parent:
        return parent  # this lineage stops in round 2: no information gain
    return add_words(parent, operation_of(text))


def _executor_recipe(tmp_path: Path, run_dir: Path) -> dict:
    from tests.judge_doubles import POLICIES

    POLICIES["evol_writer"] = _executor_writer
    data = tmp_path / "prompts.jsonl"
    prompts = ["Name a primary colour.", "What is 3 + 4?", "Say hello in French.", "Why?"]
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in
                            enumerate(prompts)))  # fmt: skip
    return {
        "name": "evol-resume",
        "source": {"path": str(data), "id_field": "id"},
        "models": {"writer": {"backend": "scripted", "policy": "evol_writer"}},
        "stages": [{"type": "evol_instruct", "model": "writer", "rounds": 2}],
        "output": {"dir": str(run_dir), "formats": []},
        "settings": {"shard_size": 2},
    }


def test_through_the_executor_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    import polars as pl

    import synthpref

    def outputs(run_dir: Path) -> list[tuple]:
        rows = pl.read_parquet(run_dir / "data" / "records.parquet").to_dicts()
        return [(r["id"], json.dumps(r["prompt"]), r["metadata"]) for r in rows]

    CRASH.update(after=None, calls=0)
    synthpref.run(_executor_recipe(tmp_path, tmp_path / "whole"), progress=False)
    expected = outputs(tmp_path / "whole")
    ids = [e[0] for e in expected]
    assert ids == ["q0", "q0.e1", "q1", "q1.e1", "q1.e1.e2", "q2", "q2.e1", "q2.e1.e2",
                   "q3", "q3.e1", "q3.e1.e2"]  # fmt: skip
    lineage = json.loads(dict((e[0], e[2]) for e in expected)["q1.e1.e2"])["lineage"]
    assert (lineage["parent"], lineage["root"], lineage["round"]) == ("q1.e1", "q1", 2)

    CRASH.update(after=9, calls=0)  # shard 0 (4 + 3 calls) finishes; shard 1 dies in round 1
    with pytest.raises(Exception, match="killed"):
        synthpref.run(_executor_recipe(tmp_path, tmp_path / "resumed"), progress=False)
    CRASH.update(after=None, calls=0)
    synthpref.run(_executor_recipe(tmp_path, tmp_path / "resumed"), progress=False)
    assert outputs(tmp_path / "resumed") == expected
