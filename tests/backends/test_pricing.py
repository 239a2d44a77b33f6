"""What a model's tokens cost: the shipped price table, which spec gets which price, and the dollars
the client computes from what the provider billed (by hand here, to the cent's fraction)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import ClassVar

import pytest

import synthpref
from synthpref.backends.anthropic_backend import AnthropicBackend, AnthropicSpec
from synthpref.backends.base import Backend, Capability, OnGenerated
from synthpref.backends.builtin import EmbeddedSpec
from synthpref.backends.client import ModelClient
from synthpref.backends.openai_backend import OpenAIBackend, OpenAISpec
from synthpref.backends.pricing import Price, shipped_price, shipped_table
from synthpref.backends.types import (
    Completion,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Usage,
)
from synthpref.records import Message
from tests.conftest import tiny_recipe
from tests.fake_anthropic_server import API_KEY, FakeAnthropicServer, text
from tests.fake_openai_server import FakeServer, chat_reply

PRICE = Price(input=2.5, cached_input=1.25, output=10)


def table(provider: str, name: str) -> Price:
    return Price(**shipped_table()[provider][name])


# --- the shipped table -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "model", "listed"),
    [
        ("openai", "gpt-4o", "gpt-4o"),
        ("openai", "gpt-4o-2024-08-06", "gpt-4o"),  # a dated snapshot
        ("openai", "gpt-4o-mini", "gpt-4o-mini"),  # the longest listed name, not gpt-4o
        ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai", "gpt-5-nano-2025-08-07", "gpt-5-nano"),
        ("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("anthropic", "claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("anthropic", "claude-opus-4-1-20250805", "claude-opus-4-1"),
    ],
)
def test_a_model_takes_the_price_of_the_longest_listed_name_it_starts_with(provider, model, listed):
    assert shipped_price(provider, model) == table(provider, listed)


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "my-finetune"),
        ("openai", "gpt-4omni"),  # a listed name followed by anything but "-" is another model
        ("openai", "claude-sonnet-4-5"),  # another provider's model
        ("anthropic", "claude-9"),
        ("nobody", "gpt-4o"),
    ],
)
def test_a_model_the_table_does_not_list_has_no_price(provider, model):
    assert shipped_price(provider, model) is None


def test_the_table_carries_its_date_and_valid_prices():
    assert shipped_table()["as_of"]
    for provider in ("openai", "anthropic"):
        for name in shipped_table()[provider]:
            assert table(provider, name).output > 0


# --- which spec gets which price ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (OpenAISpec(model="gpt-4o-2024-08-06"), table("openai", "gpt-4o")),
        (OpenAISpec(model="gpt-4o", base_url="https://api.openai.com/v1/"), table("openai", "gpt-4o")),
        (OpenAISpec(model="gpt-4o", base_url="http://127.0.0.1:8000/v1"), None),  # self-hosted
        (OpenAISpec(model="gpt-4o", base_url="http://127.0.0.1:8000/v1", price=PRICE), PRICE),
        (OpenAISpec(model="gpt-4o", price=PRICE), PRICE),  # the spec's price wins
        (OpenAISpec(model="my-finetune"), None),  # hosted, not in the table
        (AnthropicSpec(model="claude-haiku-4-5"), table("anthropic", "claude-haiku-4-5")),
        (AnthropicSpec(model="claude-haiku-4-5", base_url="https://api.anthropic.com"),
         table("anthropic", "claude-haiku-4-5")),
        (AnthropicSpec(model="claude-haiku-4-5", base_url="http://gateway.example"), None),
        (AnthropicSpec(model="claude-haiku-4-5", price=PRICE), PRICE),
        (AnthropicSpec(model="claude-unlisted"), None),
        (EmbeddedSpec(), None),
        (EmbeddedSpec(price=PRICE), PRICE),
    ],
)  # fmt: skip
def test_effective_price(spec, expected):
    assert spec.effective_price() == expected


def test_a_hosted_model_without_a_price_validates(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHPREF_TEST_PRICE_KEY", "k")
    recipe = tiny_recipe(tmp_path)
    for name, backend, model in (("a", "openai", "my-finetune"), ("b", "anthropic", "claude-x")):
        recipe["models"][name] = {
            "backend": backend,
            "model": model,
            "api_key_env": "SYNTHPREF_TEST_PRICE_KEY",
        }
    warnings = synthpref.validate(recipe)  # does not fail for want of a price
    assert not [w for w in warnings if w.startswith("models.")]


# --- dollars through the client ----------------------------------------------------------------


class _Billed(Backend):
    """Answers every request with one completion billed as ``usage`` says."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({"generate"})

    def __init__(self, usage: Usage | None) -> None:
        self.usage = usage

    @property
    def identity(self) -> str:
        return "billed-double"

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        out = []
        for i, _ in enumerate(requests):
            completion = Completion(text="ok", finish_reason="stop", completion_tokens=40)
            result = GenerationResult(completions=[completion], prompt_tokens=300, usage=self.usage)
            if on_result:
                on_result(i, result)
            out.append(result)
        return out


