"""Reward-model judge: a trained sequence-classification reward model scores each candidate.

The model (Skywork-Reward, any ``...ForSequenceClassification`` reward model whose forward returns
``logits``; ArmoRM's remote-code output object is not read yet) reads the
record's conversation with the candidate as the assistant's reply, rendered with its own chat
template, and its head gives one value per output: a scalar reward, or several attributes
(helpfulness, correctness, verbosity...). The model spec says ``task: reward``; running it is a
backend capability (``reward``) of the transformers and vLLM backends, and of an openai spec pointing
at a pooling server (``vllm serve`` of a reward model). ``synthpref validate`` refuses a model that
cannot do it.

``combine`` turns the outputs into the judgment's ``score``: nothing (the single output of a scalar
model), one output by name, or a weighted sum of named outputs. Every output is kept in ``scores``
(a scalar model's one output is named ``reward``), the raw values in ``raw``, and what the model read
in ``details`` (``labels``, ``tokens``, ``dropped_turns``). Values are the head's raw outputs, so the
score has no fixed range (``score_range`` is None): a jury normalises it within each prompt, and a
margin filter compares it in the model's own units.

A conversation longer than the model's context fails that candidate's judgment with
``truncation: error``, or loses its oldest turns with ``drop_oldest_turns`` (counted as
``truncated``); a failure of the backend itself stops the shard so a rerun retries it, as with the
log-probability judges (the bisection that isolates one bad request is theirs, from ``logprob.py``).
A model whose outputs do not match ``attributes`` or ``combine`` stops the run with
:class:`RewardHeadMismatch` once its rewards are in the request cache, so the corrected rerun
recomputes nothing.

Pairwise reward models (PairRM-style: one forward pass over the prompt and two replies) would plug in
as ``unit: pair``, today refused: a ``reward_pair`` backend capability with a request holding both
replies, and this stage emitting one pairwise judgment per pair (``candidate_ids`` [a, b], score the
preference for a, both presentation orders averaged as ``pairwise_judge`` does), which the pair
builder, jury and filters already read.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator

from synthpref.backends.client import ModelClient
from synthpref.backends.types import RewardRequest, RewardResult
from synthpref.errors import ConfigError
from synthpref.judges.base import JudgeStage
from synthpref.judges.logprob import isolated, judged_response, record_failed
from synthpref.records import Judgment, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage

SCALAR = "reward"
"""The name of a scalar reward model's one output in ``scores``."""


class RewardHeadMismatch(ConfigError, ValueError):
    """The reward model's outputs are not what the stage's ``attributes`` or ``combine`` name."""


class RewardModelParams(StageParams):
    model: str = Field(
        description="the reward model: a name under 'models' whose spec has task: reward"
    )
    combine: str | dict[str, float] | None = Field(
        None,
        description="the score from the head's outputs: null = the one output of a scalar model; "
        "an output's name (e.g. helpfulness); or a mapping name -> weight, their weighted sum",
    )
    truncation: Literal["error", "drop_oldest_turns"] = Field(
        "error",
        description="a conversation over the model's context: a failed judgment (error), or drop "
        "whole turns from the start, never a system message, the last user turn or the reply "
        "(drop_oldest_turns; recorded in details.dropped_turns)",
    )
    attributes: list[str] | None = Field(
        None,
        description="the output names the model must have (its id2label; a scalar model's one "
        "output is 'reward'); checked against every result, and lets validate check combine",
    )
    unit: Literal["candidate"] = Field(
        "candidate",
        description="what one reward covers: each candidate in its conversation (the only unit "
        "today; a pairwise reward model such as PairRM would be 'pair')",
    )

    @field_validator("combine")
    @classmethod
    def _named(cls, value: Any) -> Any:
        if isinstance(value, str) and not value:
            raise ValueError("an output name, not an empty string")
        if isinstance(value, dict) and not value:
            raise ValueError("a mapping of at least one output name to its weight")
        return value


async def reward_isolated(
    client: ModelClient, requests: list[RewardRequest]
) -> list[RewardResult | str]:
    """Every request's reward, with the error text in place of a request that fails on its own
    content (a ``RequestError``); anything else propagates (see :func:`isolated`)."""
    return await isolated(client.reward, requests)


