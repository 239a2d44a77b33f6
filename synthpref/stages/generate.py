"""The generator stage: N samples per prompt from each of several models."""

from __future__ import annotations

import asyncio

from pydantic import Field

from synthpref.backends.types import GenerationRequest, SamplingParams
from synthpref.errors import RunPaused
from synthpref.records import Candidate, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage

# Far above any real use; they keep a typo (n: 1e6) from queueing a run that cannot finish.
MAX_SAMPLES = 1024
MAX_TOKENS = 1_048_576


class ModelSampling(StageParams):
    """One generating model, optionally with its own sampling settings."""

    model: str
    n: int | None = Field(None, ge=1, le=MAX_SAMPLES)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    seed: int | None = None
    stop: list[str] | None = None


class GenerateParams(StageParams):
    models: list[str | ModelSampling] = Field(
        default_factory=lambda: ["default"],
        min_length=1,
        description="model names, or {model: name, n: .., temperature: ..} to override per model",
    )
    n: int = Field(2, ge=1, le=MAX_SAMPLES, description="samples per prompt per model")
    temperature: float = Field(0.8, ge=0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(
        0.95, gt=0, le=1, description="nucleus sampling: keep this probability mass"
    )
    max_tokens: int = Field(
        256, ge=1, le=MAX_TOKENS, description="longest response, in tokens (longer ones are cut)"
    )
    seed: int = Field(0, description="sampling seed; each sample draws from its own seeded stream")
    stop: list[str] = Field(default_factory=list, description="strings that end a response")


@register_stage
class Generate(Stage):
    """Samples n candidate responses per prompt from each listed model."""

    type_name = "generate"
    kind = "generator"
    writes_candidates = True
    Params = GenerateParams
    params: GenerateParams

    def _entries(self) -> list[tuple[str, str, SamplingParams]]:
        """(model, candidate-id key, sampling) per entry of ``models``.

        The key is the model name, so ids stay those of earlier runs (their caches and checkpoints
        stay valid); a model listed again, e.g. with other sampling settings, gets ``name#i`` (``i``
        its entry index) because judges match their answers to candidates by id.
        """
        p = self.params
        base = dict(
            n=p.n,
            temperature=p.temperature,
            top_p=p.top_p,
            max_tokens=p.max_tokens,
            seed=p.seed,
            stop=p.stop,
        )
        out = []
        seen: set[str] = set()
        for i, entry in enumerate(p.models):
            if isinstance(entry, str):
                name, sampling = entry, SamplingParams(**base)
            else:
                over = entry.model_dump(exclude={"model"}, exclude_none=True)
                name, sampling = entry.model, SamplingParams(**{**base, **over})
            key = name if name not in seen else f"{name}#{i}"
            seen.add(key)
            out.append((name, key, sampling))
        return out

    def models_used(self) -> list[str]:
        return [name for name, _, _ in self._entries()]

    async def process(self, records: list[Record]) -> list[Record]:
        """Every model's requests are sent at once: a server gets them all in flight, and models on
        one local backend share its running batch. Candidates are added in the order of
        ``models``."""
        assert self.ctx is not None
        entries = self._entries()

        async def ask(name: str, sampling: SamplingParams):
            requests = [GenerationRequest(messages=r.prompt, params=sampling) for r in records]
            return await self.ctx.model(name).generate(requests)  # type: ignore[union-attr]

        answers = await _gather(ask(name, sampling) for name, _, sampling in entries)
        for (name, key, sampling), results in zip(entries, answers, strict=True):
            for record, result in zip(records, results, strict=True):
                for k, completion in enumerate(result.completions):
                    record.candidates.append(
                        Candidate(
                            id=f"{self.name}:{key}:{k}",
                            model=name,
                            text=completion.text,
                            reasoning=completion.reasoning,
                            sampling=sampling.model_dump(),
                            sample_index=k,
                            prompt_tokens=result.prompt_tokens,
                            completion_tokens=completion.completion_tokens,
                            finish_reason=completion.finish_reason,
                            stage=self.name,
                        )
                    )
                    self.counters["candidates"] += 1
                    self.counters[f"finish_{completion.finish_reason}"] += 1
                    if not completion.text.strip():
                        self.counters["empty_candidates"] += 1
        return records


async def _gather(calls) -> list:
    """The calls' results in order. When one fails, the others are cancelled before the error goes
    on (no model keeps generating for a shard that is stopping); when one pauses (batch jobs still
    running), the others are let finish submitting theirs, so one pass puts all of a shard's work
    with the provider, and then the pause goes on, unless another failed meanwhile: an error
    outranks a pause."""

    def first_error(tasks, hard_only: bool):
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                if not (hard_only and isinstance(t.exception(), RunPaused)):
                    return t.exception()
        return None

    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if (error := first_error(tasks, hard_only=True)) is not None:
            raise error
        await asyncio.wait(tasks)
        error = first_error(tasks, hard_only=True) or first_error(tasks, hard_only=False)
        if error is not None:
            raise error
        return [t.result() for t in tasks]
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
