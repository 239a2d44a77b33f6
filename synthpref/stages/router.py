"""The router: assigns each prompt a domain (``record.annotations["domain"]``) for later stages.

Judges that customise themselves per domain (the density-ratio judge picks its system prompts and
exemplars by it) read the annotation. The domain comes from, in order:

1. an input metadata field (``metadata_field``), when the source already labels its prompts;
2. keyword and regular-expression rules, first match wins (``rules``; the shipped rules cover the
   domains ``safety`` and ``reasoning``, anything else falls through);
3. a model (``model``), for the prompts no rule matched, asked with ``prompts/router/classify.jinja``:
   ``method: likelihood`` teacher-forces each domain name as the reply and takes the most likely one
   (needs a scoring backend, always yields a valid domain), ``method: generate`` reads the name from a
   greedy reply (any backend; an unreadable reply falls back to the default and is counted);
4. ``default``.

``annotations["domain_source"]`` records which of these decided (e.g. ``rule:2``, ``model``).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from synthpref.backends.types import GenerationRequest, SamplingParams, ScoreRequest
from synthpref.errors import TemplateError
from synthpref.records import Message, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage
from synthpref.templates import load_template


class Rule(StageParams):
    domain: str
    keywords: list[str] = Field(
        default_factory=list,
        description="words or phrases, matched case-insensitively at word boundaries",
    )
    patterns: list[str] = Field(
        default_factory=list, description="regular expressions (Python syntax, case-insensitive)"
    )

    def compiled(self) -> re.Pattern[str]:
        parts = [r"\b" + re.escape(k) + r"\b" for k in self.keywords] + list(self.patterns)
        return re.compile("|".join(f"(?:{p})" for p in parts), re.IGNORECASE)


SHIPPED_RULES = [
    Rule(
        domain="safety",
        keywords=(
            "weapon|bomb|explosive|poison|murder|hurt someone|suicide|self-harm|steal|shoplift|"
            "hack into|malware|ransomware|phishing|launder|counterfeit|illegal drugs|meth|stalk|"
            "untraceable"
        ).split("|"),
    ),
    Rule(
        domain="reasoning",
        keywords=(
            "calculate|compute|solve|prove|equation|integral|derivative|probability|how many|"
            "step by step|algorithm|python|javascript|function|code|debug|sql|regex|puzzle|logic"
        ).split("|"),
        patterns=[r"\d+\s*[-+*/^x×÷]\s*\d+"],
    ),
]

DEFAULT_DESCRIPTIONS = {
    "chat": "conversation, advice, writing, explanations and general knowledge",
    "reasoning": "mathematics, logic puzzles, programming and other step-by-step problem solving",
    "safety": "requests that could cause harm: weapons, crime, self-harm, dangerous or illegal acts",
}


class RouteParams(StageParams):
    key: str = Field("domain", description="the annotation this stage sets")
    domains: list[str] = Field(
        default_factory=lambda: ["chat", "reasoning", "safety"],
        min_length=1,
        description="the domains a prompt may be given",
    )
    default: str = Field("chat", description="the domain of prompts nothing else decided")
    metadata_field: str | None = Field(
        None, description="take the domain from this input metadata field where it is set"
    )
    rules: list[Rule] | None = Field(
        None,
        description="first matching rule wins; null: the shipped safety/reasoning rules; []: none",
    )
    model: str | None = Field(
        None, description="classify the prompts no rule matched with this model; null: no model"
    )
    method: Literal["likelihood", "generate"] = Field(
        "likelihood",
        description="likelihood: the most likely domain name as the model's reply (needs scoring); "
        "generate: the name the model writes",
    )
    template: str = Field(
        "router/classify.jinja", description="the classification prompt the model reads"
    )
    descriptions: dict[str, str] = Field(
        default_factory=dict,
        description="domain -> one-line description for the classification prompt",
    )

    @model_validator(mode="after")
    def _known_domains(self) -> RouteParams:
        allowed = set(self.domains)
        if self.default not in allowed:
            raise ValueError(f"default {self.default!r} is not one of the domains {self.domains}")
        for rule in self.rules or []:
            if rule.domain not in allowed:
                raise ValueError(f"rule domain {rule.domain!r} is not one of {self.domains}")
        return self


@register_stage
class Route(Stage):
    """Assigns each prompt a domain (metadata field, rules, or a model) in record.annotations."""

    type_name = "route"
    kind = "annotator"
    Params = RouteParams
    params: RouteParams
    model_params = ("model",)

    def requirements(self) -> dict[str, set]:
        need = "score" if self.params.method == "likelihood" else "generate"
        return {m: {need} for m in self.models_used()}

    def rules(self) -> list[Rule]:
        if self.params.rules is not None:
            return self.params.rules
        return [r for r in SHIPPED_RULES if r.domain in self.params.domains]

    def check(self, previous: list[Stage]) -> list[str]:
        problems = []
        for i, rule in enumerate(self.rules()):
            try:
                rule.compiled()
            except re.error as exc:
                problems.append(f"rules[{i}]: invalid pattern: {exc}")
        if self.params.model:
            try:
                load_template(self.params.template, self.base_dir)
            except TemplateError as exc:
                problems.append(f"template: {exc}")
        return problems

    def fingerprint(self) -> dict:
        extra = {"rules": [r.model_dump() for r in self.rules()]}
        if self.params.model:
            extra["template"] = load_template(self.params.template, self.base_dir).hash
        return extra

    def _description(self, domain: str) -> str:
        return self.params.descriptions.get(domain, DEFAULT_DESCRIPTIONS.get(domain, domain))

    async def process(self, records: list[Record]) -> list[Record]:
        p = self.params
        compiled = [r.compiled() for r in self.rules()]
        undecided: list[Record] = []
        for record in records:
            text = "\n".join(m.content for m in record.prompt if m.role != "assistant")
            value = record.metadata.get(p.metadata_field) if p.metadata_field else None
            if value is not None and str(value) in p.domains:
                self._set(record, str(value), "metadata")
                continue
            if value is not None:
                self.counters["metadata_not_a_domain"] += 1
            for i, (rule, pattern) in enumerate(zip(self.rules(), compiled, strict=True)):
                if pattern.pattern and pattern.search(text):
                    self._set(record, rule.domain, f"rule:{i}")
                    break
            else:
                undecided.append(record)
        if undecided and p.model:
            await self._classify(undecided)
        else:
            for record in undecided:
                self._set(record, p.default, "default")
        return records

    def _set(self, record: Record, domain: str, source: str) -> None:
        record.annotations[self.params.key] = domain
        record.annotations[f"{self.params.key}_source"] = source
        self.counters[f"{self.params.key}_{domain}"] += 1

    def _question(self, record: Record) -> str:
        instruction = "\n\n".join(
            f"{m.role.upper()}: {m.content}" if len(record.prompt) > 1 else m.content
            for m in record.prompt
        )
        return load_template(self.params.template, self.base_dir).render(
            instruction=instruction,
            domains=[(d, self._description(d)) for d in self.params.domains],
        )

    async def _classify(self, records: list[Record]) -> None:
        client = self.model_client(self.params.model)  # type: ignore[arg-type]
        domains = self.params.domains
        if self.params.method == "likelihood":
            requests = [
                ScoreRequest(
                    messages=[
                        Message(role="user", content=self._question(r)),
                        Message(role="assistant", content=d),
                    ],
                    include_end_of_turn=True,
                    truncation="left",
                )
                for r in records
                for d in domains
            ]
            results = await client.score(requests)
            for k, record in enumerate(records):
                totals = [res.total for res in results[k * len(domains) : (k + 1) * len(domains)]]
                best = max(range(len(domains)), key=lambda j: totals[j])
                self._set(record, domains[best], "model")
            return
        requests = [
            GenerationRequest(
                messages=[Message(role="user", content=self._question(r))],
                params=SamplingParams(temperature=0.0, max_tokens=8),
            )
            for r in records
        ]
        results = await client.generate(requests)
        for record, result in zip(records, results, strict=True):
            domain = parse_domain(result.completions[0].text, domains)
            if domain is None:
                self.counters["model_unparsed"] += 1
                self._set(record, self.params.default, "default")
            else:
                self._set(record, domain, "model")


def parse_domain(text: str, domains: list[str]) -> str | None:
    """The domain named first in ``text`` (whole words, case-insensitive), or None."""
    found = []
    for d in domains:
        m = re.search(r"\b" + re.escape(d) + r"\b", text, re.IGNORECASE)
        if m:
            found.append((m.start(), d))
    return min(found)[1] if found else None
