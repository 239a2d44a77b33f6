"""Servers that differ from OpenAI, and rate limits: ``Retry-After``, client-side request and token
caps, and a server that rejects ``n > 1``. Against the scripted server of ``fake_openai_server``
(real sockets and the ``openai`` SDK), and the rate limiter on a fake clock."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from types import SimpleNamespace

import httpx
import pytest

from synthpref.backends.base import BackendError, TransientBackendError
from synthpref.backends.openai_backend import OpenAIBackend, OpenAISpec, rejects_n, retry_after
from synthpref.backends.rate_limit import RateLimiter
from synthpref.backends.types import GenerationRequest, SamplingParams
from synthpref.backends.window import AIMDWindow, AsyncWindow
from synthpref.records import Message
from tests.fake_openai_server import FakeServer, chat_reply, error, ok, with_headers


def user(text: str) -> Message:
    return Message(role="user", content=text)


def ask(text: str = "hi", **params) -> GenerationRequest:
    return GenerationRequest(messages=[user(text)], params=SamplingParams(**params))


def scripted(server: FakeServer, **kwargs) -> OpenAIBackend:
    return OpenAIBackend("m", base_url=server.base_url, retry_initial_wait=0.01, **kwargs)


def first_then_ok(*replies):
    """A behaviour answering ``replies`` in turn, then ``ok`` for good."""
    queue = iter(replies)
    return lambda path, body: next(queue, None) or ok(path, body)


# --- Retry-After --------------------------------------------------------------------------------


def test_a_429_retry_waits_at_least_retry_after_and_shrinks_the_window():
    behaviour = first_then_ok(with_headers(error(429, "slow down"), retry_after="1"))
    with FakeServer(behaviour) as server:
        backend = scripted(server, max_retries=2)
        (result,) = asyncio.run(backend.generate([ask()]))
    assert result.completions[0].text.startswith("Rating: 4")
    assert len(server.requests) == 2 and backend.retries == 1
    # the back-off alone (retry_initial_wait=0.01) would have retried within ~0.03 s
    assert server.received[1] - server.received[0] >= 1.0
    assert backend.window.shrinks["error"] == 1 and backend.window.size < 256


def test_retry_after_ms_on_a_503_is_honoured():
    behaviour = first_then_ok(with_headers(error(503, "loading"), retry_after_ms="400"))
    with FakeServer(behaviour) as server:
        backend = scripted(server, max_retries=1)
        asyncio.run(backend.generate([ask()]))
    assert server.received[1] - server.received[0] >= 0.4


def test_retry_after_holds_requests_not_yet_sent():
    # One place in flight: the second request is sent only after the first was told to wait 1 s,
    # and waits that second too instead of going out straight into the rate limit.
    behaviour = first_then_ok(with_headers(error(429, "slow down"), retry_after="1"))
    with FakeServer(behaviour) as server:
        backend = scripted(server, max_retries=1, max_concurrency=1, adaptive_concurrency=False)
        asyncio.run(backend.generate([ask("a"), ask("b")]))
    first, second = server.received[0], server.received[1]
    assert [body["messages"][0]["content"] for _, body in server.requests][:2] == ["a", "b"]
    assert second - first >= 1.0
    assert backend.limiter.waited >= 0.9


def test_a_retry_after_longer_than_the_backend_waits_fails_at_once_as_transient():
    behaviour = first_then_ok(with_headers(error(429, "daily quota"), retry_after="3600"))
    with FakeServer(behaviour) as server:
        backend = scripted(server, max_retries=5, retry_after_max=30)
        with pytest.raises(TransientBackendError, match=r"asked to wait 3600s.*run again later"):
            asyncio.run(backend.generate([ask()]))
    assert len(server.requests) == 1 and backend.retries == 0


def _failed(headers: dict[str, str]) -> SimpleNamespace:
    return SimpleNamespace(response=SimpleNamespace(headers=httpx.Headers(headers)))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer one wins
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
        ({"Retry-After": "-4"}, 0.0),
        ({"Retry-After": format_datetime(datetime(2000, 1, 1, tzinfo=timezone.utc), True)}, 0.0),
        ({"Retry-After": "whenever"}, None),
        ({"Retry-After": "nan"}, None),
        ({}, None),
    ],
)
def test_retry_after_parsing(headers, expected):
    assert retry_after(_failed(headers)) == expected


def test_retry_after_as_an_http_date():
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    told = retry_after(_failed({"Retry-After": format_datetime(when, usegmt=True)}))
    assert told is not None and 28 <= told <= 30  # the date has whole seconds
    assert retry_after(ValueError("no response")) is None


# --- request and token caps ---------------------------------------------------------------------


def test_requests_per_minute_spread_the_sends():
    with FakeServer() as server:
        backend = scripted(server, requests_per_minute=600)
        start = time.monotonic()
        results = asyncio.run(backend.generate([ask(str(k)) for k in range(20)]))
    assert len(results) == 20 and len(server.requests) == 20
    # 600 per minute: one every 0.1 s, the first at once, so the last is sent 1.9 s or more after
    # the call began. Measured from the call, not from the first arrival, which a new connection
    # may delay (that once left 1.846 s between the first and last arrivals).
    assert max(server.received) - start >= 1.9
    gaps = [b - a for a, b in itertools.pairwise(sorted(server.received))]
    assert sum(gap >= 0.05 for gap in gaps) >= 10, f"sends bunched, not spread: {gaps}"
    # the wait for the cap is not the server's latency: the window never shrank for it
    assert not backend.window.shrinks


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_limiter_spaces_requests_and_tokens_without_a_burst():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=6000, clock=clock)
    # one request a second; a 200-token request holds the token budget for 2 s
    assert [limiter.reserve(tokens=t) for t in (200, 10, 10, 50)] == [0.0, 2.0, 3.0, 4.0]
    clock.now += (
        10  # idle time is not saved up: the next request goes at once, the one after 1 s on
    )
    assert limiter.reserve(10) == 0.0 and limiter.reserve(10) == 1.0


def test_the_limiter_sleeps_in_arrival_order_and_honours_pauses():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=120, clock=clock, sleep=clock.sleep)

    async def main() -> None:
        await limiter.acquire()
        await limiter.acquire()
        limiter.pause(5)
        await limiter.acquire()

    asyncio.run(main())
    assert clock.slept == [0.5, 5.0] and limiter.waited == 5.5
    # no caps: nothing waits unless a server asked
    free = RateLimiter(clock=clock, sleep=clock.sleep)
    assert [free.reserve(10**9) for _ in range(3)] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="requests_per_minute"):
        RateLimiter(requests_per_minute=0)


def test_token_estimate_is_prompt_characters_over_4_plus_max_tokens_per_sample():
    backend = OpenAIBackend("m", base_url="http://127.0.0.1:1/v1", tokens_per_minute=10_000)
    req = GenerationRequest(
        messages=[Message(role="system", content="x" * 10), user("y" * 7)],
        params=SamplingParams(n=3, max_tokens=100),
    )
    assert backend._token_estimate(req) == 5 + 300  # ceil(17 / 4) + 3 * 100
    assert OpenAIBackend("m", base_url="http://127.0.0.1:1/v1")._token_estimate(req) == 0


def test_the_window_starts_its_latency_clock_after_the_ready_wait():
    clock = FakeClock()
    gate = AsyncWindow(AIMDWindow(maximum=4), clock=clock)

    async def main() -> None:
        async with gate.slot("k", ready=lambda: clock.sleep(30)):
            clock.now += 2

    asyncio.run(main())
    assert gate.window.baseline("k") == 2.0 and gate.window.in_flight == 0


def test_rate_caps_are_volatile_and_supports_n_enters_fingerprints_only_when_set():
    base = OpenAISpec(model="m", base_url="http://x/v1")
    capped = OpenAISpec(
        model="m", base_url="http://x/v1", requests_per_minute=500, tokens_per_minute=2e5
    )
    assert capped.fingerprint() == base.fingerprint()
    assert "supports_n" not in base.fingerprint()
    assert OpenAISpec(model="m", supports_n=False).fingerprint()["supports_n"] is False
    backend = capped.build()
    assert backend.limiter.requests_per_minute == 500 and backend.supports_n is None
    with pytest.raises(ValueError, match="greater than 0"):
        OpenAISpec(model="m", tokens_per_minute=0)


# --- a server that rejects n > 1 ----------------------------------------------------------------


def rejecting_n(param: str | None = "n", message: str = "n must be 1"):
    """A server that answers 400 to n > 1 and otherwise one completion naming its seed."""

    def behaviour(path: str, body: dict) -> tuple:
        if body.get("n", 1) > 1:
            return error(400, message, param=param)
        return chat_reply([f"seed={body.get('seed')}"])

    return behaviour


def test_rejected_n_is_split_into_single_requests_with_seed_plus_k_and_remembered():
    with FakeServer(rejecting_n()) as server:
        backend = scripted(server)
        (result,) = asyncio.run(backend.generate([ask(n=3, seed=7)]))
        assert [c.text for c in result.completions] == ["seed=7", "seed=8", "seed=9"]
        assert [b["n"] for _, b in server.requests] == [3, 1, 1, 1]
        assert sorted(b["seed"] for _, b in server.requests[1:]) == [7, 8, 9]
        assert backend.supports_n is False and backend.retries == 0

        # later calls split without asking again
        del server.requests[:]
        results = asyncio.run(backend.generate([ask("a", n=2, seed=0), ask("b", n=2, seed=5)]))
    assert [[c.text for c in r.completions] for r in results] == [
        ["seed=0", "seed=1"],
        ["seed=5", "seed=6"],
    ]
    assert [b["n"] for _, b in server.requests] == [1, 1, 1, 1]


def test_only_one_request_finds_out_while_support_for_n_is_unknown():
    with FakeServer(rejecting_n()) as server:
        backend = scripted(server)
        results = asyncio.run(backend.generate([ask(str(k), n=2, seed=k) for k in range(6)]))
    assert [[c.text for c in r.completions] for r in results] == [
        [f"seed={k}", f"seed={k + 1}"] for k in range(6)
    ]
    assert sum(b["n"] > 1 for _, b in server.requests) == 1 and len(server.requests) == 13


def test_no_seed_stays_no_seed_when_split():
    with FakeServer(rejecting_n()) as server:
        backend = scripted(server, supports_n=False)
        (result,) = asyncio.run(backend.generate([ask(n=2, seed=None)]))
    assert [c.text for c in result.completions] == ["seed=None", "seed=None"]
    assert [b["n"] for _, b in server.requests] == [1, 1]  # false: never asked with n > 1
    assert all("seed" not in b for _, b in server.requests)


def test_a_server_that_takes_n_is_asked_once_per_request():
    def takes_n(path, body):
        return chat_reply([f"sample {k}" for k in range(body.get("n", 1))])

    with FakeServer(takes_n) as server:
        backend = scripted(server)
        results = asyncio.run(backend.generate([ask("a", n=2), ask("b", n=3), ask("c")]))
    assert [len(r.completions) for r in results] == [2, 3, 1]
    # the first n > 1 request was probed once, with a one-token copy of itself
    (at,) = [k for k, (_, b) in enumerate(server.requests) if b["max_completion_tokens"] == 1]
    probe, rest = server.requests[at], server.requests[:at] + server.requests[at + 1 :]
    assert probe[1]["n"] == 2 and server.gets == ["/v1/models"]  # it lists no models: probed
    assert all(b["n"] == 1 for _, b in server.requests[:at])  # the other n > 1 waited for it
    assert sorted(b["n"] for _, b in rest) == [1, 2, 3]
    assert all(b["max_completion_tokens"] > 1 for _, b in rest)
    assert backend.supports_n is True


def vllm_card(model: str, owned_by: str = "vllm") -> dict:
    """A model entry of vLLM's /v1/models (``owned_by`` and ``max_model_len`` are vLLM's)."""
    return {"id": model, "object": "model", "owned_by": owned_by, "max_model_len": 2048}


@pytest.mark.parametrize(("owned_by", "probes"), [("vllm", 0), ("someone-else", 1)])
def test_a_model_that_vllm_serves_is_not_probed_for_n(owned_by, probes):
    """vLLM takes n > 1, and its /v1/models says it serves the model: no one-token probe is sent
    (the server would count it as work, and every other request would wait for its prefill)."""

    def takes_n(path, body):
        return chat_reply([f"sample {k}" for k in range(body.get("n", 1))])

    with FakeServer(takes_n, models=[vllm_card("other"), vllm_card("m", owned_by)]) as server:
        backend = scripted(server)
        results = asyncio.run(backend.generate([ask(str(k), n=2) for k in range(4)]))
    assert [len(r.completions) for r in results] == [2, 2, 2, 2]
    sizes = [b["max_completion_tokens"] for _, b in server.requests]
    assert sizes.count(1) == probes and len(sizes) == 4 + probes
    assert server.gets == ["/v1/models"] and backend.supports_n is True


def test_the_probe_asks_for_one_token_and_its_usage_is_billed():
    """The probe is a one-token copy of the first n > 1 request, so the requests waiting on it are
    held back for a prefill, not for a whole reply; what the server billed for it is added to that
    request's usage."""

    def takes_n(path, body):
        return chat_reply([f"s{k}" for k in range(body.get("n", 1))])  # 10 prompt tokens each

    with FakeServer(takes_n) as server:
        backend = scripted(server)
        results = asyncio.run(backend.generate([ask(str(k), n=2) for k in range(3)]))
    sizes = [b["max_completion_tokens"] for _, b in server.requests]
    assert sizes[0] == 1 and sizes.count(1) == 1 and len(sizes) == 4
    assert sorted(r.usage.input_tokens for r in results) == [10, 10, 20]
    assert sorted(r.usage.output_tokens for r in results) == [2, 2, 4]


