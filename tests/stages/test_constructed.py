"""Constructed candidates: token edit distance, the `constructed` pair rule, re-judging new texts."""

from __future__ import annotations

import asyncio

import pytest

from synthpref.judges.verifier import VerifierParams
from synthpref.records import Candidate, Judgment, Message, Origin, Record
from synthpref.stages.base import StageParams
from synthpref.stages.constructed import (
    JudgedConstruction,
    constructed,
    token_edit_distance,
    tokens,
)
from synthpref.stages.pairs import BuildPairs, PairsParams
from tests.judges.test_verifier import ContainsAnswer


def test_tokens_and_edit_distance_by_hand():
    assert tokens("3 + 4 = 7, so x=7.") == ["3", "+", "4", "=", "7", ",", "so", "x", "=", "7", "."]
    # one substitution (7 -> 8) in two places
    assert token_edit_distance("3 + 4 = 7, so x=7.", "3 + 4 = 8, so x=8.") == 2
    # an inserted word and a deleted full stop
    assert token_edit_distance("The sum is 7.", "The sum is not 7") == 2
    assert token_edit_distance("same text", "same  text") == 0


def rec(texts, origins=None, scores=None) -> Record:
    cands = [Candidate(id=f"c{k}", model="m", text=t) for k, t in enumerate(texts)]
    for k, origin in (origins or {}).items():
        cands[k] = cands[k].model_copy(update={"origin": origin})
    judgments = [
        Judgment(judge="v", candidate_ids=[f"c{k}"], score=s) for k, s in (scores or {}).items()
    ]
    return Record(
        id="r", prompt=[Message(role="user", content="q")], candidates=cands, judgments=judgments
    )


def pairs(record, min_margin=0.0):
    stage = BuildPairs("pairs", PairsParams(judge="v", rule="constructed", min_margin=min_margin))
    stage.bind([])
    stage.judge = "v"
    (out,) = asyncio.run(stage.process([record]))
    return stage, out.pairs


def test_constructed_rule_pairs_each_construction_with_its_parent_the_right_way_round():
    edit = Origin(operation="inject_error:sign", parent="c0", prefer="parent")
    better = Origin(operation="checklist_refinement", parent="c1", prefer="self")
    record = rec(
        ["x = 4", "draft", "x = -4", "refined draft"],
        origins={2: edit, 3: better},
        scores={0: 1.0, 1: 0.25, 2: 0.0, 3: 0.75},
    )
    stage, made = pairs(record)
    assert [(p.chosen_id, p.rejected_id, p.margin, p.rule) for p in made] == [
        ("c0", "c2", 1.0, "constructed"),
        ("c3", "c1", 0.5, "constructed"),
    ]
    # sampled candidates are never paired with each other: c0 (1.0) vs c1 (0.25) is not a pair
    assert stage.counters["pairs"] == 1 and stage.counters["pair_rows"] == 2


def test_constructed_rule_skips_what_the_judge_does_not_confirm():
    edit = Origin(operation="inject_error:sign", parent="c0", prefer="parent")
    stage, made = pairs(rec(["4", "-4"], {1: edit}, {0: 0.0, 1: 0.0}))
    assert made == [] and stage.counters["skipped_constructed_not_better"] == 1
    stage, made = pairs(rec(["4", "3", "-4"], {2: edit}, {0: 1.0, 1: 0.0}))
    assert made == [] and stage.counters["skipped_constructed_unscored"] == 1
    stage, made = pairs(rec(["4", "-4"], {1: edit}, {0: 1.0, 1: 0.5}), min_margin=0.6)
    assert made == [] and stage.counters["skipped_below_margin"] == 1
    stage, made = pairs(rec(["4", "5"], None, {0: 1.0, 1: 0.0}))
    assert made == [] and stage.counters["skipped_no_constructed_candidates"] == 1


class Exclaim(JudgedConstruction):
    """A construction for the test: appends a text and keeps it when the verifier fails it."""

    type_name = "exclaim_test"

    class Params(StageParams):
        judge: str
        suffix: str = " not"

    async def process(self, records):
        for record in records:
            parent = record.candidates[0]
            child = constructed(
                parent,
                parent.text.replace("4", "5") + self.params.suffix,
                self.name,
                Origin(operation="test", parent=parent.id, prefer="parent", stage=self.name),
            )
            (judged,) = await self.rejudge_all([(record, [child])])
            if judged and judged[0].score == 0.0:
                record.candidates.append(child)
                record.judgments.extend(judged)
        return records


