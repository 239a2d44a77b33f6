"""The spending cap's mechanism: bookings before sending, settlement after, and the ceilings a
request books (its prompt at the top input rate, every sample's max_tokens, a thinking budget)."""

from __future__ import annotations

import asyncio

import pytest

from synthpref.backends.anthropic_backend import AnthropicSpec
from synthpref.backends.client import ModelClient
from synthpref.backends.cost import BudgetExceeded, CostMeter
from synthpref.backends.pricing import Price
from synthpref.backends.types import GenerationRequest, SamplingParams, Usage
from synthpref.records import Message
from tests.judge_doubles import ScriptedBackend


def test_bookings_are_refused_past_the_cap_and_settled_to_what_was_billed():
    meter = CostMeter(cap=1.0, spent_before=0.25)
    assert meter.book(0.5)
    assert not meter.book(0.3)  # 0.25 spent + 0.5 booked + 0.3 > 1.0
    meter.settle(0.5, 0.1)
    assert meter.total == pytest.approx(0.35) and meter.booked == 0
    assert meter.book(0.6) and meter.held_back == 1


def test_price_ceiling_takes_the_highest_prompt_rate_and_the_batch_discount():
    price = Price(input=1.0, cached_input=0.1, cache_write=1.25, output=4.0)
    assert price.ceiling(1000, 100) == pytest.approx((1000 * 1.25 + 100 * 4.0) / 1e6)
    assert price.ceiling(1000, 100, batch=True) == pytest.approx(price.ceiling(1000, 100) / 2)
    usage = Usage(input_tokens=10, cached_input_tokens=100, cache_write_tokens=20, output_tokens=5)
    assert price.cost(usage) == pytest.approx((10 * 1.0 + 100 * 0.1 + 20 * 1.25 + 5 * 4.0) / 1e6)


def request(max_tokens: int, n: int = 1) -> GenerationRequest:
    return GenerationRequest(
        messages=[Message(role="user", content="x" * 30)],
        params=SamplingParams(max_tokens=max_tokens, n=n),
    )


def capped_client(spec, cap: float) -> tuple[ModelClient, ScriptedBackend]:
    backend = ScriptedBackend("always_a")
    return ModelClient("m", spec, backend, None, meter=CostMeter(cap)), backend


def test_a_thinking_budget_is_booked_on_top_of_max_tokens():
    """With a thinking budget the API may bill budget + max_tokens output tokens per sample."""
    price = {"input": 0.0, "output": 1e6}  # a dollar per output token
    plain = AnthropicSpec(model="claude-x", price=price)
    thinking = AnthropicSpec(model="claude-x", price=price, thinking_budget=1024)
    client, backend = capped_client(plain, cap=200.0)
    asyncio.run(client.generate([request(100)]))
    assert len(backend.requests) == 1
    client, backend = capped_client(thinking, cap=200.0)
    with pytest.raises(BudgetExceeded, match=r"up to \$1124"):
        asyncio.run(client.generate([request(100)]))
    assert backend.requests == []


def test_requests_that_fit_are_sent_before_the_cap_stops_the_call(tmp_path):
    """Each miss books its ceiling in order (100, 100, then 10 x 5 samples = 50 output dollars):
    under a $240 cap the third does not fit, so the first two are sent and cached, then the call
    stops; with the cap raised, a rerun sends only the third."""
    from synthpref.cache import RequestCache

    price = {"input": 0.0, "output": 1e6}
    spec = AnthropicSpec(model="claude-x", price=price)
    cache = RequestCache(tmp_path / "cache.sqlite")
    backend = ScriptedBackend("always_a")
    reqs = [request(100), request(101), request(10, n=5)]
    client = ModelClient("m", spec, backend, cache, meter=CostMeter(240.0))
    with pytest.raises(BudgetExceeded, match="1 more call"):
        asyncio.run(client.generate(reqs))
    assert [r.params.max_tokens for r in backend.requests] == [100, 101]
    billed = cache.spent()
    assert 0 < billed <= 240.0
    client = ModelClient("m", spec, backend, cache, meter=CostMeter(1000.0, spent_before=billed))
    asyncio.run(client.generate(reqs))
    assert [r.params.max_tokens for r in backend.requests] == [100, 101, 10]
