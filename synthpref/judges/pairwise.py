"""Pairwise judge with balanced position calibration and multiple evidence.

LLM judges favour a position (usually the first response), so a verdict from one order mixes quality
with position. Following Wang et al. (2023, "Large Language Models are not Fair Evaluators"), every pair
is judged in both orders (balanced position calibration) with ``samples`` verdicts per order (multiple
evidence), and the orders are averaged so the position preference cancels. Whether the two orders name
the same winner is recorded on every judgment, so a dataset can keep only consistent pairs.

Verdicts use WildBench's five levels, A++ / A+ / A=B / B+ / B++, worth +1, +0.5, 0, -0.5, -1 for A.
WildBench's length rule is on by default (K = 500 characters, WildBench's value): a *slight* win (A+ or
B+) by a response longer than the other by more than ``length_rule_chars`` characters is turned into a
tie, so a judge's taste for long answers cannot decide close calls. How many verdicts the
rule changed is counted per judgment (details) and per stage (counters).

``Judgment.score`` is the preference for ``candidate_ids[0]`` in [-1, 1]: the mean of the two orders'
mean verdicts, each read from candidate_ids[0]'s side. ``details`` hold per-order verdict lists (as
written and after the length rule), the per-order preferences, ``agree``, ``position_bias`` (the mean
preference for whichever response was shown first: +1 means the judge always picked A) and the length
rule's flips. The pair builder turns these into per-candidate scores (see ``candidate_scores``).

Stage counters: ``consistent`` / ``inconsistent`` judgments (orders agree or not), ``picked_first`` /
``picked_second`` / ``tied`` verdicts by position (a fair judge picks each position about equally
often), ``verdicts``, ``failed_verdicts``, ``retries``, ``failed`` judgments and
``length_rule_flips`` (its share is length_rule_flips / verdicts).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field

from synthpref.backends.types import Completion, GenerationRequest
from synthpref.judges.base import (
    Answer,
    JudgeParams,
    JudgeStage,
    ask_until_parsed,
    instruction,
    judge_request,
)
from synthpref.judges.parsing import ParseError, clip, json_object
from synthpref.metrics import sign
from synthpref.records import Candidate, Judgment, Record
from synthpref.stages.registry import register_stage
from synthpref.templates import Template, load_template

FIVE_LEVELS: dict[str, float] = {"A++": 1.0, "A+": 0.5, "A=B": 0.0, "B+": -0.5, "B++": -1.0}
ORDERS = ("ab", "ba")


class TwoOrderParams(JudgeParams):
    """Parameters shared by judges that compare two responses in both orders."""

    samples: int = Field(
        1,
        ge=1,
        description="verdicts drawn per order (multiple evidence); more than 1 needs temperature > 0",
    )
    max_pairs: int | None = Field(
        None,
        ge=1,
        description="compare at most this many pairs of candidates per prompt (a fixed random "
        "subset); default: all pairs",
    )
    reasoning: Literal["before", "after"] = Field(
        "before",
        description="before: the judge reasons, then gives its verdict (best for capable judges); "
        "after: the verdict comes first (pre-filled where the backend allows), then a short reason; "
        "use it with small judges and small max_tokens",
    )
    structured: Literal["auto", "off"] = Field(
        "auto",
        description="auto: ask for JSON constrained by a schema where the backend supports it "
        "(vLLM structured outputs, OpenAI response_format); off: always free text",
    )
    template: str | None = Field(None, description="a template path overriding the shipped one")


class PairwiseParams(TwoOrderParams):
    criteria: str | None = Field(
        None,
        description="what 'better' means for this dataset, in a sentence or two; default: overall "
        "helpfulness, accuracy and faithfulness to the instruction",
    )
    length_rule_chars: int | None = Field(
        500,
        ge=0,
        description="WildBench's length rule (on by default, WildBench's K=500): a slight win "
        "(A+/B+) by a response longer than the other by more than this many characters counts as "
        "a tie; null: off",
    )


@dataclass(frozen=True)
class Verdict:
    label: str
    rationale: str


@dataclass
class _Unit:
    record: Record
    first: Candidate
    second: Candidate
    order: str
    sample: int


class TwoOrderJudge(JudgeStage):
    """Base of judges that compare two responses in both orders and calibrate by averaging.

    Subclasses define the verdict labels and their values, the prompt, and the parser.
    """

    params: TwoOrderParams
    verdict_values: ClassVar[dict[str, float]] = FIVE_LEVELS
    verdict_prefix: ClassVar[str] = "Verdict:"
    reason_key: ClassVar[str] = "reasoning"
    default_template: ClassVar[str] = ""
    score_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)

    # subclass hooks ---------------------------------------------------------------------------

    def render(self, record: Record, response_a: str, response_b: str, json_output: bool) -> str:
        raise NotImplementedError

    def parse(self, raw: str, completion: Completion) -> Verdict:
        raise NotImplementedError

    def json_schema(self) -> dict[str, Any]:
        verdict = {"type": "string", "enum": list(self.verdict_values)}
        reason = {"type": "string"}
        props = (
            {self.reason_key: reason, "verdict": verdict}
            if self.params.reasoning == "before"
            else {"verdict": verdict, self.reason_key: reason}
        )
        return {
            "title": "verdict",
            "type": "object",
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        }

    def length_rule(self, label: str, a: Candidate, b: Candidate) -> str:
        """The verdict after any rule that depends on the responses (none by default)."""
        return label

    # shared machinery -------------------------------------------------------------------------

    @property
    def template(self) -> Template:
        return load_template(self.params.template or self.default_template, self.base_dir)

    def check(self, previous) -> list[str]:
        problems = []
        try:
            self.template  # noqa: B018 - loads and validates the path
        except (FileNotFoundError, ValueError) as exc:
            problems.append(f"template: {exc}")
        if self.params.samples > 1 and self.params.temperature == 0:
            problems.append(
                f"samples: {self.params.samples} with temperature: 0 draws the same verdict "
                f"{self.params.samples} times; set temperature > 0 (e.g. 0.7) or samples: 1"
            )
        if not any(s.kind == "generator" for s in previous):
            problems.append("a judge needs candidates: put a generate stage before it")
        return problems

    def fingerprint(self) -> dict:
        return {"template": self.template.hash}

    def pairs_of(self, record: Record) -> list[tuple[Candidate, Candidate]]:
        pairs = list(itertools.combinations(record.candidates, 2))
        cap = self.params.max_pairs
        if cap is not None and len(pairs) > cap:

            def key(p: tuple[Candidate, Candidate]) -> str:
                blob = f"{self.params.seed}|{record.id}|{p[0].id}|{p[1].id}"
                return hashlib.sha256(blob.encode()).hexdigest()

            chosen = set(map(id, sorted(pairs, key=key)[:cap]))
            pairs = [p for p in pairs if id(p) in chosen]
        return pairs

    async def process(self, records: list[Record]) -> list[Record]:
        client = self.client()
        json_output = self.params.structured == "auto" and client.supports("json_schema")
        prefill = (
            self.verdict_prefix
            if self.params.reasoning == "after" and not json_output and client.supports("prefill")
            else None
        )
        units: list[_Unit] = []
        requests: list[GenerationRequest] = []
        for record in records:
            for x, y in self.pairs_of(record):
                for order in ORDERS:
                    a, b = (x, y) if order == "ab" else (y, x)
                    text = self.render(record, a.text, b.text, json_output)
                    request = judge_request(
                        text, prefill, json_schema=self.json_schema() if json_output else None
                    )
                    for s in range(self.params.samples):
                        units.append(_Unit(record, x, y, order, s))
                        requests.append(request)
        answers = await ask_until_parsed(
            client,
            requests,
            self.parse,
            self.params,
            prefix=prefill or "",
            samples=[u.sample for u in units],
        )
        grouped: dict[tuple[str, str, str], list[tuple[_Unit, Answer[Verdict]]]] = {}
        for unit, answer in zip(units, answers, strict=True):
            key = (unit.record.id, unit.first.id, unit.second.id)
            grouped.setdefault(key, []).append((unit, answer))
        for items in grouped.values():
            unit = items[0][0]
            unit.record.judgments.append(self._judgment(unit.first, unit.second, items))
        return records

    def _judgment(
        self, x: Candidate, y: Candidate, items: list[tuple[_Unit, Answer[Verdict]]]
    ) -> Judgment:
        per: dict[str, dict[str, Any]] = {}
        flips = 0
        for order in ORDERS:
            a, b = (x, y) if order == "ab" else (y, x)
            answers = [ans for u, ans in items if u.order == order]
            written = [ans.value.label if ans.ok else None for ans in answers]
            calibrated = [self.length_rule(v, a, b) if v else None for v in written]
            flips += sum(1 for w, c in zip(written, calibrated, strict=True) if w != c)
            for v in calibrated:
                if v is not None:
                    value = self.verdict_values[v]
                    self.counters[
                        "picked_first" if value > 0 else "picked_second" if value < 0 else "tied"
                    ] += 1
            # preference for x: order ab shows x as A, order ba shows x as B
            side = 1.0 if order == "ab" else -1.0
            prefs = [side * self.verdict_values[v] for v in calibrated if v is not None]
            per[order] = {
                "a": a.id,
                "verdicts": written,
                "calibrated": calibrated,
                "preference": sum(prefs) / len(prefs) if prefs else None,
            }
        n_verdicts = len(items)
        n_failed = sum(1 for _, ans in items if not ans.ok)
        self.counters["judgments"] += 1
        self.counters["verdicts"] += n_verdicts
        self.counters["failed_verdicts"] += n_failed
        self.counters["retries"] += sum(ans.attempts - 1 for _, ans in items)
        self.counters["length_rule_flips"] += flips
        ab, ba = per["ab"]["preference"], per["ba"]["preference"]
        failed = ab is None or ba is None
        details: dict[str, Any] = {
            "orders": per,
            "samples": self.params.samples,
            "length_rule": {
                "chars": getattr(self.params, "length_rule_chars", None),
                "flips": flips,
                "of": n_verdicts - n_failed,
            },
        }
        score = None
        if failed:
            self.counters["failed"] += 1
        else:
            score = (ab + ba) / 2
            agree = sign(ab) == sign(ba)
            details["agree"] = agree
            details["position_bias"] = (ab - ba) / 2
            self.counters["consistent" if agree else "inconsistent"] += 1
        raws = [
            f"[{u.order}{f' #{u.sample}' if self.params.samples > 1 else ''}] {ans.raw}"
            for u, ans in items
        ]
        errors = [f"{u.order}: {ans.error}" for u, ans in items if not ans.ok]
        return Judgment(
            judge=self.name,
            candidate_ids=[x.id, y.id],
            score=score,
            scores={"ab": ab, "ba": ba},
            status="failed" if failed else "ok",
            error=(
                "no parseable verdict in "
                + " and ".join(o for o in ORDERS if per[o]["preference"] is None)
                + " order; "
                + "; ".join(errors)
            )
            if failed
            else None,
            raw="\n\n".join(raws),
            rationale=" | ".join(ans.value.rationale for _, ans in items if ans.ok)[:2000],
            template_hash=self.template.hash,
            model=self.params.model,
            sampling=items[0][1].sampling or {},
            attempts=max(ans.attempts for _, ans in items),
            details=details,
        )


@register_stage
class PairwiseJudge(TwoOrderJudge):
    """Compares each pair of candidates in both orders on WildBench's five-level scale."""

    type_name = "pairwise_judge"
    Params = PairwiseParams
    params: PairwiseParams
    default_template = "pairwise/verdict.jinja"

    def render(self, record: Record, response_a: str, response_b: str, json_output: bool) -> str:
        return self.template.render(
            instruction=instruction(record),
            response_a=response_a,
            response_b=response_b,
            criteria=self.params.criteria,
            reasoning=self.params.reasoning,
            json_output=json_output,
        )

    def parse(self, raw: str, completion: Completion) -> Verdict:
        return parse_five_level(raw)

    def length_rule(self, label: str, a: Candidate, b: Candidate) -> str:
        return apply_length_rule(label, len(a.text), len(b.text), self.params.length_rule_chars)


