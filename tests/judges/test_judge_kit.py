"""The judge kit (synthpref.judges.Judge): units, both orders, per-prompt judgments, skips, re-asks
and provenance, checked against what a scripted model was asked and answered."""

from __future__ import annotations

import hashlib
import re

import pytest

from synthpref.judges import (
    Judge,
    JudgeParams,
    ParseError,
    Skip,
    Verdict,
    parse_five_level,
    parse_rating,
)
from synthpref.records import Candidate, Message, Record
from tests.judge_doubles import ScriptedBackend, client_for, prefill, prompt_text, run_stage


def record(rid: str, texts: list[str], **metadata) -> Record:
    return Record(
        id=rid,
        prompt=[Message(role="user", content=f"question {rid}")],
        metadata=metadata,
        candidates=[Candidate(id=f"c{i}", model="m", text=t) for i, t in enumerate(texts)],
    )


class LengthRater(Judge):
    """Rates by the number in the response (the scripted model reads it back)."""

    type_name = "length_rater"
    reply_prefix = "Score:"
    prompt = "Rate.\n[Response]\n{{ response }}\n[End of response]"

    def parse(self, reply, completion):
        return parse_rating(reply, low=1, high=9)[0]


def echo_number(request) -> str:
    text = prompt_text(request)
    m = re.search(r"\[Response\]\n(.*?)\n\[End", text, re.S)
    return f" {m.group(1)}" if m else " ?"


def test_pointwise_judge_from_a_prompt_and_a_parser():
    backend = ScriptedBackend(echo_number, name="echo")
    stage = LengthRater("rate", JudgeParams(model="judge"))
    (out,) = run_stage(stage, [record("r", ["3", "7", "oops"])], {"judge": client_for(backend)})
    by = {j.candidate_ids[0]: j for j in out.judgments}
    assert by["c0"].score == 3 and by["c1"].score == 7
    assert by["c2"].status == "failed" and by["c2"].attempts == 3  # asked once + 2 re-asks
    assert "no rating" in by["c2"].error or "rating" in by["c2"].error
    expected_hash = hashlib.sha256(LengthRater.prompt.encode()).hexdigest()[:16]
    for j in out.judgments:
        assert (
            j.template_hash == expected_hash and j.model == "judge" and j.raw.startswith("Score:")
        )
    assert stage.fingerprint() == {"template": expected_hash}
    assert stage.counters == {"judgments": 3, "failed": 1, "retries": 2}
    # every request pre-filled the reply, greedy first, sampled re-asks
    asked = [r for r in backend.requests if "oops" in prompt_text(r)]
    assert [r.params.temperature for r in asked] == [0.0, 0.7, 0.7]
    assert all(prefill(r) == "Score:" for r in backend.requests)


class Duel(Judge):
    type_name = "duel"
    unit = "pair"
    prompt = "[Response A]\n{{ response_a }}\n[End of response a]\n[Response B]\n{{ response_b }}\n[End of response b]"

    def parse(self, reply, completion):
        return parse_five_level(reply)

    def verdict(self, unit, answers):
        values = {"A++": 1, "A+": 0.5, "A=B": 0, "B+": -0.5, "B++": -1}
        ab = [values[a.value.label] for a in answers if a.label == "ab"]
        ba = [-values[a.value.label] for a in answers if a.label == "ba"]
        return Verdict((sum(ab) / len(ab) + sum(ba) / len(ba)) / 2, {"ab": ab[0], "ba": ba[0]})


def test_pair_units_are_asked_in_both_orders():
    def first_is_longer_wins(request):
        text = prompt_text(request)
        a = re.search(r"\[Response A\]\n(.*?)\n\[End", text, re.S).group(1)
        b = re.search(r"\[Response B\]\n(.*?)\n\[End", text, re.S).group(1)
        return "Verdict: A++" if len(a) > len(b) else "Verdict: B++"

    backend = ScriptedBackend(first_is_longer_wins, name="longer")
    stage = Duel("duel", JudgeParams(model="judge"))
    (out,) = run_stage(
        stage, [record("r", ["short", "much longer", "mid"])], {"judge": client_for(backend)}
    )
    assert len(backend.requests) == 6  # 3 pairs x 2 orders
    by = {tuple(j.candidate_ids): j for j in out.judgments}
    assert by[("c0", "c1")].score == -1.0 and by[("c1", "c2")].score == 1.0
    assert by[("c0", "c1")].raw.startswith("[ab]\nVerdict: B++\n\n[ba]\nVerdict: A++")
    assert stage.score_range == (-1.0, 1.0)


class Ranker(Judge):
    """All of a prompt's candidates in one question; one judgment per candidate."""

    type_name = "ranker"
    unit = "prompt"
    prompt = (
        "{% for r in responses %}[{{ loop.index }}] {{ r }}\n{% endfor %}Give a score per response."
    )

    def parse(self, reply, completion):
        scores = [float(x) for x in reply.split()]
        if not scores:
            raise ParseError(f"no scores in {reply!r}")
        return scores

    def verdict(self, unit, answers):
        (answer,) = answers
        if not answer.ok or len(answer.value) != len(unit.candidates):
            return Verdict(None, error="wrong number of scores")
        return Verdict(1.0, {c.id: s for c, s in zip(unit.candidates, answer.value, strict=True)})


def test_prompt_unit_asks_once_and_scores_every_candidate():
    backend = ScriptedBackend(lambda r: "0.2 0.9", name="two")
    stage = Ranker("rank", JudgeParams(model="judge"))
    records = [record("r1", ["x", "y"]), record("r2", ["x", "y", "z"])]
    out = run_stage(stage, records, {"judge": client_for(backend)})
    assert len(backend.requests) == 2  # one question per prompt; a verdict-level reject is final
    assert [(j.candidate_ids, j.score) for j in out[0].judgments] == [(["c0"], 0.2), (["c1"], 0.9)]
    assert all(
        j.status == "failed" and j.error == "wrong number of scores" for j in out[1].judgments
    )
    assert stage.counters["judgments"] == 5 and stage.counters["failed"] == 3


class NeedsReference(LengthRater):
    type_name = "needs_reference"

    def context(self, record):
        if "ref" not in record.metadata:
            raise Skip("no reference", counter="missing_reference")
        return {"reference": record.metadata["ref"]}


def test_skip_fails_a_record_without_asking():
    backend = ScriptedBackend(echo_number, name="echo")
    stage = NeedsReference("rate", JudgeParams(model="judge"))
    out = run_stage(
        stage,
        [record("a", ["2"], ref="x"), record("b", ["3", "4"])],
        {"judge": client_for(backend)},
    )
    assert len(backend.requests) == 1
    assert out[0].judgments[0].score == 2
    assert [(j.status, j.error, j.attempts) for j in out[1].judgments] == [
        ("failed", "no reference", 0)
    ] * 2
    assert stage.counters["missing_reference"] == 2 and stage.counters["failed"] == 2


def test_check_reports_a_broken_prompt_and_a_missing_generator():
    class Broken(LengthRater):
        prompt = "{{ response "

    problems = Broken("b", JudgeParams(model="judge")).check([])
    assert problems[0].startswith("template: ") and "line 1" in problems[0]
    assert problems[-1].startswith("a judge needs candidates")


def test_a_judge_without_parse_is_abstract():
    class NoParse(Judge):
        prompt = "x {{ response }}"

    with pytest.raises(TypeError, match="parse"):
        NoParse("n", JudgeParams())
