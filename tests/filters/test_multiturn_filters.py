"""Every filter on multi-turn records (issue 16).

Prompt filters compare a conversation's user turns: ``dedup`` its whole user side (duplicates repeat
every user turn; a shared opening turn alone is not a duplicate; assistant turns do not count unless
``roles`` names them), ``decontaminate`` the user turns together and each turn alone. Pair filters
read judgments, pairs and replies, never the conversation: they are run here on multi-turn records
judged by a real judge stage (scripted model), and the length-bias guard measures the replies, not
the history they share. The reliability filter calibrates on gold pairs given as conversations, and
the judge it replays sees each gold pair's whole conversation.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from synthpref.filters._common import words
from synthpref.filters.consistency import ConsistencyFilter, ConsistencyParams
from synthpref.filters.decontaminate import Decontaminate, DecontaminateParams
from synthpref.filters.dedup import Dedup, DedupParams
from synthpref.filters.length_bias import LengthBiasFilter, LengthBiasParams
from synthpref.filters.margin import MarginFilter, MarginParams
from synthpref.filters.reliability import ReliabilityFilter, ReliabilityParams
from synthpref.judges.pairwise import PairwiseJudge, PairwiseParams
from synthpref.judges.units import CONTEXT_NOTE
from synthpref.records import Candidate, Message, Record
from synthpref.stages.base import Stage, StageContext
from synthpref.stages.pairs import BuildPairs, PairsParams
from tests.filters.test_filters import _Named
from tests.judge_doubles import ScriptedBackend, client_for, prefers_longer, section


def run(stage: Stage, records: list[Record]) -> list[Record]:
    return asyncio.run(stage.process(records))


def turns(*texts: str, system: str | None = None) -> list[Message]:
    """Alternating user / assistant messages, starting and ending with the user."""
    head = [Message(role="system", content=system)] if system else []
    roles = ["user", "assistant"]
    return head + [Message(role=roles[i % 2], content=t) for i, t in enumerate(texts)]


def conversations(prompts: list[list[Message]]) -> list[Record]:
    return [Record(id=f"r{i}", prompt=p, source_row=i + 1) for i, p in enumerate(prompts)]


# dedup ------------------------------------------------------------------------------------------

OPENING = "Plan a three day trip to Lisbon for a family with two young children."


def dedup(records: list[Record], **params) -> tuple[Dedup, list[str]]:
    stage = Dedup("dedup", DedupParams(**params))
    stage.prepare(records)
    return stage, [r.id for r in run(stage, records)]


def test_dedup_compares_the_whole_user_side_of_a_conversation():
    records = conversations(
        [
            turns(OPENING, "Day 1: Belem. Day 2: Alfama. Day 3: Oceanarium.", "Add a rainy day plan with indoor activities for the children."),
            # the same user turns, another assistant reply (another model, another sample): a copy
            turns(OPENING, "Start at the castle, then the tram, then the aquarium.", "Add a rainy day plan with indoor activities for the children."),
            # the same opening, another follow-up: another conversation
            turns(OPENING, "Day 1: Belem. Day 2: Alfama. Day 3: Oceanarium.", "Make it cheaper, with free museums only."),
            # the opening alone, as a single-turn prompt: not a copy of the conversations
            turns(OPENING),
            # the same user turns after a system prompt: user turns are what is compared
            turns(OPENING, "Here is a plan.", "add a RAINY day plan with indoor activities for the children.", system="You are a travel agent."),
        ]
    )  # fmt: skip
    stage, kept = dedup(records, near=False)
    assert kept == ["r0", "r2", "r3"]
    assert stage.counters == {"kept": 3, "dropped:exact_duplicate": 2}
    _, kept = dedup(records)  # near duplicates too (default threshold): the same decisions
    assert kept == ["r0", "r2", "r3"]


def test_dedup_can_compare_assistant_turns_too():
    records = conversations(
        [
            turns(OPENING, "Day 1: Belem. Day 2: Alfama. Day 3: Oceanarium.", "Add a rainy day plan with indoor activities for the children."),
            turns(OPENING, "Start at the castle, then the tram, then the aquarium.", "Add a rainy day plan with indoor activities for the children."),
        ]
    )  # fmt: skip
    _, kept = dedup(records, near=False, roles=["user", "assistant"])
    assert kept == ["r0", "r1"]


# decontaminate ----------------------------------------------------------------------------------

ITEM = (
    "A train leaves the station at nine in the morning travelling at sixty miles per hour and a "
    "second train leaves the same station an hour later at eighty miles per hour; when does the "
    "second train catch up with the first one?"
)
CHAT = (
    "I am preparing a lesson for my class next week about speed, distance and time, and I would "
    "like some help choosing examples that are neither too easy nor too hard for twelve year old "
    "students who have just learned about fractions and simple equations in their maths course."
)


def decontaminate(tmp_path, records: list[Record], items: list[str]) -> dict[str, dict | None]:
    (tmp_path / "eval.txt").write_text("\n".join(items) + "\n")
    stage = Decontaminate(
        "decon", DecontaminateParams(eval_prompts=[str(tmp_path / "eval.txt")], action="flag")
    )
    out = run(stage, records)
    return {r.id: r.annotations.get("flags", [None])[0] for r in out}


def test_decontaminate_tests_each_user_turn_and_the_conversation(tmp_path):
    part = " ".join(ITEM.split()[:12])  # a later turn copies a third of an evaluation item
    records = conversations(
        [
            turns(CHAT, "Happy to help. What topic first?", ITEM),  # a later turn is the item
            turns(CHAT, "Happy to help. What topic first?", part + "?"),  # part of it
            turns(CHAT, "Sure.", "Define entropy."),  # a short item, equal to one turn
            turns(CHAT, ITEM, "Thanks, and one more?"),  # the item in an assistant turn only
            turns(CHAT, "Sure.", "Now a question about rates and trains for the class."),
        ]
    )
    flags = decontaminate(tmp_path, records, [ITEM, "Define entropy."])
    assert flags["r0"]["overlap"] == 1.0 and flags["r0"]["eval_item"] == 0
    # diluted by the long first turn the whole conversation holds little of the item; the turn
    # alone is all inside it
    assert flags["r1"]["overlap"] == 1.0 and flags["r1"]["eval_item"] == 0
    assert flags["r2"]["overlap"] == 1.0 and flags["r2"]["eval_item"] == 1
    assert flags["r3"] is None  # model output is not the prompt
    assert flags["r4"] is None


def test_decontaminate_finds_an_item_split_across_user_turns(tmp_path):
    words = ITEM.split()
    first, second = " ".join(words[:20]), " ".join(words[20:])
    records = conversations([turns(first, "Go on.", second)])
    flags = decontaminate(tmp_path, records, [ITEM])
    assert flags["r0"]["overlap"] == 1.0  # the turns together hold every n-gram of the item


def test_decontaminate_single_turn_prompts_are_tested_as_before(tmp_path):
    stage_records = conversations([turns(CHAT + " " + ITEM), turns(CHAT)])
    flags = decontaminate(tmp_path, stage_records, [ITEM])
    assert flags["r0"]["overlap"] == 1.0 and flags["r1"] is None


# pair filters on records judged in their conversation --------------------------------------------

HISTORY = (
    "Can you explain what a closure is in Python, with a long and careful explanation that covers "
    "the enclosing scope, free variables, the nonlocal keyword and late binding in loops?"
)
ANSWER = (
    "A closure is a function that remembers the variables of the scope it was defined in. "
    "Free variables are looked up in the enclosing scope when the inner function runs. " * 3
)


def judged_conversations() -> list[Record]:
    """Multi-turn records (a long shared history), a short and a long reply each, judged by a real
    pairwise judge (scripted: the longer reply is slightly better, in both orders), paired."""
    replies = [
        ("Use nonlocal.", "Use nonlocal to rebind the variable of the enclosing function."),
        ("Yes.", "Yes: each lambda sees the loop variable's last value, bind it with a default."),
    ]
    followups = ["How do I change the outer variable?", "Is late binding a trap in loops?"]
    records = [
        Record(
            id=f"r{k}",
            prompt=turns(HISTORY, ANSWER, followups[k]),
            candidates=[
                Candidate(id=f"r{k}:c{i}", model="m", text=t) for i, t in enumerate(replies[k])
            ],
        )
        for k in range(2)
    ]
    backend = ScriptedBackend(prefers_longer, name="longer")
    judge = PairwiseJudge("pw", PairwiseParams(model="judge"))
    judge.ctx = StageContext({"judge": client_for(backend)})
    records = run(judge, records)
    assert all(section(r.messages[0].content, "Instruction").startswith(CONTEXT_NOTE)
               for r in backend.requests)  # fmt: skip
    pairs = BuildPairs("pairs", PairsParams())
    pairs.bind([judge])
    return run(pairs, records)


def filter_stage(cls, params):
    stage = cls(cls.type_name, params)
    previous = [_Named("pw", "judge", (-1.0, 1.0)), _Named("pairs", "pairs")]
    assert stage.check(previous) == []
    stage.bind(previous)
    return stage


def test_pair_filters_decide_on_multi_turn_records():
    records = judged_conversations()
    assert [len(r.pairs) for r in records] == [1, 1]
    assert all(r.pairs[0].chosen_id.endswith(":c1") and r.pairs[0].margin == 1.0 for r in records)

    margin = filter_stage(MarginFilter, MarginParams(min_margin=0.5))
    out = run(margin, [r.model_copy(deep=True) for r in records])
    assert [len(r.pairs) for r in out] == [1, 1]
    strict = filter_stage(MarginFilter, MarginParams(min_margin=1.5))
    assert [len(r.pairs) for r in run(strict, [r.model_copy(deep=True) for r in records])] == [0, 0]

    consistency = filter_stage(ConsistencyFilter, ConsistencyParams(judges=["pw"]))
    out = run(consistency, [r.model_copy(deep=True) for r in records])
    assert [len(r.pairs) for r in out] == [1, 1]
    assert consistency.counters["judge:pw:agree"] == 2


def test_length_bias_guard_measures_the_replies_not_the_shared_history():
    records = judged_conversations()
    guard = filter_stage(LengthBiasFilter, LengthBiasParams(max_ratio=2.0, action="flag"))
    out = run(guard, records)
    chosen = [len(words(r.candidate(r.pairs[0].chosen_id).text)) for r in records]
    rejected = [len(words(r.candidate(r.pairs[0].rejected_id).text)) for r in records]
    assert guard.counters["length:before:chosen_total"] == sum(chosen)
    assert guard.counters["length:before:rejected_total"] == sum(rejected)
    # the long replies are several times the short ones; with the history counted they would not be
    assert guard.counters["flagged:length_bias"] == 2
    assert [f["flag"] for r in out for f in r.annotations["flags"]] == ["length_bias"] * 2


def test_reliability_filter_calibrates_on_conversational_gold_pairs(tmp_path):
    gold = []
    for i in range(8):
        history = [
            {"role": "user", "content": f"Question {i} about closures?"},
            {"role": "assistant", "content": f"Answer {i}."},
            {"role": "user", "content": f"Follow-up {i}: and in loops?"},
        ]
        good, bad = "A careful answer " + "with detail " * (i + 2), "No."
        if i % 4 == 3:  # humans preferred the short one here: the judge disagrees
            good, bad = bad, good
        gold.append(
            {
                "chosen": [*history, {"role": "assistant", "content": good}],
                "rejected": [*history, {"role": "assistant", "content": bad}],
            }
        )
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gold))
    backend = ScriptedBackend(prefers_longer, name="longer-gold")
    judge = PairwiseJudge("pw", PairwiseParams(model="judge"))
    judge.ctx = StageContext({"judge": client_for(backend)})
    stage = ReliabilityFilter("rel", ReliabilityParams(gold=str(tmp_path / "gold.jsonl"), bands=0))
    previous = [judge, _Named("pairs", "pairs")]
    assert stage.check(previous) == []
    stage.bind(previous)
    stage.prepare([])
    out = run(stage, judged_conversations())
    assert stage.baseline.total == 8 and stage.baseline.agreement == pytest.approx(6 / 8)
    assert stage.counters["pairs_in"] == 2 and len(out) == 2
    # the replayed judge saw each gold pair's whole conversation, final turn as the instruction
    shown = [section(r.messages[0].content, "Instruction") for r in backend.requests]
    assert len(shown) == 8 * 2  # both orders
    for i in range(8):
        mine = [s for s in shown if f"Question {i} about" in s]
        assert len(mine) == 2
        for s in mine:
            assert s.index(f"Question {i}") < s.index(f"Answer {i}.") < s.index(f"Follow-up {i}")
            assert section(s, "Final user message") == f"Follow-up {i}: and in loops?"
