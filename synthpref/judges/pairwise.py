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

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field

from synthpref.backends.types import Completion
from synthpref.judges.base import ORDERS, Answer, Judge, JudgeParams, Unit, Verdict
from synthpref.judges.parsing import ParseError, clip, json_object
from synthpref.metrics import sign
from synthpref.records import Candidate
from synthpref.stages.registry import register_stage

FIVE_LEVELS: dict[str, float] = {"A++": 1.0, "A+": 0.5, "A=B": 0.0, "B+": -0.5, "B++": -1.0}


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
class Choice:
    """One reply's verdict label (e.g. "A+") and the reasoning given for it."""

    label: str
    rationale: str


class TwoOrderJudge(Judge):
    """Base of judges that compare two responses in both orders and calibrate by averaging.

    Subclasses define the verdict labels and their values, the prompt variables, and the parser."""

    unit = "pair"
    params: TwoOrderParams
    verdict_values: ClassVar[dict[str, float]] = FIVE_LEVELS
    verdict_prefix: ClassVar[str] = "Verdict:"
    reason_key: ClassVar[str] = "reasoning"

    def prefix(self) -> str:
        return self.verdict_prefix if self.params.reasoning == "after" else ""

    def variables(self, unit: Unit) -> dict[str, Any]:
        return {"reasoning": self.params.reasoning}

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

    def verdict(self, unit: Unit, answers: list[Answer[Choice]]) -> Verdict:
        x, y = unit.candidates
        per: dict[str, dict[str, Any]] = {}
        flips = 0
        for order in ORDERS:
            a, b = (x, y) if order == "ab" else (y, x)
            written = [ans.value.label if ans.ok else None for ans in answers if ans.label == order]
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
        n_failed = sum(1 for ans in answers if not ans.ok)
        self.counters["verdicts"] += len(answers)
        self.counters["failed_verdicts"] += n_failed
        self.counters["length_rule_flips"] += flips
        ab, ba = per["ab"]["preference"], per["ba"]["preference"]
        details: dict[str, Any] = {
            "orders": per,
            "samples": self.params.samples,
            "length_rule": {
                "chars": getattr(self.params, "length_rule_chars", None),
                "flips": flips,
                "of": len(answers) - n_failed,
            },
        }
        score = error = None
        if ab is None or ba is None:
            errors = [f"{ans.label}: {ans.error}" for ans in answers if not ans.ok]
            error = (
                "no parseable verdict in "
                + " and ".join(o for o in ORDERS if per[o]["preference"] is None)
                + " order; "
                + "; ".join(errors)
            )
        else:
            score = (ab + ba) / 2
            agree = sign(ab) == sign(ba)
            details["agree"] = agree
            details["position_bias"] = (ab - ba) / 2
            self.counters["consistent" if agree else "inconsistent"] += 1
        many = self.params.samples > 1
        return Verdict(
            score=score,
            scores={"ab": ab, "ba": ba},
            rationale=" | ".join(
                ans.value.rationale for ans in answers if ans.ok and ans.value.rationale
            )[:2000],
            details=details,
            error=error,
            raw="\n\n".join(
                f"[{ans.label}{f' #{ans.sample}' if many else ''}] {ans.raw}" for ans in answers
            ),
        )


@register_stage
class PairwiseJudge(TwoOrderJudge):
    """Compares each pair of candidates in both orders on WildBench's five-level scale."""

    type_name = "pairwise_judge"
    Params = PairwiseParams
    params: PairwiseParams
    default_template = "pairwise/verdict.jinja"

    def variables(self, unit: Unit) -> dict[str, Any]:
        return {"criteria": self.params.criteria, "reasoning": self.params.reasoning}

    def parse(self, reply: str, completion: Completion) -> Choice:
        return parse_five_level(reply)

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


def parse_five_level(text: str) -> Choice:
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
                return Choice(label, str(reason))
    return Choice(_find_label(text, _TOKEN, _normalise, "A++, A+, A=B, B+, B++"), _reason(text))


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
