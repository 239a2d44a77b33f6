"""The OpenAI-compatible backend against a real ``vllm serve`` on the embedded model, plus its error
paths against real sockets (nothing listening; listening but never answering).

The server tests skip when vllm is not installed; the error-path tests need no server and always run.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from openai.types.chat import ChatCompletion

from synthpref.backends.base import (
    BackendError,
    CapabilityError,
    RequestError,
    TransientBackendError,
)
from synthpref.backends.openai_backend import OpenAIBackend, OpenAISpec
from synthpref.backends.specs import fingerprint_fields, spec_class
from synthpref.backends.types import GenerationRequest, SamplingParams, ScoreRequest, Usage
from synthpref.records import Message
from tests.fake_openai_server import FakeServer, chat_reply, error, ok
from tests.vllm_fixtures import SCORE_REQUESTS, assistant, free_port, user

# the vllm_server / vllm_backend / transformers_reference fixtures (drop once merged into conftest.py)


def server_backend(server, **kwargs) -> OpenAIBackend:
    kwargs.setdefault("tokenizer", str(server.model_dir))
    return OpenAIBackend(server.model, base_url=server.base_url, **kwargs)


# --- spec and capabilities (no server) --------------------------------------------------------


def test_spec_registered_and_volatile_fields_left_out_of_fingerprints():
    spec = spec_class("openai").model_validate(
        {"backend": "openai", "model": "gpt-4o-mini", "max_concurrency": 8, "timeout": 30}
    )
    assert isinstance(spec, OpenAISpec)
    fp = fingerprint_fields(spec)
    assert fp["model"] == "gpt-4o-mini"
    for volatile in ("max_concurrency", "timeout", "max_retries", "api_key_env"):
        assert volatile not in fp


def test_openai_api_without_key_says_which_variable(monkeypatch):
    monkeypatch.delenv("SYNTHPREF_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(BackendError, match="SYNTHPREF_TEST_NO_SUCH_KEY"):
        OpenAISpec(model="gpt-4o-mini", api_key_env="SYNTHPREF_TEST_NO_SUCH_KEY").build()


def test_local_server_without_key_is_fine_and_scoring_needs_a_tokenizer(monkeypatch):
    monkeypatch.delenv("SYNTHPREF_TEST_NO_SUCH_KEY", raising=False)
    backend = OpenAISpec(
        model="m", base_url="http://127.0.0.1:1/v1", api_key_env="SYNTHPREF_TEST_NO_SUCH_KEY"
    ).build()
    assert backend.supports("generate") and backend.supports("json_schema")
    assert not backend.supports("score")
    with pytest.raises(CapabilityError, match="tokenizer"):
        asyncio.run(backend.score(SCORE_REQUESTS[:1]))


def test_prefill_is_refused_with_a_pointer_to_backends_that_can():
    backend = OpenAIBackend("m", base_url="http://127.0.0.1:1/v1")
    req = GenerationRequest(
        messages=[user("hi"), assistant("Hello, I")], continue_final_message=True
    )
    with pytest.raises(CapabilityError, match="vllm"):
        asyncio.run(backend.generate([req]))


# --- real connection failures (no server) -----------------------------------------------------


def test_unreachable_server_is_retried_then_fails_clearly():
    port = free_port()  # bound and released: nothing listens there
    backend = OpenAIBackend(
        "m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, retry_initial_wait=0.1
    )
    started = time.monotonic()
    with pytest.raises(TransientBackendError) as err:
        asyncio.run(backend.generate([GenerationRequest(messages=[user("hi")])]))
    message = str(err.value)
    assert (
        "request 0" in message
        and "after 3 attempts" in message
        and "is the server running" in message
    )
    assert backend.retries == 2
    assert time.monotonic() - started >= 0.1 + 0.2  # the exponential backoff was waited


def test_silent_server_times_out_and_is_retried():
    # A real listening socket that accepts connections and never answers.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        backend = OpenAIBackend(
            "m",
            base_url=f"http://127.0.0.1:{port}/v1",
            timeout=0.5,
            max_retries=1,
            retry_initial_wait=0.05,
        )
        with pytest.raises(TransientBackendError, match=r"request 0 .*timed out after 2 attempts"):
            asyncio.run(backend.generate([GenerationRequest(messages=[user("hi")])]))
    assert backend.retries == 1


# --- HTTP errors from a scripted server: each raised as the type that says whose fault it is ----


def scripted(server: FakeServer, **kwargs) -> OpenAIBackend:
    return OpenAIBackend(
        "m", base_url=server.base_url, max_context=2048, retry_initial_wait=0.01, **kwargs
    )


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_rate_limits_and_server_errors_are_retried_then_transient(status):
    with FakeServer(lambda path, body: error(status, "try again later")) as server:
        backend = scripted(server, max_retries=2)
        with pytest.raises(TransientBackendError, match=f"after 3 attempts.*HTTP {status}"):
            asyncio.run(backend.generate([GenerationRequest(messages=[user("hi")])]))
    assert backend.retries == 2 and len(server.requests) == 3


def test_a_server_that_recovers_within_the_retries_answers():
    replies = iter([error(429, "slow down"), error(503, "loading")])
    with FakeServer(lambda path, body: next(replies, None) or ok(path, body)) as server:
        backend = scripted(server, max_retries=2)
        (result,) = asyncio.run(backend.generate([GenerationRequest(messages=[user("hi")])]))
    assert result.completions[0].text.startswith("Rating: 4") and backend.retries == 2


@pytest.mark.parametrize(
    ("status", "param", "code"),
    [(400, "input_tokens", None), (400, "messages", None), (400, None, "context_length_exceeded"),
     (422, "prompt", None), (413, None, None)],
)  # fmt: skip
def test_input_the_server_rejects_is_that_requests_error(status, param, code):
    def reply(path, body):
        if body["messages"][-1]["content"] == "too long":
            return error(status, "the input is too long", param=param, code=code)
        return ok(path, body)

    requests = [GenerationRequest(messages=[user(t)]) for t in ("hi", "too long")]
    with FakeServer(reply) as server:
        backend = scripted(server, max_retries=3)
        with pytest.raises(RequestError, match=f"request 1 failed: .*HTTP {status}") as err:
            asyncio.run(backend.generate(requests))
    assert err.value.index == 1 and backend.retries == 0


@pytest.mark.parametrize(
    ("status", "param"), [(400, "logprobs"), (400, None), (401, None), (403, None), (404, None)]
)
def test_configuration_errors_are_neither_transient_nor_request_specific(status, param):
    with FakeServer(lambda path, body: error(status, "not like this", param=param)) as server:
        backend = scripted(server, max_retries=3)
        with pytest.raises(BackendError, match=f"HTTP {status}") as err:
            asyncio.run(backend.generate([GenerationRequest(messages=[user("hi")])]))
    assert type(err.value) is BackendError and backend.retries == 0


def test_an_over_long_score_request_is_a_request_error_before_reaching_the_server(embedded_dir):
    long = ScoreRequest(messages=[user("word " * 100), assistant("Fine.")])
    with FakeServer() as server:
        backend = scripted(server, tokenizer=str(embedded_dir))
        backend.max_context = 50
        with pytest.raises(
            RequestError, match=r"score request 1: .*over the model's context"
        ) as err:
            asyncio.run(backend.score([SCORE_REQUESTS[0], long]))
    assert err.value.index == 1
    assert server.requests == []


# --- billed usage ------------------------------------------------------------------------------


def _usage_of(reply, **params):
    """The result of one request answered by ``reply``; n > 1 is known to be supported, so no
    probe (billed too) is sent first."""
    with FakeServer(lambda path, body: reply) as server:
        (result,) = asyncio.run(
            scripted(server, supports_n=True).generate(
                [GenerationRequest(messages=[user("hi")], params=SamplingParams(**params))]
            )
        )
    return result


def test_usage_splits_the_cached_prompt_tokens_from_the_rest():
    result = _usage_of(chat_reply(["a", "b"], 100, cached_tokens=64, completion_tokens=30), n=2)
    assert result.usage == Usage(input_tokens=36, cached_input_tokens=64, output_tokens=30)
    assert result.prompt_tokens == 100  # every prompt token, cached or not
    # no prompt_tokens_details (vLLM, most servers): nothing was read from a cache
    plain = _usage_of(chat_reply(["a"], 100, completion_tokens=7))
    assert plain.usage == Usage(input_tokens=100, output_tokens=7)


def test_a_server_that_reports_no_usage_leaves_it_unset():
    result = _usage_of(chat_reply(["a b c"], usage=False))
    assert result.usage is None and result.prompt_tokens == 0
    # the client then counts what the token counts imply
    assert result.billed() == Usage(output_tokens=result.completions[0].completion_tokens)


def test_a_split_request_sums_what_each_part_billed():
    def one_sample(path, body):
        assert body["n"] == 1
        return chat_reply([f"seed={body['seed']}"], 100, cached_tokens=40, completion_tokens=5)

    with FakeServer(one_sample) as server:
        backend = scripted(server, supports_n=False)
        (result,) = asyncio.run(
            backend.generate(
                [GenerationRequest(messages=[user("hi")], params=SamplingParams(n=3, seed=1))]
            )
        )
    assert len(server.requests) == 3
    # the server billed the prompt three times; prompt_tokens is still the prompt's length
    assert result.usage == Usage(input_tokens=180, cached_input_tokens=120, output_tokens=15)
    assert result.prompt_tokens == 100


def test_parse_chat_reads_usage_from_completions_built_from_dicts_as_batch_results_are():
    _, body = chat_reply(["x"], 50, cached_tokens=20, completion_tokens=3)
    backend = OpenAIBackend("m", base_url="http://127.0.0.1:1/v1")
    req = GenerationRequest(messages=[user("hi")])
    result = backend._parse_chat(0, req, ChatCompletion.model_validate(body))
    assert result.usage == Usage(input_tokens=30, cached_input_tokens=20, output_tokens=3)
    _, bare = chat_reply(["x"], usage=False)
    assert backend._parse_chat(0, req, ChatCompletion.model_validate(bare)).usage is None


# --- against vllm serve -----------------------------------------------------------------------


@pytest.mark.vllm
def test_generation_n_seed_stop_and_top_logprobs(vllm_server):
    backend = server_backend(vllm_server)
    sampled = GenerationRequest(
        messages=[user("Write two sentences about the sea.")],
        params=SamplingParams(n=2, temperature=1.0, max_tokens=24, seed=7, stop=["\n"]),
        top_logprobs=3,
    )
    reported: dict[int, object] = {}
    first = asyncio.run(backend.generate([sampled], on_result=reported.__setitem__))
    again = asyncio.run(backend.generate([sampled]))
    assert list(reported) == [0] and reported[0] == first[0]
    (result,) = first
    assert result.prompt_tokens > 0
    assert len(result.completions) == 2
    texts = [c.text for c in result.completions]
    assert texts == [c.text for c in again[0].completions], "a seeded request must reproduce"
    assert texts[0] != texts[1], "the n samples of one request must differ"
    for c in result.completions:
        assert "\n" not in c.text
        assert c.finish_reason in {"stop", "length"}
        assert 0 < c.completion_tokens <= 24
        assert c.top_logprobs is not None and len(c.top_logprobs) == c.completion_tokens
        for alternatives in c.top_logprobs:
            assert 1 <= len(alternatives) <= 3
            assert all(v <= 0.0 for v in alternatives.values())


@pytest.mark.vllm
def test_server_renders_prompts_like_the_transformers_backend(vllm_server, transformers_reference):
    backend = server_backend(vllm_server)
    req = GenerationRequest(
        messages=[Message(role="system", content="Be terse."), user("Name a prime number.")],
        params=SamplingParams(temperature=0.0, max_tokens=5),
    )
    (result,) = asyncio.run(backend.generate([req]))
    tok = transformers_reference.tokenizer
    local = tok(transformers_reference.render_prompt(req), add_special_tokens=False).input_ids
    assert result.prompt_tokens == len(local)


@pytest.mark.vllm
def test_json_schema_constrains_the_output(vllm_server):
    schema = {
        "type": "object",
        "properties": {"score": {"type": "integer"}, "reason": {"type": "string"}},
        "required": ["score", "reason"],
        "additionalProperties": False,
    }
    backend = server_backend(vllm_server)
    req = GenerationRequest(
        messages=[user("Rate the sentence 'the cat sat' from 1 to 10 as JSON.")],
        params=SamplingParams(temperature=0.0, max_tokens=60),
        json_schema=schema,
    )
    (result,) = asyncio.run(backend.generate([req]))
    if result.completions[0].finish_reason == "stop":
        data = json.loads(result.completions[0].text)
        assert set(data) == {"score", "reason"} and isinstance(data["score"], int)
    else:  # cut by max_tokens: still a JSON object's beginning, never free text
        assert result.completions[0].text.lstrip().startswith("{")


@pytest.mark.vllm
def test_concurrency_is_bounded_and_every_result_reported(vllm_server):
    backend = server_backend(vllm_server, max_concurrency=3)
    requests = [
        GenerationRequest(
            messages=[user(f"Count from {k} to {k + 5}.")],
            params=SamplingParams(temperature=0.0, max_tokens=12),
        )
        for k in range(10)
    ]
    seen: list[int] = []
    results = asyncio.run(backend.generate(requests, on_result=lambda i, r: seen.append(i)))
    assert sorted(seen) == list(range(10))
    assert all(r.completions[0].text for r in results)
    assert backend.peak_in_flight == 3


@pytest.mark.vllm
def test_scores_equal_transformers(vllm_server, transformers_reference):
    backend = server_backend(vllm_server)
    assert backend.supports("score")
    reported: list[int] = []
    remote = asyncio.run(backend.score(SCORE_REQUESTS, on_result=lambda i, r: reported.append(i)))
    local = asyncio.run(transformers_reference.score(SCORE_REQUESTS))
    assert sorted(reported) == list(range(len(SCORE_REQUESTS)))
    assert backend.max_context == 2048  # read from the server's /v1/models
    for r, t in zip(remote, local, strict=True):
        assert r.tokens == t.tokens
        diffs = [abs(a - b) for a, b in zip(r.token_logprobs, t.token_logprobs, strict=True)]
        assert max(diffs) < 1e-3, f"per-token difference {max(diffs):.2e} nats"
    # the end-of-turn variant scores exactly one more token, the same others
    assert remote[1].tokens == [*remote[0].tokens, "<|im_end|>"]


@pytest.mark.vllm
def test_over_long_conversation_fails_before_reaching_the_server(vllm_server):
    backend = server_backend(vllm_server)
    long = ScoreRequest(messages=[user("word " * 3000), assistant("Fine.")])
    with pytest.raises(BackendError, match=r"score request 0: .*over the model's context of 2047"):
        asyncio.run(backend.score([long]))


@pytest.mark.vllm
def test_unknown_model_fails_at_once_naming_request_and_server_message(vllm_server):
    backend = OpenAIBackend("no-such-model", base_url=vllm_server.base_url, max_retries=3)
    requests = [GenerationRequest(messages=[user("hi")])]
    started = time.monotonic()
    with pytest.raises(BackendError) as err:
        asyncio.run(backend.generate(requests))
    message = str(err.value)
    assert "request 0" in message and "HTTP 404" in message and "no-such-model" in message
    assert "--served-model-name" in message  # tells what to do
    assert backend.retries == 0 and time.monotonic() - started < 5
