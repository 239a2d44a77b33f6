"""The backend interface: generation and teacher-forced scoring, both batched and asynchronous.

Backends receive whole lists of requests so that local engines can batch and remote ones can keep many
requests in flight. They report each result through ``on_result`` as soon as it exists, which is what
lets the request cache persist finished work before a batch or a shard completes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

from synthpref.backends.types import (
    CompletionRequest,
    GenerationRequest,
    GenerationResult,
    RewardRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
)
from synthpref.errors import SynthprefError

if TYPE_CHECKING:
    from synthpref.backends.batch import BatchProvider
    from synthpref.cache import RequestCache
    from synthpref.records import Message

Capability = Literal[
    "generate", "score", "reward", "top_logprobs", "json_schema", "prefill", "batch", "complete"
]
OnGenerated = Callable[[int, GenerationResult], None]
OnScored = Callable[[int, ScoreResult], None]
OnRewarded = Callable[[int, RewardResult], None]


class BackendError(SynthprefError, RuntimeError):
    """A backend could not answer, after its retries; the message says which request and why.

    Raised as such, it means the backend or its configuration is at fault (a wrong model name or key,
    a server that cannot echo logprobs, a malformed reply): every request would fail alike, so the
    run stops and nothing is recorded. The subclasses say when something narrower is known, and
    callers branch on them, never on the message.
    """


class TransientBackendError(BackendError):
    """The backend was unavailable (rate limit, 5xx, timeout, dropped connection) after retries.

    The request itself may well succeed later, so its failure must never be recorded as its result:
    the shard stops, nothing of it is checkpointed, and a rerun resumes and retries.
    """


class RequestError(BackendError):
    """This request's own content cannot be processed (over the context window, no token to score,
    input the server rejects as invalid), while other requests can; judges record it as a failed
    judgment of the request's candidate.

    ``index`` is the request's position in the list the backend was given, where known.
    """

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index

    def __reduce__(self):
        # keeps the index through pickling (Ray ships exceptions between processes)
        return type(self), (str(self), self.index)


class CapabilityError(BackendError):
    """The backend cannot do what was asked of it at all (score text, prefill...)."""


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

    async def reward(
        self, requests: Sequence[RewardRequest], on_result: OnRewarded | None = None
    ) -> list[RewardResult]:
        """Each conversation scored by a reward model's head (a sequence classifier)."""
        raise CapabilityError(
            f"{type(self).__name__} does not run reward models; use a transformers or vllm spec with "
            "task: reward, or an openai spec with task: reward pointing at a pooling server "
            "(vllm serve of a reward model)"
        )

    async def complete(
        self, requests: Sequence[CompletionRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        """Continue raw text, no chat template applied (capability ``complete``)."""
        raise CapabilityError(
            f"{type(self).__name__} cannot continue raw text (no chat template); use the "
            "embedded, transformers or vllm backend, or an openai spec with tokenizer: on a server "
            "with /v1/completions (vllm serve)"
        )

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The model's chat template applied to ``messages``, as text (capability ``complete``)."""
        raise CapabilityError(
            f"{type(self).__name__} cannot show its chat template; use the embedded, transformers "
            "or vllm backend, or an openai spec with tokenizer: (a local copy of the served model's)"
        )

    def batch_provider(self) -> BatchProvider | None:
        """This backend's provider batch API, or None (the default: it has none)."""
        return None

    async def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        keys: Sequence[str],
        cache: RequestCache | None,
        on_result: OnGenerated | None = None,
    ) -> list[GenerationResult]:
        """``generate`` through the provider's batch API (``mode: batch``): ``keys`` are the
        requests' cache keys, which name their lines in the jobs recorded in ``cache`` (see
        :mod:`synthpref.backends.batch`). Raises ``BatchPending`` while jobs are still running."""
        provider = self.batch_provider()
        if provider is None:
            raise CapabilityError(
                f"{type(self).__name__} has no batch API; mode: batch works with the openai "
                "backend (the OpenAI Batch API) and the anthropic backend (Message Batches)"
            )
        from synthpref.backends.batch import run_batch

        # lines submitted per (key, sample) through this backend object: bounds resubmissions
        submissions = self.__dict__.setdefault("_batch_submissions", {})
        return await run_batch(
            provider, self.identity, requests, keys, cache, on_result, submissions
        )

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engines, connections or GPU memory."""
