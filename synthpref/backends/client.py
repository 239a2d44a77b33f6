"""What stages talk to: a named model from the recipe, with its system prompt and the request cache.

Stages never see backends directly. ``ModelClient`` applies the spec's system prompt, answers repeated
requests from the cache, sends only the misses to the backend, stores each result the moment the backend
reports it, and counts tokens for progress reporting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from synthpref.backends.base import Backend, Capability
from synthpref.backends.specs import ModelSpec
from synthpref.backends.types import (
    GenerationRequest,
    GenerationResult,
    RewardRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
)
from synthpref.cache import RequestCache
from synthpref.records import Message

TokenCallback = Callable[[int], None]


class ModelClient:
    def __init__(
        self,
        name: str,
        spec: ModelSpec,
        backend: Backend,
        cache: RequestCache | None,
        on_tokens: TokenCallback | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.backend = backend
        self.cache = cache
        self.on_tokens = on_tokens
        self.calls = 0
        self.cache_hits = 0
        self.tokens = 0

    def supports(self, capability: Capability) -> bool:
        return self.backend.supports(capability)

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

        return await self._cached(
            "generate", requests, self.backend.generate, GenerationResult, tokens
        )

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
            "score", prepared, self.backend.score, ScoreResult, lambda r: len(r.token_logprobs)
        )

    async def reward(self, requests: Sequence[RewardRequest]) -> list[RewardResult]:
        """Reward-model scores of conversations (the spec's system prompt applied as for chat)."""
        prepared = [
            r.model_copy(update={"messages": self._with_system(r.messages)}) for r in requests
        ]
        return await self._cached(
            "reward", prepared, self.backend.reward, RewardResult, lambda r: r.tokens
        )

    async def _cached(self, kind, requests, call, result_type, count_tokens):
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
        if todo:
            unique = list(todo)
            batch = [requests[todo[k][0]] for k in unique]

            def on_result(j: int, result) -> None:
                if self.cache is not None:
                    self.cache.put(unique[j], kind, result.model_dump_json())
                n = count_tokens(result)
                self.tokens += n
                if self.on_tokens:
                    self.on_tokens(n)

            self.calls += len(batch)
            fresh = await call(batch, on_result)
            for key, result in zip(unique, fresh, strict=True):
                for i in todo[key]:
                    results[i] = result
        return results