def output_names(result: RewardResult) -> list[str]:
    """The names of a result's values: ``reward`` for a scalar model, else the head's labels
    (``LABEL_i`` where the backend gave none)."""
    if len(result.values) == 1:
        return [SCALAR]
    if len(result.labels) == len(result.values):
        return list(result.labels)
    return [f"LABEL_{i}" for i in range(len(result.values))]


@register_stage
class RewardModelJudge(JudgeStage):
    """Scores each candidate with a sequence-classification reward model (a model spec with
    task: reward): one value or several attributes per response, combined into the score."""

    type_name = "reward_model"
    Params = RewardModelParams
    params: RewardModelParams
    score_range: tuple[float, float] | None = None  # raw head outputs: unbounded
    model_capability = "reward"

    def check(self, previous: list[Stage]) -> list[str]:
        problems = []
        if not any(s.kind == "generator" for s in previous):
            problems.append("a judge needs candidates: put a generate stage before it")
        attributes, combine = self.params.attributes, self.params.combine
        if attributes is None:
            return problems
        if len(set(attributes)) != len(attributes) or not attributes:
            problems.append("attributes: list each output name once")
        names = ", ".join(attributes)
        if combine is None and len(attributes) > 1:
            problems.append(
                f"combine: the model has {len(attributes)} outputs ({names}); say which makes the "
                f"score: one name (combine: {attributes[0]}) or weights "
                f"(combine: {{{attributes[0]}: 1.0, ...}})"
            )
        wanted = [combine] if isinstance(combine, str) else list(combine or {})
        for name in wanted:
            if name not in attributes:
                problems.append(f"combine: {name!r} is not one of the attributes ({names})")
        return problems

    async def process(self, records: list[Record]) -> list[Record]:
        units: list[tuple[Record, str]] = []
        requests: list[RewardRequest] = []
        for record in records:
            for cand in record.candidates:
                units.append((record, cand.id))
                requests.append(
                    RewardRequest(
                        messages=judged_response(record, cand.text),
                        truncation=self.params.truncation,
                    )
                )
        results = await reward_isolated(self.client(), requests)
        for result in results:  # before any judgment is added: a mismatch stops the shard
            if not isinstance(result, str):
                self._check_outputs(output_names(result))
        for (record, cand_id), result in zip(units, results, strict=True):
            self.counters["judgments"] += 1
            if isinstance(result, str):
                record_failed(self, record, cand_id, result, model=self.params.model)
                continue
            record.judgments.append(self._judgment(cand_id, result))
        return records

    def _judgment(self, cand_id: str, result: RewardResult) -> Judgment:
        names = output_names(result)
        scores = dict(zip(names, result.values, strict=True))
        combine = self.params.combine
        if combine is None:
            score = result.values[0]
        elif isinstance(combine, str):
            score = scores[combine]
        else:
            score = sum(weight * scores[name] for name, weight in combine.items())
        if result.dropped_turns:
            self.counters["truncated"] += 1
        return Judgment(
            judge=self.name,
            candidate_ids=[cand_id],
            score=score,
            scores=scores,
            raw=json.dumps(result.values),
            model=self.params.model,
            attempts=1,
            details={
                "labels": result.labels,
                "dropped_turns": result.dropped_turns,
                "tokens": result.tokens,
            },
        )

    def _check_outputs(self, names: list[str]) -> None:
        """Raise :class:`RewardHeadMismatch` when the outputs are not what the stage names."""
        model, attributes, combine = self.params.model, self.params.attributes, self.params.combine
        has = ", ".join(names)
        where = f"stage {self.name!r}: reward model {model!r} has {len(names)} output(s) ({has})"
        if len(set(names)) != len(names):
            raise RewardHeadMismatch(f"{where}: its output names (id2label) repeat")
        if attributes is not None and set(attributes) != set(names):
            raise RewardHeadMismatch(
                f"{where}, not the attributes the recipe expects ({', '.join(attributes)})"
            )
        if combine is None and len(names) > 1:
            raise RewardHeadMismatch(
                f"{where}; set combine to one of them or to weights "
                f"(combine: {{{names[0]}: 1.0, ...}})"
            )
        wanted = [combine] if isinstance(combine, str) else list(combine or {})
        missing = [n for n in wanted if n not in names]
        if missing:
            raise RewardHeadMismatch(
                f"{where}; combine names {', '.join(missing)}, which it does not have"
            )