def test_rejudge_runs_the_named_judge_on_new_candidates_under_its_name():
    verifier = ContainsAnswer("v", VerifierParams(workers=1))
    stage = Exclaim("edit", Exclaim.Params(judge="v"))
    assert stage.check([]) == [
        "exclaim_test needs candidates: put a generate stage before it",
        "judge: 'v' is not a judge stage before this one (there is none)",
    ]
    stage.bind([verifier])
    record = Record(
        id="r",
        prompt=[Message(role="user", content="2+2?")],
        metadata={"answer": "4"},
        candidates=[Candidate(id="g:0", model="m", text="it is 4")],
    )
    record.judgments = asyncio.run(verifier.process([record]))[0].judgments
    (out,) = asyncio.run(stage.process([record]))
    child = out.candidates[1]
    assert child.id == "edit:g:0:0" and child.origin.parent == "g:0"
    assert [(j.judge, j.candidate_ids, j.score) for j in out.judgments] == [
        ("v", ["g:0"], 1.0),
        ("v", ["edit:g:0:0"], 0.0),
    ]
    assert stage.counters["judge_judgments"] == 1
    _, made = pairs(
        out.model_copy(
            update={"judgments": [j.model_copy(update={"judge": "v"}) for j in out.judgments]}
        )
    )
    assert [(p.chosen_id, p.rejected_id) for p in made] == [("g:0", "edit:g:0:0")]


def test_the_judges_parameters_join_the_fingerprint():
    a, b = (
        ContainsAnswer("v", VerifierParams(workers=1)),
        ContainsAnswer("v", VerifierParams(workers=4)),
    )
    s1, s2 = Exclaim("e", Exclaim.Params(judge="v")), Exclaim("e", Exclaim.Params(judge="v"))
    s1.bind([a])
    s2.bind([b])
    assert s1.fingerprint() == s2.fingerprint()  # workers are volatile
    assert s1.fingerprint()["judge"]["type"] == "contains_answer_test"


@pytest.mark.parametrize("prefer", ["parent", "self"])
def test_constructed_candidate_keeps_the_parents_model(prefer):
    parent = Candidate(id="g:1", model="big", text="a", sample_index=1, sampling={"t": 1})
    child = constructed(parent, "b", "st", Origin(operation="o", parent="g:1", prefer=prefer), 2)
    assert (child.id, child.model, child.sample_index, child.stage) == ("st:g:1:2", "big", 1, "st")


def test_preference_and_reward_rows_say_how_a_pair_was_constructed():
    from synthpref.export.preference import preference_rows
    from synthpref.export.reward import reward_rows

    edit = Origin(operation="inject_error:sign", parent="c0", prefer="parent", edit_tokens=1)
    record = rec(["x = 4", "x = -4", "x is 4"], {1: edit}, {0: 1.0, 1: 0.0, 2: 0.0})
    _, made = pairs(record)
    record.pairs = made
    record.pairs.append(made[0].model_copy(update={"rejected_id": "c2", "rule": "best_worst"}))
    for rows in (list(preference_rows(record)), list(reward_rows(record))):
        assert [(r["construction"], r["edit_tokens"]) for r in rows] == [
            ("inject_error:sign", 1),
            (None, None),
        ]


def test_rejudge_all_judges_a_whole_shard_in_one_call():
    calls = []

    class Counting(ContainsAnswer):
        async def process(self, records):
            calls.append([r.id for r in records])
            return await super().process(records)

    stage = Exclaim("edit", Exclaim.Params(judge="v"))
    stage.bind([Counting("v", VerifierParams(workers=1))])
    recs = [
        Record(id=i, prompt=[Message(role="user", content="q")], metadata={"answer": "4"})
        for i in ("r1", "r2")
    ]
    groups = [
        (recs[0], [Candidate(id="a", model="m", text="4"), Candidate(id="b", model="m", text="5")]),
        (recs[1], []),  # nothing new: not judged
        (recs[1], [Candidate(id="c", model="m", text="it is 4")]),
    ]
    judged = asyncio.run(stage.rejudge_all(groups))
    assert calls == [["r1", "r2"]]
    assert [[(j.candidate_ids[0], j.score) for j in js] for js in judged] == [
        [("a", 1.0), ("b", 0.0)],
        [],
        [("c", 1.0)],
    ]