def test_without_a_param_the_message_is_read_but_a_param_always_decides():
    # no param: the wording is all there is
    with FakeServer(rejecting_n(param=None, message="n: must be exactly 1")) as server:
        (result,) = asyncio.run(scripted(server).generate([ask(n=2, seed=3)]))
    assert [c.text for c in result.completions] == ["seed=3", "seed=4"]
    # a param that is not n: not a rejection of n, whatever the message says
    with FakeServer(rejecting_n(param="temperature", message="n must be 1")) as server:
        backend = scripted(server)
        with pytest.raises(BackendError, match="HTTP 400"):
            asyncio.run(backend.generate([ask(n=2)]))
    assert len(server.requests) == 1 and backend.supports_n is None


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("n: must be exactly 1", True),
        ("'n' must be 1", True),
        ("Only n=1 is supported", True),
        ("n > 1 is not supported for this model", True),
        ("messages: can't be empty", False),
        ("invalid value for top_n", False),
        ("max_tokens is too large", False),
    ],
)
def test_reading_a_rejection_of_n_from_a_message(message, expected):
    from openai import BadRequestError

    def bad_request(param):
        body = {"message": message, "type": "invalid_request_error", "param": param}
        response = httpx.Response(
            400, request=httpx.Request("POST", "http://x/v1/chat/completions")
        )
        return BadRequestError(message, response=response, body=body)

    assert rejects_n(bad_request(None)) is expected
    assert rejects_n(bad_request("n")) is True
    assert rejects_n(bad_request("messages")) is False
