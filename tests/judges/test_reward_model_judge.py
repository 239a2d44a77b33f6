"""The reward_model judge: its judgments, combine / attributes, failure isolation, and how pairs,
juries, filters and eval-judges take an unbounded score; on a stand-in reward backend (values known
exactly, no model) and, marked slow, the shipped recipe on a tiny real reward model."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import pyarrow.parquet as pq
import pytest
import yaml

import synthpref
from synthpref.backends import base
from synthpref.backends.base import Backend, Capability, OnGenerated, OnRewarded
from synthpref.backends.specs import ModelSpec, register_backend
from synthpref.backends.types import (
    Completion,
    GenerationRequest,
    GenerationResult,
    RewardRequest,
    RewardResult,
)
from synthpref.judges.jury import Jury
from synthpref.judges.reward_model import (
    RewardHeadMismatch,
    RewardModelJudge,
    RewardModelParams,
    reward_isolated,
)
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Candidate, Message, Record
from synthpref.stages.pairs import candidate_scores
from tests.conftest import write_recipe
from tests.judge_doubles import client_for, run_stage

ROOT = Path(__file__).resolve().parents[2]
ATTRS = ["helpfulness", "correctness", "verbosity"]

# --- a stand-in reward model ---------------------------------------------------------------------


def attribute_values(text: str) -> list[float]:
    """helpfulness grows with length, correctness is 1 for replies that say 'right', verbosity is
    minus the word count: distinct orderings, so each combine picks a known winner."""
    return [len(text) / 10, 1.0 if "right" in text else 0.0, -float(len(text.split()))]


class StandInRewards(Backend):
    """A reward backend with known values: the scalar is len(reply) / 10, three outputs follow
    :func:`attribute_values`. ``fail`` may return an exception for a request, which then fails the
    whole call, as one bad request fails a local engine's batch."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({"reward"})
    built: ClassVar[list[StandInRewards]] = []

    def __init__(
        self,
        labels: Sequence[str] = (),
        fail: Callable[[RewardRequest], BaseException | None] | None = None,
        dropped: int = 0,
    ) -> None:
        self.labels = list(labels)
        self.fail = fail or (lambda r: None)
        self.dropped = dropped
        self.calls: list[list[RewardRequest]] = []
        StandInRewards.built.append(self)

    @property
    def identity(self) -> str:
        return f"standin-reward:{self.labels}"

    async def generate(self, requests, on_result=None):
        raise AssertionError("a reward model does not generate")

    async def reward(
        self, requests: Sequence[RewardRequest], on_result: OnRewarded | None = None
    ) -> list[RewardResult]:
        self.calls.append(list(requests))
        for i, r in enumerate(requests):
            exc = self.fail(r)
            if exc is not None:
                if isinstance(exc, base.RequestError):
                    exc.index = i
                raise exc
        out = []
        for i, r in enumerate(requests):
            reply = r.messages[-1].content
            values = attribute_values(reply) if len(self.labels) == 3 else [len(reply) / 10]
            result = RewardResult(
                values=values,
                labels=self.labels or ["LABEL_0"],
                tokens=len(reply.split()) + 5,
                dropped_turns=self.dropped,
            )
            if on_result:
                on_result(i, result)
            out.append(result)
        return out


@register_backend
class StandInRewardSpec(ModelSpec):
    """A stand-in reward model (tests only): ``attributes: true`` gives three named outputs."""

    backend_name: ClassVar[str] = "standin_reward"
    backend: str = "standin_reward"
    attributes: bool = False

    def build(self) -> Backend:
        return StandInRewards(ATTRS if self.attributes else ())

    def capabilities(self) -> frozenset[str]:
        return StandInRewards.capabilities

    def display_name(self) -> str:
        return "standin-reward"