def apply_length_rule(label: str, len_a: int, len_b: int, chars: int | None) -> str:
    """WildBench's rule: a slight win by a response longer than the loser by > ``chars`` is a tie."""
    if chars is None:
        return label
    if label == "A+" and len_a - len_b > chars:
        return "A=B"
    if label == "B+" and len_b - len_a > chars:
        return "A=B"
    return label


# parsing ------------------------------------------------------------------------------------------

_SYMBOLS = {
    "A++": "A++",
    "A+": "A+",
    "A=B": "A=B",
    "B=A": "A=B",
    "B+": "B+",
    "B++": "B++",
    "A>>B": "A++",
    "A>B": "A+",
    "B>>A": "B++",
    "B>A": "B+",
    "A<<B": "B++",
    "A<B": "B+",
    "B<<A": "A++",
    "B<A": "A+",
    "TIE": "A=B",
}
_TOKEN = re.compile(
    r"(?<![A-Za-z0-9])(A\s*(?:\+\+|\+|=\s*B|>>\s*B|>\s*B|<<\s*B|<\s*B)"
    r"|B\s*(?:\+\+|\+|=\s*A|>>\s*A|>\s*A|<<\s*A|<\s*A)|(?i:tie))(?![A-Za-z0-9])"
)
_LABEL = re.compile(r"(?:verdict|choice|judg(?:e)?ment|result|winner)\s*\**\s*[:=]", re.IGNORECASE)
_REASON = re.compile(r"(?:reasoning|reason|rationale|explanation)\s*\**\s*[:=]\s*\**\s*", re.I)
_JSON_KEYS = ("verdict", "choice", "winner", "result", "judgment")


