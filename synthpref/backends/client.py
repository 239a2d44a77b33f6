"""What stages talk to: a named model from the recipe, with its system prompt and the request cache.

Stages never see backends directly. ``ModelClient`` applies the spec's system prompt, answers repeated
requests from the cache, sends only the misses to the backend, stores each result the moment the backend
reports it, and counts tokens and dollars for progress reporting and the run summary.

Two things decided by the spec happen here, so that every backend gets them alike: the spending cap
(each miss books its most expensive outcome with the run's :class:`~synthpref.backends.cost.CostMeter`
before it is sent; the misses that do not fit are held back and the call ends in ``BudgetExceeded``
once the rest are cached), and ``mode: batch`` (generation misses go to the backend's
``generate_batch`` with their cache keys, which name the lines of provider batch jobs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from synthpref.backends.base import Backend, Capability
from synthpref.backends.cost import CostMeter
from synthpref.backends.pricing import Price
from synthpref.backends.specs import ModelSpec
from synthpref.backends.types import (
    CompletionRequest,
    GenerationRequest,
    GenerationResult,
    RewardRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
    Usage,
)
from synthpref.cache import RequestCache
from synthpref.records import Message

TokenCallback = Callable[[int], None]
CostCallback = Callable[[float], None]

#: characters per token assumed when booking a prompt's cost before it is sent (English text runs
#: about four; three books more than most prompts will cost)
CHARS_PER_TOKEN = 3


@dataclass
class Spend:
    """Tokens as billed and dollars, summed over the calls a client made (cache hits cost nothing)."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    batch_calls: int = 0
    dollars: float = 0.0

    def add(self, usage: Usage, dollars: float) -> None:
        self.input_tokens += usage.input_tokens
        self.cached_input_tokens += usage.cached_input_tokens
        self.cache_write_tokens += usage.cache_write_tokens
        self.output_tokens += usage.output_tokens
        self.batch_calls += int(usage.batch)
        self.dollars += dollars