class EchoGenerator(Backend):
    """Candidates of known lengths: the system prompt, then the user's words."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({"generate"})

    @property
    def identity(self) -> str:
        return "echo-generator"

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        out = []
        for i, r in enumerate(requests):
            system = next((m.content for m in r.messages if m.role == "system"), "")
            text = f"{system} {r.messages[-1].content}".strip()
            result = GenerationResult(
                completions=[Completion(text=text, finish_reason="stop", completion_tokens=3)],
                prompt_tokens=3,
            )
            if on_result:
                on_result(i, result)
            out.append(result)
        return out


@register_backend
class EchoGeneratorSpec(ModelSpec):
    """Echoes its system prompt and the user's words (tests only)."""

    backend_name: ClassVar[str] = "echo_generator"
    backend: str = "echo_generator"

    def build(self) -> Backend:
        return EchoGenerator()

    def capabilities(self) -> frozenset[str]:
        return EchoGenerator.capabilities

    def display_name(self) -> str:
        return "echo-generator"


# --- the stage on its own ------------------------------------------------------------------------


def records() -> list[Record]:
    texts = ["Short.", "A right answer.", "A longer answer that says more words."]
    return [
        Record(
            id=f"r{k}",
            prompt=[Message(role="user", content=f"question {k}")],
            candidates=[Candidate(id=f"r{k}-{i}", model="m", text=t) for i, t in enumerate(texts)],
        )
        for k in range(2)
    ]


def judge(backend: StandInRewards, **params) -> tuple[RewardModelJudge, list[Record]]:
    stage = RewardModelJudge("rm", RewardModelParams(model="rm", **params))
    out = run_stage(stage, records(), {"rm": client_for(backend, "rm")})
    return stage, out


def by_candidate(recs: list[Record], name: str = "rm") -> dict:
    return {j.candidate_ids[0]: j for r in recs for j in r.judgments if j.judge == name}


def test_a_scalar_reward_model_scores_each_candidate_in_its_conversation():
    backend = StandInRewards()
    stage, out = judge(backend, truncation="drop_oldest_turns")
    (call,) = backend.calls
    assert len(call) == 6
    first = call[0]
    assert first.truncation == "drop_oldest_turns"
    assert [(m.role, m.content) for m in first.messages] == [
        ("user", "question 0"),
        ("assistant", "Short."),
    ]
    got = by_candidate(out)
    j = got["r0-2"]
    value = len("A longer answer that says more words.") / 10
    assert j.status == "ok" and j.score == pytest.approx(value)
    assert j.scores == {"reward": pytest.approx(value)}
    assert json.loads(j.raw) == [pytest.approx(value)]
    assert j.details == {"labels": ["LABEL_0"], "dropped_turns": 0, "tokens": 12}
    assert (j.model, j.attempts, j.template_hash) == ("rm", 1, None)
    assert stage.counters == {"judgments": 6}
    assert stage.score_range is None
    assert stage.requirements() == {"rm": {"reward"}}


@pytest.mark.parametrize(
    ("combine", "expected"),
    [
        ("correctness", lambda v: v[1]),
        ({"helpfulness": 1.0, "verbosity": 0.5}, lambda v: v[0] + 0.5 * v[2]),
    ],
)
def test_combine_makes_the_score_and_every_attribute_is_kept(combine, expected):
    _, out = judge(StandInRewards(ATTRS), combine=combine, attributes=list(reversed(ATTRS)))
    for (cid, j), text in zip(
        sorted(by_candidate(out).items())[:3],
        [c.text for c in records()[0].candidates],
        strict=True,
    ):
        values = attribute_values(text)
        assert j.score == pytest.approx(expected(values)), cid
        assert j.scores == dict(zip(ATTRS, values, strict=True))
        assert j.details["labels"] == ATTRS


def test_dropped_turns_are_recorded_and_counted():
    stage, out = judge(StandInRewards(dropped=2), truncation="drop_oldest_turns")
    assert all(j.details["dropped_turns"] == 2 for j in by_candidate(out).values())
    assert stage.counters["truncated"] == 6


