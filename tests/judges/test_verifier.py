"""The verifier kit: per-candidate checks in worker processes, skips, dead workers, verify()."""

from __future__ import annotations

import asyncio
import os

import pytest

from synthpref.judges.verifier import Check, Verifier, VerifierParams, metadata_field
from synthpref.records import Candidate, Message, Record


def contains_answer(spec: dict, response: str) -> Check:
    """Passes when the reference answer appears in the response; dies on request (a crash)."""
    if response == "DIE":
        os._exit(1)
    ok = spec["answer"] in response
    return Check(1.0 if ok else 0.0, {"pid": os.getpid(), "found": ok})


class ContainsAnswer(Verifier):
    type_name = "contains_answer_test"
    check_fn = contains_answer

    def spec(self, record: Record) -> dict:
        return {"answer": str(metadata_field(record, "answer", stage=self.name, what="the answer"))}


def record(rid: str, texts: list[str], **metadata) -> Record:
    return Record(
        id=rid,
        prompt=[Message(role="user", content="q")],
        metadata=metadata,
        candidates=[Candidate(id=f"{rid}:{k}", model="m", text=t) for k, t in enumerate(texts)],
    )


def run(stage: Verifier, records: list[Record]) -> list[Record]:
    return asyncio.run(stage.process(records))


def shard() -> list[Record]:
    return [
        record("a", ["it is 4", "5", "4!"], answer=4),
        record("b", ["no idea"], answer="x"),
        record("c", ["4"]),  # no answer field
        record("d", [], answer=1),
    ]


def test_every_candidate_gets_one_judgment_with_evidence_and_counters():
    stage = ContainsAnswer("check", VerifierParams(workers=2))
    out = run(stage, shard())
    scores = {j.candidate_ids[0]: (j.status, j.score) for r in out for j in r.judgments}
    assert scores == {
        "a:0": ("ok", 1.0),
        "a:1": ("ok", 0.0),
        "a:2": ("ok", 1.0),
        "b:0": ("ok", 0.0),
        "c:0": ("failed", None),
    }
    j = out[0].judgments[0]
    assert j.judge == "check" and j.model is None and j.details["found"] is True
    assert j.details["pid"] != os.getpid()  # checked in a worker process
    failed = out[2].judgments[0]
    assert "record 'c'" in failed.error and "'answer'" in failed.error
    assert stage.counters == {"judgments": 5, "passed": 2, "failed": 1, "missing_field": 1}


def test_results_do_not_depend_on_the_number_of_workers():
    one = run(ContainsAnswer("check", VerifierParams(workers=1)), shard())
    two = run(ContainsAnswer("check", VerifierParams(workers=2)), shard())

    def view(records):
        return [
            (j.candidate_ids, j.score, j.status, j.details.get("found"))
            for r in records
            for j in r.judgments
        ]

    assert view(one) == view(two)


def test_a_check_that_kills_its_worker_fails_alone():
    stage = ContainsAnswer("check", VerifierParams(workers=2))
    out = run(stage, [record("a", ["4", "DIE", "nope", "4 4"], answer=4)])
    got = [(j.status, j.score) for j in out[0].judgments]
    assert got == [("ok", 1.0), ("failed", None), ("ok", 0.0), ("ok", 1.0)]
    assert "died" in out[0].judgments[1].error
    assert stage.counters["check_died"] == 1
    # the pool works again afterwards
    again = run(stage, [record("b", ["4"], answer=4)])
    assert again[0].judgments[0].score == 1.0


def test_needs_a_generator_and_fingerprints_library_versions():
    stage = ContainsAnswer("check", VerifierParams())
    assert stage.check([]) == ["a judge needs candidates: put a generate stage before it"]
    stage.libraries = ("pydantic", "no-such-distribution-xyz")
    libs = stage.fingerprint()["libraries"]
    assert libs["pydantic"] and libs["no-such-distribution-xyz"] is None


def test_workers_are_volatile():
    from synthpref.backends.specs import fingerprint_fields

    assert fingerprint_fields(VerifierParams(workers=1)) == fingerprint_fields(
        VerifierParams(workers=8)
    )


@pytest.mark.parametrize("value", [None, "", []])
def test_metadata_field_refuses_empty_values(value):
    from synthpref.judges.units import Skip

    with pytest.raises(Skip, match="has no 'answer' field"):
        metadata_field(record("r", [], answer=value), "answer", stage="s", what="x")
