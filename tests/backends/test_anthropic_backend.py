"""The native Anthropic backend through the official ``anthropic`` SDK, against the scripted Messages
API of ``tests/fake_anthropic_server.py`` (real sockets; only the answers are scripted)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pyarrow.parquet as pq
import pytest
from anthropic.types import Message as SDKMessage

import synthpref
from synthpref.backends.anthropic_backend import AnthropicBackend, AnthropicSpec
from synthpref.backends.base import (
    BackendError,
    CapabilityError,
    RequestError,
    TransientBackendError,
)
from synthpref.backends.specs import fingerprint_fields, spec_class
from synthpref.backends.types import GenerationRequest, SamplingParams, Usage
from synthpref.errors import ConfigError
from synthpref.records import Message
from tests.conftest import tiny_recipe, write_recipe
from tests.fake_anthropic_server import (
    API_KEY,
    FakeAnthropicServer,
    echo,
    failure,
    last_text,
    text,
    thinking,
)

NO_KEY_ENV = "SYNTHPREF_TEST_NO_SUCH_ANTHROPIC_KEY"


def user(content: str) -> Message:
    return Message(role="user", content=content)


def backend(server: FakeAnthropicServer, **kwargs) -> AnthropicBackend:
    kwargs.setdefault("retry_initial_wait", 0.01)
    return AnthropicBackend("claude-test", base_url=server.base_url, api_key=API_KEY, **kwargs)


def ask(*requests: GenerationRequest, policy=echo, latency: float = 0.0, **kwargs):
    """(results, the bodies the server received, the backend)."""
    with FakeAnthropicServer(policy, latency=latency) as server:
        b = backend(server, **kwargs)
        results = asyncio.run(b.generate(list(requests)))
    return results, [body for _, body in server.requests], b


# --- spec, registry, keys (no server) ---------------------------------------------------------


def test_spec_is_registered_with_described_settings_and_volatile_ones_out_of_fingerprints():
    spec = spec_class("anthropic").model_validate(
        {"backend": "anthropic", "model": "claude-haiku-4-5", "max_concurrency": 4}
    )
    assert isinstance(spec, AnthropicSpec) and spec.display_name() == "claude-haiku-4-5"
    assert all(f.description for n, f in AnthropicSpec.model_fields.items() if n != "backend")
    fp = fingerprint_fields(spec)
    assert fp["model"] == "claude-haiku-4-5" and fp["prefill"] is False
    for volatile in ("max_concurrency", "timeout", "max_retries", "api_key_env", "prompt_caching"):
        assert volatile not in fp
    assert spec.capabilities() == {"generate"}
    assert AnthropicSpec(model="m", prefill=True).capabilities() == {"generate", "prefill"}


def test_identity_is_the_address_and_the_model_name(monkeypatch):
    monkeypatch.setenv(NO_KEY_ENV, "k")
    api = AnthropicBackend("claude-a", api_key_env=NO_KEY_ENV)
    other = AnthropicBackend("claude-b", api_key_env=NO_KEY_ENV)
    gateway = AnthropicBackend("claude-a", base_url="http://gw.example/", api_key_env=NO_KEY_ENV)
    assert api.identity == "anthropic:api.anthropic.com:claude-a"
    assert gateway.identity == "anthropic:http://gw.example:claude-a"
    assert len({api.identity, other.identity, gateway.identity}) == 3
    assert not api.supports("score") and not api.supports("top_logprobs")
    assert not api.supports("json_schema") and not api.supports("prefill")


def test_missing_key_fails_at_build_and_validate_warns_like_openai(monkeypatch, tmp_path):
    monkeypatch.delenv(NO_KEY_ENV, raising=False)
    with pytest.raises(BackendError, match=f"Anthropic API needs a key.*{NO_KEY_ENV}"):
        AnthropicSpec(model="claude-test", api_key_env=NO_KEY_ENV).build()
    # a gateway may need none
    AnthropicSpec(model="m", base_url="http://127.0.0.1:1", api_key_env=NO_KEY_ENV).build()

    recipe = tiny_recipe(tmp_path)
    recipe["models"]["a"] = {"backend": "anthropic", "model": "m", "api_key_env": NO_KEY_ENV}
    warnings = synthpref.validate(recipe)
    (warning,) = [w for w in warnings if w.startswith("models.a.api_key_env: ")]
    assert NO_KEY_ENV in warning
    assert "`synthpref run` stops until it is set" in warning


# --- the request each call sends, and what comes back ----------------------------------------


def test_system_prompt_is_cached_when_prompt_caching_is_on_and_plain_when_off():
    req = GenerationRequest(messages=[Message(role="system", content="Be brief."), user("hi")])
    (on,), (sent_on,), b = ask(req)
    assert sent_on["system"] == [
        {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}
    ]
    assert sent_on["messages"] == [{"role": "user", "content": "hi"}]  # short: left unmarked
    assert on.completions[0].text == "You said: hi"
    _, (sent_off,), _ = ask(req, prompt_caching=False)
    assert sent_off["system"] == "Be brief." and "cache_control" not in json.dumps(sent_off)
    # the API's usage: the system prompt written to the cache, the rest read as input
    assert b.usage["cache_creation_input_tokens"] == 3 and b.usage["input_tokens"] == 1
    assert on.prompt_tokens == 4  # every prompt token, cached or not


def test_a_long_shared_first_message_is_cached_once_and_then_read():
    long = "Judge the following carefully. " * 200
    req = GenerationRequest(messages=[user(long)], params=SamplingParams(n=3))
    # each answer takes 0.2 s: sent together, the three would all miss the cache and write it
    (result,), sent, b = ask(req, latency=0.2)
    assert len(sent) == 3 and len(result.completions) == 3
    for body in sent:
        (block,) = body["messages"][0]["content"]
        assert block["cache_control"] == {"type": "ephemeral"} and block["text"] == long
    # the first call wrote the prefix; the others waited for it and read it
    tokens = -(-len(long) // 4)
    assert b.usage["cache_creation_input_tokens"] == tokens
    assert b.usage["cache_read_input_tokens"] == 2 * tokens
    # a long message sent once is not marked: a cache write costs more than plain input
    _, (once,), _ = ask(GenerationRequest(messages=[user(long)]))
    assert once["messages"][0]["content"] == long


def test_messages_that_begin_alike_get_a_breakpoint_after_the_shared_start():
    """A judge's requests share their fixed instructions and differ after them: the shared start
    becomes its own cached block, written by the first request and read by the others."""
    rubric = "Grade the response against this rubric, line by line.\n" * 120
    reqs = [
        GenerationRequest(messages=[user(f"{rubric}[Response]\nanswer number {k}\n")])
        for k in range(3)
    ]
    results, sent, b = ask(*reqs, latency=0.2)
    assert len(results) == 3
    shared = rubric + "[Response]\n"  # everything alike, up to the last newline
    tails = set()
    for body in sent:  # the first is sent alone; the others after it, in any order
        head, tail = body["messages"][0]["content"]
        assert head == {"type": "text", "text": shared, "cache_control": {"type": "ephemeral"}}
        assert set(tail) == {"type", "text"}
        tails.add(tail["text"])
    assert tails == {f"answer number {k}\n" for k in range(3)}
    tokens = -(-len(shared) // 4)
    assert b.usage["cache_creation_input_tokens"] == tokens
    assert b.usage["cache_read_input_tokens"] == 2 * tokens
    # a short shared start is not worth a breakpoint
    short = [GenerationRequest(messages=[user(f"Rate this.\nanswer {k}")]) for k in range(2)]
    _, sent, _ = ask(*short)
    assert all(isinstance(body["messages"][0]["content"], str) for body in sent)


def test_prefill_is_continued_and_only_the_continuation_returned():
    req = GenerationRequest(
        messages=[user("Rate it."), Message(role="assistant", content="Score: ")],
        continue_final_message=True,
    )
    (result,), (sent,), _ = ask(req, policy=lambda body: text(" 4 out of 5"), prefill=True)
    # the API refuses trailing whitespace in a prefill: it is not sent, and the continuation's
    # leading whitespace is dropped so that prefill + text reads as one reply
    assert sent["messages"][-1] == {"role": "assistant", "content": "Score:"}
    assert result.completions[0].text == "4 out of 5"
    with pytest.raises(CapabilityError, match="prefill: true"):
        ask(req)  # prefill: false (the default, for Claude 4.6 and later)
    # a model that refuses prefills: the error says which setting to look at
    refuse = failure(400, "invalid_request_error", "This model does not support prefill.")
    with pytest.raises(RequestError, match=r"Claude 4\.6 and later refuse a prefill"):
        ask(req, policy=lambda body: refuse, prefill=True)


def test_stop_sequences_and_max_tokens_set_the_finish_reason():
    story = "One two three. Four five six. Seven eight nine."
    stopped = GenerationRequest(messages=[user("go")], params=SamplingParams(stop=[". Four"]))
    cut = GenerationRequest(messages=[user("go")], params=SamplingParams(max_tokens=3))
    (a, b), sent, _ = ask(stopped, cut, policy=lambda body: text(story))
    sent = sorted(sent, key=lambda body: -body["max_tokens"])  # the two calls race
    assert sent[0]["stop_sequences"] == [". Four"] and "stop_sequences" not in sent[1]
    assert (a.completions[0].text, a.completions[0].finish_reason) == ("One two three", "stop")
    assert (b.completions[0].text, b.completions[0].finish_reason) == ("One two three.", "length")
    assert b.completions[0].completion_tokens == 3 and sent[1]["max_tokens"] == 3


def test_n_samples_are_n_calls():
    counter = itertools.count()
    req = GenerationRequest(messages=[user("name a colour")], params=SamplingParams(n=3, seed=7))
    (result,), sent, _ = ask(req, policy=lambda body: text(f"colour {next(counter)}"))
    assert len(sent) == 3 and all(s["messages"] == sent[0]["messages"] for s in sent)
    assert all("n" not in s and "seed" not in s for s in sent)  # the API has neither
    assert sorted(c.text for c in result.completions) == ["colour 0", "colour 1", "colour 2"]
    assert result.prompt_tokens == 4 and all(c.completion_tokens == 2 for c in result.completions)


def test_sampling_params_are_sent_only_when_the_spec_says_the_model_takes_them():
    req = GenerationRequest(
        messages=[user("hi")], params=SamplingParams(temperature=0.3, top_p=0.9)
    )
    _, (plain,), _ = ask(req)
    assert "temperature" not in plain and "top_p" not in plain
    _, (sampled,), _ = ask(req, sampling_params=True)
    assert sampled["temperature"] == 0.3 and sampled["top_p"] == 0.9
    hot = GenerationRequest(messages=[user("hi")], params=SamplingParams(temperature=1.5))
    with pytest.raises(BackendError, match=r"temperature from 0 to 1, got 1\.5"):
        ask(hot, sampling_params=True)


def test_a_system_message_inside_the_conversation_is_that_requests_error():
    odd = GenerationRequest(messages=[user("hi"), Message(role="system", content="Now French.")])
    with pytest.raises(RequestError, match="request 1: a system message") as err:
        ask(GenerationRequest(messages=[user("hi")]), odd)
    assert err.value.index == 1


# --- failures: typed as the OpenAI backend types them ------------------------------------------


def test_rate_limit_waits_as_retry_after_says_then_succeeds():
    replies = iter([failure(429, "rate_limit_error", "slow down", **{"retry-after": "1"})])
    started = time.monotonic()
    (result,), sent, b = ask(
        GenerationRequest(messages=[user("hi")]),
        policy=lambda body: next(replies, None) or echo(body),
        max_retries=2,
    )
    assert result.completions[0].text == "You said: hi"
    assert len(sent) == 2 and b.retries == 1
    assert time.monotonic() - started >= 1.0  # not the 0.01 s back-off: the server's second
    assert b.window.shrinks["error"] == 1


@pytest.mark.parametrize(
    ("status", "kind"), [(429, "rate_limit_error"), (529, "overloaded_error"), (500, "api_error")]
)
def test_overload_and_server_errors_are_retried_then_transient(status, kind):
    policy = lambda body: failure(status, kind, "try later", **{"retry-after-ms": "5"})  # noqa: E731
    with FakeAnthropicServer(policy) as server:
        b = backend(server, max_retries=2)
        with pytest.raises(TransientBackendError, match=f"after 3 attempts.*HTTP {status} {kind}"):
            asyncio.run(b.generate([GenerationRequest(messages=[user("hi")])]))
    assert b.retries == 2 and len(server.requests) == 3


def test_input_the_api_rejects_is_that_requests_error():
    def policy(body):
        if last_text(body) == "too long":
            return failure(400, "invalid_request_error", "prompt is too long: 300000 tokens")
        return echo(body)

    requests = [GenerationRequest(messages=[user(t)]) for t in ("hi", "too long")]
    with pytest.raises(RequestError, match=r"request 1 failed: .*HTTP 400 invalid_request") as err:
        ask(*requests, policy=policy, max_retries=3)
    assert err.value.index == 1


@pytest.mark.parametrize(
    ("status", "kind", "hint"),
    [
        (401, "authentication_error", "check the API key"),
        (403, "permission_error", "may not use"),
        (404, "not_found_error", "a model name the API knows"),
    ],
)
def test_configuration_errors_are_neither_transient_nor_request_specific(status, kind, hint):
    with FakeAnthropicServer(lambda body: failure(status, kind, "no")) as server:
        b = backend(server, max_retries=3)
        with pytest.raises(BackendError, match=hint) as err:
            asyncio.run(b.generate([GenerationRequest(messages=[user("hi")])]))
    assert type(err.value) is BackendError and b.retries == 0 and len(server.requests) == 1


# --- a recipe end to end: generate, then a pairwise judge that pre-fills its verdict -----------


def test_a_recipe_generates_and_judges_pairs_through_the_messages_api(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHPREF_TEST_ANTHROPIC_KEY", API_KEY)
    drafts = itertools.count()

    def policy(body):
        prompt = last_text(body)
        if "[Response A]" in prompt:
            assert body["messages"][-1] == {"role": "assistant", "content": "Verdict:"}
            a = prompt.split("[Response A]\n", 1)[1].split("\n[End of response A]", 1)[0]
            return text(" A+\nReasoning: more." if "longer" in a else " B+\nReasoning: more.")
        return text("Short." if next(drafts) % 2 else "A longer and better answer.")

    with FakeAnthropicServer(policy) as server:
        spec = {
            "backend": "anthropic",
            "base_url": server.base_url,
            "api_key_env": "SYNTHPREF_TEST_ANTHROPIC_KEY",
        }
        recipe = tiny_recipe(tmp_path, prompts=[{"id": "p1", "prompt": "Name a colour."}])
        recipe["models"] = {
            "writer": {**spec, "model": "claude-test-writer", "system_prompt": "Be helpful."},
            "judge": {**spec, "model": "claude-test-judge", "prefill": True},
        }
        recipe["stages"] = [
            {"type": "generate", "models": ["writer"], "n": 2, "max_tokens": 32},
            {"type": "pairwise_judge", "name": "verdict", "model": "judge", "reasoning": "after"},
            {"type": "pairs", "judge": "verdict"},
        ]
        assert synthpref.validate(recipe) == []
        path = write_recipe(tmp_path, recipe)
        result = synthpref.run(path, progress=False)
        calls = len(server.requests)
        again = synthpref.run(path, progress=False, fresh=False)
    assert calls == 2 + 2  # two samples, one pair judged in both orders
    assert len(server.requests) == calls  # the rerun is answered from checkpoints and cache
    writer_calls = [b for _, b in server.requests if b["model"] == "claude-test-writer"]
    assert all(b["system"][0]["cache_control"] == {"type": "ephemeral"} for b in writer_calls)
    (row,) = [json.loads(line) for line in (result.run_dir / "data" / "preference.jsonl").open()]
    assert row["chosen"][-1]["content"] == "A longer and better answer."
    assert row["rejected"][-1]["content"] == "Short."
    judge = next(s for s in result.stages if s.name == "verdict")
    assert judge.counters["judgments"] == 1 and not judge.counters.get("failed")
    assert again.fingerprint == result.fingerprint


# --- billed usage ------------------------------------------------------------------------------


def test_usage_is_what_the_api_billed_summed_over_the_n_calls():
    long = "Judge the following carefully. " * 200
    req = GenerationRequest(
        messages=[Message(role="system", content="Be brief."), user(long)],
        params=SamplingParams(n=3),
    )
    (result,), _, b = ask(req, policy=lambda body: text("Fine, thanks."), latency=0.2)
    system, first = -(-len("Be brief.") // 4), -(-len(long) // 4)
    # the first call wrote both marked prefixes, the two others read them
    assert result.usage == Usage(
        input_tokens=0,
        cache_write_tokens=system + first,
        cached_input_tokens=2 * (system + first),
        output_tokens=3 * 2,
    )
    assert result.prompt_tokens == system + first  # the prompt's length, once
    assert [c.completion_tokens for c in result.completions] == [2, 2, 2]
    assert result.usage.input_tokens == b.usage["input_tokens"]
    assert result.usage.cached_input_tokens == b.usage["cache_read_input_tokens"]
    assert result.usage.cache_write_tokens == b.usage["cache_creation_input_tokens"]


def test_result_reads_messages_built_from_dicts_as_batch_results_are():
    def reply(usage: dict) -> SDKMessage:
        return SDKMessage.model_validate(
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-test",
                "content": [
                    {"type": "thinking", "thinking": "Step one.", "signature": "s"},
                    {"type": "redacted_thinking", "data": "xyz"},
                    {"type": "thinking", "thinking": "Step two.", "signature": "s"},
                    {"type": "text", "text": "Four."},
                ],
                "stop_reason": "max_tokens",
                "stop_sequence": None,
                "usage": usage,
            }
        )

    b = AnthropicBackend("claude-test", base_url="http://127.0.0.1:1", api_key=API_KEY)
    first = {"input_tokens": 5, "cache_read_input_tokens": 100, "output_tokens": 9}
    second = {**first, "cache_creation_input_tokens": 7, "cache_read_input_tokens": None}
    result = b._result(0, [reply(first), reply(second)], False)
    assert result.usage == Usage(
        input_tokens=10, cached_input_tokens=100, cache_write_tokens=7, output_tokens=18
    )
    assert result.prompt_tokens == 105
    (one, _) = result.completions
    assert (one.text, one.reasoning, one.finish_reason) == (
        "Four.",
        "Step one.\n\nStep two.",
        "length",
    )


# --- extended thinking -------------------------------------------------------------------------

DECOY = "The first reply is longer. Verdict: A+ ... no, on reflection the second is better."


def test_thinking_is_sent_with_max_tokens_above_the_budget_and_kept_apart_from_the_answer():
    req = GenerationRequest(messages=[user("2+2?")], params=SamplingParams(max_tokens=50))
    policy = lambda body: thinking("Two and two make four.", "4")  # noqa: E731
    (result,), (sent,), _ = ask(req, policy=policy, thinking_budget=2000)
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2000}
    assert sent["max_tokens"] == 2050  # the budget, then the request's own max_tokens
    assert "temperature" not in sent and "top_p" not in sent
    (got,) = result.completions
    assert (got.text, got.reasoning, got.finish_reason) == ("4", "Two and two make four.", "stop")
    assert got.completion_tokens == 5 + 1  # thinking is billed as output
    assert result.usage.output_tokens == 6
    # without a budget the API sends no thinking, and the request carries none
    (plain,), (unsent,), _ = ask(req, policy=policy)
    assert "thinking" not in unsent and unsent["max_tokens"] == 50
    assert (plain.completions[0].text, plain.completions[0].reasoning) == ("4", None)


def test_redacted_thinking_adds_nothing_readable():
    req = GenerationRequest(messages=[user("hi")])
    policy = lambda body: thinking("Visible part.", "Hello.", redacted=True)  # noqa: E731
    (result,), _, _ = ask(req, policy=policy, thinking_budget=1024)
    assert result.completions[0].reasoning == "Visible part."
    only_redacted = lambda body: (  # noqa: E731
        200,
        {
            "content": [
                {"type": "redacted_thinking", "data": "ZW5j"},
                {"type": "text", "text": "Hello."},
            ]
        },
        {},
    )
    (result,), _, _ = ask(req, policy=only_redacted, thinking_budget=1024)
    assert (result.completions[0].text, result.completions[0].reasoning) == ("Hello.", "")


def test_a_reply_cut_while_thinking_is_an_empty_answer():
    budget = 1024
    req = GenerationRequest(messages=[user("hi")], params=SamplingParams(max_tokens=5))
    policy = lambda body: thinking("word " * (budget + 10), "Too late.")  # noqa: E731
    (result,), _, _ = ask(req, policy=policy, thinking_budget=budget)
    (got,) = result.completions
    assert (got.text, got.finish_reason) == ("", "length")
    assert (
        got.reasoning == " ".join(["word"] * (budget + 5)) and got.completion_tokens == budget + 5
    )


@pytest.mark.parametrize(
    ("budget", "settings", "message"),
    [
        (4096, {"prefill": True}, "cannot be combined with prefill: true"),
        (4096, {"sampling_params": True}, "cannot be combined with sampling_params: true"),
        (512, {}, "1024"),
    ],
)
def test_thinking_refuses_what_the_api_refuses_with_it_before_anything_is_sent(
    budget, settings, message
):
    with pytest.raises(ValueError, match=message):  # pydantic's ValidationError is a ValueError
        AnthropicSpec(model="m", thinking_budget=budget, **settings)
    with pytest.raises(BackendError, match=message):
        AnthropicBackend("m", base_url="http://127.0.0.1:1", thinking_budget=budget, **settings)


def test_a_prefilled_request_is_refused_with_thinking_before_sending():
    req = GenerationRequest(
        messages=[user("Rate it."), Message(role="assistant", content="Score:")],
        continue_final_message=True,
    )
    with FakeAnthropicServer() as server:
        b = backend(server, thinking_budget=1024)
        with pytest.raises(CapabilityError, match="refuses with extended thinking"):
            asyncio.run(b.generate([req]))
    assert server.requests == [] and not b.supports("prefill")


def test_thinking_budget_enters_fingerprint_and_identity_only_when_set(monkeypatch, tmp_path):
    plain, thinks = AnthropicSpec(model="m"), AnthropicSpec(model="m", thinking_budget=2048)
    assert "thinking_budget" not in plain.result_fields()
    assert thinks.result_fields()["thinking_budget"] == 2048
    assert plain.identity() != thinks.identity()
    monkeypatch.setenv(NO_KEY_ENV, "k")
    assert AnthropicBackend("m", api_key_env=NO_KEY_ENV).identity == "anthropic:api.anthropic.com:m"
    assert (
        AnthropicBackend("m", api_key_env=NO_KEY_ENV, thinking_budget=2048).identity
        == "anthropic:api.anthropic.com:m:thinking=2048"
    )
    # a recipe that asks for both is refused with the model's path
    recipe = tiny_recipe(tmp_path)
    recipe["models"]["a"] = {
        "backend": "anthropic",
        "model": "m",
        "base_url": "http://127.0.0.1:1",
        "thinking_budget": 2048,
        "prefill": True,
    }
    with pytest.raises(ConfigError, match=r"models\.a.*prefill"):
        synthpref.validate(recipe)


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ({"max_tokens": 2000}, "must be greater than `thinking.budget_tokens`"),
        ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "greater than or equal to 1024"),
        ({"temperature": 0.5}, "may only be set to 1"),
        ({"top_p": 0.5}, "between 0.95 and 1"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}]},
         "must start with a thinking block"),
    ],
)  # fmt: skip
def test_the_fake_server_checks_the_thinking_parameter_as_the_api_does(change, refusal):
    body = {
        "model": "m",
        "max_tokens": 3000,
        "messages": [{"role": "user", "content": "hi"}],
        "thinking": {"type": "enabled", "budget_tokens": 2000},
    }
    server = FakeAnthropicServer()
    status, reply, _ = server.answer("/v1/messages", API_KEY, body)
    assert status == 200
    status, reply, _ = server.answer("/v1/messages", API_KEY, {**body, **change})
    assert (status, reply["error"]["type"]) == (400, "invalid_request_error")
    assert refusal in reply["error"]["message"]


def test_a_pairwise_judge_that_thinks_reads_its_verdict_from_the_answer(tmp_path, monkeypatch):
    """The judge's thinking names the other verdict; the answer's verdict decides, and the
    thinking is kept as the rationale where the verdict gives none."""
    monkeypatch.setenv("SYNTHPREF_TEST_ANTHROPIC_KEY", API_KEY)
    drafts = itertools.count()

    def policy(body):
        prompt = last_text(body)
        if "[Response A]" in prompt:
            assert body["messages"][-1]["role"] == "user"  # no prefill with thinking
            a = prompt.split("[Response A]\n", 1)[1].split("\n[End of response A]", 1)[0]
            # the decoy in the thinking always favours A; the answer favours the longer reply
            return thinking(DECOY, "Verdict: A+" if "longer" in a else "Verdict: B+")
        return text("Short." if next(drafts) % 2 else "A longer and better answer.")

    with FakeAnthropicServer(policy) as server:
        spec = {
            "backend": "anthropic",
            "base_url": server.base_url,
            "api_key_env": "SYNTHPREF_TEST_ANTHROPIC_KEY",
        }
        recipe = tiny_recipe(tmp_path, prompts=[{"id": "p1", "prompt": "Name a colour."}])
        recipe["models"] = {
            "writer": {**spec, "model": "claude-test-writer"},
            "judge": {**spec, "model": "claude-test-judge", "thinking_budget": 1024},
        }
        recipe["stages"] = [
            {"type": "generate", "models": ["writer"], "n": 2, "max_tokens": 32},
            {"type": "pairwise_judge", "name": "verdict", "model": "judge", "max_tokens": 64},
            {"type": "pairs", "judge": "verdict"},
        ]
        assert synthpref.validate(recipe) == []
        result = synthpref.run(write_recipe(tmp_path, recipe), progress=False)
    judge_calls = [b for _, b in server.requests if b["model"] == "claude-test-judge"]
    assert len(judge_calls) == 2
    assert all(b["thinking"]["budget_tokens"] == 1024 for b in judge_calls)
    (row,) = [json.loads(line) for line in (result.run_dir / "data" / "preference.jsonl").open()]
    assert row["chosen"][-1]["content"] == "A longer and better answer."
    assert row["rejected"][-1]["content"] == "Short."
    (record,) = pq.read_table(result.run_dir / "data" / "records.parquet").to_pylist()
    (judgment,) = record["judgments"]
    assert judgment["status"] == "ok"
    assert DECOY in judgment["rationale"]  # the thinking, kept: the verdict gave no reasoning
    assert DECOY not in judgment["raw"]  # what was parsed: the answers only


def test_sampling_params_are_part_of_the_identity():
    """Whether temperature and top_p are sent changes the replies: cached results of one setting
    must never answer the other."""
    from synthpref.backends.anthropic_backend import AnthropicBackend

    plain = AnthropicBackend("claude-haiku-4-5", api_key="k")
    sampled = AnthropicBackend("claude-haiku-4-5", api_key="k", sampling_params=True)
    assert plain.identity != sampled.identity
