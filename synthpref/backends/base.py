"""The backend interface: generation and teacher-forced scoring, both batched and asynchronous.

Backends receive whole lists of requests so that local engines can batch and remote ones can keep many
requests in flight. They report each result through ``on_result`` as soon as it exists, which is what
lets the request cache persist finished work before a batch or a shard completes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

from synthpref.backends.types import GenerationRequest, GenerationResult, ScoreRequest, ScoreResult

Capability = Literal["generate", "score", "top_logprobs", "json_schema", "prefill"]
OnGenerated = Callable[[int, GenerationResult], None]
OnScored = Callable[[int, ScoreResult], None]


class BackendError(RuntimeError):
    """A request failed on the backend after its retries; the message says which and why."""


class CapabilityError(BackendError):
    pass


class Backend(ABC):
    capabilities: ClassVar[frozenset[Capability]] = frozenset({"generate"})

    @property
    @abstractmethod
    def identity(self) -> str:
        """Everything about this backend that changes its outputs (model weights, revision...).

        It is part of every request's cache key, so two backends that would answer differently must
        never share an identity.
        """

    @abstractmethod
    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]: ...

    async def score(
        self, requests: Sequence[ScoreRequest], on_result: OnScored | None = None
    ) -> list[ScoreResult]:
        raise CapabilityError(
            f"{type(self).__name__} cannot score given text (teacher forcing); use the embedded, "
            "transformers, vllm or an OpenAI-compatible completions server (e.g. vllm serve) backend"
        )

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engines, connections or GPU memory."""
