"""Dedup and decontaminate after a prompt-writing stage (issue 16): the prompts do not exist before
the run, so dedup decides as shards arrive, against the prompts it kept so far, and a resumed or
paused run decides exactly as an uninterrupted one. Model-free: a scripted prompt writer."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import polars as pl
import pytest
from pydantic import Field

from synthpref.backends.batch import BatchPending
from synthpref.checks import executor_problems
from synthpref.executor.local import LocalExecutor, RunError
from synthpref.filters.dedup import Dedup, DedupParams
from synthpref.recipes.loader import parse_recipe
from synthpref.records import Message, Record
from synthpref.stages.base import Stage, StageParams

HERE = "tests.filters.test_dedup_after_synthesis"

LONG = (
    "Write a short story about a robot who learns to paint landscapes in the mountains "
    "and becomes famous in the village"
)
LONG_NEAR = LONG.replace("short story", "short tale")  # a near duplicate of LONG at 0.7
OTHER = (
    "Explain to a curious ten year old why the moon changes its shape during the month and "
    "why we always see the same side of it"
)

#: what the writer writes for seed k: two prompts, ids ``seed-00000k.w0`` / ``.w1``. Two seeds per
#: shard, so four prompts per shard, and duplicates planned within and across shards.
PLAN = {
    0: ["What is the capital of France?", LONG],
    1: ["Name three rivers in Africa.", "what is the capital of   FRANCE?"],  # exact, same shard
    2: ["How do magnets work?", LONG_NEAR],  # near duplicate of shard 0's LONG
    3: ["Explain photosynthesis briefly.", "Name three rivers in Africa."],  # exact, shard 0
    4: [LONG_NEAR.upper(), "Describe a volcano."],  # exact copy of a dropped near duplicate
    5: ["How do MAGNETS work?", "Give two uses of copper."],  # exact copy from shard 1
    6: ["Describe a volcano!", OTHER],  # one symbol apart from a short prompt: kept
    7: [
        OTHER.replace("ten year old", "nine year old"),
        "Write a limerick about cats.",
    ],  # near, shard 3
}
SEEDS = len(PLAN)

#: what an uninterrupted run keeps, in order
KEPT = [
    "seed-000000.w0", "seed-000000.w1", "seed-000001.w0",
    "seed-000002.w0",
    "seed-000003.w0",
    "seed-000004.w1", "seed-000005.w1",
    "seed-000006.w0", "seed-000006.w1",
    "seed-000007.w1",
]  # fmt: skip
COUNTERS = {"kept": 10, "dropped:exact_duplicate": 3, "dropped:near_duplicate": 3}


class WriterParams(StageParams):
    plan: str = Field("default", description="which of PLANS")
    pause_file: str | None = Field(
        None, description="while this file exists, the shard holding pause_seed pauses once"
    )
    pause_seed: int = 0


class Writer(Stage):
    """A scripted prompt writer: each seed record becomes the prompts of its plan."""

    type_name = "writer"
    kind = "generator"
    writes_prompts = True
    creates_prompts = True
    Params = WriterParams
    params: WriterParams

    async def process(self, records: list[Record]) -> list[Record]:
        pause = Path(self.params.pause_file) if self.params.pause_file else None
        if pause and pause.exists() and any(r.metadata["seed"] == self.params.pause_seed
                                            for r in records):  # fmt: skip
            pause.unlink()  # pauses once, as a batch job still out does
            raise BatchPending("scripted: batch job still out", jobs=["job-1"])
        plan = PLANS[self.params.plan]
        out = []
        for r in records:
            for j, text in enumerate(plan[r.metadata["seed"]]):
                out.append(
                    Record(
                        id=f"{r.id}.w{j}",
                        prompt=[Message(role="user", content=text)],
                        source_row=r.source_row,
                        metadata={"parent": r.id},
                    )
                )
        return out


def recipe(run_dir: Path, stages: list[dict], seeds: int = SEEDS, **settings):
    raw = {
        "name": "dedup-after-synthesis",
        "source": {"seeds": seeds},
        "stages": stages,
        "output": {"dir": str(run_dir), "formats": []},
        "settings": {"shard_size": 2, **settings},
    }
    return parse_recipe(raw, base_dir=run_dir.parent)


def run(run_dir: Path, stages: list[dict], seeds: int = SEEDS, **settings):
    result = LocalExecutor(recipe(run_dir, stages, seeds, **settings), progress=False).run()
    by_name = {s.name: s for s in result.stages}
    records = pl.read_parquet(run_dir / "data" / "records.parquet")
    return records, by_name


def pipeline(tmp_path: Path, action: str = "drop", **writer) -> list[dict]:
    return [
        {"type": f"{HERE}:Writer", **writer},
        {"type": "dedup", "threshold": 0.7, "action": action},
        {
            "type": "tests.fault_fixtures:Crash",
            "flag": str(tmp_path / "crash-flag"),
            "on": "seed-000004.w1",
        },
    ]


def flags(records: pl.DataFrame) -> dict[str, list]:
    return {
        rid: json.loads(a).get("flags", [])
        for rid, a in zip(records["id"], records["annotations"], strict=True)
    }


# the rule ----------------------------------------------------------------------------------------


def test_dedup_after_a_prompt_writer_decides_in_shard_order(tmp_path):
    records, stages = run(tmp_path / "run", pipeline(tmp_path))
    assert records["id"].to_list() == KEPT
    assert dict(stages["dedup"].counters) == COUNTERS
    # the same stream of prompts through the run-level pre-pass keeps the same prompts
    written = [
        Record(id=f"seed-{k:06d}.w{j}", prompt=[Message(role="user", content=t)])
        for k, texts in PLAN.items()
        for j, t in enumerate(texts)
    ]
    prepass = Dedup("dedup", DedupParams(threshold=0.7))
    prepass.prepare(written)
    assert [r.id for r in asyncio.run(prepass.process(written))] == KEPT
    # the one difference: an exact copy of a dropped near duplicate is a near duplicate of the
    # kept prompt (only kept prompts are indexed), where the pre-pass calls it an exact one
    assert prepass.counters["dropped:exact_duplicate"] == COUNTERS["dropped:exact_duplicate"] + 1


def test_the_rule_follows_the_stages_before_dedup(tmp_path):
    after = recipe(tmp_path / "a", pipeline(tmp_path)).stages[1]
    assert after.carries_state and after.fingerprint() == {"decides": "in_shard_order"}
    plain = parse_recipe(
        {
            "source": {"path": "prompts.jsonl"},
            "stages": [{"type": "dedup"}, {"type": "tests.fault_fixtures:Crash", "flag": "x"}],
            "output": {"dir": str(tmp_path / "b")},
        },
        base_dir=tmp_path,
    )
    first = plain.stages[0]
    # before any prompt writer: today's pre-pass, and the fingerprint it always had
    assert not first.carries_state and first.fingerprint() == {}


def test_the_ray_executor_refuses_dedup_after_a_prompt_writer(tmp_path):
    loaded = recipe(tmp_path / "run", pipeline(tmp_path))
    problems = executor_problems(loaded, "ray")
    assert len(problems) == 1 and problems[0].startswith("stages[1] (dedup):")
    assert executor_problems(loaded, "local") == []
    plain = parse_recipe(
        {
            "source": {"path": "prompts.jsonl"},
            "stages": [{"type": "dedup"}],
            "output": {"dir": str(tmp_path / "b")},
        },
        base_dir=tmp_path,
    )
    assert executor_problems(plain, "ray") == []  # the shipped recipes' dedup-first still runs


# resume ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "forget_from"),
    [(1, None), (1, 2), (3, None), (3, 2), (3, 3)],
)
def test_a_resumed_run_decides_as_an_uninterrupted_one(tmp_path, depth, forget_from):
    """The crash stage after dedup fails on shard 2 (dedup may have run ahead of it); the rerun
    replays dedup's finished shards (0 and 1 from before the resume point, 2 as the resume point)
    and processes the rest, optionally after its checkpoints of the last shards were deleted."""
    (tmp_path / "crash-flag").write_text("")
    with pytest.raises(RunError, match="simulated crash"):
        run(tmp_path / "run", pipeline(tmp_path), max_concurrent_shards=depth)
    (tmp_path / "crash-flag").unlink()
    if forget_from is not None:
        for k in range(forget_from, 4):
            for path in (tmp_path / "run" / "checkpoints").glob(
                f"01-dedup-*/shard-{k:05d}.parquet"
            ):
                path.unlink()
    records, stages = run(tmp_path / "run", pipeline(tmp_path), max_concurrent_shards=depth)
    assert records["id"].to_list() == KEPT
    assert dict(stages["dedup"].counters) == COUNTERS
    assert stages["dedup"].shards_resumed >= 2


def test_a_paused_writer_holds_dedup_and_the_run_decides_as_an_uninterrupted_one(tmp_path):
    """The writer's shard 1 pauses once (a batch job still out): the writer goes on with shards 2
    and 3, dedup waits for shard 1; the next pass replays dedup's shard 0 and continues in order."""
    (tmp_path / "pause").write_text("")
    stages_spec = pipeline(tmp_path, pause_file=str(tmp_path / "pause"), pause_seed=2)
    records, stages = run(
        tmp_path / "run", stages_spec, max_concurrent_shards=3, batch={"poll_seconds": 0.01}
    )
    assert not (tmp_path / "pause").exists()  # it did pause
    assert records["id"].to_list() == KEPT
    assert dict(stages["dedup"].counters) == COUNTERS