def _fails_on(word: str, exc: BaseException):
    return lambda r: exc if word in r.messages[-1].content else None


def test_a_request_error_fails_only_its_candidate():
    too_long = base.RequestError("the conversation is 9000 tokens, over the 8192-token context")
    backend = StandInRewards(fail=_fails_on("right", too_long))
    stage, out = judge(backend)
    got = by_candidate(out)
    failed = {cid for cid, j in got.items() if j.status == "failed"}
    assert failed == {"r0-1", "r1-1"}
    j = got["r0-1"]
    assert j.score is None and j.model == "rm"
    assert j.error.startswith(
        "record 'r0' candidate 'r0-1': RequestError: the conversation is 9000"
    )
    assert got["r0-0"].score == pytest.approx(0.6)
    assert stage.counters["judgments"] == 6 and stage.counters["failed"] == 2


def test_a_transient_backend_error_stops_the_judge_without_judgments():
    busy = base.TransientBackendError("reward request 0: HTTP 503")
    backend = StandInRewards(fail=_fails_on("right", busy))
    stage = RewardModelJudge("rm", RewardModelParams(model="rm"))
    recs = records()
    with pytest.raises(base.TransientBackendError):
        run_stage(stage, recs, {"rm": client_for(backend, "rm")})
    assert len(backend.calls) == 1  # raised at once, not bisected
    assert not any(r.judgments for r in recs) and not stage.counters.get("failed")


def test_reward_isolated_bisects_to_the_bad_request():
    bad = base.RequestError("too long")
    backend = StandInRewards(fail=_fails_on("B", bad))
    client = client_for(backend, "rm")
    reqs = [
        RewardRequest(
            messages=[Message(role="user", content="q"), Message(role="assistant", content=t)]
        )
        for t in ("A", "B", "C", "D")
    ]
    out = asyncio.run(reward_isolated(client, reqs))
    assert out[1] == "RequestError: too long"
    assert [r.values for r in out if not isinstance(r, str)] == [[0.1]] * 3


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, r"verbosity\); set combine to one of them"),
        ({"combine": "honesty"}, "combine names honesty, which it does not have"),
        ({"combine": "correctness", "attributes": ["a", "b"]}, "not the attributes the recipe"),
    ],
)
def test_outputs_that_do_not_match_stop_the_run_before_any_judgment(params, message):
    backend = StandInRewards(ATTRS)
    stage = RewardModelJudge("rm", RewardModelParams(model="rm", **params))
    recs = records()
    with pytest.raises(RewardHeadMismatch, match=message) as info:
        run_stage(stage, recs, {"rm": client_for(backend, "rm")})
    assert "reward model 'rm' has 3 output(s) (helpfulness, correctness, verbosity)" in str(
        info.value
    )
    assert not any(r.judgments for r in recs)


def test_a_scalar_model_is_named_reward_for_combine_and_attributes():
    _, out = judge(StandInRewards(), combine="reward", attributes=["reward"])
    assert all(j.status == "ok" for j in by_candidate(out).values())


# --- recipes -------------------------------------------------------------------------------------

PROMPTS = [{"id": f"p{i}", "prompt": f"Question number {i}?"} for i in range(4)]


def reward_recipe(tmp_path: Path, *, judge_params: dict | None = None, **extra) -> dict:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    recipe = {
        "name": "rm",
        "source": {"path": str(data), "id_field": "id"},
        "models": {
            "brief": {"backend": "echo_generator", "system_prompt": "Brief."},
            "medium": {"backend": "echo_generator", "system_prompt": "A right answer here."},
            "long": {
                "backend": "echo_generator",
                "system_prompt": "A much longer answer with many reasons and words.",
            },
            "rm": {"backend": "standin_reward"},
        },
        "stages": [
            {"type": "generate", "models": ["brief", "medium", "long"], "n": 1},
            {"type": "reward_model", "name": "rm", "model": "rm", **(judge_params or {})},
            {"type": "pairs", "judge": "rm"},
        ],
        "output": {"dir": str(tmp_path / "run"), "formats": ["preference"]},
        "settings": {"shard_size": 2},
    }
    recipe.update(extra)
    return recipe


