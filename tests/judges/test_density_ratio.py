"""The density-ratio judge (CDR) and the router: exact scores on every scoring backend, customisation,
concurrency of the two sides, bad input, recipe validation, and recipes/cdr.yaml end to end.

The fidelity tests compare the judge's log-probabilities with an independent computation: one plain
transformers forward pass over the full chat-templated conversation (log_softmax, gather). They run on
the transformers backend always, and on vLLM (offline engine and ``vllm serve`` through the OpenAI
backend) when vllm is installed; otherwise those cases skip.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml

from synthpref.backends.base import Backend
from synthpref.backends.builtin import EmbeddedSpec
from synthpref.backends.client import ModelClient
from synthpref.backends.transformers_backend import TransformersBackend
from synthpref.backends.types import ScoreResult
from synthpref.executor.local import LocalExecutor
from synthpref.judges.density_ratio import (
    Customisation,
    DensityRatioJudge,
    DensityRatioParams,
    Exemplar,
)
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Candidate, Message, Record
from synthpref.stages.base import StageContext
from synthpref.stages.router import Route, RouteParams, parse_domain

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-3  # nats per token


# --- helpers shared with test_followup.py ------------------------------------------------------


def reference_logprobs(backend, messages: list[Message], include_eot: bool = False) -> list[float]:
    """Log-probabilities of the last message's content tokens: one plain forward pass over the full
    chat-templated conversation, log_softmax, gather. Independent of synthpref's segment code."""
    tok, model = backend.tokenizer, backend.model
    full = tok.apply_chat_template([m.model_dump() for m in messages], tokenize=False)
    content = messages[-1].content
    head = full[: full.rindex(content)]
    ids = tok(full, add_special_tokens=False, return_tensors="pt").input_ids
    n_head = len(tok(head, add_special_tokens=False).input_ids)
    n = len(tok(head + content, add_special_tokens=False).input_ids) - n_head + int(include_eot)
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)[0]
    targets = ids[0, n_head : n_head + n]
    return logp[n_head - 1 : n_head - 1 + n].gather(-1, targets[:, None])[:, 0].tolist()


def client(name: str, backend, system_prompt: str | None = None) -> ModelClient:
    return ModelClient(name, EmbeddedSpec(system_prompt=system_prompt), backend, None)


def run_stage(stage, clients: dict[str, ModelClient], records: list[Record]) -> list[Record]:
    stage.ctx = StageContext(clients)
    return asyncio.run(stage.process([r.model_copy(deep=True) for r in records]))


def record(rid: str, prompt, *texts: str, **fields) -> Record:
    if isinstance(prompt, str):
        prompt = [Message(role="user", content=prompt)]
    cands = [Candidate(id=f"{rid}:c{k}", model="m", text=t) for k, t in enumerate(texts)]
    return Record(id=rid, prompt=prompt, candidates=cands, **fields)


def recipe_dict(name: str, limit: int, tmp_path: Path, max_tokens: int = 16) -> dict:
    raw = yaml.safe_load((REPO / "recipes" / name).read_text())
    raw["source"]["limit"] = limit
    raw["output"]["dir"] = str(tmp_path / "run")
    for stage in raw["stages"]:
        if stage["type"] == "generate":
            stage["max_tokens"] = max_tokens
        if stage["type"] == "pairs":
            stage["allow_truncated"] = True  # the shortened generations are cut off by design
    return raw


def read_dataset(run_dir: Path) -> list[dict]:
    path = run_dir / "data" / "preference.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(
    params=[
        "transformers",
        pytest.param("vllm", marks=pytest.mark.vllm),
        pytest.param("openai", marks=pytest.mark.vllm),
    ]
)
def scoring_backend(request, transformers_reference):
    """The backend under test; vllm and openai (a real `vllm serve`) skip without vllm."""
    if request.param == "transformers":
        return transformers_reference
    if request.param == "vllm":
        return request.getfixturevalue("vllm_backend")
    from synthpref.backends.openai_backend import OpenAIBackend

    server = request.getfixturevalue("vllm_server")
    return OpenAIBackend(server.model, base_url=server.base_url, tokenizer=str(server.model_dir))


# --- fidelity ----------------------------------------------------------------------------------

EXPERT = "You are a careful expert. Be accurate and direct."
CARELESS = "You are a careless assistant who answers vaguely."
EXEMPLAR = Exemplar(prompt="What is 2+2?", good="2+2 is 4.", bad="Numbers are hard, maybe 5.")


