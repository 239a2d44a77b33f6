"""Judge prompts put what every call shares first, so prompt caches hit (issue 15).

Provider prompt caches (OpenAI's automatic one: the longest previously seen prefix, in 128-token steps
from 1024 tokens; Anthropic's up to its ``cache_control`` breakpoints), vLLM's prefix caching and the
transformers backend's shared KV prefix all reuse only what comes *before* the first byte in which two
prompts differ. So every shipped judge template puts its fixed instructions (role, criteria, rubric,
scale, reply form) first and the varying content (instruction, reference, responses, question) last,
ending with at most one short fixed cue ("Now reply in the form given above.").

The requests are the real ones: each judge runs on two records through its own request building
(the kit, a scripted backend in both the free-text/pre-filled and the JSON form), and the two
requests for the same slot (aspect, order, question) are compared as sent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from synthpref.backends.types import GenerationRequest
from synthpref.judges.checklist import (
    ChecklistJudge,
    ChecklistJudgeParams,
    ChecklistWriter,
    ChecklistWriterParams,
)
from synthpref.judges.pairwise import PairwiseJudge, PairwiseParams
from synthpref.judges.prometheus import AbsoluteJudge, AbsoluteParams, RelativeJudge, RelativeParams
from synthpref.judges.rubric import ASPECTS, RubricJudge, RubricParams
from synthpref.records import Candidate, Message, Record
from synthpref.stages.router import Route, RouteParams
from synthpref.templates import shipped_templates
from tests.judge_doubles import ScriptedBackend, client_for, run_stage

RUBRIC = {
    "criteria": "Is the explanation correct and easy to follow for a beginner?",
    "scores": {
        1: "Wrong or incomprehensible.",
        2: "Mostly wrong, or correct but impossible to follow.",
        3: "Partly correct, or correct but hard to follow.",
        4: "Correct and mostly easy to follow.",
        5: "Correct, complete and clear to a beginner.",
    },
}
CHECKS = ["Does the response answer what was asked?", "Is the response free of factual errors?"]

# The two records differ from their first character on, in every varying field, so two requests'
# common prefix ends exactly where the first varying content starts.
RECORDS = [
    (
        "Explain why the sky looks blue on a clear day.",
        [
            "Sunlight scatters off air molecules; blue light scatters most, so the sky looks blue.",
            "Because the ocean reflects onto it.",
            "Dust in the air is blue.",
        ],
        "Rayleigh scattering: shorter (blue) wavelengths scatter far more in air than red.",
    ),
    (
        "Give two tips for sleeping better.",
        [
            "Keep a regular schedule, and avoid screens for an hour before bed.",
            "Drink strong coffee late at night.",
            "Nap all afternoon.",
        ],
        "Keep a fixed bedtime; keep the bedroom dark, quiet and cool.",
    ),
]

# Prompt-only templates with nothing that varies per call (the density-ratio judge's system prompts and
# the criteria they include): always the same text, so always a cache hit.
NO_VARYING_CONTENT = {
    "cdr/criteria_chat.jinja",
    "cdr/criteria_reasoning.jinja",
    "cdr/criteria_safety.jinja",
    "cdr/strong.jinja",
    "cdr/weak.jinja",
}


def records() -> list[Record]:
    out = []
    for k, (prompt, texts, reference) in enumerate(RECORDS):
        out.append(
            Record(
                id=f"r{k}",
                prompt=[Message(role="user", content=prompt)],
                metadata={"reference": reference, "checks": CHECKS},
                candidates=[
                    Candidate(id=f"r{k}:c{i}", model="m", text=t) for i, t in enumerate(texts)
                ],
            )
        )
    return out


def varying(record: Record) -> list[str]:
    """Everything of a record a prompt may show: instruction, responses, reference, questions."""
    return [
        record.prompt[0].content,
        *(c.text for c in record.candidates),
        record.metadata["reference"],
        *CHECKS,
    ]


def backend(json_form: bool) -> ScriptedBackend:
    extra = ["json_schema", "top_logprobs"] if json_form else []
    return ScriptedBackend(lambda request: "x", extra=extra, name=f"echo-json{json_form}")


def judge_requests(stage, json_form: bool, given_checklists: bool = False):
    b = backend(json_form)
    recs = records()
    if given_checklists:
        writer = ChecklistWriter("cw", ChecklistWriterParams(model="judge", source_field="checks"))
        recs = run_stage(writer, recs, {"judge": client_for(b)})
    run_stage(stage, recs, {"judge": client_for(b)})
    return b.requests


def router_requests(json_form: bool):
    b = backend(json_form)
    stage = Route("route", RouteParams(rules=[], model="judge", method="generate"))
    run_stage(stage, records(), {"judge": client_for(b)})
    return b.requests


def _params(cls, **kw):
    return cls(model="judge", max_retries=0, **kw)


@dataclass(frozen=True)
class Case:
    template: str
    form: str
    requests: Callable[[], list[GenerationRequest]]
    markers: tuple[str, ...]
    """Fixed text that must lie in the shared prefix: the scale and the reply form at least."""


def _cases() -> list[Case]:
    cases = []
    for aspect in ASPECTS:
        for prefill in ("Rating:", None):
            cases.append(
                Case(
                    f"rubric/{aspect}.jinja",
                    f"prefill={prefill}",
                    lambda a=aspect, p=prefill: judge_requests(
                        RubricJudge("r", _params(RubricParams, aspects=[a], prefill=p)), False
                    ),
                    ("Score from 1 to 5:", "\n5 = ", "Rating: <a whole number", "Rationale: <"),
                )
            )
    forms = {
        "text/before": (False, "before"),
        "text/after": (False, "after"),
        "json/before": (True, "before"),
        "json/after": (True, "after"),
    }
    for form, (js, reasoning) in forms.items():
        reply = ("Reply with a JSON object",) if js else ("Verdict: <verdict>", "Reasoning: <")
        cases.append(
            Case(
                "pairwise/verdict.jinja",
                form,
                lambda js=js, r=reasoning: judge_requests(
                    PairwiseJudge("pw", _params(PairwiseParams, reasoning=r)), js
                ),
                ("Verdict scale:", "A++ = response A", "B++ = response B", *reply),
            )
        )
        ref = dict(rubric=RUBRIC, reasoning=reasoning, reference_field="reference")
        if js:
            reply = ('"score" (an integer from 1 to 5)',)
        elif reasoning == "before":
            reply = ("Feedback: <", "[RESULT] <an integer from 1 to 5>")
        else:
            reply = ("Score: <an integer from 1 to 5>", "Feedback: <")
        cases.append(
            Case(
                "prometheus/absolute.jinja",
                form,
                lambda js=js, kw=ref: judge_requests(
                    AbsoluteJudge("abs", _params(AbsoluteParams, **kw)), js
                ),
                ("[Score rubric]", "Score 5: Correct", "[End of score rubric]", *reply),
            )
        )
        if js:
            reply = ('"verdict" ("A" or "B")',)
        elif reasoning == "before":
            reply = ("Feedback: <", "[RESULT] <A or B>")
        else:
            reply = ("[RESULT] Response <A or B>", "Feedback: <")
        cases.append(
            Case(
                "prometheus/relative.jinja",
                form,
                lambda js=js, kw=ref: judge_requests(
                    RelativeJudge("rel", _params(RelativeParams, **kw)), js
                ),
                ("[Score rubric]", "Score 5: Correct", "[End of score rubric]", *reply),
            )
        )
    for js in (False, True):
        form = "json" if js else "text"
        cases.append(
            Case(
                "checklist/write.jinja",
                form,
                lambda js=js: judge_requests(
                    ChecklistWriter("cw", ChecklistWriterParams(model="judge", max_retries=0)), js
                ),
                ("2 to 8 questions", '{"questions": [...]}' if js else "1. Does the response"),
            )
        )
        cases.append(
            Case(
                "checklist/answer.jinja",
                form,
                lambda js=js: judge_requests(
                    ChecklistJudge("cj", _params(ChecklistJudgeParams)), js, given_checklists=True
                ),
                ("YES or NO", '{"answer": "YES"}' if js else "Answer: <YES or NO>"),
            )
        )
    cases.append(
        Case(
            "router/classify.jinja",
            "generate",
            lambda: router_requests(False),
            ("Which category", "- chat: ", "- reasoning: ", "- safety: "),
        )
    )
    return cases


CASES = _cases()

_DELIMITER = re.compile(r"^(\[[^\]\n]*\]|\w+:)$")
"""Section markers ("[Instruction]", "[End of response A]", "Request:"): they frame the varying content
and cannot precede it."""


def user_text(request: GenerationRequest) -> str:
    (user,) = [m for m in request.messages if m.role == "user"]
    return user.content


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def fixed_lines(text: str, values: list[str]) -> list[tuple[int, str]]:
    """(end offset, line) of every line that holds none of ``values`` and is not a delimiter."""
    masked = list(text)
    for value in values:
        for m in re.finditer(re.escape(value), text):
            masked[m.start() : m.end()] = "\0" * len(value)
    out, pos = [], 0
    for line in "".join(masked).split("\n"):
        end = pos + len(line)
        if line.strip() and "\0" not in line and not _DELIMITER.match(line.strip()):
            out.append((end, line))
        pos = end + 1
    return out


def first_per_record(requests: list[GenerationRequest]) -> list[GenerationRequest]:
    """The first request that shows each record: the same slot (aspect, order, question) of both."""
    out = []
    for prompt, _, _ in RECORDS:
        out.append(next(r for r in requests if prompt in user_text(r)))
    return out


@dataclass(frozen=True)
class Sharing:
    prefix: int  # characters the two records' prompts share
    length: int  # characters of the first record's prompt
    fixed: int  # characters of its fixed instructions (delimiters and varying lines left out)
    fixed_in_prefix: int
    after: list[str]  # fixed instruction lines after the shared prefix


def sharing(case: Case) -> tuple[Sharing, str]:
    a, b = first_per_record(case.requests())
    assert a.messages[1:] == b.messages[1:]  # the same pre-filled reply start, if any
    ta, tb = user_text(a), user_text(b)
    n = common_prefix(ta, tb)
    lines = fixed_lines(ta, varying(records()[0]))
    inside = [line for end, line in lines if end <= n]
    after = [line for end, line in lines if end > n]
    fixed = sum(len(line) for _, line in lines)
    return Sharing(n, len(ta), fixed, sum(len(x) for x in inside), after), ta[:n]


def case_id(case: Case) -> str:
    return f"{case.template}:{case.form}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fixed_instructions_are_in_the_shared_prefix(case: Case):
    share, prefix = sharing(case)
    missing = [m for m in case.markers if m not in prefix]
    assert not missing, f"not in the prefix two records share: {missing}"
    assert share.fixed_in_prefix >= 0.8 * share.fixed, share
    # after the varying content: delimiters and at most one short fixed cue
    assert len(share.after) <= 1 and all(len(line) <= 80 for line in share.after), share.after


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_calls_of_one_record_share_its_instruction_too(case: Case):
    """Candidates, both orders and every question of one record share its instruction and (before
    the responses) its reference answer; a checklist's questions share the response too."""
    prompt, texts, reference = RECORDS[0]
    mine = list(dict.fromkeys(user_text(r) for r in case.requests() if prompt in user_text(r)))
    if len(mine) < 2:
        pytest.skip("one call per record")
    a, b = mine[:2]
    n = common_prefix(a, b)
    shared = [prompt] + ([reference] if reference in a else [])
    if case.template == "checklist/answer.jinja":
        shared.append(texts[0])
    for value in shared:
        assert a.index(value) + len(value) <= n, f"{value!r} is not in the shared prefix"


