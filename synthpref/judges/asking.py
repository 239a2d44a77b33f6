"""Asking a judging model: requests, sampling per attempt, and re-asking replies that do not parse.

A judge reply that cannot be parsed is asked again with sampling on (a greedy re-ask would return the
same text), a bounded number of times; what still fails becomes an :class:`Answer` with an ``error``
that keeps the raw text, so the judge records a ``failed`` judgment instead of a silent ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import Field

from synthpref.backends.client import ModelClient
from synthpref.backends.types import Completion, GenerationRequest, SamplingParams
from synthpref.judges.parsing import ParseError
from synthpref.records import Message
from synthpref.stages.base import StageParams

T = TypeVar("T")

_SAMPLE_SEED_STRIDE = 1_000_003


class JudgeParams(StageParams):
    model: str = Field("default", description="the judging model (a name under 'models')")
    temperature: float = Field(0.0, ge=0, description="0 = greedy first attempt")
    max_tokens: int = Field(256, ge=1, description="longest reply the judge may write, in tokens")
    seed: int = Field(0, description="sampling seed (re-asks and extra samples shift it)")
    max_retries: int = Field(2, ge=0, description="re-asks of an unparseable reply")
    retry_temperature: float = Field(
        0.7, gt=0, description="temperature of the re-asks (greedy would repeat the same reply)"
    )

    def sampling(self, attempt: int, sample: int = 0) -> SamplingParams:
        """Attempt 0 uses the judge's settings; re-asks sample. ``sample`` tells apart the k
        independent verdicts a judge may draw for one question (it shifts the seed)."""
        seed = self.seed + _SAMPLE_SEED_STRIDE * sample
        if attempt == 0:
            return SamplingParams(
                temperature=self.temperature, max_tokens=self.max_tokens, seed=seed
            )
        return SamplingParams(
            temperature=self.retry_temperature, max_tokens=self.max_tokens, seed=seed + attempt
        )


def judge_request(
    text: str,
    prefill: str | None = "",
    *,
    top_logprobs: int = 0,
    json_schema: dict[str, Any] | None = None,
) -> GenerationRequest:
    """One user turn holding the rendered judge prompt, with the reply's start pre-filled when given.

    Pre-filling ("Rating:", "1.") makes even a small model answer in the expected form; the backend
    then continues the assistant turn instead of opening a new one.
    """
    messages = [Message(role="user", content=text)]
    if prefill:
        messages.append(Message(role="assistant", content=prefill))
    return GenerationRequest(
        messages=messages,
        continue_final_message=bool(prefill),
        top_logprobs=top_logprobs,
        json_schema=json_schema,
    )


@dataclass
class Answer(Generic[T]):
    """The outcome of one question: the parsed ``value``, or ``error`` after every attempt failed.

    ``raw`` is the whole reply (pre-filled start included); ``label`` and ``sample`` say which of a
    judgment's questions it answers (an aspect, an order, a checklist item; the k-th draw).
    ``reasoning`` is a reasoning model's reasoning, kept apart: verdicts are read from ``raw`` (the
    final answer) only."""

    value: T | None
    raw: str
    attempts: int
    error: str | None = None
    sampling: dict[str, Any] | None = None
    label: str = ""
    sample: int = 0
    reasoning: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def ask_until_parsed(
    client: ModelClient,
    requests: Sequence[GenerationRequest],
    parse: Callable[[str, Completion], T],
    params: JudgeParams,
    prefix: str = "",
    samples: Sequence[int] | None = None,
) -> list[Answer[T]]:
    """Send every request, re-asking only those whose reply ``parse`` rejects.

    ``parse`` gets the reply text and the completion (for judges that read token log-probabilities).
    The reply text is the model's final answer (``Completion.text``): a reasoning model's reasoning
    is never parsed for a verdict, only kept on the :class:`Answer`.
    ``prefix`` is text the request pre-filled as the start of the reply; it is glued back on before
    parsing so parsers always see the whole verdict. ``samples`` (one per request) numbers repeated
    questions so each draws its own verdict (see :meth:`JudgeParams.sampling`).
    """
    answers: list[Answer[T] | None] = [None] * len(requests)
    pending = list(range(len(requests)))
    for attempt in range(params.max_retries + 1):
        per = [params.sampling(attempt, samples[i] if samples else 0) for i in pending]
        batch = [
            requests[i].model_copy(update={"params": p}) for i, p in zip(pending, per, strict=True)
        ]
        results = await client.generate(batch)
        still = []
        for i, result, sampling in zip(pending, results, per, strict=True):
            completion = result.completions[0]
            raw = prefix + completion.text
            reasoning = completion.reasoning
            try:
                value = parse(raw, completion)
                answers[i] = Answer(
                    value, raw, attempt + 1, None, sampling.model_dump(), reasoning=reasoning
                )
            except ParseError as exc:
                answers[i] = Answer(
                    None, raw, attempt + 1, str(exc), sampling.model_dump(), reasoning=reasoning
                )
                still.append(i)
        pending = still
        if not pending:
            break
    return answers  # type: ignore[return-value]
