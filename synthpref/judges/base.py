"""The judge kit: a judge is a prompt (``render``) and a reader of replies (``parse``).

:class:`Judge` owns everything else a judge that asks a model must get right, so every judge gets it
right the same way: which candidates one judgment covers (``unit``: each candidate, each pair of
candidates asked in both orders with ``samples`` draws per order, or all of a prompt's candidates in
one question), loading, validating and fingerprinting its templates, building requests (pre-filled
reply start, JSON schema, log-probabilities, only where the backend supports them), re-asking
unparseable replies (:mod:`synthpref.judges.asking`), the ``failed`` judgment that keeps the raw text,
and every provenance field of a :class:`~synthpref.records.Judgment` (model, template hash, sampling,
attempts, raw replies, errors) plus the ``judgments`` / ``failed`` / ``retries`` counters. A judging
model that reasons is read from its final answer only; its reasoning becomes the judgment's
``rationale`` where the verdict gives none.

A subclass says what is judged and how a reply reads; optional hooks add the rest:

- ``prompt`` (inline Jinja text) or ``default_template`` (a template path), rendered with
  ``instruction``, ``response`` (or ``response_a`` / ``response_b``, or ``responses``), ``record``,
  ``params``, ``json_output`` and whatever :meth:`Judge.variables` adds. On a multi-turn record
  ``instruction`` holds the earlier turns as a marked context block, then the user's final message
  (:func:`~synthpref.judges.units.instruction`); a template that lays the conversation out itself
  reads ``history`` (the messages before the final one, each with ``role`` and ``content``) and
  ``final_message`` (that message's text) instead;
- :meth:`Judge.parse` turns one reply into a value, raising ``ParseError`` when it cannot;
- :meth:`Judge.verdict` turns a unit's answers into a :class:`Verdict` (default: the mean of the
  values, failed when any question failed); :meth:`Judge.asks` asks several questions per unit
  (aspects, checklist items); :meth:`Judge.context` reads per-record inputs, raising :class:`Skip`
  to record failed judgments without asking.
"""

from __future__ import annotations

import hashlib
import itertools
from abc import abstractmethod
from typing import Any, ClassVar, Literal

from synthpref.backends.client import ModelClient
from synthpref.backends.types import Completion
from synthpref.errors import TemplateError
from synthpref.judges.asking import (
    Answer,
    JudgeParams,
    ask_until_parsed,
    judge_request,
)
from synthpref.judges.units import Ask, Form, Skip, Unit, Verdict, instruction
from synthpref.records import Candidate, Judgment, Record
from synthpref.stages.base import Stage
from synthpref.templates import InvalidTemplate, Template, inline_template, load_template

__all__ = [
    "Answer",
    "Ask",
    "Form",
    "Judge",
    "JudgeParams",
    "JudgeStage",
    "Skip",
    "Unit",
    "Verdict",
    "instruction",
]

ORDERS = ("ab", "ba")


class JudgeStage(Stage):
    """Base of every stage that judges with a model: its kind, its model and its client.

    Subclass :class:`Judge` instead unless the judge does not ask questions and parse replies (the
    log-probability judges score text instead)."""

    kind = "judge"
    params: JudgeParams
    model_params = ("model",)

    def client(self) -> ModelClient:
        return self.model_client(self.params.model)


