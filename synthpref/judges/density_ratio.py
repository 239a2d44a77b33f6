"""Density-ratio judge (CDR): reward = log p_strong(y | x) - log p_weak(y | x), by teacher forcing.

A better-aligned model ("strong") and a less-aligned one ("weak") score the same response string, each
with its own tokenizer and chat template; the log-density ratio is the reward (Xu et al., "Dr.SoW" /
"CDR: customizable density ratios of strong-over-weak LLMs"). ``aggregate: mean`` uses each side's
per-token mean instead of the sums, which removes the length bias of the sum (its sign is that of the
sum only when both sides tokenize alike).

Customisation, as in the paper: per prompt domain (set by a ``route`` stage in
``record.annotations["domain"]``), each side gets a system prompt (criteria text placed in it) and
few-shot exemplar turns before the prompt. With ``exemplar_answers: contrastive`` the strong side sees
the exemplars' good answers and the weak side their bad answers, so the same weights under a "good
assistant" and a "bad assistant" conditioning form a strong/weak pair; this is what
``recipes/cdr.yaml`` runs on the embedded model (see docs/judges-logprob.md for its limits).

The two sides are scored concurrently (``asyncio.gather`` over the two clients), which overlaps them
when they sit on different devices or servers. Each candidate gets one pointwise judgment; one that
cannot be scored (empty response, conversation over the context window with ``truncation: error``)
becomes a ``failed`` judgment naming the record and the candidate, and the shard carries on; a
failing backend (rate limit, server down, misconfiguration) stops the shard instead, so that a rerun
retries it rather than finding its failures checkpointed.

The helpers it shares with the follow-up-likelihood judge (failure isolation, data file lookup,
hashing) live in ``logprob.py``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jinja2
from pydantic import Field, ValidationError

from synthpref.backends.types import ScoreRequest, ScoreResult
from synthpref.judges.logprob import (
    content_hash,
    load_yaml_file,
    record_failed,
    score_isolated,
)
from synthpref.records import Judgment, Message, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage
from synthpref.templates import load_template, render_string

# --- customisation ----------------------------------------------------------------------------


def render_text(value: str, base_dir: str | Path | None = None, **variables: Any) -> str:
    """A ``.jinja`` template file (by the recipe path rule) or literal text, which may use the same
    variables; both rendered sandboxed, since this text comes from the recipe."""
    if value.endswith(".jinja"):
        return load_template(value, base_dir).render(**variables)
    return render_string(value, **variables)


class Exemplar(StageParams):
    prompt: str = Field(min_length=1)
    good: str = Field(min_length=1, description="an answer the strong side should resemble")
    bad: str = Field(min_length=1, description="an answer the weak side should resemble")


class Customisation(StageParams):
    """How the two sides are conditioned for one prompt domain."""

    criteria: str | None = Field(
        None,
        description="what a good response does in this domain: text or a .jinja template; the "
        "system prompts receive it as {{ criteria }}",
    )
    strong_system: str | None = Field(
        None,
        description="system prompt of the strong side: text or a .jinja template (variables: "
        "criteria, domain); null: the model spec's own",
    )
    weak_system: str | None = Field(None, description="system prompt of the weak side, likewise")
    exemplars: str | list[Exemplar] = Field(
        default_factory=list,
        description="few-shot exemplars as chat turns before the prompt: a YAML file holding a list "
        "of {prompt, good, bad}, or the list inline",
    )
    exemplar_answers: Literal["contrastive", "good"] = Field(
        "contrastive",
        description="contrastive: the strong side sees the good answers, the weak side the bad ones; "
        "good: both sides see the good answers",
    )


SHIPPED_DOMAINS = ("chat", "reasoning", "safety")


def shipped_customisation(domain: str) -> Customisation:
    return Customisation(
        criteria=f"cdr/criteria_{domain}.jinja",
        strong_system="cdr/strong.jinja",
        weak_system="cdr/weak.jinja",
        exemplars=f"cdr/exemplars/{domain}.yaml",
    )


@dataclass(frozen=True)
class Side:
    """One side's conditioning, resolved: the turns placed before the record's prompt."""

    system: str | None
    turns: tuple[Message, ...]


@dataclass(frozen=True)
class Resolved:
    strong: Side
    weak: Side
    hash: str


def resolve_customisation(
    custom: Customisation, domain: str, base_dir: str | Path | None = None
) -> Resolved:
    def text(field: str, **variables: Any) -> str | None:
        """A text field rendered; its errors name the field (``chat.strong_system``)."""
        value = getattr(custom, field)
        try:
            return render_text(value, base_dir, **variables) if value else None
        except (OSError, ValueError, jinja2.TemplateError) as exc:
            raise ValueError(f"{domain}.{field}: {exc}") from None

    criteria = text("criteria", domain=domain) or ""
    variables = {"criteria": criteria, "domain": domain}
    exemplars = custom.exemplars
    if isinstance(exemplars, str):
        try:
            data = load_yaml_file(exemplars, base_dir)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{domain}.exemplars: {exc}") from None
        items = data.get("exemplars", data) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError(f"{exemplars}: expected a list of {{prompt, good, bad}}")
        try:
            exemplars = [Exemplar.model_validate(e) for e in items]
        except ValidationError as exc:
            raise ValueError(f"{exemplars}: {exc}") from None

    def side(system_field: str, answer: str) -> Side:
        turns: list[Message] = []
        for ex in exemplars:
            turns.append(Message(role="user", content=ex.prompt))
            turns.append(Message(role="assistant", content=getattr(ex, answer)))
        return Side(text(system_field, **variables), tuple(turns))

    strong = side("strong_system", "good")
    weak = side("weak_system", "bad" if custom.exemplar_answers == "contrastive" else "good")
    digest = content_hash(
        {
            s: {"system": x.system, "turns": [m.model_dump() for m in x.turns]}
            for s, x in (("strong", strong), ("weak", weak))
        }
    )
    return Resolved(strong, weak, digest)


def conditioned(side: Side, record: Record, response: str) -> list[Message]:
    """System prompt (merged with the record's own, which follows it), exemplars, prompt, response.

    Without a customised system prompt the record's system message, if any, stays first; without
    either, the model spec's system prompt is added by the client as usual.
    """
    prompt = list(record.prompt)
    systems = [side.system] if side.system else []
    if prompt and prompt[0].role == "system":
        systems.append(prompt.pop(0).content)
    head = [Message(role="system", content="\n\n".join(systems))] if systems else []
    return [*head, *side.turns, *prompt, Message(role="assistant", content=response)]


# --- the judge ------------------------------------------------------------------------------


class DensityRatioParams(StageParams):
    strong: str = Field(description="the better-aligned model (a name under 'models')")
    weak: str = Field(
        description="the less-aligned model; may be the same weights as 'strong' "
        "when the customisations condition the two sides differently"
    )
    aggregate: Literal["sum", "mean"] = Field(
        "sum",
        description="sum: log-density ratio of the whole response (the paper's reward); mean: "
        "difference of the two sides' per-token means (each over its own tokens)",
    )
    include_end_of_turn: bool = Field(
        True,
        description="score the end-of-turn token after the response too (whether the model would "
        "stop there; penalises responses cut off at max_tokens)",
    )
    truncation: Literal["error", "left"] = Field(
        "error",
        description="a conversation over a side's context window: a failed judgment (error), or drop "
        "its oldest tokens - system prompt and exemplars first - and record how many (left)",
    )
    preset: Literal["none", "shipped"] = Field(
        "none",
        description="shipped: the customisations in prompts/cdr for the domains chat, reasoning, "
        "safety (and 'default' = chat); entries under 'customisations' override them per domain",
    )
    customisations: dict[str, Customisation] = Field(
        default_factory=dict,
        description="domain -> customisation; a record uses the one of its domain, else 'default', "
        "else none (the plain density ratio)",
    )
    domain_key: str = Field(
        "domain",
        description="the record annotation (set by a route stage) or input metadata field holding "
        "the prompt's domain",
    )


@register_stage
class DensityRatioJudge(Stage):
    """Scores each candidate by log p_strong - log p_weak of its text, teacher-forced (CDR)."""

    type_name = "density_ratio"
    kind = "judge"
    Params = DensityRatioParams
    params: DensityRatioParams
    model_params = ("strong", "weak")
    model_capability = "score"

    def customisations(self) -> dict[str, Customisation]:
        out: dict[str, Customisation] = {}
        if self.params.preset == "shipped":
            out = {d: shipped_customisation(d) for d in SHIPPED_DOMAINS}
            out["default"] = out["chat"]
        return {**out, **self.params.customisations}

    def resolved(self) -> dict[str, Resolved]:
        if not hasattr(self, "_resolved"):
            self._resolved = {
                d: resolve_customisation(c, d, self.base_dir)
                for d, c in self.customisations().items()
            }
        return self._resolved

    def check(self, previous: list[Stage]) -> list[str]:
        problems = []
        if not any(s.kind == "generator" for s in previous):
            problems.append("a judge needs candidates: put a generate stage before it")
        try:
            resolved = self.resolved()
        except (FileNotFoundError, ValueError, jinja2.TemplateError) as exc:
            return [*problems, f"customisations: {exc}"]
        if self.params.strong == self.params.weak:
            same = [d for d, r in resolved.items() if r.strong == r.weak]
            if not resolved or same or "default" not in resolved:
                problems.append(
                    f"strong and weak are the same model ({self.params.strong!r}) and "
                    + (
                        f"the customisation of {', '.join(repr(d) for d in same)} conditions both "
                        "sides alike"
                        if same
                        else "prompts without a customisation (no 'default') would score alike"
                    )
                    + ", so their density ratio is 0: use two models, or give the sides different "
                    "system prompts or exemplar answers"
                )
        return problems

    def fingerprint(self) -> dict:
        return {d: r.hash for d, r in self.resolved().items()}

    def _domain(self, record: Record) -> str | None:
        key = self.params.domain_key
        value = record.annotations.get(key, record.metadata.get(key))
        return str(value) if value is not None else None

    async def process(self, records: list[Record]) -> list[Record]:
        strong, weak = self.model_client(self.params.strong), self.model_client(self.params.weak)
        resolved = self.resolved()
        plain = Resolved(Side(None, ()), Side(None, ()), content_hash("plain"))
        units, strong_reqs, weak_reqs = [], [], []
        for record in records:
            domain = self._domain(record)
            key = domain if domain in resolved else ("default" if "default" in resolved else None)
            if resolved and domain is not None and key != domain:
                self.counters["domain_without_customisation"] += 1
            custom = resolved[key] if key else plain
            for cand in record.candidates:
                if not cand.text.strip():
                    units.append((record, cand, domain, key, custom, None))
                    continue
                units.append((record, cand, domain, key, custom, len(strong_reqs)))
                for side, reqs in ((custom.strong, strong_reqs), (custom.weak, weak_reqs)):
                    reqs.append(
                        ScoreRequest(
                            messages=conditioned(side, record, cand.text),
                            include_end_of_turn=self.params.include_end_of_turn,
                            truncation=self.params.truncation,
                        )
                    )
        strong_out, weak_out = await asyncio.gather(
            score_isolated(strong, strong_reqs), score_isolated(weak, weak_reqs)
        )
        names = {"strong": strong.spec.display_name(), "weak": weak.spec.display_name()}
        for record, cand, domain, key, custom, k in units:
            self.counters["judgments"] += 1
            common = {
                "template_hash": custom.hash,
                "model": f"{self.params.strong}/{self.params.weak}",
                "details": {"domain": domain, "customisation": key, "models": names},
            }
            if k is None:
                record_failed(self, record, cand.id, "empty response", "empty_response", **common)
                continue
            s, w = strong_out[k], weak_out[k]
            errors = [
                f"{n} side: {r}" for n, r in (("strong", s), ("weak", w)) if isinstance(r, str)
            ]
            if errors:
                record_failed(self, record, cand.id, "; ".join(errors), **common)
                continue
            record.judgments.append(self._judgment(cand.id, s, w, common))
        return records

    def _judgment(self, cand_id: str, s: ScoreResult, w: ScoreResult, common: dict) -> Judgment:
        if self.params.aggregate == "mean":
            score = s.mean - w.mean
        else:
            score = s.total - w.total
        truncated = {"strong": s.truncated_tokens, "weak": w.truncated_tokens}
        if any(truncated.values()):
            self.counters["truncated"] += 1
        return Judgment(
            judge=self.name,
            candidate_ids=[cand_id],
            score=score,
            scores={
                "logp_strong": s.total,
                "logp_weak": w.total,
                "tokens_strong": len(s.token_logprobs),
                "tokens_weak": len(w.token_logprobs),
                "mean_strong": s.mean,
                "mean_weak": w.mean,
            },
            **{
                **common,
                "details": {
                    **common["details"],
                    "aggregate": self.params.aggregate,
                    "truncated_tokens": truncated,
                },
            },
        )
