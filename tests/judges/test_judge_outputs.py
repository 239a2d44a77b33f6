"""The built-in generative judges give the same requests, judgments, counters and fingerprints as
before the judge kit (commit d8f6e05): hashes recorded from that code on a scripted model that answers
in every form (labelled, pre-filled, JSON, garbage, with and without log-probabilities).

A deliberate change to a judge's output updates ``tests/fixtures/judge_outputs.json`` (``python -m
tests.judges.test_judge_outputs`` from the repository root re-records it) and says so in its commit; an accidental one fails here, naming the case and the part.

Re-recorded for issue 15 (judge templates put the shared rubric first, so prompt caches hit): every
shipped judge template now gives its fixed text (criteria, scale, rubric, reply form) before the
instruction, reference and responses, and ends with a short cue ("Now reply in the form given
above."). Every hash changed because the scripted replies are drawn from a hash of the prompt text.
Replayed with replies keyed on the prompt's content only (its sections, not their order), the old and
new templates gave the same judgments, annotations and counters in all 30 cases, and the same
requests apart from the user message, whose lines differ only in order, the cue, and the reference
answer's note on a line of its own; fingerprints differ only in their template hashes.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from synthpref.backends.types import GenerationResult
from synthpref.judges.checklist import (
    ChecklistJudge,
    ChecklistJudgeParams,
    ChecklistWriter,
    ChecklistWriterParams,
)
from synthpref.judges.pairwise import PairwiseJudge, PairwiseParams
from synthpref.judges.prometheus import AbsoluteJudge, AbsoluteParams, RelativeJudge, RelativeParams
from synthpref.judges.rubric import RubricJudge, RubricParams
from synthpref.records import Candidate, Message, Record
from tests.judge_doubles import ScriptedBackend, client_for, prefill, prompt_text, run_stage

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "judge_outputs.json"


def recs():
    out = []
    P = [
        "Name a fruit that is yellow.",
        "What is 2+2? Answer briefly.",
        "Write one sentence about cats.",
    ]
    T = [
        ["Banana.", "A banana is a long yellow fruit that grows in bunches " * 3, "Lemon"],
        ["4", "The answer is four.", "5"],
        ["Cats purr.", "Cats are small furry animals that many people keep as pets.", "Dogs bark."],
    ]
    for i, (p, ts) in enumerate(zip(P, T, strict=True)):
        r = Record(
            id=f"r{i}",
            prompt=[Message(role="user", content=p)],
            metadata={"ref": "Banana" if i != 1 else ""},
            candidates=[Candidate(id=f"c{k}", model="m", text=t) for k, t in enumerate(ts)],
        )
        out.append(r)
    return out


def chaos(request):
    """Deterministic mixed replies: good, JSON, garbage; keyed by prompt hash + seed."""
    import hashlib

    t = prompt_text(request)
    pf = prefill(request)
    h = int(
        hashlib.sha256(
            (t + str(request.params.seed) + str(request.params.temperature)).encode()
        ).hexdigest(),
        16,
    )
    k = h % 5
    if request.json_schema is not None:
        props = request.json_schema.get("properties", {})
        if k == 0:
            return "not json at all"
        if "verdict" in props:
            enum = props["verdict"]["enum"]
            return json.dumps({"verdict": enum[h % len(enum)], "reasoning": "r", "feedback": "f"})
        if "score" in props:
            enum = props["score"]["enum"]
            return json.dumps({"score": enum[h % len(enum)], "feedback": "fb"})
        if "answer" in props:
            return json.dumps({"answer": ["YES", "NO"][h % 2]})
        if "questions" in props:
            return json.dumps(
                {"questions": ["Is it yellow?", "Is it short?", "Is it a fruit?"][: 1 + h % 3]}
            )
    if k == 0:
        return " hmm, I am not sure."
    if "[RESULT]" in t and "Response A" in t:
        return f" {'AB'[h % 2]}\nFeedback: ok" if pf else f"Feedback: fine [RESULT] {'AB'[h % 2]}"
    if "Response A" in t or "response A" in t or "[Response A]" in t:
        lab = ["A++", "A+", "A=B", "B+", "B++"][h % 5]
        return f" {lab}\nReasoning: x" if pf else f"Reasoning: x\nVerdict: {lab}"
    if pf.startswith("Answer"):
        return [" YES", " NO", " yes it does"][h % 3]
    if pf.startswith("1."):
        return " Is it yellow?\n2. Is it short?\n3. Is it a fruit?"
    if pf.startswith("Score"):
        return f" {1 + h % 5}\nFeedback: fine"
    if pf.startswith("Rating"):
        return f" {1 + h % 5}\nRationale: because"
    return f"Feedback: ok [RESULT] {1 + h % 5}\nRating: {1 + h % 5}"


class LogprobScripted(ScriptedBackend):
    async def generate(self, requests, on_result=None):
        out = await super().generate(requests, on_result)
        res = []
        for req, r in zip(requests, out, strict=True):
            c = r.completions[0]
            tl = None
            if req.top_logprobs:
                tl = [
                    {
                        "1": -2.0,
                        "2": -1.5,
                        "3": -1.0,
                        "4": -0.7,
                        "5": -2.5,
                        " YES": -0.3,
                        " NO": -1.4,
                    }
                ]
            res.append(
                GenerationResult(
                    completions=[c.model_copy(update={"top_logprobs": tl})],
                    prompt_tokens=r.prompt_tokens,
                )
            )
        return res


def dump(stage, records, backend):
    reqs = [json.loads(r.model_dump_json()) for r in getattr(backend, "requests", [])]
    return {
        "judgments": {
            r.id: [json.loads(j.model_dump_json()) for j in r.judgments] for r in records
        },
        "annotations": {r.id: r.annotations for r in records},
        "counters": dict(sorted(stage.counters.items())),
        "requests": reqs,
        "fingerprint": stage.fingerprint(),
    }


CONFIGS = [
    (
        "rubric",
        RubricJudge,
        RubricParams,
        [dict(), dict(aspects=["helpfulness", "honesty"]), dict(score="parsed", prefill=None)],
    ),
    (
        "pairwise",
        PairwiseJudge,
        PairwiseParams,
        [
            dict(),
            dict(reasoning="after"),
            dict(samples=2, temperature=0.7, max_pairs=2),
            dict(structured="off", reasoning="after", length_rule_chars=5),
        ],
    ),
    (
        "absolute",
        AbsoluteJudge,
        AbsoluteParams,
        [
            dict(
                rubric={
                    "criteria": "good?",
                    "scores": {1: "bad", 2: "meh", 3: "ok", 4: "good", 5: "great"},
                }
            ),
            dict(
                rubric={"criteria": "good?", "scores": {1: "bad", 2: "meh", 3: "ok"}},
                reasoning="after",
                reference_field="ref",
            ),
            dict(
                rubric={"criteria": "good?", "scores": {1: "bad", 2: "ok", 3: "good"}},
                reasoning="after",
                reference_field="ref",
                missing_reference="fail",
                structured="off",
            ),
        ],
    ),
    (
        "relative",
        RelativeJudge,
        RelativeParams,
        [
            dict(rubric={"criteria": "good?"}),
            dict(
                rubric={"criteria": "good?"},
                reasoning="after",
                reference_field="ref",
                missing_reference="fail",
            ),
        ],
    ),
]


def canonical_hash(value) -> str:
    text = json.dumps(json.loads(json.dumps(value, default=str, sort_keys=True)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def all_cases() -> dict[str, dict]:
    backends = {
        "plain": lambda: ScriptedBackend(chaos, name="chaos"),
        "rich": lambda: LogprobScripted(
            chaos, extra=["json_schema", "top_logprobs"], name="chaosrich"
        ),
    }
    results = {}
    for bname, mk in backends.items():
        for name, cls, P, variants in CONFIGS:
            for vi, kw in enumerate(variants):
                b, rs = mk(), recs()
                st = cls(name, P(model="judge", **kw))
                run_stage(st, rs, {"judge": client_for(b)})
                results[f"{bname}/{name}/{vi}"] = dump(st, rs, b)
        checklists = [
            (dict(), dict()),
            (dict(structured="off"), dict(score="p_yes")),
            (dict(source_field="ref"), dict(structured="off")),
        ]
        for vi, (wkw, jkw) in enumerate(checklists):
            b, rs = mk(), recs()
            w = ChecklistWriter("cw", ChecklistWriterParams(model="judge", **wkw))
            run_stage(w, rs, {"judge": client_for(b)})
            st = ChecklistJudge("cj", ChecklistJudgeParams(model="judge", **jkw))
            run_stage(st, rs, {"judge": client_for(b)})
            d = dump(st, rs, b)
            d["writer_counters"] = dict(sorted(w.counters.items()))
            results[f"{bname}/checklist/{vi}"] = d
    return results


def hashes(cases: dict[str, dict]) -> dict[str, dict[str, str]]:
    return {
        case: {part: canonical_hash(v) for part, v in parts.items()}
        for case, parts in cases.items()
    }


@pytest.fixture(scope="module")
def current() -> dict[str, dict[str, str]]:
    return hashes(all_cases())


RECORDED = json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_judge_outputs_unchanged(case, current):
    changed = [part for part, h in RECORDED[case].items() if current[case].get(part) != h]
    assert not changed, f"{case}: {', '.join(changed)} changed"


def test_every_case_is_recorded(current):
    assert set(current) == set(RECORDED)


if __name__ == "__main__":  # re-record after a deliberate change
    FIXTURE.write_text(json.dumps(hashes(all_cases()), indent=1, sort_keys=True) + "\n")
    sys.exit(0)
