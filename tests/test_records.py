from __future__ import annotations

import pyarrow as pa

from synthpref.records import (
    Candidate,
    Judgment,
    Message,
    Pair,
    Record,
    records_from_arrow,
    records_to_arrow,
)


def test_arrow_round_trip_keeps_everything():
    record = Record(
        id="r1",
        prompt=[Message(role="user", content="hi")],
        source_row=3,
        metadata={"topic": "greeting", "tags": ["a", "b"]},
        annotations={"checklist": ["Is it polite?"]},
        candidates=[Candidate(id="c1", model="m", text="hello", sampling={"temperature": 0.7})],
        judgments=[
            Judgment(judge="j", candidate_ids=["c1"], score=4.0, scores={"help": 4.0, "x": None}),
            Judgment(judge="j", candidate_ids=["c1"], status="failed", error="no rating", raw="??"),
        ],
        pairs=[
            Pair(
                chosen_id="c1",
                rejected_id="c1",
                chosen_score=1,
                rejected_score=0,
                margin=1,
                judge="j",
                rule="r",
            )
        ],
    )
    table = records_to_arrow([record, Record(id="r2", prompt=[Message(role="user", content="x")])])
    back = records_from_arrow(table)
    assert back[0] == record
    assert back[1].candidates == []


def test_reasoning_round_trips_and_old_checkpoints_without_it_load():
    record = Record(
        id="r",
        prompt=[Message(role="user", content="2+2?")],
        candidates=[
            Candidate(id="c1", model="m", text="4", reasoning="two and two"),
            Candidate(id="c2", model="m", text="4"),
        ],
    )
    table = records_to_arrow([record])
    assert records_from_arrow(table) == [record]
    # a checkpoint written before candidates had a reasoning column
    rows = table.to_pylist()
    for c in rows[0]["candidates"]:
        del c["reasoning"]
    old = pa.Table.from_pylist(rows)
    assert "reasoning" not in str(old.schema)
    [back] = records_from_arrow(old)
    assert [c.reasoning for c in back.candidates] == [None, None]
    assert [c.text for c in back.candidates] == ["4", "4"]


def test_origin_round_trips_and_old_checkpoints_without_it_load():
    from synthpref.records import Origin

    origin = Origin(
        operation="inject_error:off_by_one",
        parent="c1",
        prefer="parent",
        stage="rise",
        edit_tokens=2,
        evidence={"kind": "off_by_one", "after": {"extracted": "5"}},
    )
    record = Record(
        id="r",
        prompt=[Message(role="user", content="2+2?")],
        candidates=[
            Candidate(id="c1", model="m", text="4"),
            Candidate(id="c2", model="m", text="5", origin=origin),
        ],
    )
    table = records_to_arrow([record])
    [back] = records_from_arrow(table)
    assert back == record
    assert back.candidates[1].origin == origin
    rows = table.to_pylist()
    for c in rows[0]["candidates"]:
        del c["origin"]
    [old] = records_from_arrow(pa.Table.from_pylist(rows))
    assert [c.origin for c in old.candidates] == [None, None]
