"""Checklist evaluation (TICK, Cook et al. 2024): instruction-specific YES/NO questions, answered per
response.

``checklist_writer`` asks a model for 2-8 YES/NO questions that together check whether a response
follows the instruction, phrased so that YES is good. The checklist is written once per prompt and kept
in ``record.annotations["checklist"]`` (with the writer's model, template hash and raw reply), so every
candidate of the prompt is checked against the same questions, and a later run or stage can reuse it.
A recipe may instead supply checklists in an input column (``source_field``).

``checklist_judge`` asks one question per call (the question, the instruction and the response) and
reads a YES or NO. The judgment's score is the pass rate, the share of questions answered YES. Where
the backend returns token log-probabilities, each answer's P(YES) = p(yes) / (p(yes) + p(no)) at the
answer token is kept too and averaged into ``scores["p_yes_mean"]``, a soft score that separates
responses a small judge would tie on (``score: p_yes`` makes it the headline score).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from synthpref.backends.types import Completion
from synthpref.errors import TemplateError
from synthpref.judges.asking import Answer as JudgeAnswer
from synthpref.judges.asking import ask_until_parsed, judge_request
from synthpref.judges.base import (
    Ask,
    Form,
    Judge,
    JudgeParams,
    JudgeStage,
    Skip,
    Unit,
    Verdict,
    instruction,
)
from synthpref.judges.parsing import ParseError, json_object
from synthpref.records import Record
from synthpref.stages.registry import register_stage
from synthpref.templates import Template, load_template

ANNOTATION = "checklist"


# writer -----------------------------------------------------------------------------------------


class ChecklistWriterParams(JudgeParams):
    max_tokens: int = Field(256, ge=1, description="longest checklist reply, in tokens")
    min_questions: int = Field(2, ge=1, description="fewer parsed questions is a failed checklist")
    max_questions: int = Field(8, ge=1, description="questions beyond this are dropped (counted)")
    structured: Literal["auto", "off"] = Field(
        "auto", description="auto: JSON constrained by a schema where the backend supports it"
    )
    prefill: bool = Field(
        True,
        description="start the reply with '1.' where the backend allows, so even small models "
        "answer with a numbered list",
    )
    source_field: str | None = Field(
        None,
        description="input column (record metadata) that already holds a checklist (a list of "
        "questions); records that have one skip the model",
    )
    template: str | None = Field(None, description="a template path overriding the shipped one")

    @model_validator(mode="after")
    def _bounds(self) -> ChecklistWriterParams:
        if self.min_questions > self.max_questions:
            raise ValueError("min_questions is larger than max_questions")
        return self


@register_stage
class ChecklistWriter(JudgeStage):
    """Writes 2-8 YES/NO questions per instruction into record.annotations['checklist'] (TICK)."""

    type_name = "checklist_writer"
    kind = "annotator"
    Params = ChecklistWriterParams
    params: ChecklistWriterParams

    @property
    def template(self) -> Template:
        return load_template(self.params.template or "checklist/write.jinja", self.base_dir)

    def check(self, previous) -> list[str]:
        try:
            self.template  # noqa: B018 - loads and validates the path
        except TemplateError as exc:
            return [f"template: {exc}"]
        return []

    def fingerprint(self) -> dict:
        return {"template": self.template.hash}

    def json_schema(self) -> dict[str, Any]:
        return {
            "title": "checklist",
            "type": "object",
            "properties": {
                "questions": {
                    "type": "array",
                    "items": {"type": "string"},
                    "minItems": self.params.min_questions,
                    "maxItems": self.params.max_questions,
                }
            },
            "required": ["questions"],
            "additionalProperties": False,
        }

    async def process(self, records: list[Record]) -> list[Record]:
        todo = []
        for record in records:
            given = self._given(record)
            if given is not None:
                record.annotations[ANNOTATION] = given
                self.counters["from_source"] += 1
            else:
                todo.append(record)
        if not todo:
            return records
        client = self.client()
        json_output = self.params.structured == "auto" and client.supports("json_schema")
        prefill = (
            "1." if self.params.prefill and not json_output and client.supports("prefill") else ""
        )
        requests = []
        for record in todo:
            text = self.template.render(
                instruction=instruction(record),
                min_questions=self.params.min_questions,
                max_questions=self.params.max_questions,
                json_output=json_output,
            )
            requests.append(
                judge_request(
                    text, prefill, json_schema=self.json_schema() if json_output else None
                )
            )

        def parse(raw: str, completion: Completion) -> list[str]:
            return parse_checklist(raw, self.params.min_questions)

        answers = await ask_until_parsed(client, requests, parse, self.params, prefix=prefill)
        for record, ans in zip(todo, answers, strict=True):
            self.counters["checklists"] += 1
            self.counters["retries"] += ans.attempts - 1
            questions = ans.value[: self.params.max_questions] if ans.ok else []
            if ans.ok:
                self.counters["questions"] += len(questions)
                if len(ans.value) > len(questions):
                    self.counters["truncated"] += 1
            else:
                self.counters["failed"] += 1
            record.annotations[ANNOTATION] = {
                "questions": questions,
                "status": "ok" if ans.ok else "failed",
                "error": ans.error,
                "writer": self.name,
                "model": self.params.model,
                "template_hash": self.template.hash,
                "sampling": ans.sampling or {},
                "attempts": ans.attempts,
                "raw": ans.raw,
            }
        return records

    def _given(self, record: Record) -> dict[str, Any] | None:
        field = self.params.source_field
        value = record.metadata.get(field) if field else None
        if isinstance(value, str):
            try:
                value = parse_checklist(value, 1)
            except ParseError:
                value = None
        if not (isinstance(value, list) and value and all(isinstance(q, str) for q in value)):
            return None
        return {
            "questions": [q.strip() for q in value if q.strip()],
            "status": "ok",
            "error": None,
            "writer": f"input:{field}",
            "model": None,
            "template_hash": None,
            "raw": "",
        }


_ITEM = re.compile(r"^\s*(?:[-*•]|\(?\d{1,2}[.):]|Q\d{1,2}[.):]?)\s+(.*\S)\s*$", re.IGNORECASE)


_PLACEHOLDER = re.compile(r"\.\.\.|…|<[^>]*>")


def parse_checklist(text: str, min_questions: int = 2) -> list[str]:
    """Questions from JSON (``{"questions": [...]}`` or a list) or from a numbered / bulleted list.

    Every line that ends with a question mark is a question (list markers removed); statements,
    headers, chatter, copies of the prompt's placeholders ("Does the response ...?") and an item cut
    off by max_tokens are dropped; duplicates are kept once. Fewer than ``min_questions`` is a
    ParseError.
    """
    questions: list[str] = []
    parsed = _json_value(text)
    if isinstance(parsed, dict):
        parsed = parsed.get("questions") or parsed.get("checklist")
    if isinstance(parsed, list):
        questions = [q.strip() for q in parsed if isinstance(q, str) and q.strip()]
    else:
        for line in text.splitlines():
            m = _ITEM.match(line)
            item = m.group(1) if m else line.strip()
            item = item.strip().strip("*").strip()
            if item.endswith("?"):
                questions.append(item)
    questions = [q for q in dict.fromkeys(questions) if not _PLACEHOLDER.search(q)]
    if len(questions) < min_questions:
        raise ParseError(
            f"found {len(questions)} question(s), need at least {min_questions}: {text[:200]!r}"
        )
    return questions


def _json_value(text: str) -> Any:
    obj = json_object(text)
    if obj is not None:
        return obj
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        try:
            return json.loads(text[start : end + 1])
        except json.JSONDecodeError:
            return None
    return None


# judge ------------------------------------------------------------------------------------------


class ChecklistJudgeParams(JudgeParams):
    max_tokens: int = Field(8, ge=1, description="the answer is one word; a few tokens suffice")
    structured: Literal["auto", "off"] = Field(
        "auto", description="auto: JSON constrained by a schema where the backend supports it"
    )
    score: Literal["pass_rate", "p_yes"] = Field(
        "pass_rate",
        description="the judgment's score: the share of YES answers, or the mean P(YES) from "
        "log-probabilities (falls back to the pass rate where the backend gives none)",
    )
    template: str | None = Field(None, description="a template path overriding the shipped one")


@dataclass(frozen=True)
class YesNo:
    yes: bool
    p_yes: float | None


_ANSWER_SCHEMA = {
    "title": "answer",
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["YES", "NO"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


@register_stage
class ChecklistJudge(Judge):
    """Answers each checklist question YES/NO per candidate; score = pass rate (TICK)."""

    type_name = "checklist_judge"
    Params = ChecklistJudgeParams
    params: ChecklistJudgeParams
    score_range = (0.0, 1.0)
    default_template = "checklist/answer.jinja"
    reply_prefix = "Answer:"

    def check(self, previous) -> list[str]:
        problems = super().check(previous)
        if not any(isinstance(s, ChecklistWriter) for s in previous):
            problems.append(
                "a checklist judge needs checklists: put a checklist_writer stage before it"
            )
        return problems

    def json_schema(self) -> dict[str, Any]:
        return _ANSWER_SCHEMA

    def wants_logprobs(self) -> bool:
        return True

    def context(self, record: Record) -> dict[str, Any]:
        checklist = record.annotations.get(ANNOTATION) or {}
        questions = checklist.get("questions") or []
        if not questions:
            why = checklist.get("error") or "no checklist_writer output"
            raise Skip(f"the prompt has no checklist ({why})", counter="no_checklist")
        return {"questions": questions}

    def asks(self, unit: Unit, form: Form) -> list[Ask]:
        return [Ask(self.render(unit, form, question=q), q) for q in unit.context["questions"]]

    def parse(self, reply: str, completion: Completion) -> YesNo:
        return YesNo(parse_yes_no(reply), p_yes(completion.top_logprobs))

    def verdict(self, unit: Unit, answers: list[JudgeAnswer[YesNo]]) -> Verdict:
        self.counters["questions"] += len(answers)
        failed = [a for a in answers if not a.ok]
        self.counters["failed_answers"] += len(failed)
        answered = [a.value for a in answers if a.ok]
        pass_rate = sum(a.yes for a in answered) / len(answered) if answered else None
        soft = [a.p_yes for a in answered if a.p_yes is not None]
        p_yes_mean = sum(soft) / len(soft) if soft and len(soft) == len(answers) else None
        score = p_yes_mean if self.params.score == "p_yes" and p_yes_mean is not None else pass_rate
        questions = [a.label for a in answers]
        return Verdict(
            score=None if failed else score,
            scores={"pass_rate": pass_rate, "p_yes_mean": p_yes_mean},
            details={
                "checklist_hash": hashlib.sha256("\n".join(questions).encode()).hexdigest()[:16],
                "checklist_writer": (unit.record.annotations.get(ANNOTATION) or {}).get("writer"),
                "answers": [
                    {
                        "question": a.label,
                        "answer": ("YES" if a.value.yes else "NO") if a.ok else None,
                        "p_yes": a.value.p_yes if a.ok else None,
                    }
                    for a in answers
                ],
            },
            error="; ".join(f"{a.label!r}: {a.error}" for a in failed) or None,
            raw="\n".join(f"[Q{k + 1}] {a.raw}" for k, a in enumerate(answers)),
        )


_YES_NO = re.compile(r"^[\s*_`\"'\[(]*(yes|no)\b", re.IGNORECASE)
_ANSWER_LABEL = re.compile(r"answer\s*\**\s*[:=]\s*", re.IGNORECASE)


def parse_yes_no(text: str) -> bool:
    """YES or NO from JSON ``{"answer": "YES"}``, a labelled ``Answer: no`` or a reply that starts
    with the word; anything else (including a yes or no buried in a sentence) is a ParseError."""
    obj = json_object(text)
    if obj is not None and isinstance(obj.get("answer"), str):
        value = obj["answer"].strip().upper()
        if value in ("YES", "NO"):
            return value == "YES"
        raise ParseError(f"answer {obj['answer']!r} is neither YES nor NO")
    label = _ANSWER_LABEL.search(text)
    rest = text[label.end() :] if label else text
    m = _YES_NO.match(rest)
    if not m:
        raise ParseError(f"no YES/NO answer at the start of {text[:120]!r}")
    return m.group(1).lower() == "yes"


def p_yes(top_logprobs: list[dict[str, float]] | None) -> float | None:
    """p(yes) / (p(yes) + p(no)) at the answer token, or None when no position offers one.

    The answer token is the first generated position whose most likely token spells the start of
    "yes" or "no" (tokenizers split " YES" into " Y" + "ES"); every alternative there that starts
    either word, in any case, counts towards it.
    """
    if not top_logprobs:
        return None
    for alternatives in top_logprobs:
        if not alternatives:
            continue
        if _yes_or_no(max(alternatives, key=alternatives.get)) is None:
            continue
        mass = {"yes": 0.0, "no": 0.0}
        for token, lp in alternatives.items():
            word = _yes_or_no(token)
            if word is not None:
                mass[word] += math.exp(lp)
        return mass["yes"] / (mass["yes"] + mass["no"])
    return None


def _yes_or_no(token: str) -> str | None:
    t = token.strip().lower()
    if not t:
        return None
    if "yes".startswith(t):
        return "yes"
    if "no".startswith(t):
        return "no"
    return None