@dataclass
class ModelClient:
    name: str
    spec: ModelSpec
    backend: Backend
    cache: RequestCache | None
    on_tokens: TokenCallback | None = None
    meter: CostMeter | None = None
    on_cost: CostCallback | None = None
    calls: int = 0
    cache_hits: int = 0
    tokens: int = 0
    spend: Spend = field(default_factory=Spend)
    #: every distinct request this client answered, cache hits included, as billed when it was
    #: computed and priced now at online rates: what the work costs from an empty cache
    #: (``synthpref estimate`` projects from it); ``requests`` counts them
    work: Spend = field(default_factory=Spend)
    requests: int = 0
    _seen: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.price: Price | None = self.spec.effective_price()

    def supports(self, capability: Capability) -> bool:
        return self.backend.supports(capability)

    @property
    def batch_mode(self) -> bool:
        return getattr(self.spec, "mode", "online") == "batch"

    def _with_system(self, messages: Sequence[Message]) -> list[Message]:
        system = self.spec.system_prompt
        if system and (not messages or messages[0].role != "system"):
            return [Message(role="system", content=system), *messages]
        return list(messages)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        requests = [
            r.model_copy(update={"messages": self._with_system(r.messages)}) for r in requests
        ]

        def tokens(result: GenerationResult) -> int:
            return sum(c.completion_tokens for c in result.completions)

        # a reasoning model may spend its thinking budget on top of max_tokens (Anthropic's
        # thinking_budget is sent as budget + max_tokens)
        thinking = getattr(self.spec, "thinking_budget", None) or 0

        def ceiling(r: GenerationRequest) -> tuple[int, int]:
            return _prompt_ceiling(r.messages), (r.params.max_tokens + thinking) * r.params.n

        return await self._cached(
            "generate", requests, self.backend.generate, GenerationResult, tokens, ceiling
        )

    async def complete(self, requests: Sequence[CompletionRequest]) -> list[GenerationResult]:
        """Raw-text continuations (no chat template, no system prompt: the text is sent as given),
        cached like every call."""

        def tokens(result: GenerationResult) -> int:
            return sum(c.completion_tokens for c in result.completions)

        def ceiling(r: CompletionRequest) -> tuple[int, int]:
            return -(-len(r.prompt) // CHARS_PER_TOKEN), r.params.max_tokens * r.params.n

        return await self._cached(
            "complete", list(requests), self.backend.complete, GenerationResult, tokens, ceiling
        )

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The model's chat template applied to ``messages`` (the spec's system prompt first, as
        for every chat request)."""
        return self.backend.render_chat(self._with_system(messages), add_generation_prompt)

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        shift = 1 if self.spec.system_prompt else 0
        prepared = []
        for r in requests:
            messages = self._with_system(r.messages)
            segment = (
                r.segment
                if r.segment < 0 or len(messages) == len(r.messages)
                else r.segment + shift
            )
            prepared.append(r.model_copy(update={"messages": messages, "segment": segment}))
        return await self._cached(
            "score",
            prepared,
            self.backend.score,
            ScoreResult,
            lambda r: len(r.token_logprobs),
            lambda r: (_prompt_ceiling(r.messages), 1),
        )

    async def reward(self, requests: Sequence[RewardRequest]) -> list[RewardResult]:
        """Reward-model scores of conversations (the spec's system prompt applied as for chat)."""
        prepared = [
            r.model_copy(update={"messages": self._with_system(r.messages)}) for r in requests
        ]
        return await self._cached(
            "reward",
            prepared,
            self.backend.reward,
            RewardResult,
            lambda r: r.tokens,
            lambda r: (_prompt_ceiling(r.messages), 0),
        )

    async def _cached(self, kind, requests, call, result_type, count_tokens, ceiling):
        identity = self.backend.identity
        keys = [r.cache_key(identity) for r in requests]
        hits = self.cache.get_many(list(set(keys))) if self.cache is not None else {}
        results = [None] * len(requests)
        todo: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key in hits:
                results[i] = result_type.model_validate_json(hits[key])
            else:
                todo.setdefault(key, []).append(i)
        self.cache_hits += len(requests) - sum(len(v) for v in todo.values())
        for key, result in zip(keys, results, strict=True):
            if result is not None:
                self._count_work(key, result)
        if not todo:
            return results
        unique = list(todo)
        batch_mode = self.batch_mode and kind == "generate"
        booked = self._book(unique, [requests[todo[k][0]] for k in unique], ceiling, batch_mode)
        held = len(unique) - len(booked)
        unique = unique[: len(booked)]
        batch = [requests[todo[k][0]] for k in unique]

        def on_result(j: int, result) -> None:
            usage = result.billed() if isinstance(result, GenerationResult) else None
            dollars = self.price.cost(usage) if self.price is not None and usage else 0.0
            if self.meter is not None and booked:
                self.meter.settle(booked[j], dollars)
            if self.cache is not None:
                self.cache.put(unique[j], kind, result.model_dump_json(), dollars, self.name)
            if usage is not None:
                self.spend.add(usage, dollars)
                if dollars and self.on_cost:
                    self.on_cost(dollars)
            if batch_mode:  # a request waits on a job over several passes: count it once, answered
                self.calls += 1
            n = count_tokens(result)
            self.tokens += n
            if self.on_tokens:
                self.on_tokens(n)

        if not batch_mode:
            self.calls += len(batch)
        if batch:
            if batch_mode:
                fresh = await self.backend.generate_batch(batch, unique, self.cache, on_result)
            else:
                fresh = await call(batch, on_result)
            for key, result in zip(unique, fresh, strict=True):
                self._count_work(key, result)
                for i in todo[key]:
                    results[i] = result
        if held:
            assert self.meter is not None
            raise self.meter.exceeded(f"{held} more call(s) to model {self.name!r}")
        return results

    def _count_work(self, key: str, result) -> None:
        """Count a distinct request's result once, however often it was asked or from where."""
        if key in self._seen:
            return
        self._seen.add(key)
        self.requests += 1
        if isinstance(result, GenerationResult):
            usage = result.billed()
            online = usage.model_copy(update={"batch": False})
            self.work.add(usage, self.price.cost(online) if self.price is not None else 0.0)

    def _book(self, keys, requests, ceiling, batch: bool) -> list[float]:
        """Book each request's most expensive outcome, in order, until one does not fit under the
        cap; returns the bookings made (their number is how many requests may be sent)."""
        if self.meter is None or self.price is None:  # no cap, or a model that costs nothing
            return [0.0] * len(keys)
        out: list[float] = []
        for r in requests:
            prompt, output = ceiling(r)
            dollars = self.price.ceiling(prompt, output, batch)
            if not self.meter.book(dollars):
                break
            out.append(dollars)
        return out


def _prompt_ceiling(messages: Sequence[Message]) -> int:
    """A prompt's tokens as booked before sending: characters / ``CHARS_PER_TOKEN``, plus a few
    per message for the chat template's markers."""
    return sum(-(-len(m.content) // CHARS_PER_TOKEN) + 8 for m in messages)
