"""Shared machinery of generative judges: ask, parse, re-ask the unparseable, record failures.

A judge reply that cannot be parsed is asked again with sampling on (a greedy re-ask would return the
same text), a bounded number of times; what still fails becomes a ``failed`` judgment that keeps the
raw text, and is counted. Nothing becomes a silent ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import Field

from synthpref.backends.client import ModelClient
from synthpref.backends.types import Completion, GenerationRequest, SamplingParams
from synthpref.judges.parsing import ParseError
from synthpref.records import Message, Record
from synthpref.stages.base import Stage, StageParams

T = TypeVar("T")


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


_SAMPLE_SEED_STRIDE = 1_000_003


def judge_request(
    text: str,
    prefill: str = "",
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
    value: T | None
    raw: str
    attempts: int
    error: str | None = None
    sampling: dict[str, Any] | None = None

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
            try:
                answers[i] = Answer(
                    parse(raw, completion), raw, attempt + 1, None, sampling.model_dump()
                )
            except ParseError as exc:
                answers[i] = Answer(None, raw, attempt + 1, str(exc), sampling.model_dump())
                still.append(i)
        pending = still
        if not pending:
            break
    return answers  # type: ignore[return-value]


class JudgeStage(Stage):
    """Base of judges that call a model; subclasses fill ``process``."""

    kind = "judge"
    params: JudgeParams

    def models_used(self) -> list[str]:
        return [self.params.model]

    def client(self) -> ModelClient:
        assert self.ctx is not None, "stage used before the executor attached its context"
        return self.ctx.model(self.params.model)


def self_preference_warnings(stages: Sequence[Stage], models: dict[str, Any]) -> list[str]:
    """Warn where a judge stage uses a model that also generated the candidates it judges.

    LLM judges rate their own outputs higher than other models' outputs of equal quality
    (self-preference bias). Models are compared by what they run (``display_name()`` of the spec,
    e.g. the weights' name), not by their recipe names, so the same weights under two system prompts
    count as one model. Works for every judge stage, built in or plugged in, since it only reads
    ``kind`` and ``models_used()``.
    """
    warnings = []
    generated: dict[str, list[str]] = {}
    for i, stage in enumerate(stages):
        used = [m for m in stage.models_used() if m in models]
        if stage.kind == "generator":
            for m in used:
                generated.setdefault(models[m].display_name(), []).append(m)
        elif stage.kind == "judge":
            for m in used:
                same = generated.get(models[m].display_name())
                if same:
                    names = ", ".join(repr(n) for n in dict.fromkeys(same))
                    warnings.append(
                        f"stages[{i}] ({stage.name}): judge model {m!r} runs "
                        f"{models[m].display_name()}, which also generated candidates (as {names}); "
                        "judges tend to prefer their own outputs (self-preference bias). Prefer a "
                        "different judge model, or a jury of several."
                    )
    return warnings


def instruction(record: Record) -> str:
    """The prompt as a judge reads it: the last user turn, with earlier turns as context."""
    if len(record.prompt) == 1:
        return record.prompt[0].content
    return "\n\n".join(f"{m.role.upper()}: {m.content}" for m in record.prompt)
