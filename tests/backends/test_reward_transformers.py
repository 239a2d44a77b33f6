"""Reward models on the transformers backend (``task: reward``): exact values against a plain
forward pass of the model (tests/reward_fixtures.py), truncation, and clear refusals of what is not
a reward model."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import ValidationError

from synthpref.backends.base import BackendError, CapabilityError, RequestError
from synthpref.backends.builtin import EmbeddedSpec, TransformersSpec
from synthpref.backends.types import RewardRequest
from synthpref.records import Message
from synthpref.stages.base import Stage, StageParams
from tests.conftest import tiny_recipe, write_recipe

TOL = 1e-4


def _msgs(*pairs: tuple[str, str]) -> list[Message]:
    return [Message(role=role, content=text) for role, text in pairs]


SHORT = _msgs(("user", "What is 2 + 2?"), ("assistant", "4."))
LONG = _msgs(
    ("user", "Tell me about the history of Paris in some detail, please. " * 6),
    ("assistant", "Paris grew from a Gallic settlement on the Seine into a capital. " * 8),
)
MULTI = _msgs(
    ("system", "You are terse."),
    ("user", "Name a primary colour."),
    ("assistant", "Red."),
    ("user", "And another one?"),
    ("assistant", "Blue."),
)
MEDIUM = _msgs(("user", "Say hello in French."), ("assistant", "Bonjour ! Comment allez-vous ?"))
CONVERSATIONS = [LONG, SHORT, MULTI, MEDIUM, [*SHORT[:1], Message(role="assistant", content="5")]]


def _direct(model_dir: Path, conversations: list[list[Message]]) -> list[list[float]]:
    from tests.reward_fixtures import direct_rewards

    return direct_rewards(model_dir, [[m.model_dump() for m in c] for c in conversations])


def _backend(model_dir: Path, **kwargs):
    spec = TransformersSpec(model=str(model_dir), task="reward", **kwargs)
    return spec.build()


def _assert_close(results, expected) -> None:
    for result, want in zip(results, expected, strict=True):
        assert len(result.values) == len(want)
        assert max(abs(a - b) for a, b in zip(result.values, want, strict=True)) < TOL, (
            result.values,
            want,
        )


def _variant(source: Path, out: Path, **config_changes) -> Path:
    """A model directory sharing ``source``'s weights (linked) with its config.json changed."""
    out.mkdir()
    for f in source.iterdir():
        if f.name != "config.json":
            os.symlink(f, out / f.name)
    config = json.loads((source / "config.json").read_text())
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


# values ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("which", ["scalar", "attributes"])
def test_batched_values_equal_an_unpadded_forward_pass(which, reward_model_dir, reward_model3_dir):
    """Short, long and multi-turn conversations in one padded batch, and in batches of two."""
    model_dir = reward_model_dir if which == "scalar" else reward_model3_dir
    expected = _direct(model_dir, CONVERSATIONS)
    requests = [RewardRequest(messages=c) for c in CONVERSATIONS]
    for batch_size in (8, 2):
        backend = _backend(model_dir, batch_size=batch_size)
        seen: dict[int, object] = {}
        results = asyncio.run(backend.reward(requests, seen.__setitem__))
        _assert_close(results, expected)
        assert [seen[i] for i in range(len(requests))] == results
    labels = ["LABEL_0"] if which == "scalar" else ["helpfulness", "correctness", "verbosity"]
    assert all(r.labels == labels and r.dropped_turns == 0 for r in results)
    tok = backend.tokenizer
    assert results[1].tokens == len(
        tok.apply_chat_template([m.model_dump() for m in SHORT])["input_ids"]
    )
    assert results[0].tokens > results[3].tokens > results[1].tokens