def _problems(recipe: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe)
    return info.value.problems


def test_validate_refuses_a_model_that_cannot_run_a_reward_model(tmp_path):
    recipe = reward_recipe(tmp_path)
    recipe["models"]["rm"] = {"backend": "embedded"}
    (problem,) = _problems(recipe)
    assert problem.startswith("stages[1] (rm): model 'rm' (backend embedded) cannot reward")


def test_validate_checks_combine_against_attributes(tmp_path):
    recipe = reward_recipe(tmp_path, judge_params={"attributes": ATTRS})
    (problem,) = _problems(recipe)
    assert problem.startswith("stages[1]: combine: the model has 3 outputs")
    assert "combine: helpfulness" in problem

    recipe = reward_recipe(
        tmp_path, judge_params={"attributes": ATTRS, "combine": {"helpfulness": 1, "honesty": 1}}
    )
    (problem,) = _problems(recipe)
    assert "combine: 'honesty' is not one of the attributes" in problem

    recipe = reward_recipe(tmp_path, judge_params={"combine": {}})
    assert any(p.startswith("stages[1].combine") for p in _problems(recipe))

    recipe = reward_recipe(tmp_path, judge_params={"unit": "pair"})
    assert any(p.startswith("stages[1].unit") for p in _problems(recipe))

    recipe = reward_recipe(tmp_path, judge_params={"attributes": ATTRS, "combine": "verbosity"})
    assert parse_recipe(recipe).stages[1].params.combine == "verbosity"


def test_fingerprint_follows_combine_and_truncation(tmp_path):
    from synthpref.executor.fingerprint import stage_fingerprints

    def fp(**params):
        loaded = parse_recipe(reward_recipe(tmp_path, judge_params=params))
        return stage_fingerprints("in", loaded.stages, loaded.models)[1]

    assert fp() != fp(truncation="drop_oldest_turns")
    assert fp(combine="reward") != fp()


def _run(tmp_path: Path, recipe: dict):
    return synthpref.run(write_recipe(tmp_path, recipe), progress=False, fresh=True)


def _records(result) -> list[Record]:
    from synthpref.records import records_from_arrow

    return records_from_arrow(pq.read_table(result.outputs["records"]))


@pytest.mark.parametrize("rule", ["best_worst", "best_random", "all_pairs", "listwise"])
def test_every_pair_rule_takes_reward_scores(tmp_path, rule):
    recipe = reward_recipe(tmp_path)
    recipe["stages"][2]["rule"] = rule
    recipe["output"]["formats"] = ["listwise" if rule == "listwise" else "preference"]
    result = _run(tmp_path, recipe)
    recs = _records(result)
    assert len(recs) == 4
    for rec in recs:
        scores = candidate_scores(rec, "rm")
        assert scores == {c.id: pytest.approx(len(c.text) / 10) for c in rec.candidates}
        longest = max(rec.candidates, key=lambda c: len(c.text)).id
        if rule == "listwise":
            ranking = rec.annotations["ranking"]
            assert ranking["candidate_ids"][0] == longest and len(ranking["candidate_ids"]) == 3
        else:
            assert rec.pairs and all(p.chosen_score > p.rejected_score for p in rec.pairs)
            assert rec.pairs[0].chosen_id == longest
            assert len(rec.pairs) == (3 if rule == "all_pairs" else 1)