# flags: the replay must index only the prompts dedup kept ---------------------------------------


def _words(rng: random.Random, n: int) -> list[str]:
    return rng.sample([f"w{i}" for i in range(5000)], n)


def _chain() -> tuple[str, str, str]:
    """A, B, C: B is a near duplicate of A and C of B, but C is not one of A (at 0.76)."""
    base = _words(random.Random(7), 100)
    b = list(base)
    for i in (10, 40, 70):
        b[i] = f"b{i}"
    c = list(b)
    for i in (25, 55, 85):
        c[i] = f"c{i}"
    return " ".join(base), " ".join(b), " ".join(c)


A, B, C = _chain()
#: A in shard 0, B in shard 1, C in shard 2 (two seeds per shard)
CHAIN_PLAN = {0: [A, "Something else entirely."], 1: ["Filler one."],
              2: [B, "Another unrelated question?"], 3: ["Filler two."],
              4: [C, "A third one, also apart."], 5: ["Filler three."],
              6: ["Last one.", "Really the last one."]}  # fmt: skip


def _kept(texts: list[str]) -> list[int]:
    stage = Dedup("d", DedupParams(threshold=0.76))
    records = [Record(id=f"r{i}", prompt=[Message(role="user", content=t)]) for i, t in enumerate(texts)]  # fmt: skip
    return [int(r.id[1:]) for r in asyncio.run(stage.process(records))]