@pytest.mark.slow
def test_drop_oldest_turns_equals_the_cut_conversation(reward_model_dir):
    from synthpref.backends.turns import chat_ids

    long_history = _msgs(
        ("system", "You are terse."),
        ("user", "Describe the water cycle in detail. " * 10),
        ("assistant", "Water evaporates, condenses into clouds and falls as rain. " * 10),
        ("user", "Thanks. Now name a primary colour."),
        ("assistant", "Red."),
    )
    cut = [long_history[0], *long_history[3:]]
    probe = _backend(reward_model_dir)
    full_len = len(chat_ids(probe.tokenizer, long_history))
    cut_len = len(chat_ids(probe.tokenizer, cut))
    assert cut_len < full_len
    backend = _backend(reward_model_dir, max_context=cut_len + 1, batch_size=4)
    short = [long_history[0], *SHORT]  # under the limit (the template's default system is not)
    requests = [
        RewardRequest(messages=short),
        RewardRequest(messages=long_history, truncation="drop_oldest_turns"),
    ]
    results = asyncio.run(backend.reward(requests))
    _assert_close(results, _direct(reward_model_dir, [short, cut]))
    assert [r.dropped_turns for r in results] == [0, 2]
    assert results[1].tokens == cut_len

    # truncation: error fails that request alone, by its index, before any value is computed
    seen = []
    with pytest.raises(RequestError) as info:
        asyncio.run(
            backend.reward(
                [RewardRequest(messages=short), RewardRequest(messages=long_history)],
                lambda i, r: seen.append(i),
            )
        )
    assert info.value.index == 1 and "reward request 1" in str(info.value)
    assert f"{full_len} tokens, over the model's {cut_len + 1}-token context" in str(info.value)
    assert seen == []


@pytest.mark.slow
def test_a_model_without_a_pad_token_is_batched_exactly(reward_model_dir, tmp_path):
    """No pad_token_id in the config: alone, the model pools the last token; batched, too."""
    model_dir = _variant(reward_model_dir, tmp_path / "nopad", pad_token_id=None)
    expected = _direct(model_dir, CONVERSATIONS)
    backend = _backend(model_dir, batch_size=8)
    _assert_close(
        asyncio.run(backend.reward([RewardRequest(messages=c) for c in CONVERSATIONS])), expected
    )
    assert backend.model.config.pad_token_id is None  # the model is left as it was loaded


def test_the_pad_id_never_ends_a_row_of_a_model_without_one():
    from synthpref.backends.transformers_reward import pooling_pad_id

    assert pooling_pad_id(7, 2, [7, 1]) == 7  # the model's own pad: its pooling skips it anyway
    assert pooling_pad_id(None, 2, [198, 5]) == 2
    assert pooling_pad_id(None, 2, [2, 5]) == 0
    assert pooling_pad_id(None, 2, [2, 0, 1]) == 3


# refusals ----------------------------------------------------------------------------------------


def test_a_causal_lm_directory_is_refused_as_a_reward_model(embedded_dir):
    from synthpref.backends.transformers_reward import RewardModelError, TransformersRewardBackend

    with pytest.raises(ValidationError, match="LlamaForCausalLM") as info:
        TransformersSpec(model=str(embedded_dir), task="reward")
    assert str(embedded_dir) in str(info.value) and "ForSequenceClassification" in str(info.value)
    with pytest.raises(RewardModelError, match="generating model") as err:
        TransformersRewardBackend(str(embedded_dir))
    assert isinstance(err.value, BackendError) and str(embedded_dir) in str(err.value)
    with pytest.raises(ValidationError, match="causal LM, not a reward model"):
        EmbeddedSpec(task="reward")


def test_a_causal_lm_config_that_maps_a_remote_classifier_is_not_refused(tmp_path):
    from synthpref.backends.transformers_reward import check_reward_config

    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoModelForSequenceClassification": "modeling.InternLM2ForRewardModel"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    check_reward_config(str(tmp_path))
    TransformersSpec(model=str(tmp_path), task="reward", trust_remote_code=True)


@pytest.mark.slow
def test_a_checkpoint_without_a_head_is_refused(embedded_dir, tmp_path):
    """A causal LM's weights under a classifier's config: transformers would draw a random head."""
    from synthpref.backends.transformers_reward import RewardModelError

    model_dir = _variant(
        embedded_dir, tmp_path / "headless", architectures=["LlamaForSequenceClassification"]
    )
    backend = _backend(model_dir)
    with pytest.raises(RewardModelError, match=r"no weights for score\.weight") as info:
        asyncio.run(backend.reward([RewardRequest(messages=SHORT)]))
    assert str(model_dir) in str(info.value) and not isinstance(info.value, RequestError)