class Judge(JudgeStage):
    """A judge that asks its model questions and reads the replies: subclass, write ``prompt`` (or
    ``default_template``) and :meth:`parse`; see the module docstring for the optional hooks."""

    unit: ClassVar[Literal["candidate", "pair", "prompt"]] = "candidate"
    prompt: ClassVar[str] = ""
    """The judge's prompt as inline Jinja text (or set ``default_template`` to a template path)."""
    default_template: ClassVar[str] = ""
    reply_prefix: ClassVar[str] = ""
    """The start of the reply, pre-filled where the backend allows and no JSON schema is used."""

    # hooks --------------------------------------------------------------------------------------

    @abstractmethod
    def parse(self, reply: str, completion: Completion) -> Any:
        """The value of one reply (a number, or an object the verdict reads); ``ParseError`` when
        the reply does not say it, which re-asks and finally records the failure."""

    def variables(self, unit: Unit) -> dict[str, Any]:
        """Template variables beyond the standard ones."""
        return {}

    def context(self, record: Record) -> dict[str, Any]:
        """Per-record inputs the prompts need (``unit.context``); raise :class:`Skip` to fail the
        record's units without asking."""
        return {}

    def asks(self, unit: Unit, form: Form) -> list[Ask]:
        """The questions for one unit. Default: one; for pairs, both orders x ``samples`` draws."""
        if self.unit != "pair":
            return [Ask(self.render(unit, form))]
        samples = getattr(self.params, "samples", 1)
        out = []
        for order in ORDERS:
            text = self.render(unit.shown(order), form)
            out += [Ask(text, order, s) for s in range(samples)]
        return out

    def verdict(self, unit: Unit, answers: list[Answer]) -> Verdict:
        """Default: the mean of the answers' values (numbers, or objects with a ``score``); failed
        when any question failed."""
        if not all(a.ok for a in answers):
            return Verdict(None)
        values = [getattr(a.value, "score", a.value) for a in answers]
        return Verdict(sum(values) / len(values))

    def json_schema(self) -> dict[str, Any] | None:
        """A JSON schema for the reply, used where the backend enforces one (and the params'
        ``structured`` is not ``off``); None: free text."""
        return None

    def prefix(self) -> str:
        """The reply's pre-filled start (default ``reply_prefix``)."""
        return self.reply_prefix

    def wants_logprobs(self) -> bool:
        """Ask for the top-20 token log-probabilities of the reply where the backend returns them."""
        return False

    def template_sources(self) -> dict[str, tuple[str, str]]:
        """Key -> (template path, or inline text when it holds a newline or a Jinja tag, and the
        recipe field that chose it). Several keys: ``template_hash`` names each."""
        chosen = getattr(self.params, "template", None)
        return {"template": (chosen or self.prompt or self.default_template, "template")}

    # the kit ------------------------------------------------------------------------------------

    @property
    def score_range(self) -> tuple[float, float] | None:
        return (-1.0, 1.0) if self.unit == "pair" else None

    def templates(self) -> dict[str, Template]:
        return {key: self._load(source) for key, (source, _) in self.template_sources().items()}

    @property
    def template(self) -> Template:
        """The judge's one template (judges with several use :meth:`templates`)."""
        return next(iter(self.templates().values()))

    def _load(self, source: str) -> Template:
        if "\n" in source or "{{" in source or "{%" in source:
            return inline_template(source, f"<{type(self).__name__}.prompt>")
        if not source:
            raise InvalidTemplate(f"{type(self).__name__} has no prompt or default_template")
        return load_template(source, self.base_dir)

    def render(self, unit: Unit, form: Form, template: Template | None = None, **extra) -> str:
        """The prompt for one unit: ``template`` (default: the judge's) with the standard
        variables, :meth:`variables` and ``extra``."""
        shown = unit.candidates
        names: dict[str, Any] = {"responses": [c.text for c in shown]}
        if self.unit == "candidate":
            names["response"] = shown[0].text
        elif self.unit == "pair":
            names["response_a"], names["response_b"] = shown[0].text, shown[1].text
        variables = {
            "instruction": unit.instruction,
            "history": unit.history,
            "final_message": unit.final_message,
            "record": unit.record,
            "params": self.params,
            "json_output": form.json_output,
            **names,
            **unit.context,
            **self.variables(unit),
            **extra,
        }
        return (template or self.template).render(**variables)

    def template_hash(self) -> str:
        hashes = {key: t.hash for key, t in self.templates().items()}
        if list(hashes) == ["template"]:
            return hashes["template"]
        return ",".join(f"{k}={h}" for k, h in hashes.items())

    def check(self, previous) -> list[str]:
        problems = []
        for source, where in self.template_sources().values():
            try:
                self._load(source)
            except TemplateError as exc:
                problems.append(f"{where}: {exc}")
        samples = getattr(self.params, "samples", 1)
        if samples > 1 and self.params.temperature == 0:
            problems.append(
                f"samples: {samples} with temperature: 0 draws the same verdict {samples} times; "
                "set temperature > 0 (e.g. 0.7) or samples: 1"
            )
        if not any(s.kind == "generator" for s in previous):
            problems.append("a judge needs candidates: put a generate stage before it")
        return problems

    def fingerprint(self) -> dict:
        return {key: t.hash for key, t in self.templates().items()}

    def units(self, record: Record) -> list[tuple[Candidate, ...]]:
        """The candidate groups of a record that get one judgment each."""
        if self.unit == "candidate":
            return [(c,) for c in record.candidates]
        if self.unit == "prompt":
            return [tuple(record.candidates)] if record.candidates else []
        pairs = list(itertools.combinations(record.candidates, 2))
        cap = getattr(self.params, "max_pairs", None)
        if cap is not None and len(pairs) > cap:

            def key(p: tuple[Candidate, ...]) -> str:
                blob = f"{self.params.seed}|{record.id}|{p[0].id}|{p[1].id}"
                return hashlib.sha256(blob.encode()).hexdigest()

            chosen = set(map(id, sorted(pairs, key=key)[:cap]))
            pairs = [p for p in pairs if id(p) in chosen]
        return pairs

    def form(self, client: ModelClient) -> Form:
        schema = self.json_schema()
        json_output = (
            schema is not None
            and getattr(self.params, "structured", "auto") == "auto"
            and client.supports("json_schema")
        )
        prefill = self.prefix() if not json_output and client.supports("prefill") else ""
        logprobs = self.wants_logprobs() and client.supports("top_logprobs")
        return Form(
            json_output, prefill or "", 20 if logprobs else 0, schema if json_output else None
        )

    async def process(self, records: list[Record]) -> list[Record]:
        client = self.client()
        form = self.form(client)
        jobs: list[tuple[Unit, list[Ask]]] = []
        skipped: dict[str, Skip] = {}
        for record in records:
            try:
                context = self.context(record)
            except Skip as skip:
                skipped[record.id] = skip
                context = {}
            for group in self.units(record):
                unit = Unit(record, group, context)
                jobs.append((unit, [] if record.id in skipped else self.asks(unit, form)))
        requests, owners = [], []
        for j, (_, asks) in enumerate(jobs):
            for ask in asks:
                request = judge_request(
                    ask.prompt,
                    form.prefill,
                    top_logprobs=form.top_logprobs,
                    json_schema=form.json_schema,
                )
                requests.append(request)
                owners.append((j, ask))
        answers = await ask_until_parsed(
            client,
            requests,
            self.parse,
            self.params,
            prefix=form.prefill,
            samples=[ask.sample for _, ask in owners],
        )
        per_job: list[list[Answer]] = [[] for _ in jobs]
        for (j, ask), answer in zip(owners, answers, strict=True):
            answer.label, answer.sample = ask.label, ask.sample
            per_job[j].append(answer)
        for (unit, _), got in zip(jobs, per_job, strict=True):
            skip = skipped.get(unit.record.id)
            if skip is not None:
                made = [self._skipped(unit, c, skip) for c in self._judged(unit)]
            else:
                made = self._judgments(unit, got)
            unit.record.judgments.extend(made)
        return records

    def _judged(self, unit: Unit) -> list[tuple[Candidate, ...]]:
        """Candidate-id groups of the judgments a unit produces."""
        if self.unit == "prompt":
            return [(c,) for c in unit.candidates]
        return [unit.candidates]

    def _skipped(self, unit: Unit, group: tuple[Candidate, ...], skip: Skip) -> Judgment:
        self.counters["judgments"] += 1
        self.counters["failed"] += 1
        if skip.counter:
            self.counters[skip.counter] += 1
        return Judgment(
            judge=self.name,
            candidate_ids=[c.id for c in group],
            status="failed",
            error=str(skip),
            attempts=0,
            template_hash=self.template_hash(),
            model=self.params.model,
        )

    def _judgments(self, unit: Unit, answers: list[Answer]) -> list[Judgment]:
        verdict = self.verdict(unit, answers)
        labelled = len(answers) > 1 or any(a.label for a in answers)
        errors = [f"{a.label}: {a.error}" if labelled else a.error for a in answers if not a.ok]
        raw = verdict.raw
        if raw is None:
            raw = (
                "\n\n".join(f"[{a.label}]\n{a.raw}" for a in answers)
                if len(answers) > 1
                else answers[0].raw
            )
        common = dict(
            judge=self.name,
            raw=raw,
            rationale=verdict.rationale or _reasoning(answers),
            template_hash=self.template_hash(),
            model=self.params.model,
            sampling=answers[0].sampling or {},
            attempts=max(a.attempts for a in answers),
            details=verdict.details,
        )
        retries = sum(a.attempts - 1 for a in answers)
        if self.unit == "prompt":
            scored = [
                (c, verdict.scores.get(c.id) if verdict.score is not None else None)
                for c in unit.candidates
            ]
        else:
            scored = [(None, verdict.score)]
        out = []
        for k, (cand, score) in enumerate(scored):
            failed = score is None
            self.counters["judgments"] += 1
            self.counters["retries"] += retries if k == 0 else 0
            if failed:
                self.counters["failed"] += 1
            out.append(
                Judgment(
                    candidate_ids=[cand.id] if cand else [c.id for c in unit.candidates],
                    score=score,
                    scores={} if cand else verdict.scores,
                    status="failed" if failed else "ok",
                    error=(verdict.error or "; ".join(errors) or "no score") if failed else None,
                    **common,
                )
            )
        return out


def _reasoning(answers: list[Answer]) -> str:
    """A reasoning judge's reasoning, as a judgment's rationale when its verdict gives none (the
    verdict itself is parsed from the final answers only); labelled when there are several."""
    if len(answers) == 1:
        return answers[0].reasoning or ""
    return "\n\n".join(f"[{a.label}]\n{a.reasoning}" for a in answers if a.reasoning)