def test_the_chain_is_what_the_flag_test_needs():
    assert _kept([A, B]) == [0] and _kept([B, C]) == [0] and _kept([A, C]) == [0, 1]


@pytest.mark.parametrize("depth", [1, 3])
def test_a_resumed_flagging_run_replays_only_the_kept_prompts(tmp_path, depth):
    """B (shard 1) is flagged as a near duplicate of A; C (shard 2) is one of B but not of A, so it
    stays unflagged only if the replay of shard 1 leaves the flagged B out of the index."""
    spec = [
        {"type": f"{HERE}:Writer", "plan": "chain"},
        {"type": "dedup", "threshold": 0.76, "action": "flag"},
        {
            "type": "tests.fault_fixtures:Crash",
            "flag": str(tmp_path / "crash-flag"),
            "on": "seed-000004.w0",
        },
    ]
    fresh, fresh_stages = run(tmp_path / "fresh", spec, seeds=7, max_concurrent_shards=depth)
    expect = flags(fresh)
    assert [f["flag"] for f in expect["seed-000002.w0"]] == ["near_duplicate"]
    assert expect["seed-000004.w0"] == []
    (tmp_path / "crash-flag").write_text("")
    with pytest.raises(RunError, match="simulated crash"):
        run(tmp_path / "run", spec, seeds=7, max_concurrent_shards=depth)
    (tmp_path / "crash-flag").unlink()
    for path in (tmp_path / "run" / "checkpoints").glob("01-dedup-*/shard-0000[2-3].parquet"):
        path.unlink()  # dedup decides shard 2 again, after replaying shards 0 and 1
    resumed, stages = run(tmp_path / "run", spec, seeds=7, max_concurrent_shards=depth)
    assert flags(resumed) == expect
    assert stages["dedup"].counters == fresh_stages["dedup"].counters