@pytest.mark.slow
def test_a_head_that_does_not_match_num_labels_is_refused(reward_model_dir, tmp_path):
    from synthpref.backends.transformers_reward import RewardModelError

    labels = {str(i): f"LABEL_{i}" for i in range(3)}
    model_dir = _variant(
        reward_model_dir,
        tmp_path / "mismatch",
        id2label=labels,
        label2id={v: int(k) for k, v in labels.items()},
    )
    backend = _backend(model_dir)
    with pytest.raises(RewardModelError, match="head does not match") as info:
        asyncio.run(backend.reward([RewardRequest(messages=SHORT)]))
    message = str(info.value)
    assert str(model_dir) in message and "checkpoint [1, 576], config [3, 576]" in message
    assert not isinstance(info.value, RequestError)


def test_a_reward_spec_only_rewards(reward_dir_config):
    from synthpref.backends.transformers_backend import TransformersBackend
    from synthpref.backends.types import GenerationRequest, ScoreRequest

    spec = TransformersSpec(model=str(reward_dir_config), task="reward")
    assert spec.capabilities() == {"reward"}
    backend = spec.build()  # builds without loading weights
    assert backend.supports("reward") and not backend.supports("generate")
    with pytest.raises(CapabilityError, match="task: reward"):
        asyncio.run(backend.generate([GenerationRequest(messages=SHORT[:1])]))
    with pytest.raises(CapabilityError, match="task: reward"):
        asyncio.run(backend.score([ScoreRequest(messages=SHORT)]))
    generating = TransformersBackend(str(reward_dir_config))
    with pytest.raises(CapabilityError, match="task: reward"):
        asyncio.run(generating.reward([RewardRequest(messages=SHORT)]))


def test_task_enters_the_identity_only_for_reward_models(reward_dir_config):
    generate = TransformersSpec(model=str(reward_dir_config))
    reward = TransformersSpec(model=str(reward_dir_config), task="reward")
    assert "task" not in generate.fingerprint()  # generating specs keep their old fingerprints
    assert reward.fingerprint()["task"] == "reward"
    assert reward.identity() != generate.identity()
    assert reward.backend_key() != generate.backend_key()


# recipes -----------------------------------------------------------------------------------------


@pytest.fixture
def reward_dir_config(tmp_path) -> Path:
    """A reward model directory as far as a recipe can tell (config only; no weights)."""
    model_dir = tmp_path / "rm"
    model_dir.mkdir()
    config = {"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"}
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


class _NeedsRewardParams(StageParams):
    model: str


class NeedsReward(Stage):
    """A judge that needs the reward capability (the reward_model judge's requirement)."""

    type_name: ClassVar[str] = "needs_reward"
    kind = "judge"
    Params = _NeedsRewardParams

    def models_used(self) -> list[str]:
        return [self.params.model]

    def requirements(self) -> dict:
        return {self.params.model: {"reward"}}

    async def process(self, records):
        return records


def _validate_problems(tmp_path: Path, recipe: dict) -> list[str]:
    import synthpref
    from synthpref.recipes.loader import RecipeError

    with pytest.raises(RecipeError) as info:
        synthpref.validate(write_recipe(tmp_path, recipe))
    return info.value.problems


def test_validate_refuses_a_reward_model_in_a_generate_stage(tmp_path, reward_dir_config):
    recipe = tiny_recipe(tmp_path)
    recipe["models"]["rm"] = {
        "backend": "transformers",
        "model": str(reward_dir_config),
        "task": "reward",
    }
    recipe["stages"][0]["models"] = ["a", "rm"]
    problems = _validate_problems(tmp_path, recipe)
    assert len(problems) == 1, problems
    assert problems[0].startswith(
        "stages[0] (generate): model 'rm' (backend transformers) cannot generate"
    )
    assert "task: reward only scores conversations" in problems[0]


def test_validate_refuses_a_generating_model_in_a_reward_judge(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"].insert(
        1,
        {"type": "tests.backends.test_reward_transformers:NeedsReward", "name": "rm", "model": "a"},
    )
    problems = _validate_problems(tmp_path, recipe)
    assert len(problems) == 1, problems
    assert problems[0].startswith("stages[1] (rm): model 'a' (backend embedded) cannot reward")
    assert "transformers or vllm model with task: reward" in problems[0]


def test_validate_refuses_a_causal_lm_directory_with_task_reward(tmp_path, embedded_dir):
    recipe = tiny_recipe(tmp_path)
    recipe["models"]["rm"] = {
        "backend": "transformers",
        "model": str(embedded_dir),
        "task": "reward",
    }
    problems = _validate_problems(tmp_path, recipe)
    assert any(p.startswith("models.rm") and "LlamaForCausalLM" in p for p in problems), problems
