"""Reasoning models: the answer and the reasoning kept apart, from the backend to the judgment.

Local models' ``<think>`` blocks are split by one rule (backends/reasoning.py); servers send the
reasoning apart (``reasoning_content`` / ``reasoning``). Candidates keep both; judges read verdicts
from the answer alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import ClassVar

import pytest

from synthpref.backends.anthropic_backend import AnthropicBackend, AnthropicSpec
from synthpref.backends.base import Backend, Capability, OnGenerated
from synthpref.backends.client import ModelClient
from synthpref.backends.openai_backend import OpenAIBackend, OpenAISpec
from synthpref.backends.reasoning import split_reasoning
from synthpref.backends.transformers_backend import TransformersBackend
from synthpref.backends.types import (
    Completion,
    GenerationRequest,
    GenerationResult,
)
from synthpref.backends.vllm_backend import VLLMBackend
from synthpref.judges.rubric import RubricJudge, RubricParams
from synthpref.records import Candidate, Message, Record
from synthpref.stages.base import StageContext
from synthpref.stages.generate import Generate, GenerateParams
from tests.fake_anthropic_server import API_KEY, FakeAnthropicServer, thinking
from tests.fake_openai_server import FakeServer, reasoning_reply

# --- the split rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer", "reasoning"),
    [
        ("<think>\nLet me add.\n</think>\n\nThe answer is 4.", "The answer is 4.", "Let me add."),
        ("  \n<think>a</think>b", "b", "a"),  # whitespace before the tag
        ("<think></think>Hi", "Hi", ""),  # thinking switched off: an empty block
        (
            "<think>first</think>A <think>not a block</think>",
            "A <think>not a block</think>",
            "first",
        ),
        ("<think>\nStill thinking when max_tokens cut", "", "Still thinking when max_tokens cut"),
        ("<think>", "", ""),
    ],
    ids=["closed", "leading_whitespace", "empty", "first_close_only", "unclosed", "tag_only"],
)
def test_text_starting_with_think_is_split(text, answer, reasoning):
    assert split_reasoning(text) == (answer, reasoning)


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 4.",
        "",
        "Sure. <think>inline</think> rest",  # the tag further in: not a reasoning block
        "Reasoning:</think> answer",
        "<thinking>x</thinking> y",
    ],
    ids=["plain", "empty", "tag_later", "close_only", "other_tag"],
)
def test_other_text_is_left_as_it_is(text):
    assert split_reasoning(text) == (text, None)


# --- local backends split where they build a Completion ------------------------------------------


class _Tokenizer:
    """Decodes ids 0.. to the pieces given (id 99 is end of sequence)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if i != 99)


@pytest.mark.parametrize(
    ("ids", "answer", "reasoning", "finish"),
    [([0, 1, 2, 3, 99], "Four.", "Add.", "stop"), ([0, 1], "", "Add.", "length"), ([3], "Four.", None, "length")],
)  # fmt: skip
def test_transformers_completion_keeps_reasoning_apart(ids, answer, reasoning, finish):
    class Fake(TransformersBackend):
        tokenizer = _Tokenizer(["<think>", "Add.", "</think>\n", "Four."])  # type: ignore[assignment]

    req = GenerationRequest(messages=[Message(role="user", content="2+2?")])
    got = Fake._completion(object.__new__(Fake), ids, {99}, req, None)
    assert (got.text, got.reasoning, got.finish_reason) == (answer, reasoning, finish)
    assert got.completion_tokens == len(ids)  # the reasoning's tokens are still counted


def test_vllm_result_keeps_reasoning_apart():
    outputs = [
        SimpleNamespace(index=1, text="plain", finish_reason="stop", token_ids=[1], logprobs=None),
        SimpleNamespace(
            index=0, text="<think>hm</think>\nyes", finish_reason="stop", token_ids=[1, 2, 3],
            logprobs=None,
        ),
    ]  # fmt: skip
    out = SimpleNamespace(outputs=outputs, prompt_token_ids=[5, 6])
    req = GenerationRequest(messages=[Message(role="user", content="ok?")])
    result = VLLMBackend._result(None, req, out)  # type: ignore[arg-type]
    assert [(c.text, c.reasoning) for c in result.completions] == [("yes", "hm"), ("plain", None)]


# --- a server that sends the reasoning apart ----------------------------------------------------


def _server_backend(server: FakeServer) -> OpenAIBackend:
    return OpenAIBackend("m", base_url=server.base_url, max_context=2048, retry_initial_wait=0.01)


def _ask(backend: Backend) -> Completion:
    (result,) = asyncio.run(backend.generate([GenerationRequest(messages=[_user("2+2?")])]))
    return result.completions[0]


def _user(text: str) -> Message:
    return Message(role="user", content=text)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_server_reasoning_field_is_kept_apart_from_the_answer(field):
    with FakeServer(reasoning_reply("Two and two make four.", "4", field=field)) as server:
        got = _ask(_server_backend(server))
    assert (got.text, got.reasoning, got.finish_reason) == ("4", "Two and two make four.", "stop")


def test_server_answer_cut_while_reasoning_is_an_empty_answer():
    with FakeServer(reasoning_reply("Two and", None, finish_reason="length")) as server:
        got = _ask(_server_backend(server))
    assert (got.text, got.reasoning, got.finish_reason) == ("", "Two and", "length")


def test_server_without_reasoning_gives_none():
    with FakeServer() as server:
        got = _ask(_server_backend(server))
    assert got.reasoning is None and got.text.startswith("Rating: 4")