def _normalise(token: str) -> str | None:
    key = re.sub(r"\s+", "", token).upper()
    return _SYMBOLS.get(key)


def parse_five_level(text: str) -> Verdict:
    """A five-level verdict from free text or JSON, or ParseError. Never guesses a strength.

    Accepted: ``A++ A+ A=B B+ B++`` (spaces allowed, ``B=A`` and ``tie`` are ties), Arena-Hard's
    ``A>>B A>B A=B B>A B>>A`` (optionally in ``[[...]]``), and JSON with a ``verdict`` / ``choice`` key.
    A labelled verdict (``Verdict: A+``) wins over other mentions; an unlabelled reply must name one
    verdict only. A bare ``A`` or ``B`` has no strength and is rejected.
    """
    obj = json_object(text)
    if obj is not None:
        for key in _JSON_KEYS:
            value = obj.get(key)
            if isinstance(value, str):
                label = _normalise(value)
                if label is None:
                    raise ParseError(f"{key} {value!r} is not one of A++, A+, A=B, B+, B++")
                reason = obj.get("reasoning") or obj.get("reason") or obj.get("rationale") or ""
                return Verdict(label, str(reason))
    return Verdict(_find_label(text, _TOKEN, _normalise, "A++, A+, A=B, B+, B++"), _reason(text))


