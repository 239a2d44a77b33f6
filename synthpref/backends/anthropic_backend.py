"""Native Anthropic backend: Claude through the Messages API and the official ``anthropic`` SDK.

Generation only: the Messages API returns no log-probabilities (no ``score``, no ``top_logprobs``)
and no JSON-schema mode (tool use could emulate one; not done).

Two things depend on the model generation, so the spec says them rather than guessing from the
model's name: Claude models up to 4.5 continue a final assistant message (judges then pre-fill their
verdict) and take ``temperature``/``top_p``; from Claude 4.6 on, a pre-filled reply is refused with
HTTP 400, and from Opus 4.7 on so is ``temperature`` (the ``anthropic`` SDK 2.x no longer names
either sampling parameter). Both are off by default, which works with every model: ``prefill: true``
turns the ``prefill`` capability on, ``sampling_params: true`` sends the requests' temperature and
top_p (in the request body, past the SDK's named arguments).

How our requests map onto the Messages API:

- a leading system message becomes ``system``; a system message anywhere else is refused for that
  request (the API has no such role);
- a final assistant message with ``continue_final_message`` is the prefill; the text returned is the
  continuation only, as every backend returns it. The API rejects a prefill that ends in whitespace,
  so that whitespace is not sent and the continuation's leading whitespace is dropped instead
  (``"Score: "`` + ``"5"``, never ``"Score: "`` + ``" 5"``);
- ``stop`` -> ``stop_sequences``; with ``sampling_params``, ``temperature`` (which must lie within
  the API's 0..1) and ``top_p`` only when it is not 1 (models refuse the two together);
- ``n > 1`` -> n independent calls. The API has neither ``n`` nor ``seed``: **sampling on Anthropic
  is not reproducible**, not even at temperature 0. What makes a rerun stable is the request cache,
  which answers every request that completed before from ``cache.sqlite``;
- ``stop_reason`` -> ``finish_reason``: ``end_turn``/``stop_sequence`` -> ``stop``, ``max_tokens``
  (and ``model_context_window_exceeded``) -> ``length``, anything else (``refusal``) as given.

Prompt caching (``prompt_caching: true``, the default): the system prompt is marked
``cache_control: {"type": "ephemeral"}``, and so is the first user message when it is long (about
1024 tokens or more, estimated from its length) and the batch sends it more than once (``n > 1``, or
requests that share it). A cache entry exists only once the first request that writes it is
answered, so among the requests of one batch that share a long marked prefix, the first is sent
alone and the others wait for it: they then read the prefix at a tenth of the input price instead
of each writing it at 1.25 times. Requests whose first user messages only *begin* alike (a judge's
fixed instructions, which the shipped templates put first, then each record's content) get that
message split into two text blocks with the breakpoint after the shared start.

Usage: each result's ``GenerationResult.usage`` is what the API billed, its four numbers summed over
the request's ``n`` calls: ``input_tokens`` (uncached), ``cache_read_input_tokens`` ->
``cached_input_tokens``, ``cache_creation_input_tokens`` -> ``cache_write_tokens`` and
``output_tokens`` (thinking included). ``GenerationResult.prompt_tokens`` is the prompt's length once
(uncached, written and read together, from the first call) and the backend's ``usage`` counter keeps
the API's four numbers summed over every call. On the Anthropic API itself a model's price comes from
the shipped table unless its spec names one (:meth:`AnthropicSpec.effective_price`); a gateway
(``base_url``) costs nothing unless its spec names a price.

Extended thinking (``thinking_budget: N``, at least 1024): every request is sent with
``thinking: {"type": "enabled", "budget_tokens": N}`` and ``max_tokens`` = N + the request's
``max_tokens`` (the API counts thinking within ``max_tokens`` and requires it above the budget, so the
request's own limit is what is left for the answer once the budget is spent). ``thinking`` blocks
become ``Completion.reasoning`` (their text joined in order, blank-line separated) and ``text``
blocks the answer, so judges parse verdicts from the answer only; ``redacted_thinking`` blocks
(encrypted by the API) add nothing readable: a reply whose thinking was all redacted has reasoning
``""``, a reply with no thinking at all ``None``. The API refuses a pre-filled reply and a
temperature or top_p other than the defaults with thinking, so ``thinking_budget`` cannot be
combined with ``prefill: true`` or ``sampling_params: true`` (refused when the spec is read).

Failures are typed as the OpenAI backend types them (:mod:`synthpref.backends.openai_backend`):
timeouts, dropped connections, 408, 429, 529 and other 5xx are retried (honouring ``retry-after``)
and then raised as :class:`TransientBackendError`; 413 and a 400 ``invalid_request_error`` are this
request's :class:`RequestError` (the API's error body carries no field naming the offending
parameter, so what this backend knows every request shares, such as the temperature's range or a
prefill the spec does not allow, is checked here before anything is sent); 401, 403, 404 and the rest are the configuration's :class:`BackendError`. The
in-flight window, the fan-out of requests and the error helpers are the OpenAI backend's own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from synthpref.backends.base import (
    Backend,
    BackendError,
    Capability,
    CapabilityError,
    OnGenerated,
    RequestError,
    TransientBackendError,
)
from synthpref.backends.openai_backend import (
    NO_KEY,
    OpenAIBackend,
    _describe,
    _preview,
    _server_message,
)
from synthpref.backends.pricing import Price, shipped_price
from synthpref.backends.rate_limit import retry_after
from synthpref.backends.specs import VOLATILE, ModelSpec, batch_mode_field, missing_api_key
from synthpref.backends.types import Completion, GenerationRequest, GenerationResult, Usage
from synthpref.backends.window import AIMDWindow, AsyncWindow, Signal

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic

log = logging.getLogger(__name__)

API_URL = "https://api.anthropic.com"

#: a marked prefix shorter than this many characters (about 1024 tokens, the smallest prefix the API
#: caches on most models) is not worth holding a batch back for
CACHE_MIN_CHARS = 4096

#: the longest ``retry-after`` obeyed, in seconds
MAX_RETRY_AFTER = 600.0

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
}

#: the smallest ``budget_tokens`` the API accepts
MIN_THINKING_BUDGET = 1024

USAGE_FIELDS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)


class AnthropicSpec(ModelSpec):
    """A Claude model through Anthropic's Messages API (or a gateway that speaks it).

    Generates (and, with ``prefill: true``, continues a pre-filled reply); cannot score text or
    return log-probabilities. Sampling is not reproducible on Anthropic (no seed): the request
    cache is what makes reruns stable.
    """

    backend_name: ClassVar[str] = "anthropic"
    backend: Literal["anthropic"] = "anthropic"
    model: str = Field(
        description="the model name, e.g. claude-sonnet-4-5-20250929 (a dated name pins the model: "
        "cached results are keyed by the name)"
    )
    base_url: str | None = Field(
        None,
        description="unset: the Anthropic API; else a proxy or gateway speaking the Messages API",
    )
    api_key_env: str = Field(
        "ANTHROPIC_API_KEY",
        description="environment variable holding the API key; with base_url set it may be unset",
        json_schema_extra=VOLATILE,
    )
    max_concurrency: int = Field(
        32,
        ge=1,
        description="most requests in flight; the adaptive window starts here and halves on 429, "
        "529, 5xx, timeouts and rising latency",
        json_schema_extra=VOLATILE,
    )
    timeout: float = Field(
        600.0, gt=0, description="seconds per HTTP request", json_schema_extra=VOLATILE
    )
    max_retries: int = Field(
        5,
        ge=0,
        description="retries of a rate-limited (429), overloaded (529), failed (5xx) or timed-out "
        "call, waiting as retry-after says, else exponentially, before the shard stops",
        json_schema_extra=VOLATILE,
    )
    mode: Literal["online", "batch"] = batch_mode_field()
    prefill: bool = Field(
        False,
        description="the model continues a final assistant message, so judges pre-fill their "
        "verdict: Claude models up to 4.5 do; from 4.6 on the API refuses it (HTTP 400)",
    )
    sampling_params: bool = Field(
        False,
        description="send each request's temperature (0..1) and top_p: models up to Claude 4.6 "
        "accept them, Opus 4.7 and later refuse them; false: the model's own defaults",
    )
    prompt_caching: bool = Field(
        True,
        description="mark the system prompt, and a long first user message sent more than once, "
        "with cache_control so the API reads them from its prompt cache (outputs are unchanged)",
        json_schema_extra=VOLATILE,
    )
    thinking_budget: int | None = Field(
        None,
        ge=MIN_THINKING_BUDGET,
        description="turn extended thinking on with this many tokens for it (at least 1024): the "
        "thinking is kept as each reply's reasoning, apart from its answer, and max_tokens is sent "
        "as the budget plus the request's max_tokens; cannot be combined with prefill or "
        "sampling_params (the API refuses both with thinking); unset: no thinking",
    )

    @model_validator(mode="after")
    def _thinking_takes_no_prefill_or_sampling(self) -> AnthropicSpec:
        problem = thinking_conflict(self.thinking_budget, self.prefill, self.sampling_params)
        if problem:
            raise ValueError(problem)
        return self

    def missing_key(self) -> str | None:
        return missing_key(self.api_key_env, self.base_url)

    def effective_price(self) -> Price | None:
        """``price``, else the shipped table's price of ``model`` on the Anthropic API itself
        (``base_url`` unset or the API's own address); a gateway costs nothing unless its spec
        names a price. None also for a model the table does not list."""
        if self.price is not None:
            return self.price
        if self.base_url is None or self.base_url.rstrip("/").removesuffix("/v1") == API_URL:
            return shipped_price("anthropic", self.model)
        return None

    def result_fields(self) -> dict[str, Any]:
        """``thinking_budget`` enters only when set, so specs without thinking keep their
        fingerprints."""
        out = super().result_fields()
        if out.get("thinking_budget") is None:
            out.pop("thinking_budget", None)
        return out

    def build(self) -> Backend:
        return AnthropicBackend(
            self.model,
            base_url=self.base_url,
            api_key_env=self.api_key_env,
            max_concurrency=self.max_concurrency,
            timeout=self.timeout,
            max_retries=self.max_retries,
            prompt_caching=self.prompt_caching,
            prefill=self.prefill,
            sampling_params=self.sampling_params,
            thinking_budget=self.thinking_budget,
        )

    def capabilities(self) -> frozenset[str]:
        return frozenset({"generate", "prefill"} if self.prefill else {"generate"})

    def display_name(self) -> str:
        return self.model


def missing_key(env: str, base_url: str | None) -> str | None:
    """The Anthropic API itself (no ``base_url``) requires a key; a gateway may not."""
    return missing_api_key("Anthropic", env, base_url, "a gateway that needs none")


def thinking_conflict(budget: int | None, prefill: bool, sampling_params: bool) -> str | None:
    """Why these settings cannot go together, or None: with extended thinking the API refuses a
    pre-filled reply, and a temperature or top_p other than their defaults."""
    if budget is None:
        return None
    if budget < MIN_THINKING_BUDGET:
        return f"thinking_budget must be at least {MIN_THINKING_BUDGET} tokens, got {budget}"
    if prefill:
        return (
            "thinking_budget cannot be combined with prefill: true: the API refuses a pre-filled "
            "reply when extended thinking is on (judges then ask without pre-filling)"
        )
    if sampling_params:
        return (
            "thinking_budget cannot be combined with sampling_params: true: the API refuses a "
            "temperature or top_p other than the defaults when extended thinking is on"
        )
    return None


class AnthropicBackend(Backend):
    """``POST /v1/messages`` per request (n per request with ``n > 1``), many in flight.

    ``retries`` counts retried attempts, ``usage`` the API's token counts summed over every call
    (cache writes and reads included), ``window`` is the in-flight controller.
    """

    #: what every instance can do; ``supports`` adds "prefill" when the spec allows it
    capabilities: ClassVar[frozenset[Capability]] = frozenset({"generate"})

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "ANTHROPIC_API_KEY",
        max_concurrency: int = 32,
        timeout: float = 600.0,
        max_retries: int = 5,
        prompt_caching: bool = True,
        prefill: bool = False,
        sampling_params: bool = False,
        thinking_budget: int | None = None,
        retry_initial_wait: float = 1.0,
        retry_max_wait: float = 60.0,
    ) -> None:
        problem = thinking_conflict(thinking_budget, prefill, sampling_params)
        if problem:
            raise BackendError(problem)
        self.thinking_budget = thinking_budget
        self.model = model
        self.base_url = base_url.rstrip("/") if base_url else None
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.prompt_caching = prompt_caching
        self.prefill = prefill
        self.sampling_params = sampling_params
        self.retry_initial_wait = retry_initial_wait
        self.retry_max_wait = retry_max_wait
        if api_key is None:
            api_key = os.environ.get(api_key_env)
        if not api_key:
            problem = missing_key(api_key_env, self.base_url)
            if problem:
                raise BackendError(problem)
            api_key = NO_KEY
        self._api_key = api_key
        self.window = AIMDWindow(maximum=max_concurrency)
        self._gate = AsyncWindow(self.window, classify=overload_signal, on_change=self._resized)
        self.retries = 0
        self.usage: Counter[str] = Counter()

    # the OpenAI backend's fan-out (report each result as it lands, cancel the rest on the first
    # failure) and window bookkeeping, shared rather than copied
    _run_all = OpenAIBackend._run_all
    _resized = OpenAIBackend._resized
    max_concurrency = OpenAIBackend.max_concurrency
    peak_in_flight = OpenAIBackend.peak_in_flight

    @property
    def where(self) -> str:
        return self.base_url or "the Anthropic API"

    @property
    def identity(self) -> str:
        """The address and the model name, as for the OpenAI backend: the weights behind a name
        cannot be seen, so pin a dated model name. A thinking budget changes every reply (and its
        ``max_tokens``), and ``sampling_params`` decides whether the requests' temperature and top_p
        are sent at all, so each is part of the identity when set. (``prefill`` is not: it only
        decides whether a pre-filled request is refused.)"""
        host = self.base_url or API_URL.removeprefix("https://")
        thinking = f":thinking={self.thinking_budget}" if self.thinking_budget else ""
        sampling = ":sampling" if self.sampling_params else ""
        return f"anthropic:{host}:{self.model}{thinking}{sampling}"

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities or (capability == "prefill" and self.prefill)

    def _client(self) -> AsyncAnthropic:
        from anthropic import AsyncAnthropic

        # One client per generate call (its connection pool belongs to the running event loop);
        # the SDK's own retries are off: _call retries, with the request index in the logs.
        return AsyncAnthropic(
            api_key=self._api_key,
            base_url=self.base_url or API_URL,
            timeout=self.timeout,
            max_retries=0,
        )

    # generation -------------------------------------------------------------------------------

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        calls = [self._message_call(i, r) for i, r in enumerate(requests)]  # refuse before sending
        if not requests:
            return []
        waits, leads = self._cache_leaders(requests, calls)
        async with self._client() as client:

            async def one(i: int) -> GenerationResult:
                kwargs, _, _ = calls[i]
                kind = f"messages:max_tokens={requests[i].params.max_tokens}"

                async def sample(k: int) -> Any:
                    if (i, k) in waits:  # another call writes the cache entry this one reads
                        await waits[i, k].wait()
                    try:
                        return await self._call(i, lambda: client.messages.create(**kwargs), kind)
                    finally:
                        if (i, k) in leads:
                            leads[i, k].set()

                replies = await asyncio.gather(*(sample(k) for k in range(requests[i].params.n)))
                return self._result(i, replies, calls[i][1])

            return await self._run_all(len(requests), one, on_result)

    def _message_call(
        self, i: int, req: GenerationRequest
    ) -> tuple[dict[str, Any], bool, tuple[str, ...] | None]:
        """(the Messages API arguments, whether the prefill lost trailing whitespace, the marked
        prefix when its first user message is marked for caching)."""
        p = req.params
        if self.sampling_params and not 0.0 <= p.temperature <= 1.0:
            raise BackendError(
                f"request {i}: the Anthropic API accepts temperature from 0 to 1, got "
                f"{p.temperature}; lower it in the stage's parameters"
            )
        if req.continue_final_message and self.thinking_budget:
            raise CapabilityError(
                f"request {i} pre-fills the reply, which the API refuses with extended thinking "
                "(thinking_budget): ask without a pre-filled reply"
            )
        if req.continue_final_message and not self.prefill:
            raise CapabilityError(
                f"request {i} pre-fills the reply, which this spec does not allow: set prefill: "
                "true for a model that continues a final assistant message (Claude up to 4.5)"
            )
        messages = list(req.messages)
        system_text = messages.pop(0).content if messages and messages[0].role == "system" else ""
        if any(m.role == "system" for m in messages):
            raise RequestError(
                f"request {i}: a system message after the first message; the Messages API takes "
                "one system prompt, before the conversation",
                index=i,
            )
        ends_with_reply = bool(messages) and messages[-1].role == "assistant"
        if req.continue_final_message != ends_with_reply:
            raise BackendError(
                f"request {i}: "
                + (
                    "asks to continue a final assistant message but ends with no assistant message"
                    if req.continue_final_message
                    else "ends with an assistant message, which the Messages API would continue; "
                    "set continue_final_message to pre-fill the reply"
                )
            )
        turns: list[dict[str, Any]] = [{"role": m.role, "content": m.content} for m in messages]
        stripped = False
        if req.continue_final_message:
            prefill = turns[-1]["content"].rstrip()
            stripped = prefill != turns[-1]["content"]
            if prefill:
                turns[-1]["content"] = prefill
            else:
                turns.pop()
        kwargs: dict[str, Any] = {
            "model": self.model,
            "max_tokens": p.max_tokens,
            "messages": turns,
        }
        if self.thinking_budget:
            # thinking counts within max_tokens, which must exceed the budget: the request's own
            # max_tokens is what is left for the answer once the budget is spent
            kwargs["thinking"] = {"type": "enabled", "budget_tokens": self.thinking_budget}
            kwargs["max_tokens"] = self.thinking_budget + p.max_tokens
        if system_text:  # an empty system prompt is left out (the API refuses empty text blocks)
            kwargs["system"] = [_cached_block(system_text)] if self.prompt_caching else system_text
        marked: tuple[str, ...] | None = None
        first = next((t for t in turns if t["role"] == "user"), None)
        if self.prompt_caching and first is not None:
            before = [t["content"] for t in turns[: turns.index(first)]]
            marked = (system_text, *before, first["content"])
        if self.sampling_params:
            # extra_body: the SDK 2.x no longer names them, older ones accept them either way
            sampling = {"temperature": p.temperature}
            if p.top_p != 1.0:
                sampling["top_p"] = p.top_p
            kwargs["extra_body"] = sampling
        if p.stop:
            kwargs["stop_sequences"] = list(p.stop)
        return kwargs, stripped, marked

    def _cache_leaders(
        self,
        requests: Sequence[GenerationRequest],
        calls: list[tuple[dict[str, Any], bool, tuple[str, ...] | None]],
    ) -> tuple[dict[tuple[int, int], asyncio.Event], dict[tuple[int, int], asyncio.Event]]:
        """Mark each long first user message the batch sends more than once, and make the calls
        that share a long marked prefix wait for the first of them (which writes the cache entry).

        Returns (the event sample k of request i waits for, the event sample k of request i sets
        once answered), both keyed by ``(i, k)``.
        """
        shared: dict[tuple[str, ...], list[tuple[int, int]]] = {}
        for i, (_, _, marked) in enumerate(calls):
            if marked is not None and sum(map(len, marked)) >= CACHE_MIN_CHARS:
                shared.setdefault(marked, []).extend((i, k) for k in range(requests[i].params.n))
        groups = {prefix: members for prefix, members in shared.items() if len(members) > 1}
        grouped = {i for members in groups.values() for i, _ in members}
        for i, (kwargs, _, _) in enumerate(calls):
            system = kwargs.get("system")
            if i not in grouped and isinstance(system, list):
                if len(system[0]["text"]) >= CACHE_MIN_CHARS:
                    members = [(i, k) for k in range(requests[i].params.n)]
                    groups.setdefault((system[0]["text"],), []).extend(members)
        waits: dict[tuple[int, int], asyncio.Event] = {}
        leads: dict[tuple[int, int], asyncio.Event] = {}
        for members in self._split_shared_starts(requests, calls, grouped):
            leads[members[0]] = asyncio.Event()
            waits.update(dict.fromkeys(members[1:], leads[members[0]]))
            grouped |= {i for i, _ in members}
        for prefix, members in groups.items():
            if len(members) < 2:
                continue
            if len(prefix) > 1:  # the first user message is worth a breakpoint of its own
                for i in {i for i, _ in members}:
                    turns = calls[i][0]["messages"]
                    first = next(t for t in turns if t["role"] == "user")
                    first["content"] = [_cached_block(first["content"])]
            leads[members[0]] = asyncio.Event()
            waits.update(dict.fromkeys(members[1:], leads[members[0]]))
        return waits, leads

    @staticmethod
    def _split_shared_starts(
        requests: Sequence[GenerationRequest],
        calls: list[tuple[dict[str, Any], bool, tuple[str, ...] | None]],
        grouped: set[int],
    ) -> list[list[tuple[int, int]]]:
        """Requests whose first user messages differ but begin with the same long text (a judge's
        fixed instructions, which the shipped templates put before the varying content): that
        message is split into two text blocks, the shared start marked ``cache_control``, so every
        request after the first reads it from the cache. The shared start is cut after its last
        newline; requests are grouped by everything before that message (system prompt, earlier
        turns). Returns the groups, as ``(i, k)`` per sample, the writer first."""
        by_head: dict[tuple[str, ...], list[int]] = {}
        for i, (_, _, marked) in enumerate(calls):
            if marked is not None and i not in grouped:
                by_head.setdefault(marked[:-1], []).append(i)
        out = []
        for head, members in by_head.items():
            if len(members) < 2:
                continue
            texts = [calls[i][2][-1] for i in members]  # type: ignore[index]
            common = os.path.commonprefix(texts)  # noqa: RUF071 (text, not paths)
            cut = common.rfind("\n") + 1
            if cut == 0 or sum(map(len, head)) + cut < CACHE_MIN_CHARS:
                continue
            for i in members:
                first = next(t for t in calls[i][0]["messages"] if t["role"] == "user")
                text = first["content"]
                blocks = [_cached_block(text[:cut])]
                if text[cut:]:
                    blocks.append({"type": "text", "text": text[cut:]})
                first["content"] = blocks
            out.append([(i, k) for i in members for k in range(requests[i].params.n)])
        return out

    def _result(self, i: int, replies: Sequence[Any], stripped: bool) -> GenerationResult:
        """One request's replies (one per sample) as a result: the text blocks are the answer, the
        thinking blocks its reasoning, and ``usage`` the API's four counts summed over the replies."""
        completions = []
        prompt_tokens = 0
        billed: Counter[str] = Counter()
        for k, reply in enumerate(replies):
            content = getattr(reply, "content", None)
            usage = getattr(reply, "usage", None)
            if not isinstance(content, list) or usage is None:
                raise BackendError(
                    f"request {i}: {self.where} answered without content or usage; got "
                    f"{_preview(reply)}"
                )
            counts = {f: int(getattr(usage, f, None) or 0) for f in USAGE_FIELDS}
            billed.update(counts)
            text = "".join(b.text for b in content if getattr(b, "type", None) == "text")
            if stripped:
                text = text.lstrip()
            stop = reply.stop_reason or "end_turn"
            completions.append(
                Completion(
                    text=text,
                    finish_reason=FINISH_REASONS.get(stop, stop),
                    completion_tokens=counts["output_tokens"],
                    reasoning=_thinking(content),
                )
            )
            if k == 0:
                prompt_tokens = sum(v for f, v in counts.items() if f != "output_tokens")
        return GenerationResult(
            completions=completions,
            prompt_tokens=prompt_tokens,
            usage=Usage(
                input_tokens=billed["input_tokens"],
                cached_input_tokens=billed["cache_read_input_tokens"],
                cache_write_tokens=billed["cache_creation_input_tokens"],
                output_tokens=billed["output_tokens"],
            ),
        )

    # batch mode -------------------------------------------------------------------------------

    def batch_provider(self):
        """The Message Batches API (``mode: batch``, :mod:`synthpref.backends.anthropic_batch`)."""
        from synthpref.backends.anthropic_batch import AnthropicBatches

        return AnthropicBatches(self)

    # plumbing ---------------------------------------------------------------------------------

    async def _call(self, i: int, send, kind: str) -> Any:
        """One Messages API call, retried on transient failures; any failure leaves typed."""
        attempt = 1
        while True:
            try:
                async with self._gate.slot(kind):  # backoff sleeps hold no place in the window
                    reply = await send()
            except Exception as exc:
                if attempt > self.max_retries or not is_transient(exc):
                    raise typed_error(exc, i, self._explain(i, exc, attempt)) from exc
                wait = self._backoff(exc, attempt)
                self.retries += 1
                log.warning(
                    "request %d to %s failed (%s), retry %d of %d in %.1fs",
                    i,
                    self.where,
                    _describe(exc),
                    attempt,
                    self.max_retries,
                    wait,
                )
                attempt += 1
                await asyncio.sleep(wait)
                continue
            usage = getattr(reply, "usage", None)
            for f in USAGE_FIELDS:
                self.usage[f] += int(getattr(usage, f, None) or 0)
            return reply

    def _backoff(self, exc: BaseException, attempt: int) -> float:
        """What the server's ``retry-after`` (or ``retry-after-ms``) says, else exponential with
        jitter so that concurrent retries spread out."""
        said = retry_after(exc)
        if said is not None:
            return min(said, MAX_RETRY_AFTER)
        base = min(self.retry_initial_wait * 2 ** (attempt - 1), self.retry_max_wait)
        return base + random.uniform(0, self.retry_initial_wait)

    def _explain(self, i: int, exc: Exception, attempts: int) -> str:
        from anthropic import APIConnectionError, APIStatusError, APITimeoutError

        tries = f" after {attempts} attempts" if attempts > 1 else ""
        if isinstance(exc, APITimeoutError):
            return (
                f"request {i} to {self.where} timed out{tries} (timeout: {self.timeout}s): raise "
                "timeout in the model spec, or lower max_tokens"
            )
        if isinstance(exc, APIConnectionError):
            return (
                f"request {i} could not reach {self.where}{tries} ({_describe(exc)}); check the "
                "network, or base_url if one is set"
            )
        if not isinstance(exc, APIStatusError):
            return f"request {i} to {self.where} failed{tries}: {_describe(exc)}"
        status = exc.status_code
        kind = f" {error_type(exc)}" if error_type(exc) else ""
        text = f"request {i} failed{tries}: {self.where} answered HTTP {status}{kind}: "
        text += _server_message(exc).rstrip(". ")
        hints = {
            400: "; with prefill: true or sampling_params: true, check that the model takes them "
            "(Claude 4.6 and later refuse a prefill, Opus 4.7 and later temperature)"
            if self.prefill or self.sampling_params
            else "",
            401: f"; check the API key in ${self.api_key_env}",
            403: f"; the key in ${self.api_key_env} may not use {self.model!r}",
            404: f"; is {self.model!r} a model name the API knows? (see its /v1/models)",
            429: "; lower max_concurrency or raise max_retries (the rate limit is per minute)",
            529: "; the API is overloaded: a rerun resumes where this one stopped",
        }
        return text + hints.get(status, "")


def _thinking(content: Sequence[Any]) -> str | None:
    """The reply's reasoning: its ``thinking`` blocks' text, in order, blank-line separated.
    ``redacted_thinking`` blocks (encrypted) add nothing readable, so a reply whose thinking was
    all redacted gives ``""``; a reply without thinking blocks gives None."""
    blocks = [b for b in content if getattr(b, "type", None) in ("thinking", "redacted_thinking")]
    if not blocks:
        return None
    return "\n\n".join(
        b.thinking for b in blocks if b.type == "thinking" and getattr(b, "thinking", None)
    )


def _cached_block(text: str) -> dict[str, Any]:
    """A text content block that ends a cached prefix (``TextBlockParam`` with ``cache_control``)."""
    return {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}


def is_transient(exc: BaseException) -> bool:
    """Worth another try: timeouts, lost connections, 408, 429, 529 (overloaded) and other 5xx."""
    from anthropic import APIConnectionError, APIStatusError

    if isinstance(exc, APIConnectionError):  # includes APITimeoutError
        return True
    return isinstance(exc, APIStatusError) and (
        exc.status_code in (408, 429) or exc.status_code >= 500
    )


def typed_error(exc: BaseException, i: int, message: str) -> BackendError:
    """Transient (see :func:`is_transient`); this request's (413, or a 400 whose error type is
    ``invalid_request_error``: an over-long prompt, an empty message); else the configuration's."""
    from anthropic import APIStatusError

    if is_transient(exc):
        return TransientBackendError(message)
    if isinstance(exc, APIStatusError) and (
        exc.status_code == 413
        or (exc.status_code == 400 and error_type(exc) == "invalid_request_error")
    ):
        return RequestError(message, index=i)
    return BackendError(message)


def error_type(exc: BaseException) -> str | None:
    """The error body's ``error.type`` (``invalid_request_error``, ``overloaded_error``...)."""
    body = getattr(exc, "body", None)
    err = body.get("error") if isinstance(body, dict) else None
    kind = err.get("type") if isinstance(err, dict) else None
    return kind if isinstance(kind, str) else None


def overload_signal(exc: BaseException) -> Signal:
    """Transient failures say the API is loaded; other failures say nothing about load."""
    return "overload" if is_transient(exc) else "neutral"
