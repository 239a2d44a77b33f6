"""Typed requests and results shared by every backend.

Modelled on vLLM's ``SamplingParams``: one small value object per call, so the same stage code runs on
the embedded model, vLLM and any OpenAI-compatible server, and so a request hashes to a stable cache key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synthpref.records import Message


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(1, ge=1, description="samples per prompt")
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    seed: int | None = Field(
        0, description="makes sampling reproducible; None draws fresh randomness"
    )
    stop: list[str] = Field(default_factory=list)


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: list[Message]
    params: SamplingParams = SamplingParams()
    json_schema: dict[str, Any] | None = Field(
        None, description="constrain the output to this JSON schema where the backend supports it"
    )
    top_logprobs: int = Field(
        0, ge=0, le=20, description="return this many alternatives per generated token (0: none)"
    )
    continue_final_message: bool = Field(
        False,
        description="treat a trailing assistant message as a prefix the model continues (prefill)",
    )

    def cache_key(self, backend_identity: str) -> str:
        return _hash({"kind": "generate", "backend": backend_identity, "req": self.model_dump()})


class CompletionRequest(BaseModel):
    """Raw text for the model to continue, with no chat template applied: what Magpie-style prompt
    synthesis sends (the chat template's text up to where a user message would start). The text is
    tokenized as it stands, special tokens included, without adding a BOS token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1)
    params: SamplingParams = SamplingParams()

    def cache_key(self, backend_identity: str) -> str:
        return _hash({"kind": "complete", "backend": backend_identity, "req": self.model_dump()})


class Completion(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"] | str
    completion_tokens: int
    top_logprobs: list[dict[str, float]] | None = Field(
        None, description="per generated token, the alternatives' log-probabilities"
    )
    reasoning: str | None = Field(
        None,
        description="a reasoning model's reasoning, kept apart from its answer (``text``); None: "
        "the model gave none (see backends/reasoning.py)",
    )


class Usage(BaseModel):
    """What a provider billed for one request, as its ``usage`` says (all samples together).

    Hosted APIs bill prompt tokens at up to three rates: uncached, read from their prompt cache
    (OpenAI's automatic cache, Anthropic's ``cache_control`` breakpoints) and, on Anthropic, written
    to it. A backend that knows nothing finer leaves it unset and the client counts
    ``prompt_tokens`` as uncached input and the completions' tokens as output.
    """

    input_tokens: int = Field(0, ge=0, description="prompt tokens billed at the full input rate")
    cached_input_tokens: int = Field(0, ge=0, description="prompt tokens read from a prompt cache")
    cache_write_tokens: int = Field(0, ge=0, description="prompt tokens written to a prompt cache")
    output_tokens: int = Field(0, ge=0, description="generated tokens, reasoning included")
    batch: bool = Field(False, description="answered by a provider batch job (batch prices)")

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens

    def __add__(self, other: Usage) -> Usage:
        """Two requests' usage together (batch if either was)."""
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            cached_input_tokens=self.cached_input_tokens + other.cached_input_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            batch=self.batch or other.batch,
        )


class GenerationResult(BaseModel):
    completions: list[Completion]
    prompt_tokens: int
    usage: Usage | None = Field(
        None, description="what the provider billed, where it said; None: local or unknown"
    )

    def billed(self) -> Usage:
        """``usage``, or what the token counts imply when the backend gave none."""
        if self.usage is not None:
            return self.usage
        return Usage(
            input_tokens=self.prompt_tokens,
            output_tokens=sum(c.completion_tokens for c in self.completions),
        )


class ScoreRequest(BaseModel):
    """Teacher-forced scoring of one message of a conversation.

    The conversation is rendered with the model's own chat template; the scored segment is exactly the
    content of ``messages[segment]`` (its turn header excluded). ``include_end_of_turn`` adds the
    template's end-of-turn token that follows the content (``<|im_end|>`` for ChatML models).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: list[Message]
    segment: int = -1
    include_end_of_turn: bool = False
    truncation: Literal["error", "left"] = Field(
        "error",
        description="when the conversation exceeds the context window: fail the request, or drop the "
        "oldest context tokens (never segment tokens) and record how many were dropped",
    )

    @model_validator(mode="after")
    def _segment_in_range(self) -> ScoreRequest:
        if not -len(self.messages) <= self.segment < len(self.messages):
            raise ValueError(f"segment {self.segment} is outside the {len(self.messages)} messages")
        if not self.messages[self.segment].content:
            raise ValueError("the scored segment is empty: there is no token to score")
        return self

    def cache_key(self, backend_identity: str) -> str:
        return _hash({"kind": "score", "backend": backend_identity, "req": self.model_dump()})


class ScoreResult(BaseModel):
    token_logprobs: list[float]
    tokens: list[str]
    truncated_tokens: int = Field(0, description="context tokens dropped by the truncation policy")

    @property
    def total(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def mean(self) -> float:
        return self.total / len(self.token_logprobs)


def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class RewardRequest(BaseModel):
    """A conversation for a reward model: rendered with the model's own chat template, read whole,
    and scored by its head. The last message is the assistant reply being judged, in its context.

    ``truncation`` decides what happens when the conversation is longer than the model's context:
    ``error`` fails the request; ``drop_oldest_turns`` removes whole turns from the start (never a
    system message, never the last user turn or the reply) and records how many it removed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: list[Message]
    truncation: Literal["error", "drop_oldest_turns"] = "error"

    @model_validator(mode="after")
    def _ends_with_a_reply(self) -> RewardRequest:
        if not self.messages or self.messages[-1].role != "assistant":
            raise ValueError("a reward request ends with the assistant reply to score")
        return self

    def cache_key(self, backend_identity: str) -> str:
        return _hash({"kind": "reward", "backend": backend_identity, "req": self.model_dump()})


class RewardResult(BaseModel):
    """What a reward model's head said about one conversation: one value per output (``num_labels``;
    one for a scalar reward model, several for a multi-objective one), unnormalised, in the order
    of the model's ``id2label``."""

    values: list[float]
    labels: list[str] = Field(
        default_factory=list,
        description="the head's output names (id2label), where the model has them",
    )
    tokens: int = Field(0, description="tokens the model read")
    dropped_turns: int = Field(0, description="oldest turns removed to fit the context")
