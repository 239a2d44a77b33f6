"""user_turn: a generated reply becomes the assistant message, the simulated user answers it; recipes
alternate generate and user_turn; misplacements refused with their YAML path; the shipped
personas_multiturn recipe end to end and resumed after a kill."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import polars as pl
import pytest
import yaml

import synthpref
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Candidate, Judgment, Message, Pair, Record
from synthpref.stages.base import StageContext
from synthpref.stages.generate import Generate, GenerateParams
from synthpref.stages.user_turn import UserTurn, UserTurnParams
from tests.judge_doubles import POLICIES
from tests.stages.test_personas import PERSONAS, Scripted

ROOT = Path(__file__).resolve().parents[2]


def _stage(client, **params) -> UserTurn:
    stage = UserTurn("user_turn", UserTurnParams.model_validate(params))
    stage.ctx = StageContext({"default": client})
    return stage


def _cand(cid: str, text: str = "An answer.", finish: str = "stop") -> Candidate:
    return Candidate(id=cid, model="m", text=text, finish_reason=finish, stage="turn1")


def _record(*candidates: Candidate, rid: str = "r1", **metadata) -> Record:
    return Record(
        id=rid,
        prompt=[
            Message(role="system", content="Be brief."),
            Message(role="user", content="How do I prune tomatoes?"),
        ],
        metadata=metadata,
        annotations={"domain": "chat"},
        candidates=list(candidates),
        judgments=[Judgment(judge="j", candidate_ids=[c.id], score=1.0) for c in candidates],
        pairs=[Pair(chosen_id="a", rejected_id="b", chosen_score=1, rejected_score=0, margin=1,
                    judge="j", rule="best_worst")] if len(candidates) > 1 else [],
    )  # fmt: skip


def _reply(text: str, finish: str = "stop"):
    return Scripted(lambda request, k: (text, finish))


def test_builds_user_assistant_user_and_keeps_what_the_user_needs():
    client = _reply('USER: "And how often should I water them?"')
    stage = _stage(client)
    cut, good, other = _cand("c0", "Cut off mid", "length"), _cand("c1"), _cand("c2", "Other.")
    [out] = asyncio.run(
        stage.process([_record(cut, good, other, persona="A gardener.", goal="Grow tomatoes.")])
    )
    assert [(m.role, m.content) for m in out.prompt] == [
        ("system", "Be brief."),
        ("user", "How do I prune tomatoes?"),
        ("assistant", "An answer."),  # the first usable candidate: c0 was cut at max_tokens
        ("user", "And how often should I water them?"),
    ]
    assert out.candidates == [] and out.judgments == [] and out.pairs == []
    assert out.annotations == {"domain": "chat"}
    assert out.metadata["persona"] == "A gardener." and out.metadata["goal"] == "Grow tomatoes."
    assert out.metadata["turns"] == [
        {
            "stage": "user_turn",
            "assistant_candidate": "c1",
            "assistant_model": "m",
            "assistant_stage": "turn1",
            "continue_with": "first",
            "candidates": 3,
        }
    ]
    assert stage.counters == {"turns_added": 1}
    # the simulated user reads the conversation (no system prompt), its persona and goal
    [request] = client.requests
    asked = request.messages[0].content
    assert "The user: A gardener." in asked and "The user's goal: Grow tomatoes." in asked
    assert "Be brief." not in asked
    assert asked.index("USER: How do I prune tomatoes?") < asked.index("ASSISTANT: An answer.")
    assert request.params.stop == ["\nUSER:", "\nASSISTANT:"]
    # with allow_truncated the cut candidate continues
    [out] = asyncio.run(
        _stage(_reply("Thanks!"), allow_truncated=True).process([_record(cut, good)])
    )
    assert out.prompt[2].content == "Cut off mid"
    # keep_cut_user keeps a user reply cut at max_tokens
    stage = _stage(_reply("And then I", "length"), keep_cut_user=True)
    [out] = asyncio.run(stage.process([_record(good)]))
    assert out.prompt[-1].content == "And then I" and stage.counters["user_cut_kept"] == 1


def test_no_persona_no_persona_lines():
    client = _reply("Thanks!")
    asyncio.run(_stage(client).process([_record(_cand("c1"))]))
    asked = client.requests[0].messages[0].content
    assert "The user:" not in asked and "goal" not in asked


def test_best_by_a_judge():
    a, b, c = _cand("a", "A."), _cand("b", "B."), _cand("c", "C.", "length")
    record = _record(a, b, c)
    record.judgments = [
        Judgment(judge="rating", candidate_ids=["a"], score=3.0),
        Judgment(judge="rating", candidate_ids=["a"], score=5.0),  # mean 4
        Judgment(judge="rating", candidate_ids=["b"], score=4.5),
        Judgment(judge="rating", candidate_ids=["c"], score=9.0),  # cut: not usable
        Judgment(judge="other", candidate_ids=["a"], score=10.0),
        Judgment(judge="rating", candidate_ids=["a", "b"], score=1.0),  # pairwise: not read
    ]
    stage = _stage(_reply("More?"), continue_with="best", judge="rating")
    [out] = asyncio.run(stage.process([record]))
    assert out.prompt[2].content == "B."
    assert out.metadata["turns"][0]["continue_with"] == "best:rating"
    # nothing scored: the first usable candidate, counted
    record = _record(a, b)
    record.judgments = [Judgment(judge="rating", candidate_ids=["a"], status="failed")]
    [out] = asyncio.run(stage.process([record]))
    assert out.prompt[2].content == "A." and stage.counters["best_unscored"] == 1


@pytest.mark.parametrize(
    "reply, finish, counter",
    [("   ", "stop", "dropped_user_empty"), ('User: ""', "stop", "dropped_user_empty"),
     ("And then I", "length", "dropped_user_cut")],
)  # fmt: skip
def test_empty_or_cut_user_reply_drops_the_record(reply, finish, counter):
    stage = _stage(_reply(reply, finish))
    assert asyncio.run(stage.process([_record(_cand("c1"))])) == []
    assert stage.counters == {counter: 1}


def test_records_with_nothing_to_continue_are_dropped_and_counted():
    ended = _record(_cand("c1"), rid="ended")
    ended.prompt = [*ended.prompt, Message(role="assistant", content="Hi")]
    records = [
        _record(rid="none"),
        _record(_cand("c1", "  "), _cand("c2", "x", "length"), rid="unusable"),
        ended,
        _record(_cand("c1"), rid="fine"),
    ]
    stage = _stage(_reply("Thanks!"))
    out = asyncio.run(stage.process(records))
    assert [r.id for r in out] == ["fine"]
    assert stage.counters == {
        "dropped_no_candidate": 1,
        "dropped_no_usable_candidate": 1,
        "dropped_no_user_turn": 1,
        "turns_added": 1,
    }


def test_seeds_derive_from_record_and_turn():
    client = _reply("Thanks!")
    records = [_record(_cand("c1"), rid="r1"), _record(_cand("c1"), rid="r2")]
    asyncio.run(_stage(client).process(records))
    asyncio.run(_stage(client).process([_record(_cand("c1"), rid="r1")]))
    seeds = [r.params.seed for r in client.requests]
    assert seeds[0] != seeds[1] and seeds[0] == seeds[2]


def test_candidates_after_a_user_turn_share_the_conversation():
    """The next generate stage branches at the last turn: every candidate answers one history."""
    [record] = asyncio.run(_stage(_reply("Why?")).process([_record(_cand("c1"))]))
    client = Scripted(lambda request, k: (f"reply {k}", "stop"))
    generate = Generate("turn2", GenerateParams.model_validate({"models": ["a", "b"], "n": 2}))
    generate.ctx = StageContext({"a": client, "b": client})
    [out] = asyncio.run(generate.process([record]))
    assert len(out.candidates) == 4
    assert [r.messages for r in client.requests] == [record.prompt, record.prompt]
    assert [m.role for m in out.prompt] == ["system", "user", "assistant", "user"]


# --- validation ----------------------------------------------------------------------------------


def _recipe(tmp_path: Path, stages: list[dict], **source) -> dict:
    personas = tmp_path / "personas.jsonl"
    personas.write_text("".join(json.dumps(p) + "\n" for p in PERSONAS))
    return {
        "name": "t",
        "source": source or {"seeds": 4},
        "models": {"m": {"backend": "scripted", "policy": "persona_world"}},
        # a recipe given as a mapping reads files relative to the working directory
        "stages": [{**s, "personas": str(personas)} if "personas" in s else s for s in stages],
        "output": {"dir": str(tmp_path / "run"), "formats": []},  # records.parquet only
        "settings": {"shard_size": 2},
    }


# the scripted backend writes one sample per request: one prompt per seed
PERSONA = {"type": "persona_prompts", "model": "m", "personas": "personas.jsonl", "n": 1}
GENERATE = {"type": "generate", "models": ["m"], "n": 1}
USER = {"type": "user_turn", "model": "m"}
JUDGE = {"type": "rubric_judge", "name": "rating", "model": "m"}
PAIRWISE = {"type": "pairwise_judge", "name": "pw", "model": "m"}


def _problems(tmp_path: Path, stages: list[dict], **source) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(_recipe(tmp_path, stages, **source), base_dir=tmp_path)
    return info.value.problems


@pytest.mark.parametrize(
    "stages, where, text",
    [
        ([PERSONA, USER], "stages[1]: ", "no stage before it writes one: put a generate stage"),
        ([PERSONA, GENERATE, USER, USER], "stages[3]: ", "comes after stage 'user_turn' (user_turn)"),
        ([PERSONA, GENERATE, {**USER, "continue_with": "best"}], "stages[2]", "needs judge:"),
        ([PERSONA, GENERATE, {**USER, "judge": "rating"}], "stages[2]", "only read with"),
        ([PERSONA, GENERATE, {**USER, "continue_with": "best", "judge": "nope"}],
         "stages[2]: ", "judge: no judge stage named 'nope'"),
        ([PERSONA, GENERATE, JUDGE, USER, {**GENERATE, "name": "turn2"},
          {**USER, "name": "u2", "continue_with": "best", "judge": "rating"}],
         "stages[5]: ", "'rating' comes before the generate stage"),
        ([PERSONA, GENERATE, PAIRWISE, {**USER, "continue_with": "best", "judge": "pw"}],
         "stages[3]: ", "compares pairs"),
        # evol_instruct writes prompts, not replies: nothing to continue after it
        ([PERSONA, GENERATE, {"type": "evol_instruct", "model": "m"}, USER],
         "stages[3]: ", "comes after stage 'evol_instruct' (evol_instruct)"),
    ],
)  # fmt: skip
def test_misplaced_user_turns_are_refused_with_their_path(tmp_path, stages, where, text):
    problems = _problems(tmp_path, stages)
    assert any(p.startswith(where) and text in p for p in problems), problems


def test_user_turn_first_on_a_prompt_source(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    problems = _problems(tmp_path, [USER], path=str(data))
    assert any(p.startswith("stages[0]: ") and "put a generate stage" in p for p in problems)


def test_a_valid_chain_validates(tmp_path):
    chain = [PERSONA, {"type": "dedup"}, GENERATE, JUDGE,
             {**USER, "continue_with": "best", "judge": "rating"}, GENERATE]  # fmt: skip
    recipe = _recipe(tmp_path, [{**s, "name": f"s{i}"} for i, s in enumerate(chain)])
    recipe["stages"][4]["judge"] = "s3"
    assert synthpref.validate(recipe) is not None


# --- whole runs on a scripted model ------------------------------------------------------------


def persona_world(request) -> str:
    """A scripted model for every role: prompts from personas, answers, and user follow-ups."""
    text = request.messages[-1].content
    if text.startswith("Imagine you are the person"):
        who = text.split("Person: ")[1].splitlines()[0]
        return f"As {who.lower().rstrip('.')}, what should I do first? (draw {request.params.seed})"
    if text.startswith("You are playing the part of a user"):
        turn = text.count("\n\nUSER: ")
        return f"Thanks. Follow-up number {turn}: can you say more?"
    return f"Here is an answer to: {text[:40]}"


POLICIES.setdefault("persona_world", persona_world)


def _rows(run_dir: Path) -> list[dict]:
    return pl.read_parquet(run_dir / "data" / "records.parquet").to_dicts()


@pytest.mark.parametrize("depth", [3, 5])
def test_alternating_generate_and_user_turn_reaches_depth(tmp_path, depth):
    stages = [PERSONA, {"type": "dedup", "near": False}]
    for turn in range((depth - 1) // 2):
        stages += [{**GENERATE, "name": f"turn{turn}"}, {**USER, "name": f"user{turn}"}]
    stages.append({**GENERATE, "name": "last", "models": ["m", "m"]})
    result = synthpref.run(_recipe(tmp_path, stages), progress=False)
    rows = _rows(result.run_dir)
    assert len(rows) == 4  # 4 seeds x 1 prompt
    for row in rows:
        roles = [m["role"] for m in row["prompt"]]
        assert roles == ["user", "assistant"] * ((depth - 1) // 2) + ["user"], roles
        assert row["prompt"][-1]["content"].startswith(f"Thanks. Follow-up number {depth // 2}")
        meta = json.loads(row["metadata"])
        assert meta["persona"] in {p["persona"] for p in PERSONAS}
        assert meta["parent"] == row["id"].rsplit(".", 1)[0]
        assert len(meta["turns"]) == (depth - 1) // 2
        assert len(row["candidates"]) == 2
        assert all(c["stage"] == "last" for c in row["candidates"])


# --- the shipped recipe on the embedded model --------------------------------------------------


def _shipped(tmp_path: Path, seeds: int, run_dir: Path, reply_tokens: int) -> Path:
    """recipes/personas_multiturn.yaml, beside a copy of its persona file, with fewer seeds (one a
    shard), shorter assistant and user replies (``reply_tokens``) and a judge that stops after
    its score."""
    recipe = yaml.safe_load((ROOT / "recipes" / "personas_multiturn.yaml").read_text())
    recipe["source"]["seeds"] = seeds
    recipe["output"]["dir"] = str(run_dir)
    for stage in recipe["stages"]:
        if stage["type"] == "generate":
            stage["max_tokens"] = reply_tokens
        if stage["type"] == "user_turn":
            stage["max_tokens"] = reply_tokens  # cut user replies are kept (keep_cut_user)
        if stage["type"] == "rubric_judge":
            stage["max_tokens"] = 4  # "Rating:" is pre-filled: the score is the next token
    recipe["settings"]["shard_size"] = 1
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "personas.jsonl").write_text(
        (ROOT / "recipes" / "data" / "personas.jsonl").read_text()
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def check_multiturn_output(tmp_path: Path, run_dir: Path) -> None:
    """What the shipped recipe must make: two-turn conversations ending with the user, the
    persona kept with each prompt."""
    prefs = pl.read_parquet(run_dir / "data" / "preference.parquet").to_dicts()
    assert prefs, "no preference pairs came out"
    for row in prefs:
        assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"], row["prompt"]
        assert all(m["content"].strip() for m in row["prompt"])
        assert [m["role"] for m in row["chosen"]] == ["assistant"]
    records = {r["id"]: r for r in _rows(run_dir)}
    personas = {json.loads(line)["persona"] for line in (tmp_path / "data/personas.jsonl").open()}
    for row in prefs:
        meta = json.loads(records[row["prompt_id"]]["metadata"])
        assert meta["persona"] in personas and meta["operation"] == "persona"
        assert row["prompt"] == records[row["prompt_id"]]["prompt"]


#: 2 seeds x 2 prompts, in shards of one seed
SEEDS = 2
REPLY_TOKENS = 16


@pytest.fixture(scope="module")
def multiturn_reference(tmp_path_factory) -> Path:
    """The shipped recipe run once, uninterrupted, in this process: what every killed run of the
    same recipe must equal."""
    from tests.fault_fixtures import run_in_process

    tmp = tmp_path_factory.mktemp("multiturn-reference")
    recipe = _shipped(tmp, SEEDS, tmp / "run", REPLY_TOKENS)
    run_in_process(recipe)
    check_multiturn_output(tmp, tmp / "run")
    return tmp / "run"


def _kills(name: str) -> list:
    from tests.fault_fixtures import KillPoint

    user_turn = KillPoint("call", "user_turn", shard=0, nth=1)  # between a shard's user replies
    if name == "user-turn":
        return [user_turn]
    return [KillPoint("call", "persona_prompts", shard=1, nth=1), user_turn]  # mid-synthesis first


@pytest.mark.slow
@pytest.mark.parametrize(
    "kills",
    [
        pytest.param("user-turn"),
        pytest.param("persona-prompts-then-user-turn", marks=pytest.mark.soak),
    ],
)
def test_shipped_recipe_resumed_after_kills_equals_an_uninterrupted_run(
    kills, tmp_path, multiturn_reference, subprocess_env
):
    from tests.fault_fixtures import HOOK_MISSING, dataset, differences, journal_counts, run_child

    resumed = _shipped(tmp_path, SEEDS, tmp_path / "run", REPLY_TOKENS)
    for kill in _kills(kills):
        child = run_child(resumed, subprocess_env, kill)
        assert child.returncode != HOOK_MISSING, child.tail()
        assert child.killed, f"{kill}: not killed (exit {child.returncode}):\n{child.tail()}"
    finished = run_child(resumed, subprocess_env)
    assert finished.returncode == 0, finished.tail()
    want, got = dataset(multiturn_reference), dataset(tmp_path / "run")
    assert want["preference.parquet"], "the reference run made no pairs"
    diffs = differences(got, want, 1e-5)
    assert not diffs, "\n".join(diffs[:15])
    twice = {k: n for k, n in journal_counts(tmp_path / "run" / "cache.sqlite").items() if n > 1}
    assert not twice, f"completed calls computed again after the kill: {twice}"