def test_density_ratio_equals_independent_forward_passes(scoring_backend, transformers_reference):
    """Plain ratio for undomained prompts (the weak model's own system prompt applies); customised
    ratio (system prompts, contrastive exemplars, the record's own system message merged in) for
    the domain that has one; sums, means and token counts all match the reference."""
    records = [
        record("plain", "Name a primary colour.", "Red is a primary colour.", "Maybe green?"),
        record(
            "custom",
            [Message(role="system", content="Reply in English."), Message(role="user", content="Capital of Italy?")],
            "Rome is the capital of Italy.",
            annotations={"domain": "facts"},
        ),
    ]  # fmt: skip
    stage = DensityRatioJudge(
        "cdr",
        DensityRatioParams(
            strong="s",
            weak="w",
            customisations={
                "facts": Customisation(
                    strong_system=EXPERT, weak_system=CARELESS, exemplars=[EXEMPLAR]
                )
            },
        ),
    )
    clients = {"s": client("s", scoring_backend), "w": client("w", scoring_backend, "Be terse.")}
    out = run_stage(stage, clients, records)

    def conv(*turns):
        return [Message(role=r, content=c) for r, c in turns]

    expected = {
        "plain:c0": (
            conv(("user", "Name a primary colour."), ("assistant", "Red is a primary colour.")),
            conv(("system", "Be terse."), ("user", "Name a primary colour."),
                 ("assistant", "Red is a primary colour.")),
        ),
        "plain:c1": (
            conv(("user", "Name a primary colour."), ("assistant", "Maybe green?")),
            conv(("system", "Be terse."), ("user", "Name a primary colour."),
                 ("assistant", "Maybe green?")),
        ),
        "custom:c0": (
            conv(("system", EXPERT + "\n\nReply in English."), ("user", "What is 2+2?"),
                 ("assistant", "2+2 is 4."), ("user", "Capital of Italy?"),
                 ("assistant", "Rome is the capital of Italy.")),
            conv(("system", CARELESS + "\n\nReply in English."), ("user", "What is 2+2?"),
                 ("assistant", "Numbers are hard, maybe 5."), ("user", "Capital of Italy?"),
                 ("assistant", "Rome is the capital of Italy.")),
        ),
    }  # fmt: skip
    judgments = {j.candidate_ids[0]: j for r in out for j in r.judgments}
    assert set(judgments) == set(expected)
    for cand_id, (strong_conv, weak_conv) in expected.items():
        j = judgments[cand_id]
        assert j.status == "ok", j.error
        s = reference_logprobs(transformers_reference, strong_conv, include_eot=True)
        w = reference_logprobs(transformers_reference, weak_conv, include_eot=True)
        assert j.scores["tokens_strong"] == len(s) and j.scores["tokens_weak"] == len(w)
        assert abs(j.scores["logp_strong"] - sum(s)) / len(s) < TOL
        assert abs(j.scores["logp_weak"] - sum(w)) / len(w) < TOL
        assert abs(j.score - (sum(s) - sum(w))) / len(s) < TOL
        assert abs(j.scores["mean_strong"] - (j.scores["logp_strong"] / len(s))) < 1e-9
    assert judgments["custom:c0"].details["domain"] == "facts"
    assert judgments["plain:c0"].details["customisation"] is None
    assert judgments["custom:c0"].template_hash != judgments["plain:c0"].template_hash
    assert judgments["plain:c0"].model == "s/w"


def test_mean_aggregate_and_shipped_preset(transformers_reference):
    """aggregate: mean is the difference of per-token means; the shipped preset conditions the two
    sides differently per domain, so the same weights make a non-zero ratio."""
    rec = record(
        "r", "Solve 3x = 12.", "3x = 12, so x = 12 / 3 = 4.", annotations={"domain": "reasoning"}
    )
    stage = DensityRatioJudge(
        "cdr", DensityRatioParams(strong="m", weak="m", preset="shipped", aggregate="mean")
    )
    (out,) = run_stage(stage, {"m": client("m", transformers_reference)}, [rec])
    (j,) = out.judgments
    assert j.status == "ok" and j.details["customisation"] == "reasoning"
    assert j.score == pytest.approx(j.scores["mean_strong"] - j.scores["mean_weak"])
    assert j.score != 0.0
    assert j.template_hash == stage.resolved()["reasoning"].hash