def test_jury_and_pair_filters_beside_an_llm_judge(tmp_path):
    recipe = reward_recipe(tmp_path, judge_params={"combine": "correctness"})
    recipe["models"]["rm"]["attributes"] = True
    recipe["models"]["llm"] = {"backend": "scripted", "policy": "prefers_longer"}
    recipe["stages"][2:] = [
        {"type": "pairwise_judge", "name": "pw", "model": "llm"},
        {"type": "jury", "name": "jury", "judges": ["rm", "pw"], "method": "mean"},
        {"type": "pairs", "judge": "jury", "rule": "all_pairs"},
        {"type": "margin_filter", "min_margin": 0.5, "judges": ["rm"]},
        {"type": "consistency_filter", "judges": ["rm", "pw"]},
    ]
    import tests.judge_doubles  # noqa: F401  (registers the scripted backend)

    loaded = parse_recipe(recipe)
    jury = next(s for s in loaded.stages if isinstance(s, Jury))
    assert jury._ranges == {"rm": None, "pw": (-1.0, 1.0)}  # the reward: min-max per prompt

    result = _run(tmp_path, recipe)
    recs = _records(result)
    for rec in recs:
        # the reward judge likes the "right" answer; the LLM judge the longest one
        rm = candidate_scores(rec, "rm")
        right = next(c.id for c in rec.candidates if "right" in c.text)
        assert rm[right] == 1.0 and sorted(rm.values()) == [0.0, 0.0, 1.0]
        jury_j = {j.candidate_ids[0]: j for j in rec.judgments if j.judge == "jury"}
        assert jury_j[right].scores["rm"] == 1.0
        assert all(j.status == "ok" for j in jury_j.values())
        # kept pairs: the reward margin is 1 (right over a wrong one), and both judges agree
        for p in rec.pairs:
            assert p.chosen_id == right
            assert rm[p.chosen_id] - rm[p.rejected_id] >= 0.5
        dropped = rec.annotations.get("dropped_pairs", [])
        assert {d["stage"] for d in dropped} <= {"margin_filter", "consistency_filter"}
    summary = json.loads((result.run_dir / "summary.json").read_text())
    text = json.dumps(summary)
    assert "agreement:pw|rm" in text
    # all_pairs by the jury: right > long, right > brief, long > brief; the reward margin drops
    # long > brief (0), the LLM judge (it prefers long) drops right > long: one pair per prompt
    assert [len(r.pairs) for r in recs] == [1, 1, 1, 1]


def test_margin_filter_cannot_normalise_an_unbounded_reward(tmp_path):
    recipe = reward_recipe(tmp_path)
    recipe["stages"].append(
        {"type": "margin_filter", "min_margin": 0.1, "judges": ["rm"], "normalize": True}
    )
    (problem,) = _problems(recipe)
    assert "normalize: judge 'rm' declares no score range" in problem


def test_eval_judges_measures_a_reward_model(tmp_path):
    from synthpref.evaluation.run import evaluate_judges

    recipe = reward_recipe(tmp_path)
    loaded = parse_recipe(recipe)
    data = ROOT / "tests" / "fixtures" / "evaldata" / "pandalm.jsonl"
    result = evaluate_judges(loaded, data, output=tmp_path / "eval", progress=False)
    (entry,) = result.report["judges"]
    assert (entry["name"], entry["type"], entry["kind"]) == ("rm", "reward_model", "pointwise")
    o = entry["overall"]
    assert o["failures"] == 0 and o["correct"] + o["wrong"] + o["ties"] == 8
    # the stand-in's reward is the length: it must agree with the longer-wins baseline exactly
    rows = [json.loads(x) for x in (tmp_path / "eval" / "verdicts.jsonl").read_text().splitlines()]
    assert all(r["judges"]["rm"]["verdict"] == r["longer_wins"] for r in rows)


# --- the shipped recipe --------------------------------------------------------------------------


def commented_blocks(path: Path) -> list[dict]:
    """The YAML examples in a recipe's header comments: each block from a ``#   models:`` line to
    the next comment line that is not indented as YAML (prose is ``# text``)."""
    lines = path.read_text().splitlines()
    blocks, current = [], None
    for line in lines:
        if not line.startswith("#"):
            break
        if line.startswith("#   models:"):
            current = []
            blocks.append(current)
        elif current is not None and not line.startswith("#   "):
            current = None
        if current is not None:
            current.append(line[4:])
    return [yaml.safe_load("\n".join(b)) for b in blocks]


