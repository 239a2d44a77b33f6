"""Reward models behind an OpenAI-compatible server (an ``openai`` spec with ``task: reward``).

Against a scripted server (always run): what is sent where, retries, the error types. Against real
``vllm serve --runner pooling`` servers of the test reward models (slow; skipped without vllm): the
raw head outputs equal one unpadded forward pass per conversation (``direct_rewards``), and a chat
model served for generation is refused with a clear error.
"""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from synthpref.backends.base import (
    BackendError,
    CapabilityError,
    RequestError,
    TransientBackendError,
)
from synthpref.backends.openai_backend import OpenAIBackend, OpenAISpec
from synthpref.backends.types import GenerationRequest, RewardRequest
from synthpref.records import Message
from tests import vllm_fixtures
from tests.fake_openai_server import FakeServer, error
from tests.reward_fixtures import ATTRIBUTES, direct_rewards
from tests.vllm_fixtures import assistant, user


def system(text: str) -> Message:
    return Message(role="system", content=text)


# --- the spec ----------------------------------------------------------------------------------


def test_task_reward_can_only_reward_and_enters_the_fingerprint():
    chat = OpenAISpec(model="m", base_url="http://127.0.0.1:1/v1")
    rm = OpenAISpec(model="m", base_url="http://127.0.0.1:1/v1", task="reward")
    assert rm.capabilities() == {"reward"}
    assert "reward" not in chat.capabilities()
    assert rm.fingerprint()["task"] == "reward"
    assert "task" not in chat.fingerprint()  # generating specs keep the fingerprints they had
    assert rm.identity() != chat.identity() and rm.backend_key() != chat.backend_key()
    backend = rm.build()
    assert backend.supports("reward")
    assert not any(backend.supports(c) for c in ("generate", "score", "json_schema"))
    assert chat.build().supports("generate") and not chat.build().supports("reward")
    with pytest.raises(ValueError, match="task: reward needs base_url"):
        OpenAISpec(model="m", task="reward")  # the OpenAI API serves no reward models