def test_replay_rebuilds_the_state_processing_left():
    """Processing shards 0..2 on one object equals processing shard 0, then, on a new object,
    replaying its output and processing shards 1 and 2 (drop and flag)."""
    shards = [
        [
            Record(id=f"seed-{k:06d}.w{j}", prompt=[Message(role="user", content=t)])
            for k in (2 * s, 2 * s + 1)
            for j, t in enumerate(PLAN[k])
        ]
        for s in range(4)
    ]
    for action in ("drop", "flag"):
        one = Dedup("dedup", DedupParams(threshold=0.7, action=action))
        one.bind([Writer("writer", WriterParams())])
        one.start()
        straight = [asyncio.run(one.process([r.model_copy(deep=True) for r in s])) for s in shards]
        two = Dedup("dedup", DedupParams(threshold=0.7, action=action))
        two.bind([Writer("writer", WriterParams())])
        two.start()
        two.replay(straight[0])
        two.replay(straight[1])
        rest = [asyncio.run(two.process([r.model_copy(deep=True) for r in s])) for s in shards[2:]]
        assert rest == straight[2:]
        two.start()  # a new pass forgets everything
        assert asyncio.run(two.process(shards[0])) == straight[0]


# decontaminate after synthesis ------------------------------------------------------------------

EVAL = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "What is the capital of Australia?",
]


def test_decontaminate_after_a_prompt_writer(tmp_path):
    """Decontamination is per prompt, against the evaluation set: it works on written prompts as is
    (no state across shards), after dedup, and on resume."""
    (tmp_path / "eval.txt").write_text("\n".join(EVAL) + "\n")
    spec = [
        {"type": f"{HERE}:Writer", "plan": "decontaminate"},
        {"type": "dedup"},
        {"type": "decontaminate", "eval_prompts": [str(tmp_path / "eval.txt")]},
    ]
    assert not recipe(tmp_path / "run", spec, seeds=3).stages[2].carries_state
    records, stages = run(tmp_path / "run", spec, seeds=3)
    assert records["id"].to_list() == ["seed-000000.w0", "seed-000002.w0", "seed-000002.w1"]
    assert dict(stages["dedup"].counters) == {"kept": 5, "dropped:exact_duplicate": 1}
    assert dict(stages["decontaminate"].counters) == {"kept": 3, "dropped:contaminated": 2}


DECONTAMINATE_PLAN = {
    0: ["Tell me about Paris.", "what is the capital of australia"],  # equal to an item
    1: [
        "Solve this step by step. Natalia sold clips to 48 of her friends in April, and then "
        "she sold half as many clips in May. How many in total?",  # holds an item
        "Tell me about Paris.",  # a duplicate: dedup drops it before decontamination
    ],
    2: ["Describe the water cycle.", "How many legs does a spider have?"],
}
PLANS = {"default": PLAN, "chain": CHAIN_PLAN, "decontaminate": DECONTAMINATE_PLAN}


def test_dedup_after_a_stage_that_rewrites_prompts_sees_the_new_prompts():
    """evol_instruct rewrites prompts without being able to start from seeds (writes_prompts is
    False), and user_turn grows conversations: a dedup after either must decide on what they made,
    not on the source records (a pre-pass over the source would keep every rewritten prompt)."""
    from synthpref.filters.dedup import Dedup, DedupParams
    from synthpref.stages.evol_instruct import EvolInstruct
    from synthpref.stages.generate import Generate
    from synthpref.stages.user_turn import UserTurn

    for before in (EvolInstruct, UserTurn):
        assert before.creates_prompts and not before.writes_candidates
        dedup = Dedup("dedup", DedupParams())
        dedup.bind([object.__new__(Generate), object.__new__(before)])
        assert dedup.carries_state, before.type_name
    dedup = Dedup("dedup", DedupParams())
    dedup.bind([object.__new__(Generate)])
    assert not dedup.carries_state