def _find_label(text: str, token_re: re.Pattern, normalise, expected: str) -> str:
    labelled = _LABEL.search(text)
    if labelled:
        m = token_re.search(text, labelled.end())
        if m and not text[labelled.end() : m.start()].strip(" *[\t\"'`"):
            label = normalise(m.group(1))
            # "Verdict: A++, A+ or B++" copies the scale instead of choosing from it
            rest = text[m.end() :].split("\n", 1)[0]
            others = {normalise(t.group(1)) for t in token_re.finditer(rest)} - {None, label}
            if label and others:
                raise ParseError(
                    f"the verdict line names several verdicts ({', '.join(sorted({label, *others}))})"
                    f": {clip(text)!r}"
                )
            if label:
                return label
    found = {normalise(m.group(1)) for m in token_re.finditer(text)} - {None}
    if len(found) == 1:
        return found.pop()
    if not found:
        bare = labelled and re.match(r"[\s*\[\"'`]*([AB])\b", text[labelled.end() :])
        if bare:
            raise ParseError(
                f"verdict {bare.group(1)!r} gives no strength; expected one of {expected}: "
                f"{clip(text)!r}"
            )
        raise ParseError(f"no verdict ({expected}) found in {clip(text)!r}")
    raise ParseError(f"several verdicts ({', '.join(sorted(found))}) in {clip(text)!r}")


def _reason(text: str) -> str:
    m = _REASON.search(text)
    if not m:
        return ""
    end = _LABEL.search(text, m.end())
    return text[m.end() : end.start() if end else None].strip()