def test_generate_stores_the_servers_reasoning_on_the_candidate():
    with FakeServer(reasoning_reply("Two and two make four.", "4")) as server:
        spec = OpenAISpec(model="m", base_url=server.base_url)
        client = ModelClient("r1", spec, _server_backend(server), None)
        stage = Generate("generate", GenerateParams(models=["r1"], n=1))
        stage.ctx = StageContext({"r1": client})
        [record] = asyncio.run(stage.process([Record(id="p", prompt=[_user("2+2?")])]))
    [cand] = record.candidates
    assert (cand.text, cand.reasoning) == ("4", "Two and two make four.")


# --- a judge that reasons: the verdict comes from the answer ------------------------------------


class _ReasoningJudgeModel(Backend):
    """Answers every request with the same answer and reasoning (no prefill: the model replies
    freely, as a reasoning model must)."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({"generate"})

    def __init__(self, answer: str, reasoning: str | None) -> None:
        self.answer, self.reasoning = answer, reasoning

    @property
    def identity(self) -> str:
        return f"reasoning-double:{self.answer}:{self.reasoning}"

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        out = []
        for i, _ in enumerate(requests):
            completion = Completion(
                text=self.answer,
                reasoning=self.reasoning,
                finish_reason="stop",
                completion_tokens=9,
            )
            result = GenerationResult(completions=[completion], prompt_tokens=3)
            if on_result:
                on_result(i, result)
            out.append(result)
        return out


def _judge(answer: str, reasoning: str | None, **params):
    backend = _ReasoningJudgeModel(answer, reasoning)
    client = ModelClient("judge", OpenAISpec(model="j", base_url="http://x/v1"), backend, None)
    stage = RubricJudge("rating", RubricParams(model="judge", **params))
    stage.ctx = StageContext({"judge": client})
    record = Record(
        id="p",
        prompt=[_user("2+2?")],
        candidates=[Candidate(id="c", model="m", text="4")],
    )
    [record] = asyncio.run(stage.process([record]))
    [judgment] = record.judgments
    return judgment, stage


REASONING = "The reply is right but terse. Maybe Rating: 5? No, too generous."


def test_judge_verdict_comes_from_the_answer_not_the_reasoning():
    judgment, _ = _judge("Rating: 2", REASONING)
    assert judgment.status == "ok" and judgment.score == 2.0
    assert judgment.raw == "Rating: 2"  # the answer, as parsed
    assert judgment.rationale == REASONING  # the verdict gave none: the reasoning is kept


def test_judge_rationale_of_the_verdict_wins_over_the_reasoning():
    judgment, _ = _judge("Rating: 3\nRationale: correct, no working shown.", REASONING)
    assert judgment.score == 3.0 and judgment.rationale == "correct, no working shown."


def test_judge_cut_while_reasoning_fails_rather_than_read_the_reasoning():
    judgment, stage = _judge("", "Clearly Rating: 5 ...", max_retries=1)
    assert judgment.status == "failed" and judgment.score is None
    assert judgment.attempts == 2 and stage.counters["failed"] == 1
    assert judgment.rationale == "Clearly Rating: 5 ..."  # kept to show why it failed


def test_judge_without_reasoning_is_unchanged():
    judgment, _ = _judge("Rating: 4", None)
    assert judgment.score == 4.0 and judgment.rationale == ""


def test_several_questions_label_their_reasoning():
    judgment, _ = _judge("Rating: 4", "ok", aspects=["helpfulness", "honesty"], score="parsed")
    assert judgment.rationale == "[helpfulness]\nok\n\n[honesty]\nok"


# --- Anthropic thinking blocks: the same rule through the Messages API -----------------------------


def _judge_on_anthropic(policy, **params):
    with FakeAnthropicServer(policy) as server:
        spec = AnthropicSpec(model="claude-j", base_url=server.base_url, thinking_budget=1024)
        backend = AnthropicBackend(
            "claude-j", base_url=server.base_url, api_key=API_KEY, thinking_budget=1024
        )
        client = ModelClient("judge", spec, backend, None)
        stage = RubricJudge("rating", RubricParams(model="judge", **params))
        stage.ctx = StageContext({"judge": client})
        record = Record(
            id="p", prompt=[_user("2+2?")], candidates=[Candidate(id="c", model="m", text="4")]
        )
        [record] = asyncio.run(stage.process([record]))
    [judgment] = record.judgments
    return judgment, [body for _, body in server.requests]


def test_anthropic_judge_reads_the_answer_and_keeps_its_thinking_as_the_rationale():
    judgment, sent = _judge_on_anthropic(lambda body: thinking(REASONING, "Rating: 2"))
    assert judgment.status == "ok" and judgment.score == 2.0  # not the 5 in the thinking
    assert judgment.raw == "Rating: 2" and judgment.rationale == REASONING
    # a thinking judge cannot pre-fill "Rating:": it is asked to reply freely
    assert [b["messages"][-1]["role"] for b in sent] == ["user"]


def test_anthropic_judge_cut_while_thinking_fails_rather_than_read_the_thinking():
    long = "Clearly Rating: 5 " * 400  # 1200 words: past the budget plus the 8 answer tokens
    judgment, sent = _judge_on_anthropic(
        lambda body: thinking(long, "Rating: 5"), max_retries=1, max_tokens=8
    )
    assert [b["max_tokens"] for b in sent] == [1024 + 8, 1024 + 8]
    assert judgment.status == "failed" and judgment.score is None and len(sent) == 2
    assert judgment.rationale.startswith("Clearly Rating: 5")


def test_results_cached_before_reasoning_existed_still_load():
    legacy = '{"text": "x", "finish_reason": "stop", "completion_tokens": 1, "top_logprobs": null}'
    assert Completion.model_validate_json(legacy).reasoning is None
