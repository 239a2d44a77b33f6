"""Every judge on multi-turn records (issue 16): the reply to the user's final message is judged in
its conversation, and every candidate of a record (they branch at the last turn) in the same one.

Generative judges (rubric, Prometheus absolute and relative, pairwise, checklist writer and judge, a
custom judge) run on scripted backends, and their rendered requests are read back: the earlier turns
in order in a marked context block, then the final user message as the instruction, then the
response(s). The teacher-forced judges (density ratio, follow-up likelihood) and the reward-model
judge are checked on the requests they send: the whole conversation, in order, with the candidate as
the final assistant message (follow-up likelihood appends a user follow-up after it). The jury, which
reads judgments only, combines judges that ran on a multi-turn record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import ClassVar

import pytest

from synthpref.backends.base import Backend
from synthpref.backends.types import (
    GenerationRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
)
from synthpref.judges import Judge, JudgeParams, parse_rating
from synthpref.judges.checklist import (
    ChecklistJudge,
    ChecklistJudgeParams,
    ChecklistWriter,
    ChecklistWriterParams,
)
from synthpref.judges.density_ratio import (
    Customisation,
    DensityRatioJudge,
    DensityRatioParams,
    Exemplar,
)
from synthpref.judges.followup import FollowupJudge, FollowupParams, FollowupSet
from synthpref.judges.jury import Jury, JuryParams
from synthpref.judges.pairwise import PairwiseJudge, PairwiseParams
from synthpref.judges.prometheus import AbsoluteJudge, AbsoluteParams, RelativeJudge, RelativeParams
from synthpref.judges.reward_model import RewardModelJudge, RewardModelParams
from synthpref.judges.rubric import RubricJudge, RubricParams
from synthpref.judges.units import CONTEXT_NOTE, SYSTEM_NOTE, instruction
from synthpref.records import Candidate, Message, Record
from tests.judge_doubles import (
    ScriptedBackend,
    client_for,
    prefill,
    prompt_text,
    run_stage,
    section,
    verdict_reply,
)

SYSTEM = "You are a patient maths tutor."
# two conversations of two turns each; they differ from their first character on
TURNS = [
    ("What is 12 times 12?", "12 times 12 is 144.", "And what is that divided by 3?"),
    ("Name a prime number.", "7 is a prime number.", "Is the next one 9?"),
]
REPLIES = [
    ["144 divided by 3 is 48.", "It is 50.", "48."],
    ["No: 9 is 3 times 3. The next prime is 11.", "Yes.", "No, it is 11."],
]
RUBRIC = {"criteria": "Is the answer correct?", "scores": {1: "wrong", 2: "partly", 3: "right"}}


def conversation(k: int, system: bool = True) -> list[Message]:
    u1, a1, u2 = TURNS[k]
    head = [Message(role="system", content=SYSTEM)] if system else []
    return [
        *head,
        Message(role="user", content=u1),
        Message(role="assistant", content=a1),
        Message(role="user", content=u2),
    ]


def multiturn_records(system: bool = True) -> list[Record]:
    return [
        Record(
            id=f"r{k}",
            prompt=conversation(k, system),
            metadata={"ref": REPLIES[k][0]},
            candidates=[
                Candidate(id=f"r{k}:c{i}", model="m", text=t) for i, t in enumerate(REPLIES[k])
            ],
        )
        for k in range(len(TURNS))
    ]


def answers(request: GenerationRequest) -> str:
    """A well-behaved judge model: a parseable reply in whatever form the request asks for."""
    text, pf = prompt_text(request), prefill(request)
    if request.json_schema is not None:
        props = request.json_schema["properties"]
        if "verdict" in props:
            return json.dumps({"verdict": props["verdict"]["enum"][0], "reasoning": "r"})
        if "score" in props:
            return json.dumps({"score": props["score"]["enum"][-1], "feedback": "f"})
        if "answer" in props:
            return json.dumps({"answer": "YES"})
        return json.dumps({"questions": ["Is the result right?", "Is it stated plainly?"]})
    if "[Response A]" in text:
        if "[RESULT]" in text:
            return " A\nFeedback: ok" if pf else "Feedback: ok [RESULT] A"
        return verdict_reply("A+", request)
    if pf.startswith("Answer"):
        return " YES"
    if pf.startswith("1."):
        return " Is the result right?\n2. Is it stated plainly?"
    if pf.startswith("Score"):
        return " 3\nFeedback: ok"
    if pf.startswith("Rating"):
        return " 4\nRationale: ok"
    if "[RESULT]" in text:
        return "Feedback: ok [RESULT] 3"
    return "Rating: 4\nRationale: ok"


def _p(cls, **kw):
    return cls(model="judge", max_retries=0, **kw)


def _checklist(json_form: bool):
    return [
        ChecklistWriter("cw", ChecklistWriterParams(model="judge", max_retries=0)),
        ChecklistJudge("cj", _p(ChecklistJudgeParams)),
    ]


JUDGES: dict[str, Callable[[bool], list]] = {
    "rubric": lambda js: [RubricJudge("rubric", _p(RubricParams))],
    "absolute/before": lambda js: [
        AbsoluteJudge("abs", _p(AbsoluteParams, rubric=RUBRIC, reference_field="ref"))
    ],
    "absolute/after": lambda js: [
        AbsoluteJudge("abs", _p(AbsoluteParams, rubric=RUBRIC, reasoning="after"))
    ],
    "relative": lambda js: [
        RelativeJudge("rel", _p(RelativeParams, rubric=RUBRIC, reference_field="ref"))
    ],
    "pairwise/before": lambda js: [PairwiseJudge("pw", _p(PairwiseParams))],
    "pairwise/after": lambda js: [PairwiseJudge("pw", _p(PairwiseParams, reasoning="after"))],
    "checklist": _checklist,
}


def judge_run(name: str, json_form: bool, recs: list[Record]):
    extra = ["json_schema", "top_logprobs"] if json_form else []
    backend = ScriptedBackend(answers, extra=extra, name=f"answers-{json_form}")
    for stage in JUDGES[name](json_form):
        recs = run_stage(stage, recs, {"judge": client_for(backend)})
    return recs, [user_text(r) for r in backend.requests]


def user_text(request: GenerationRequest) -> str:
    (user,) = [m for m in request.messages if m.role == "user"]
    return user.content


def expected_instruction(k: int, system: bool = True) -> str:
    u1, a1, u2 = TURNS[k]
    head = f"[System]\n{SYSTEM}\n\n" if system else ""
    return (
        f"{CONTEXT_NOTE}\n\n[Conversation so far]\n{head}[User]\n{u1}\n\n[Assistant]\n{a1}\n"
        f"[End of conversation so far]\n\n[Final user message]\n{u2}\n[End of final user message]"
    )


CASES = [(name, js) for name in JUDGES for js in (False, True)]


@pytest.mark.parametrize(("name", "json_form"), CASES, ids=[f"{n}:json={j}" for n, j in CASES])
def test_generative_judges_read_the_final_turn_in_its_conversation(name, json_form):
    recs, texts = judge_run(name, json_form, multiturn_records())
    assert texts
    for k, record in enumerate(recs):
        u1, a1, u2 = TURNS[k]
        mine = [t for t in texts if u1 in t]
        assert mine, f"no request shows record {record.id}"
        for text in mine:
            # the instruction block: the note, earlier turns in order, then the final user message
            shown = section(text, "Instruction")
            assert shown == expected_instruction(k)
            assert shown.index(SYSTEM) < shown.index(u1) < shown.index(a1) < shown.index(u2)
            assert section(shown, "Final user message") == u2
            # then the response(s), after the whole conversation
            end = text.index("[End of instruction]")
            shown_replies = [r for r in REPLIES[k] if r in text]
            if "checklist" not in name or "[Response]" in text:
                assert shown_replies, text
                assert all(text.index(r) > end for r in shown_replies)
            for other in REPLIES[1 - k] + list(TURNS[1 - k]):
                assert other not in text  # nothing of the other record
        # every judgment of every candidate succeeded (the replies were read as usual)
        assert record.judgments and all(j.status == "ok" for j in record.judgments), [
            j.error for j in record.judgments
        ]
        if "checklist" in name:
            assert record.annotations["checklist"]["status"] == "ok"


@pytest.mark.parametrize("name", list(JUDGES))
def test_candidates_share_the_history_and_the_fixed_text_stays_first(name):
    """Candidates branch at the last turn: every request of a record shows the same conversation.
    The judge's fixed text (criteria, scale, reply form) still comes before any of it, the same
    text as for a single-turn record, so prompt caches share it across records."""
    _, texts = judge_run(name, False, multiturn_records())
    for k in range(len(TURNS)):
        mine = [t for t in texts if TURNS[k][0] in t]
        assert len({section(t, "Instruction") for t in mine}) == 1
    single = [r.model_copy(update={"prompt": [r.prompt[-1]]}) for r in multiturn_records()]
    _, single_texts = judge_run(name, False, single)
    heads = {t.split("[Instruction]")[0] for t in texts + single_texts}
    assert len(heads) == len(JUDGES[name](False)), heads  # one per template
    assert all(CONTEXT_NOTE not in h and TURNS[0][0] not in h for h in heads)


def test_a_lone_user_message_is_its_text_and_a_system_prompt_is_context():
    lone = Record(id="a", prompt=[Message(role="user", content="Hi?")])
    assert instruction(lone) == "Hi?"
    with_system = Record(
        id="b", prompt=[Message(role="system", content=SYSTEM), Message(role="user", content="Hi?")]
    )
    assert instruction(with_system) == (
        f"{SYSTEM_NOTE}\n\n[Conversation so far]\n[System]\n{SYSTEM}\n[End of conversation so far]"
        "\n\n[Final user message]\nHi?\n[End of final user message]"
    )
    (no_system,) = multiturn_records(system=False)[:1]
    assert instruction(no_system) == expected_instruction(0, system=False)


def test_a_custom_judge_can_lay_the_conversation_out_itself():
    class Turns(Judge):
        type_name = "turns_judge"
        Params = JudgeParams
        prompt = (
            "Rate 1-5.\n{% for m in history %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n"
            "{% endfor %}Final: {{ final_message }}\nReply: {{ response }}\nRating:"
        )

        def parse(self, reply, completion):
            return parse_rating(reply)[0]

    backend = ScriptedBackend(lambda r: "Rating: 5", name="five")
    (rec,) = run_stage(
        Turns("t", JudgeParams(model="judge")),
        multiturn_records()[:1],
        {"judge": client_for(backend)},
    )
    u1, a1, u2 = TURNS[0]
    assert user_text(backend.requests[0]) == (
        f"Rate 1-5.\n<system>{SYSTEM}</system>\n<user>{u1}</user>\n<assistant>{a1}</assistant>\n"
        f"Final: {u2}\nReply: {REPLIES[0][0]}\nRating:"
    )
    assert [j.score for j in rec.judgments] == [5.0, 5.0, 5.0]


# --- teacher-forced and reward-model judges -------------------------------------------------


class Recording(Backend):
    """Scores and rewards every request with fixed values, keeping the requests."""

    capabilities: ClassVar = frozenset({"score", "reward"})

    def __init__(self, name: str) -> None:
        self.name = name
        self.scored: list[ScoreRequest] = []
        self.rewarded: list = []

    @property
    def identity(self) -> str:
        return f"recording:{self.name}"

    async def generate(self, requests, on_result=None):
        raise AssertionError("not a generator")

    async def score(self, requests, on_result=None):
        self.scored += requests
        out = [ScoreResult(token_logprobs=[-1.0, -0.5], tokens=["a", "b"]) for _ in requests]
        for i, r in enumerate(out):
            if on_result:
                on_result(i, r)
        return out

    async def reward(self, requests, on_result=None):
        self.rewarded += requests
        out = [
            RewardResult(values=[float(len(r.messages[-1].content))], labels=["LABEL_0"], tokens=9)
            for r in requests
        ]
        for i, r in enumerate(out):
            if on_result:
                on_result(i, r)
        return out


def _replies_in_context(messages_per_request, recs, tail: int = 0):
    """Each request is the record's whole prompt, then one of its candidates (then ``tail`` more
    messages); all candidates of a record share the same history."""
    by_history: dict[str, set[str]] = {}
    for messages in messages_per_request:
        body = messages[: len(messages) - tail] if tail else messages
        history, reply = body[:-1], body[-1]
        assert reply.role == "assistant"
        record = next(r for r in recs if list(r.prompt) == list(history))  # every turn, in order
        assert reply.content in [c.text for c in record.candidates]
        by_history.setdefault(record.id, set()).add(reply.content)
    assert by_history == {r.id: {c.text for c in r.candidates} for r in recs}


def test_density_ratio_scores_each_reply_in_its_whole_conversation():
    strong, weak = Recording("s"), Recording("w")
    stage = DensityRatioJudge("cdr", DensityRatioParams(strong="s", weak="w"))
    recs = run_stage(
        stage, multiturn_records(), {"s": client_for(strong, "s"), "w": client_for(weak, "w")}
    )
    for backend in (strong, weak):
        _replies_in_context([r.messages for r in backend.scored], recs)
        assert all(r.segment == -1 for r in backend.scored)  # the reply is what is scored
    assert all(j.status == "ok" for r in recs for j in r.judgments)


def test_density_ratio_customisation_goes_before_the_conversation():
    strong, weak = Recording("s"), Recording("w")
    custom = Customisation(
        strong_system="Be expert.",
        weak_system="Be careless.",
        exemplars=[Exemplar(prompt="2+2?", good="4.", bad="5.")],
    )
    stage = DensityRatioJudge(
        "cdr", DensityRatioParams(strong="s", weak="w", customisations={"default": custom})
    )
    recs = run_stage(
        stage, multiturn_records(), {"s": client_for(strong, "s"), "w": client_for(weak, "w")}
    )
    u1, a1, u2 = TURNS[0]
    first = strong.scored[0].messages
    assert [(m.role, m.content) for m in first] == [
        ("system", f"Be expert.\n\n{SYSTEM}"),  # the record's system prompt merged, after
        ("user", "2+2?"),
        ("assistant", "4."),
        ("user", u1),
        ("assistant", a1),
        ("user", u2),
        ("assistant", REPLIES[0][0]),
    ]
    assert weak.scored[0].messages[2].content == "5."
    assert [m.content for m in weak.scored[0].messages[3:]] == [m.content for m in first[3:]]
    assert all(j.status == "ok" for r in recs for j in r.judgments)


def test_followup_likelihood_appends_the_follow_up_after_the_reply_in_its_conversation():
    backend = Recording("m")
    sets = {"clarity": FollowupSet(positive=["Clear, thanks."], negative=["I don't follow."])}
    stage = FollowupJudge("flr", FollowupParams(model="m", dimensions=["clarity"], followups=sets))
    recs = run_stage(stage, multiturn_records(), {"m": client_for(backend, "m")})
    assert len(backend.scored) == 2 * 3 * 2  # records x candidates x follow-ups
    for request in backend.scored:
        assert request.messages[-1].role == "user"
        assert request.messages[-1].content in ("Clear, thanks.", "I don't follow.")
    _replies_in_context([r.messages for r in backend.scored], recs, tail=1)
    assert all(j.status == "ok" for r in recs for j in r.judgments)


def test_reward_model_reads_each_reply_in_its_whole_conversation():
    backend = Recording("rm")
    stage = RewardModelJudge("rm", RewardModelParams(model="rm"))
    recs = run_stage(stage, multiturn_records(), {"rm": client_for(backend, "rm")})
    _replies_in_context([r.messages for r in backend.rewarded], recs)
    scores = {j.candidate_ids[0]: j.score for r in recs for j in r.judgments}
    assert scores == {c.id: float(len(c.text)) for r in recs for c in r.candidates}


def test_jury_combines_judges_that_ran_on_a_multi_turn_record():
    backend = ScriptedBackend(answers, name="answers-jury")
    recs = multiturn_records()
    rubric = RubricJudge("rubric", _p(RubricParams))
    pairwise = PairwiseJudge("pw", _p(PairwiseParams))
    for stage in (rubric, pairwise):
        recs = run_stage(stage, recs, {"judge": client_for(backend)})
    jury = Jury("jury", JuryParams(judges=["rubric", "pw"], method="mean"))
    jury.bind([rubric, pairwise])
    recs = run_stage(jury, recs, {})
    for record in recs:
        verdicts = [j for j in record.judgments if j.judge == "jury"]
        assert sorted(j.candidate_ids[0] for j in verdicts) == [c.id for c in record.candidates]
        assert all(j.status == "ok" and j.score is not None for j in verdicts)


# --- on the embedded model ----------------------------------------------------------------------


@pytest.mark.slow
def test_followup_scores_on_the_embedded_model_condition_on_every_earlier_turn(
    transformers_reference,
):
    """The real scoring path: the follow-up's log-likelihood equals one forward pass over the whole
    conversation, and differs from the same reply scored without the earlier turns, even when the
    reply repeats an earlier assistant turn word for word."""
    from tests.judges.test_density_ratio import TOL, client, reference_logprobs

    a1 = TURNS[0][1]
    rec = Record(
        id="r",
        prompt=conversation(0, system=False),
        candidates=[
            Candidate(id="c0", model="m", text=a1),
            Candidate(id="c1", model="m", text="48"),
        ],
    )
    sets = {"clarity": FollowupSet(positive=["Thanks, clear."], negative=["That is wrong."])}
    params = FollowupParams(model="m", dimensions=["clarity"], followups=sets)
    (out,) = run_stage(
        FollowupJudge("flr", params), [rec], {"m": client("m", transformers_reference)}
    )
    lone = rec.model_copy(update={"prompt": [rec.prompt[-1]], "judgments": []}, deep=True)
    (alone,) = run_stage(
        FollowupJudge("flr", params), [lone], {"m": client("m", transformers_reference)}
    )
    for cand, j, j_alone in zip(rec.candidates, out.judgments, alone.judgments, strict=True):
        assert j.status == "ok", j.error
        conv = [*rec.prompt, Message(role="assistant", content=cand.text)]
        for kind, text in (("positive", "Thanks, clear."), ("negative", "That is wrong.")):
            ref = reference_logprobs(
                transformers_reference, [*conv, Message(role="user", content=text)]
            )
            (got,) = j.details["followups"]["clarity"][kind]
            assert abs(got - sum(ref) / len(ref)) < TOL
        assert abs(j.score - j_alone.score) > 1e-4  # the earlier turns matter