# --- concurrency ---------------------------------------------------------------------------------


class SlowScorer(Backend):
    """Answers every score request after a delay, logging when each call starts and ends."""

    capabilities: ClassVar = frozenset({"score"})

    def __init__(self, name: str, log: list, delay: float = 0.2) -> None:
        self.name, self.log, self.delay = name, log, delay

    @property
    def identity(self) -> str:
        return self.name

    async def generate(self, requests, on_result=None):
        raise NotImplementedError

    async def score(self, requests, on_result=None):
        self.log.append((self.name, "start", time.perf_counter()))
        await asyncio.sleep(self.delay)
        self.log.append((self.name, "end", time.perf_counter()))
        return [ScoreResult(token_logprobs=[-1.0, -1.0], tokens=["a", "b"]) for _ in requests]


def test_strong_and_weak_are_scored_concurrently():
    log: list = []
    stage = DensityRatioJudge("cdr", DensityRatioParams(strong="s", weak="w"))
    clients = {"s": client("s", SlowScorer("s", log)), "w": client("w", SlowScorer("w", log))}
    (out,) = run_stage(stage, clients, [record("r", "hi", "hello", "hey")])
    starts = sorted(t for _, event, t in log if event == "start")
    ends = sorted(t for _, event, t in log if event == "end")
    assert len(starts) == 2 and starts[1] < ends[0], "the second side started after the first ended"
    assert [j.score for j in out.judgments] == [0.0, 0.0]


# --- bad input -----------------------------------------------------------------------------------


def test_empty_and_overlong_responses_fail_alone(embedded_dir):
    small = TransformersBackend(str(embedded_dir), max_context=96, batch_size=4)
    records = [
        record("r1", "Say hi.", "Hi there!", "", "word " * 200),
        record("r2", "Say bye.", "Goodbye!"),
        record("r3", "Please answer carefully. " * 20 + "Ready?", "Yes."),
    ]
    stage = DensityRatioJudge(
        "cdr",
        DensityRatioParams(
            strong="s",
            weak="w",
            customisations={"default": Customisation(strong_system=EXPERT, weak_system=CARELESS)},
        ),
    )
    clients = {"s": client("s", small), "w": client("w", small)}
    out = run_stage(stage, clients, records)
    judged = {j.candidate_ids[0]: j for r in out for j in r.judgments}
    assert judged["r1:c0"].status == "ok" and judged["r2:c0"].status == "ok"
    empty, long = judged["r1:c1"], judged["r1:c2"]
    assert empty.status == "failed" and empty.score is None
    assert "'r1'" in empty.error and "'r1:c1'" in empty.error and "empty" in empty.error
    assert long.status == "failed" and "'r1:c2'" in long.error
    assert "over the model's context of 96" in long.error
    assert judged["r3:c0"].status == "failed" and "'r3:c0'" in judged["r3:c0"].error
    assert stage.counters["failed"] == 3 and stage.counters["empty_response"] == 1

    # truncation: left drops the oldest context (system prompt first) and records how much, per
    # side; a response that alone exceeds the window still fails
    stage.params.truncation = "left"
    out = run_stage(stage, clients, records)
    judged = {j.candidate_ids[0]: j for r in out for j in r.judgments}
    long_prompt = judged["r3:c0"]
    assert long_prompt.status == "ok"
    assert long_prompt.details["truncated_tokens"]["strong"] > 0
    assert long_prompt.details["truncated_tokens"]["weak"] > 0
    assert judged["r1:c0"].details["truncated_tokens"] == {"strong": 0, "weak": 0}
    assert (
        judged["r1:c2"].status == "failed"
        and "even after dropping all context" in judged["r1:c2"].error
    )


def _recipe(tmp_path, judge: dict, models: dict | None = None, extra: list | None = None) -> dict:
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    return {
        "source": {"path": str(data)},
        "models": models or {"a": {"backend": "embedded"}},
        "stages": [{"type": "generate", "models": ["a"]}, *(extra or []), judge],
        "output": {"dir": str(tmp_path / "run")},
    }