def test_a_record_without_its_reference_still_shares_rubric_and_reply_form():
    stage = AbsoluteJudge(
        "abs", _params(AbsoluteParams, rubric=RUBRIC, reasoning="after", reference_field="ref2")
    )
    b = backend(False)
    recs = records()
    recs[0].metadata["ref2"] = RECORDS[0][2]
    run_stage(stage, recs, {"judge": client_for(b)})
    a, c = first_per_record(b.requests)
    prefix = user_text(a)[: common_prefix(user_text(a), user_text(c))]
    assert "[End of score rubric]" in prefix and "Score: <an integer from 1 to 5>" in prefix


#: templates of prompt-writing and constructing stages: one request per record that rewrites or answers
#: from that record's own text, so there is no judge rubric shared across records to measure here
SYNTHESIS_FOLDERS = ("evol/", "self_instruct/", "personas/", "user_turn/", "constructed/")


def test_every_shipped_template_is_covered():
    covered = {case.template for case in CASES}
    judges = {t for t in shipped_templates() if not t.startswith(SYNTHESIS_FOLDERS)}
    assert covered | NO_VARYING_CONTENT == judges


def report() -> str:  # pragma: no cover
    """A table of how much two records' prompts share, per template and form, for reviews:
    ``python -m tests.judges.test_prompt_prefix`` (``SYNTHPREF_PROMPTS=DIR`` reads another copy of
    ``prompts/``, e.g. an older commit's, to compare)."""
    rows = [
        "| template | form | shared prefix / prompt | fixed text in the prefix |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        s, _ = sharing(case)
        rows.append(
            f"| {case.template} | {case.form} | {s.prefix}/{s.length} = {s.prefix / s.length:.0%} "
            f"| {s.fixed_in_prefix}/{s.fixed} = {s.fixed_in_prefix / max(s.fixed, 1):.0%} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    if os.environ.get("SYNTHPREF_PROMPTS"):  # compare with another prompts/ folder (e.g. HEAD's)
        from pathlib import Path

        import synthpref.templates as templates

        templates.prompts_dir = lambda: Path(os.environ["SYNTHPREF_PROMPTS"])
    print(report())