def test_a_reward_model_does_not_generate_and_a_chat_model_does_not_reward():
    rm = OpenAIBackend("m", base_url="http://127.0.0.1:1/v1", task="reward")
    with pytest.raises(CapabilityError, match="reward model"):
        asyncio.run(rm.generate([GenerationRequest(messages=[user("hi")])]))
    chat = OpenAIBackend("m", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(CapabilityError, match="task: reward"):
        asyncio.run(chat.reward([RewardRequest(messages=[user("hi"), assistant("ho")])]))


# --- a scripted server -------------------------------------------------------------------------


def word_ids(body: dict) -> list[int]:
    """What the scripted /tokenize answers: a header token per message and one per word."""
    ids = []
    for m in body["messages"]:
        ids.append(1)
        ids.extend(100 + len(w) for w in m["content"].split())
    return ids


def rm_reply(path: str, body: dict):
    if path == "/tokenize":
        return 200, {"count": len(word_ids(body)), "max_model_len": 64, "tokens": word_ids(body)}
    if path == "/classify":
        ids = body["input"]
        probs = [float(len(ids)), -sum(ids) / 1000]  # unbounded: nothing squashes them
        data = [{"index": 0, "label": "a", "probs": probs, "num_classes": 2}]
        return 200, {"object": "list", "model": body["model"], "data": data, "usage": {}}
    return error(404, f"no route {path}")


def scripted(server: FakeServer, **kwargs) -> OpenAIBackend:
    kwargs.setdefault("max_context", 64)
    return OpenAIBackend(
        "rm", base_url=server.base_url, task="reward", retry_initial_wait=0.01, **kwargs
    )


REQUESTS = [
    RewardRequest(messages=[user("What is 2+2?"), assistant("It is 4.")]),
    RewardRequest(messages=[system("Be brief."), user("Hi"), assistant("Hello there, friend.")]),
]


def test_conversations_are_tokenized_then_classified_raw_at_the_servers_root():
    reported: list[int] = []
    with FakeServer(rm_reply) as server:
        backend = scripted(server)
        results = asyncio.run(backend.reward(REQUESTS, on_result=lambda i, r: reported.append(i)))
    assert sorted(reported) == [0, 1]
    paths = sorted(path for path, _ in server.requests)
    assert paths == ["/classify", "/classify", "/tokenize", "/tokenize"]  # beside /v1, not in it
    for req, res in zip(REQUESTS, results, strict=True):
        messages = [m.model_dump() for m in req.messages]
        ids = word_ids({"messages": messages})
        (tok_body,) = [
            b for p, b in server.requests if p == "/tokenize" and b["messages"] == messages
        ]
        assert tok_body["add_generation_prompt"] is False and tok_body["model"] == "rm"
        (cls_body,) = [b for p, b in server.requests if p == "/classify" and b["input"] == ids]
        assert cls_body["use_activation"] is False and cls_body["model"] == "rm"
        assert res.values == [float(len(ids)), -sum(ids) / 1000]
        assert res.tokens == len(ids) and res.dropped_turns == 0
        assert res.labels == []  # two outputs, no config.json to name them


def test_oldest_turns_are_dropped_by_the_servers_count():
    long = RewardRequest(
        messages=[
            user("tell me " * 30),
            assistant("words " * 30),
            user("Short now?"),
            assistant("Yes, short."),
        ],
        truncation="drop_oldest_turns",
    )
    with FakeServer(rm_reply) as server:
        (result,) = asyncio.run(scripted(server).reward([long]))
    kept = [m.model_dump() for m in long.messages[2:]]
    assert result.dropped_turns == 2 and result.tokens == len(word_ids({"messages": kept}))
    (classified,) = [b["input"] for p, b in server.requests if p == "/classify"]
    assert classified == word_ids({"messages": kept})


def test_an_over_long_conversation_is_its_request_error_before_classifying():
    long = RewardRequest(messages=[user("many words " * 40), assistant("Fine.")])
    with FakeServer(rm_reply) as server:
        with pytest.raises(RequestError, match=r"reward request 1: .*over the model's 64") as err:
            asyncio.run(scripted(server).reward([REQUESTS[0], long]))
    assert err.value.index == 1
    assert not [b for p, b in server.requests if p == "/classify" and len(b["input"]) > 64]


def test_a_rate_limit_is_retried_and_then_answered():
    failures = iter([error(429, "slow down"), error(503, "loading")])

    def reply(path, body):
        if path == "/classify":
            failure = next(failures, None)
            if failure:
                return failure
        return rm_reply(path, body)

    with FakeServer(reply) as server:
        backend = scripted(server, max_retries=2)
        (result,) = asyncio.run(backend.reward(REQUESTS[:1]))
    assert backend.retries == 2
    assert result.values[0] == len(
        word_ids({"messages": [m.model_dump() for m in REQUESTS[0].messages]})
    )


def test_rate_limits_that_persist_are_transient():
    def reply(path, body):
        return error(429, "slow down") if path == "/classify" else rm_reply(path, body)

    with FakeServer(reply) as server:
        backend = scripted(server, max_retries=1)
        with pytest.raises(TransientBackendError, match=r"after 2 attempts.*HTTP 429"):
            asyncio.run(backend.reward(REQUESTS[:1]))


def test_input_the_server_rejects_is_that_requests_error():
    def reply(path, body):
        if path == "/classify" and len(body["input"]) == len(word_ids({"messages": bad})):
            return error(400, "this input is not acceptable", param="input")
        return rm_reply(path, body)

    bad = [m.model_dump() for m in REQUESTS[1].messages]
    with FakeServer(reply) as server:
        backend = scripted(server, max_retries=3)
        with pytest.raises(RequestError, match=r"request 1 failed: .*HTTP 400") as err:
            asyncio.run(backend.reward(REQUESTS))
    assert err.value.index == 1 and backend.retries == 0


@pytest.mark.parametrize("status", [404, 501])
def test_a_server_without_classify_is_refused_naming_model_url_and_what_was_expected(status):
    def reply(path, body):
        return error(status, "Not Found") if path == "/classify" else rm_reply(path, body)

    with FakeServer(reply) as server:
        backend = scripted(server, max_retries=3)
        with pytest.raises(BackendError) as err:
            asyncio.run(backend.reward(REQUESTS[:1]))
    message = str(err.value)
    assert type(err.value) is BackendError and backend.retries == 0
    root = server.base_url.removesuffix("/v1")
    assert f"model 'rm': POST {root}/classify answered HTTP {status}" in message
    assert "vllm serve <reward model dir> --runner pooling" in message


def test_drop_oldest_turns_needs_a_known_context_window():
    with FakeServer(rm_reply) as server:  # its /v1/models answers 404
        backend = scripted(server, max_context=None)
        request = REQUESTS[0].model_copy(update={"truncation": "drop_oldest_turns"})
        with pytest.raises(BackendError, match="set max_context"):
            asyncio.run(backend.reward([request]))


# --- vllm serve --runner pooling ---------------------------------------------------------------

LONG_STORY = RewardRequest(
    messages=[user("Write a long story. " * 40), assistant("Once upon a time " * 60)]
)
MULTI_TURN = RewardRequest(
    messages=[
        system("Answer briefly."),
        user("Capital of France?"),
        assistant("Paris."),
        user("And of Germany?"),
        assistant("Berlin is the capital of Germany, and its largest city."),
    ]
)
#: over the served 2048-token window until its first exchange is dropped
CUT = RewardRequest(
    messages=[
        user("Tell me about rivers. " + "water " * 2500),
        assistant("Rivers carry water."),
        user("Now in one line?"),
        assistant("Water runs downhill to the sea."),
    ],
    truncation="drop_oldest_turns",
)


@functools.cache
def reference_rewards(model_dir: Path, conversations: str) -> list[list[float]]:
    """``direct_rewards`` of a JSON list of conversations, computed once for the module's checks of
    one server through two tokenizers."""
    return direct_rewards(model_dir, json.loads(conversations))


def check_against_direct(server, model_dir: Path, requests, labels, tokenizer: str | None):
    spec = OpenAISpec(
        model=server.model, base_url=server.base_url, task="reward", tokenizer=tokenizer
    )
    backend = spec.build()
    reported: list[int] = []
    results = asyncio.run(backend.reward(requests, on_result=lambda i, r: reported.append(i)))
    assert sorted(reported) == list(range(len(requests)))
    assert backend.max_context == 2048  # from /v1/models
    scored = [
        r.messages[2:] if r.truncation == "drop_oldest_turns" else r.messages for r in requests
    ]
    expected = reference_rewards(
        model_dir, json.dumps([[m.model_dump() for m in c] for c in scored])
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    for req, conv, res, want in zip(requests, scored, results, expected, strict=True):
        assert res.labels == labels
        assert len(res.values) == len(want)
        assert max(abs(a - b) for a, b in zip(res.values, want, strict=True)) < 1e-4
        ids = tok.apply_chat_template([m.model_dump() for m in conv], tokenize=True)
        assert res.tokens == len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert res.dropped_turns == (2 if req.truncation == "drop_oldest_turns" else 0)
    return backend


#: the reward-model servers of this module: served name -> (fixture of the model dir, test)
REWARD_SERVERS = {
    "rm3": ("reward_model3_dir", "test_attribute_rewards_equal_a_direct_forward_pass"),
    "rm": ("reward_model_dir", "test_scalar_rewards_equal_a_direct_forward_pass"),
}


@pytest.fixture(scope="module")
def reward_servers(request):
    """``vllm serve --runner pooling`` of each reward model a selected test needs, all started at
    once in the background: a start takes 40-50 s on two cores, mostly one core's imports, so the
    second overlaps the first. ``reward_servers(name, request.addfinalizer)`` waits for one and
    stops it when that test ends, so the servers are up together only until the first is done."""
    vllm_fixtures.require_vllm()
    selected = {item.name for item in request.session.items}
    contexts = {
        name: vllm_fixtures.served(request.getfixturevalue(model), name, "--runner", "pooling")
        for name, (model, test) in REWARD_SERVERS.items()
        if test in selected
    }
    with ThreadPoolExecutor(max(1, len(contexts))) as pool:
        starting = {name: pool.submit(cm.__enter__) for name, cm in contexts.items()}

        def stop(name: str) -> None:
            future = starting.pop(name, None)
            if future is not None and future.exception() is None:  # a failed start stopped itself
                contexts[name].__exit__(None, None, None)

        def get(name: str, finalizer) -> vllm_fixtures.VLLMServer:
            finalizer(lambda: stop(name))
            return starting[name].result()

        try:
            yield get
        finally:
            for name in list(starting):
                stop(name)


@pytest.mark.slow
@pytest.mark.vllm
def test_attribute_rewards_equal_a_direct_forward_pass(reward_servers, reward_model3_dir, request):
    server = reward_servers("rm3", request.addfinalizer)
    short = RewardRequest(messages=[user("What is 2+2?"), assistant("4.")])
    batch = [short, LONG_STORY, MULTI_TURN, CUT]
    # rendered by the server (/tokenize), labels from the root /v1/models reports
    backend = check_against_direct(server, reward_model3_dir, batch, list(ATTRIBUTES), None)
    # rendered by a local copy of the tokenizer, labels from its config.json
    check_against_direct(server, reward_model3_dir, batch, list(ATTRIBUTES), str(reward_model3_dir))
    over = CUT.model_copy(update={"truncation": "error"})
    with pytest.raises(RequestError, match=r"reward request 1: .*over the model's 2048") as err:
        asyncio.run(backend.reward([short, over]))
    assert err.value.index == 1


@pytest.mark.slow
@pytest.mark.vllm
def test_scalar_rewards_equal_a_direct_forward_pass(reward_servers, reward_model_dir, request):
    server = reward_servers("rm", request.addfinalizer)
    short = RewardRequest(messages=[user("Name a colour."), assistant("Blue.")])
    check_against_direct(server, reward_model_dir, [LONG_STORY, short, CUT, MULTI_TURN],
                         ["LABEL_0"], None)  # fmt: skip


@pytest.mark.slow
@pytest.mark.vllm
def test_a_chat_model_served_for_generation_is_refused_clearly(vllm_server):
    backend = OpenAISpec(
        model=vllm_server.model, base_url=vllm_server.base_url, task="reward", max_retries=3
    ).build()
    with pytest.raises(BackendError) as err:
        asyncio.run(backend.reward([RewardRequest(messages=[user("hi"), assistant("hello")])]))
    message = str(err.value)
    assert type(err.value) is BackendError and backend.retries == 0
    assert f"model {vllm_server.model!r}" in message and "/classify answered HTTP 404" in message
    assert "--runner pooling" in message and "ForSequenceClassification" in message
