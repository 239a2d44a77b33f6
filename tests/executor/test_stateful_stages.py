"""Stages that carry state across shards (``carries_state``, ``start``, ``replay``) on the local
executor: their shards go through strictly in order, one at a time, whatever
``settings.max_concurrent_shards``; a paused shard holds that stage's later shards for the pass; a
resumed run replays the shards it finished earlier, and recomputes one whose checkpoint is gone."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import polars as pl
import pytest
from pydantic import Field

from synthpref.backends.batch import BatchPending
from synthpref.executor.local import LocalExecutor, RunError
from synthpref.recipes.loader import parse_recipe
from synthpref.records import Message, Record
from synthpref.stages.base import Stage, StageParams

HERE = "tests.executor.test_stateful_stages"
SEEDS = 8  # four shards of two

#: what the stages did, in order: (stage, event, first record id of the shard)
EVENTS: list[tuple[str, str, str]] = []


class WriterParams(StageParams):
    pause_file: str | None = Field(None, description="while it exists, pause_seed's shard pauses")
    pause_seed: int = 0


class Writer(Stage):
    """Writes 'prompt k' for seed k; pauses once (a batch job still out) on pause_seed's shard."""

    type_name = "writer"
    kind = "generator"
    writes_prompts = True
    creates_prompts = True
    Params = WriterParams
    params: WriterParams

    async def process(self, records: list[Record]) -> list[Record]:
        EVENTS.append((self.name, "process", records[0].id))
        pause = Path(self.params.pause_file) if self.params.pause_file else None
        seeds = [r.metadata["seed"] for r in records]
        if pause and pause.exists() and self.params.pause_seed in seeds:
            pause.unlink()
            raise BatchPending("scripted: batch job still out", jobs=["job-1"])
        for r in records:
            r.prompt = [Message(role="user", content=f"prompt {r.metadata['seed']}")]
        return records


class Running(Stage):
    """Numbers the records in stream order: ``annotations['position']`` counts every record of
    the shards before (state carried across shards)."""

    type_name = "running"
    kind = "annotator"
    carries_state = True

    def __init__(self, name, params, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self.seen = 0
        self.busy = False

    def start(self) -> None:
        EVENTS.append((self.name, "start", ""))
        self.seen = 0

    def replay(self, records: list[Record]) -> None:
        EVENTS.append((self.name, "replay", records[0].id))
        self.seen += len(records)

    async def process(self, records: list[Record]) -> list[Record]:
        assert not self.busy, "two shards in one stateful stage at once"
        self.busy = True
        EVENTS.append((self.name, "process", records[0].id))
        await asyncio.sleep(0.02)  # room for another shard to slip in, if the executor let it
        for r in records:
            r.annotations["position"] = self.seen
            self.seen += 1
        self.busy = False
        return records


@pytest.fixture(autouse=True)
def _events():
    EVENTS.clear()
    yield
    EVENTS.clear()


def stages(tmp_path: Path, **writer) -> list[dict]:
    return [
        {"type": f"{HERE}:Writer", **writer},
        {"type": f"{HERE}:Running"},
        {
            "type": "tests.fault_fixtures:Crash",
            "flag": str(tmp_path / "crash-flag"),
            "on": "seed-000004",
        },
    ]


def run(run_dir: Path, spec: list[dict], **settings) -> list[int]:
    raw = {
        "source": {"seeds": SEEDS},
        "stages": spec,
        "output": {"dir": str(run_dir), "formats": []},
        "settings": {"shard_size": 2, **settings},
    }
    LocalExecutor(parse_recipe(raw, base_dir=run_dir.parent), progress=False).run()
    records = pl.read_parquet(run_dir / "data" / "records.parquet")
    return [json.loads(a)["position"] for a in records["annotations"]]


def events(stage: str = "running") -> list[tuple[str, str]]:
    return [(what, rid) for name, what, rid in EVENTS if name == stage]


SHARD = ["seed-000000", "seed-000002", "seed-000004", "seed-000006"]  # first record of each


@pytest.mark.parametrize("depth", [1, 4])
def test_a_stateful_stage_takes_its_shards_in_order_one_at_a_time(tmp_path, depth):
    assert run(tmp_path / "run", stages(tmp_path), max_concurrent_shards=depth) == list(range(8))
    assert events() == [("start", ""), *(("process", s) for s in SHARD)]


def test_a_paused_shard_holds_the_later_shards_of_a_stateful_stage(tmp_path):
    """The writer's shard 1 pauses: the writer goes on with shards 2 and 3 in that pass, the
    stateful stage does not (its state would skip shard 1); the next pass replays its shard 0 and
    processes 1, 2, 3 in order."""
    (tmp_path / "pause").write_text("")
    spec = stages(tmp_path, pause_file=str(tmp_path / "pause"), pause_seed=2)
    positions = run(tmp_path / "run", spec, max_concurrent_shards=4, batch={"poll_seconds": 0.01})
    assert positions == list(range(8))
    writer = events("writer")
    assert writer[:4] == [("process", s) for s in SHARD]  # pass 1: shards 2, 3 go on
    assert writer[4:] == [("process", SHARD[1])]  # pass 2: the paused one
    assert events() == [
        ("start", ""),
        ("process", SHARD[0]),
        ("start", ""),
        ("replay", SHARD[0]),
        *(("process", s) for s in SHARD[1:]),
    ]


@pytest.mark.parametrize("depth", [1, 4])
def test_a_resumed_run_replays_the_finished_shards_in_order(tmp_path, depth):
    (tmp_path / "crash-flag").write_text("")
    with pytest.raises(RunError, match="simulated crash"):
        run(tmp_path / "run", stages(tmp_path), max_concurrent_shards=depth)
    (tmp_path / "crash-flag").unlink()
    # it may have run ahead of the crash (a shard in flight then was cancelled, not checkpointed)
    finished = (tmp_path / "run" / "checkpoints").glob("01-running-*/shard-*.parquet")
    done = SHARD[: len(list(finished))]
    assert len(done) >= 3 and [rid for what, rid in events() if what == "process"][:3] == SHARD[:3]
    EVENTS.clear()
    assert run(tmp_path / "run", stages(tmp_path), max_concurrent_shards=depth) == list(range(8))
    assert events() == [
        ("start", ""),
        *(("replay", s) for s in done),
        *(("process", s) for s in SHARD[len(done) :]),
    ]


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_a_lost_checkpoint_of_a_stateful_stage_is_recomputed(tmp_path, damage):
    """A stateful stage replays its own checkpoint of every shard a later stage finished. Where that
    one is gone (or unreadable) the shard is recomputed from the checkpoint before the stage, in
    order, instead of failing on every rerun."""
    assert run(tmp_path / "run", stages(tmp_path)) == list(range(8))
    (lost,) = (tmp_path / "run" / "checkpoints").glob("01-running-*/shard-00001.parquet")
    if damage == "missing":
        lost.unlink()
    else:
        lost.write_bytes(b"not parquet")
    EVENTS.clear()
    assert run(tmp_path / "run", stages(tmp_path)) == list(range(8))
    assert events() == [
        ("start", ""),
        ("replay", SHARD[0]),
        ("process", SHARD[1]),
        ("replay", SHARD[2]),
        ("replay", SHARD[3]),
    ]
    assert lost.exists()
    assert (damage == "damaged") == any(lost.parent.glob("shard-00001.parquet.*"))
