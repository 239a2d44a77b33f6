"""Self-instruct: parsing, the paper's filters, the ROUGE-L novelty filter against rouge-score computed
directly, seeded in-context examples, and a resumed run deciding exactly as an uninterrupted one."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path

import polars as pl
import pytest
from rouge_score import rouge_scorer

from synthpref.backends.types import Completion, GenerationRequest, GenerationResult
from synthpref.records import Message, Record
from synthpref.stages.base import StageContext
from synthpref.stages.self_instruct import (
    RougePool,
    SelfInstruct,
    SelfInstructParams,
    parse_numbered,
    read_seed_file,
)
from tests.judge_doubles import POLICIES

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "recipes" / "data" / "self_instruct_seeds.jsonl"


class Replies:
    """A model client double: each request answered by ``reply(request text)``."""

    def __init__(self, reply, finish: str = "stop") -> None:
        self.reply, self.finish = reply, finish
        self.requests: list[GenerationRequest] = []

    async def generate(self, requests):
        self.requests += requests
        return [
            GenerationResult(
                completions=[
                    Completion(
                        text=self.reply(r.messages[-1].content),
                        finish_reason=self.finish,
                        completion_tokens=9,
                    )
                ],
                prompt_tokens=9,
            )
            for r in requests
        ]


def seed_records(*texts: str) -> list[Record]:
    return [
        Record(id=f"t{i}", prompt=[Message(role="user", content=t)])
        for i, t in enumerate(texts, start=1)
    ]


def stage(client, **params) -> SelfInstruct:
    s = SelfInstruct("self_instruct", SelfInstructParams.model_validate({"model": "m", **params}))
    s.ctx = StageContext({"m": client})  # type: ignore[arg-type]
    return s


def run(s: SelfInstruct, recs: list[Record]) -> list[Record]:
    return asyncio.run(s.process(recs))


def numbered(items: list[str], start: int = 9) -> str:
    return "\n".join(f"{start + i}. {t}" for i, t in enumerate(items))


def examples_of(request_text: str) -> list[str]:
    """The in-context examples a request shows."""
    body = request_text.split("Example tasks:\n\n", 1)[1].split("\nWrite the ", 1)[0]
    return parse_numbered(body)


SEED_TEXTS = [
    "Write a short story about a dragon who is afraid of heights.",
    "List three ways to save water at home.",
    "Translate the sentence into Spanish.\n\nThe library opens at nine.",
    "Explain why leaves change colour in autumn.",
]


# parsing and the paper's filters ----------------------------------------------------------------


def test_parse_numbered_keeps_inputs_with_their_instruction():
    text = (
        "Sure! Here are new tasks:\n"
        "9. Sort the numbers from smallest to largest.\n\n3, 1, 2\n"
        "10) Describe a sunrise over the sea in two sentences.\n"
        "11. Summarise the text.\n- point one\n- point two\n"
        "12.\n"
        "13. It costs 3.50 dollars at 10:30 am; is that cheap?"
    )
    assert parse_numbered(text) == [
        "Sort the numbers from smallest to largest.\n\n3, 1, 2",
        "Describe a sunrise over the sea in two sentences.",
        "Summarise the text.\n- point one\n- point two",
        "It costs 3.50 dollars at 10:30 am; is that cheap?",
    ]
    assert parse_numbered("No list at all.") == []


def test_the_papers_filters_each_drop_and_count():
    items = [
        "Name a colour.",  # 3 words
        "Describe " + "very " * 150 + "long things.",
        "? What is the best way to learn to swim as an adult?",
        "¿Cómo se dice buenos días en inglés y en francés?",
        "Write a program that prints the first ten prime numbers.",
        "Describe the image below in three sentences.",
        "Summarise the attached files for a busy manager.",
        "Go to the website and report what its front page says.",
        "Suggest five names for a bakery that sells only bread.",
        "Suggest ten names for a cafe that only sells",  # cut at max_tokens: dropped
    ]
    client = Replies(lambda text: numbered(items), finish="length")
    s = stage(client)
    out = run(s, seed_records(*SEED_TEXTS[:1]))
    assert [r.prompt[0].content for r in out] == [
        "Suggest five names for a bakery that sells only bread."
    ]
    assert {k: v for k, v in s.counters.items() if k.startswith("dropped:")} == {
        "dropped:too_short": 1,
        "dropped:too_long": 1,
        "dropped:bad_start": 2,
        "dropped:blocked_start": 1,
        "dropped:blocked_word": 3,
        "dropped:truncated": 1,
    }
    assert s.counters["parsed"] == len(items) and s.counters["accepted"] == 1


# the novelty filter -------------------------------------------------------------------------------


def test_a_near_duplicate_of_a_seed_is_rejected_and_a_novel_one_kept():
    near = "Write a short story about a dragon who is scared of heights."
    novel = "Give three tips for keeping houseplants alive in winter."
    client = Replies(lambda text: numbered([near, novel, novel]))
    s = stage(client)
    out = run(s, seed_records(*SEED_TEXTS))
    kept = [r for r in out if r.metadata["lineage"]["parent"] == "t1"]
    assert [r.prompt[0].content for r in kept] == [novel]
    assert kept[0].id == "t1.s1"  # the position in the reply
    direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert direct.score(SEED_TEXTS[0], near)["rougeL"].fmeasure >= 0.7
    # later requests repeat the novel one: rejected against the first accepted copy
    assert s.counters["accepted"] == 1
    assert s.counters["dropped:similar"] == 2 + 3 * 3


def _vocabulary_items(text: str) -> list[str]:
    """Deterministic, heavily overlapping instructions: many near-duplicates of each other."""
    digest = hashlib.sha256(text.encode()).digest()
    verbs = ["Explain", "Describe", "Summarise", "List", "Compare"]
    topics = ["rain forests", "the water cycle", "volcanoes", "honey bees", "glaciers", "tides"]
    extras = ["for a child", "in three sentences", "with one example", "briefly", "in detail"]
    out = []
    for i in range(12):
        b = digest[i]
        out.append(
            f"{verbs[b % 5]} {topics[(b // 5) % 6]} and {topics[(b // 30) % 6]} "
            f"{extras[(b // 7) % 5]}."
        )
    return out


def test_novelty_decisions_match_rouge_score_computed_directly_on_every_pair():
    client = Replies(lambda text: numbered(_vocabulary_items(text)))
    s = stage(client, max_rouge_l=0.7)
    recs = seed_records(*SEED_TEXTS)
    out = run(s, recs)

    direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    # compare: instruction (the default): a seed's input, after its first blank line, is left out
    pool = [(r.id, r.prompt[0].content.split("\n\n")[0]) for r in recs]
    expected = []
    for record, request in zip(recs, client.requests, strict=True):
        for k, item in enumerate(parse_numbered(numbered(_vocabulary_items(
                request.messages[-1].content)))):  # fmt: skip
            scores = [(direct.score(text, item)["rougeL"].fmeasure, pid) for pid, text in pool]
            best, best_id = max(scores, key=lambda x: x[0])
            if best < 0.7:
                expected.append((f"{record.id}.s{k}", item, best, best_id))
                pool.append((f"{record.id}.s{k}", item))
    got = [
        (
            r.id,
            r.prompt[0].content,
            r.metadata["lineage"]["max_rouge_l"],
            r.metadata["lineage"]["most_similar"],
        )
        for r in out
    ]
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g[2] == pytest.approx(e[2], abs=1e-6)
        # ties may name another entry with the same score
        assert direct.score(dict(pool)[g[3]], g[1])["rougeL"].fmeasure == pytest.approx(e[2])
    assert 0 < len(got) < 4 * 12 and s.counters["dropped:similar"] == 4 * 12 - len(got)


def test_a_copied_instruction_with_another_input_is_a_copy():
    seed = (
        "Extract all the place names from the paragraph.\n\nI flew from Paris to Rome, then took "
        "a train to Milan and a bus to Como before heading back home to Lyon for the winter."
    )
    copy = "Extract all the place names from the paragraph.\n\nWe drove from Oslo to Bergen."
    direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert direct.score(seed, copy)["rougeL"].fmeasure < 0.7  # diluted by the inputs
    client = Replies(lambda text: numbered([copy]))
    s = stage(client)
    assert run(s, seed_records(seed)) == [] and s.counters["dropped:similar"] == 1
    s = stage(client, compare="whole")
    assert [r.prompt[0].content for r in run(s, seed_records(seed))] == [copy]


def test_rouge_pool_search_equals_scoring_every_entry():
    pool = RougePool()
    direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = _vocabulary_items("a") + _vocabulary_items("b") + SEED_TEXTS
    for i, t in enumerate(texts):
        pool.add(f"x{i}", t)
    for query in [*_vocabulary_items("c"), "Nothing in common here at all!", ""]:
        found = pool.most_similar(query)
        best = max((direct.score(t, query)["rougeL"].fmeasure for t in texts), default=0.0)
        assert found.score == pytest.approx(best)
        stopped = pool.most_similar(query, stop_at=0.5)
        assert (stopped.score >= 0.5) == (best >= 0.5)


# examples and seeds ------------------------------------------------------------------------------


def test_examples_are_seeded_the_records_own_first_and_machine_ones_from_earlier_shards():
    client = Replies(
        lambda text: numbered([f"Invent a riddle about {len(text)} apples and pears."])
    )
    s = stage(client, num_examples=3, machine_examples=1, seed_file=str(SEEDS))
    recs = seed_records(*SEED_TEXTS)
    s.prepare(recs)
    run(s, recs[:2])
    first = [examples_of(r.messages[-1].content) for r in client.requests]
    assert [e[0] for e in first] == SEED_TEXTS[:2] and all(len(e) == 3 for e in first)
    seeds = {t for _, t in read_seed_file(SEEDS, "prompt")} | set(SEED_TEXTS)
    assert all(x in seeds for e in first for x in e)  # no machine example before any accepted
    run(s, recs[2:])
    later = [examples_of(r.messages[-1].content) for r in client.requests[2:]]
    assert all(e[-1].startswith("Invent a riddle") for e in later)
    # the same draw again from a fresh stage
    again = Replies(client.reply)
    s2 = stage(again, num_examples=3, machine_examples=1, seed_file=str(SEEDS))
    s2.prepare(recs)
    run(s2, recs[:2])
    run(s2, recs[2:])
    assert [r.messages for r in again.requests] == [r.messages for r in client.requests]


def test_source_seeds_records_draw_from_the_seed_file(tmp_path):
    empty = [Record(id=f"seed-{k:06d}", prompt=[], metadata={"seed": k}) for k in range(2)]
    client = Replies(lambda text: numbered(["Plan a picnic menu for six people."]))
    s = stage(client, seed_file=str(SEEDS), keep_seeds=True)
    s.prepare(empty)
    out = run(s, empty)
    assert [r.id for r in out] == ["seed-000000.s0"]  # the second reply repeats it: rejected
    assert out[0].metadata["lineage"]["root"] == "seed-000000"
    assert SelfInstruct.writes_prompts and SelfInstruct.carries_state
    s = stage(client)
    with pytest.raises(Exception, match="no seed instruction"):
        s.prepare(empty)


def test_keep_seeds_outputs_each_input_before_its_instructions():
    def reply(text: str) -> str:
        if "dragon" in examples_of(text)[0]:
            return numbered(["Plan a weekend trip to the mountains on a small budget."])
        return numbered(["Compose a thank-you note to a helpful neighbour."])

    out = run(stage(Replies(reply), keep_seeds=True), seed_records(*SEED_TEXTS[:2]))
    assert [r.id for r in out] == ["t1", "t1.s0", "t2", "t2.s0"]


# resume: the pool across shards ------------------------------------------------------------------

CRASH = {"after": None, "calls": 0}


def _writer(request: GenerationRequest) -> str:
    """Scripted self-instruct replies: one instruction of the record's own, two from a small shared
    set (repeated across records: kept once, then rejected as similar), and one built on the last
    in-context example, which is machine-written once the pool has any."""
    CRASH["calls"] += 1
    if CRASH["after"] is not None and CRASH["calls"] > CRASH["after"]:
        raise RuntimeError("killed")
    text = request.messages[-1].content
    examples = examples_of(text)
    own = " ".join(examples[0].split()[:5])
    shared = [
        "Give three tips for keeping houseplants alive in winter.",
        "Describe how a rainbow forms after a storm.",
        "Suggest a name for a cat that loves boxes.",
    ]
    h = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    items = [
        f"Explain the task '{own}' to a curious child.",
        shared[h % 3],
        shared[(h // 3) % 3],
        f"Turn this into a quiz question for students: {examples[-1]}",
    ]
    return numbered(items)


POLICIES["self_instruct_writer"] = _writer


def _recipe(tmp_path: Path, run_dir: Path) -> dict:
    data = tmp_path / "seeds.jsonl"
    prompts = [
        "Write a limerick about a sleepy owl.",
        "List four fruits that are red.",
        "Explain what a leap year is.",
        "Convert 10 kilometres to miles.",
        "Describe the smell of fresh bread.",
        "Name three rivers in Africa.",
        "Give a synonym for happy.",
        "Why do cats purr?",
    ]
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in
                            enumerate(prompts)))  # fmt: skip
    return {
        "name": "self-instruct-resume",
        "source": {"path": str(data), "id_field": "id"},
        "models": {"writer": {"backend": "scripted", "policy": "self_instruct_writer"}},
        "stages": [
            {"type": "self_instruct", "model": "writer", "num_examples": 4, "machine_examples": 2}
        ],
        "output": {"dir": str(run_dir), "formats": []},
        "settings": {"shard_size": 2},
    }


def _outputs(run_dir: Path) -> list[tuple]:
    rows = pl.read_parquet(run_dir / "data" / "records.parquet").to_dicts()
    return [(r["id"], json.dumps(r["prompt"]), r["metadata"]) for r in rows]


def _run(recipe: dict):
    import synthpref

    return synthpref.run(recipe, progress=False)


def test_a_resumed_run_decides_exactly_as_an_uninterrupted_one(tmp_path, monkeypatch):
    CRASH.update(after=None, calls=0)
    whole = tmp_path / "whole"
    _run(_recipe(tmp_path, whole))
    expected = _outputs(whole)
    # state really flows across shards: later shards reject copies of earlier shards' instructions
    ids = [e[0] for e in expected]
    similar_to_earlier = [
        json.loads(e[2])["lineage"]["most_similar"]
        for e in expected
        if e[0].startswith(("q4", "q5", "q6", "q7"))
    ]
    assert any(re.match(r"q[0-3]\.s\d", m or "") for m in similar_to_earlier)
    assert len(ids) == len(set(ids)) > 8

    resumed = tmp_path / "resumed"
    CRASH.update(after=4, calls=0)  # shards 0 and 1 finish; the run dies in shard 2
    with pytest.raises(Exception, match="killed"):
        _run(_recipe(tmp_path, resumed))
    CRASH.update(after=None, calls=0)
    _run(_recipe(tmp_path, resumed))
    assert CRASH["calls"] == 4  # shards 2 and 3 only: 0 and 1 were replayed, not asked again
    assert _outputs(resumed) == expected

    # without the replay, the resumed pool would miss shards 0-1 and decide differently
    broken = tmp_path / "broken"
    CRASH.update(after=4, calls=0)
    with pytest.raises(Exception, match="killed"):
        _run(_recipe(tmp_path, broken))
    CRASH.update(after=None, calls=0)
    monkeypatch.setattr(SelfInstruct, "replay", lambda self, records: None)
    _run(_recipe(tmp_path, broken))
    assert _outputs(broken) != expected


def test_check_names_a_missing_or_malformed_seed_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Fine."}\n{"text": "no prompt field"}\n')
    s = stage(Replies(str), seed_file=str(bad))
    [problem] = s.check([])
    assert problem.startswith("seed_file:") and "line 2" in problem
    s = stage(Replies(str), seed_file=str(tmp_path / "missing.jsonl"))
    assert s.check([])[0].startswith("seed_file:")
    assert stage(Replies(str), seed_file=str(SEEDS)).check([]) == []
    assert len(read_seed_file(SEEDS, "prompt")) == 35