def _requests(*texts: str) -> list[GenerationRequest]:
    return [GenerationRequest(messages=[Message(role="user", content=t)]) for t in texts]


def _spend(spec, backend: Backend, requests: list[GenerationRequest]) -> tuple[ModelClient, list]:
    costs: list[float] = []
    client = ModelClient("m", spec, backend, None, on_cost=costs.append)
    asyncio.run(client.generate(requests))
    return client, costs


@pytest.mark.parametrize(("batch", "dollars"), [(False, 0.01), (True, 0.005)])
def test_dollars_are_the_billed_tokens_at_the_specs_rates(batch, dollars):
    usage = Usage(input_tokens=1000, cached_input_tokens=2000, output_tokens=500, batch=batch)
    # 1000 x $2.50 + 2000 x $1.25 + 500 x $10, per million tokens; a batch job pays half
    client, costs = _spend(OpenAISpec(model="m", price=PRICE), _Billed(usage), _requests("a", "b"))
    assert costs == [dollars, dollars]
    assert client.spend.dollars == pytest.approx(2 * dollars, rel=1e-12)
    assert client.spend.cached_input_tokens == 4000 and client.spend.batch_calls == 2 * batch


def test_without_usage_the_token_counts_are_billed_as_uncached_input_and_output():
    client, costs = _spend(OpenAISpec(model="m", price=PRICE), _Billed(None), _requests("a"))
    assert costs == [(300 * 2.5 + 40 * 10) / 1e6]
    assert (client.spend.input_tokens, client.spend.output_tokens) == (300, 40)


def test_a_model_without_a_price_costs_nothing_but_its_tokens_are_counted():
    usage = Usage(input_tokens=10, output_tokens=5)
    spec = OpenAISpec(model="gpt-4o", base_url="http://127.0.0.1:1/v1")  # self-hosted
    client, costs = _spend(spec, _Billed(usage), _requests("a"))
    assert client.price is None and costs == [] and client.spend.dollars == 0.0
    assert client.spend.input_tokens == 10 and client.spend.output_tokens == 5


def test_openai_dollars_from_the_servers_usage_with_cached_tokens():
    reply = chat_reply(["x"], prompt_tokens=1200, cached_tokens=1024, completion_tokens=80)
    with FakeServer(lambda path, body: reply) as server:
        spec = OpenAISpec(model="gpt-4o", base_url=server.base_url, price=PRICE)
        backend = OpenAIBackend("gpt-4o", base_url=server.base_url, retry_initial_wait=0.01)
        client, costs = _spend(spec, backend, _requests("hi"))
    assert costs == [(176 * 2.5 + 1024 * 1.25 + 80 * 10) / 1e6]
    assert (client.spend.input_tokens, client.spend.cached_input_tokens) == (176, 1024)


def test_anthropic_dollars_count_cache_writes_and_reads_at_their_rates():
    price = Price(input=3.0, cached_input=0.3, cache_write=3.75, output=15.0)
    system = Message(role="system", content="Judge carefully. " * 300)
    req = GenerationRequest(
        messages=[system, Message(role="user", content="hi")], params=SamplingParams(n=2)
    )
    with FakeAnthropicServer(lambda body: text("Fine."), latency=0.1) as server:
        spec = AnthropicSpec(model="claude-x", base_url=server.base_url, price=price)
        backend = AnthropicBackend("claude-x", base_url=server.base_url, api_key=API_KEY)
        client, costs = _spend(spec, backend, [req])
    # the fake API's tokens: one per four characters. The prompt is long and sent twice, so the
    # backend marks it whole (system prompt and "hi"): the first sample writes it to the cache, the
    # second reads it; nothing is left at the plain input rate
    prefix = -(-len(system.content) // 4) + 1
    expected = (prefix * 3.75 + prefix * 0.3 + 2 * 1 * 15.0) / 1e6
    assert costs == [pytest.approx(expected, rel=1e-12)]
    assert client.spend.cache_write_tokens == prefix and client.spend.cached_input_tokens == prefix