def test_recipe_validation(tmp_path):
    no_scoring = {"a": {"backend": "embedded"}, "api": {"backend": "openai", "model": "gpt-x"}}
    with pytest.raises(RecipeError, match=r"model 'api' \(backend openai\) cannot score"):
        parse_recipe(
            _recipe(tmp_path, {"type": "density_ratio", "strong": "a", "weak": "api"}, no_scoring)
        )
    with pytest.raises(RecipeError, match="density ratio is 0"):
        parse_recipe(_recipe(tmp_path, {"type": "density_ratio", "strong": "a", "weak": "a"}))
    with pytest.raises(RecipeError, match=r"not_there\.jinja"):
        parse_recipe(
            _recipe(
                tmp_path,
                {
                    "type": "density_ratio",
                    "strong": "a",
                    "weak": "a",
                    "customisations": {"default": {"strong_system": "cdr/not_there.jinja"}},
                },
            )
        )
    with pytest.raises(RecipeError, match=r"stages\[1\]\.customisations\.x\.exemplars"):
        parse_recipe(
            _recipe(
                tmp_path,
                {
                    "type": "density_ratio",
                    "strong": "a",
                    "weak": "a",
                    "customisations": {"x": {"exemplars": [{"prompt": "q", "good": "g"}]}},
                },
            )
        )
    router_on_api = {"type": "route", "model": "api"}  # likelihood classification needs scoring
    with pytest.raises(RecipeError, match=r"'api'.*cannot score"):
        parse_recipe(
            _recipe(
                tmp_path,
                {"type": "density_ratio", "strong": "a", "weak": "a", "preset": "shipped"},
                no_scoring,
                [router_on_api],
            )
        )
    ok = parse_recipe(
        _recipe(
            tmp_path,
            {"type": "density_ratio", "strong": "a", "weak": "a", "preset": "shipped"},
            no_scoring,
            [{**router_on_api, "method": "generate"}],
        )
    )
    assert [s.type_name for s in ok.stages] == ["generate", "route", "density_ratio"]


def test_gpu_recipe_validates_without_building_anything():
    from synthpref.recipes.loader import load_recipe

    loaded = load_recipe(REPO / "recipes" / "cdr_gpu.yaml")
    cdr = next(s for s in loaded.stages if s.type_name == "density_ratio")
    assert {loaded.models[m].backend for m in cdr.models_used()} == {"vllm"}
    assert cdr.requirements() == {"strong": {"score"}, "weak": {"score"}}


# --- router --------------------------------------------------------------------------------------


def test_router_metadata_rules_and_default():
    records = [
        record("m", "anything", metadata={"category": "safety"}),
        record("s", "How do I build a bomb?"),
        record("r", "What is 17 * 3?"),
        record("c", "Tell me about autumn."),
        record("x", "Tell me about winter.", metadata={"category": "not-a-domain"}),
    ]
    route = Route("route", RouteParams(metadata_field="category"))
    out = asyncio.run(route.process(records))
    got = {r.id: (r.annotations["domain"], r.annotations["domain_source"]) for r in out}
    assert got == {
        "m": ("safety", "metadata"),
        "s": ("safety", "rule:0"),
        "r": ("reasoning", "rule:1"),
        "c": ("chat", "default"),
        "x": ("chat", "default"),
    }
    assert route.counters["metadata_not_a_domain"] == 1
    assert parse_domain("Category: Reasoning.", ["chat", "reasoning"]) == "reasoning"
    assert parse_domain("no idea", ["chat"]) is None


def test_router_model_classifies_by_likelihood(transformers_reference):
    records = [record("a", "Tell me a story about a dragon."), record("b", "Good morning!")]
    route = Route("route", RouteParams(rules=[], model="m"))
    route.ctx = StageContext({"m": client("m", transformers_reference)})
    out = asyncio.run(route.process(records))
    for r in out:
        assert r.annotations["domain"] in {"chat", "reasoning", "safety"}
        assert r.annotations["domain_source"] == "model"


# --- end to end ----------------------------------------------------------------------------------


def test_cdr_recipe_produces_a_preference_dataset(tmp_path):
    loaded = parse_recipe(
        recipe_dict("cdr.yaml", limit=2, tmp_path=tmp_path), base_dir=REPO / "recipes"
    )
    result = LocalExecutor(loaded, progress=False).run()
    cdr = next(s for s in result.stages if s.name == "cdr")
    assert cdr.counters["judgments"] == 4 and not cdr.counters.get("failed")
    rows = read_dataset(result.run_dir)
    assert 1 <= len(rows) <= 2
    for row in rows:
        assert (
            row["chosen"][-1]["role"] == "assistant" and row["rejected"][-1]["role"] == "assistant"
        )
        assert row["chosen"] != row["rejected"]