def test_the_shipped_recipe_and_its_commented_variants_validate(tmp_path):
    path = ROOT / "recipes" / "reward_model.yaml"
    recipe = yaml.safe_load(path.read_text())
    assert recipe["models"]["reward"] == {
        "backend": "transformers",
        "task": "reward",
        "model": "models/tiny-reward",
        "dtype": "float32",
    }
    assert [s["type"] for s in recipe["stages"]] == ["generate", "reward_model", "pairs"]

    # the stage as shipped, on the stand-in model (the tiny reward model need not exist here)
    recipe["models"]["reward"] = {"backend": "standin_reward"}
    loaded = parse_recipe(recipe, base_dir=path.parent)
    assert loaded.stages[1].requirements() == {"reward": {"reward"}}

    gpu, dpo = commented_blocks(path)
    # the GPU variant: a vLLM reward model in place of the tiny one
    recipe = yaml.safe_load(path.read_text())
    recipe["models"].update(gpu["models"])
    loaded = parse_recipe(recipe, base_dir=path.parent)
    spec = loaded.models["reward"]
    assert (spec.backend, spec.task) == ("vllm", "reward")
    assert spec.capabilities() == {"reward"}

    # the DPO implicit reward: a density_ratio stage whose parameters are real
    recipe = yaml.safe_load(path.read_text())
    recipe["models"].update(dpo["models"])
    recipe["stages"][1:2] = dpo["stages"]
    recipe["stages"][2]["judge"] = "dpo_reward"
    loaded = parse_recipe(recipe, base_dir=path.parent)
    stage = loaded.stages[1]
    assert stage.type_name == "density_ratio"
    assert stage.requirements() == {"policy": {"score"}, "reference": {"score"}}


# --- the shipped recipe on a real (tiny) reward model -------------------------------------------


@pytest.mark.slow
def test_the_shipped_recipe_runs_end_to_end(tmp_path, embedded_dir, monkeypatch):
    """recipes/reward_model.yaml as shipped (3 of its prompts, short replies), its reward model
    built where its comments say; the judgments equal a plain forward pass of the reward model over each
    conversation."""
    from tests.reward_fixtures import build_reward_model, direct_rewards

    shutil.copytree(ROOT / "recipes" / "data", tmp_path / "data")
    recipe = yaml.safe_load((ROOT / "recipes" / "reward_model.yaml").read_text())
    monkeypatch.chdir(tmp_path)  # the model path is relative to the working directory
    model_dir = tmp_path / recipe["models"]["reward"]["model"]
    build_reward_model(embedded_dir, model_dir)
    recipe["source"]["limit"] = 3
    recipe["stages"][0]["max_tokens"] = 32  # CPU time; replies cut here still make pairs:
    recipe["stages"][2]["allow_truncated"] = True
    recipe["output"]["dir"] = str(tmp_path / "run")
    path = tmp_path / "reward_model.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    result = synthpref.run(path, progress=False)
    recs = _records(result)
    assert recs and all(len(r.candidates) == 2 for r in recs)
    conversations, judged = [], []
    for rec in recs:
        for cand in rec.candidates:
            (j,) = [j for j in rec.judgments if j.judge == "rm" and j.candidate_ids == [cand.id]]
            assert j.status == "ok", j.error
            judged.append(j.score)
            conversations.append(
                [*(m.model_dump() for m in rec.prompt), {"role": "assistant", "content": cand.text}]
            )
    expected = [v[0] for v in direct_rewards(model_dir, conversations)]
    assert judged == pytest.approx(expected, abs=1e-4)
    assert pq.read_table(result.run_dir / "data" / "preference.parquet").num_rows >= 1
