"""Runs over a streamed source: only the shards in flight are in memory, every malformed row is
still found before any work, duplicate ids across shards are reported, the input fingerprint is the
one a list gave, stage pre-passes get a stream (or the list a custom stage expects), a source
changed mid-run stops the run, and a crashed run resumes."""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import polars as pl
import pytest

from synthpref import sources
from synthpref.executor.common import RunError
from synthpref.executor.local import LocalExecutor
from synthpref.recipes.loader import parse_recipe
from synthpref.records import Record
from synthpref.sources import load_records
from synthpref.stages.base import Stage

HERE = "tests.executor.test_streaming_run"
SHARD = 25


def _write(path: Path, n: int, *, bad_at: int | None = None, dup: tuple[int, int] | None = None):
    lines = []
    for i in range(n):
        rid = f"r{dup[0]}" if dup and i == dup[1] else f"r{i}"
        lines.append(json.dumps({"id": rid, "prompt": f"prompt number {i}"}))
    if bad_at is not None:
        lines[bad_at] = "{truncated"
    path.write_text("\n".join(lines) + "\n")


def _recipe(tmp_path: Path, stages: list[dict], **settings):
    raw = {
        "source": {"path": str(tmp_path / "p.jsonl"), "id_field": "id"},
        "stages": stages,
        "output": {"dir": str(tmp_path / "run"), "formats": []},
        "settings": {"shard_size": SHARD, **settings},
    }
    return parse_recipe(raw, base_dir=tmp_path)


def _run(tmp_path: Path, stages: list[dict], **settings):
    return LocalExecutor(_recipe(tmp_path, stages, **settings), progress=False).run()


def _ids(run_dir: Path) -> list[str]:
    return pl.read_parquet(run_dir / "data" / "records.parquet")["id"].to_list()


DEDUP = [{"type": "dedup", "near": False}, {"type": f"{HERE}:Passthrough"}]


class Passthrough(Stage):
    """A second stage, so shards queue between workers."""

    type_name = "passthrough"
    kind = "annotator"

    async def process(self, records: list[Record]) -> list[Record]:
        return records


def test_a_run_holds_only_the_shards_in_flight(tmp_path, monkeypatch):
    """Every record the source builds, and every copy a stage makes of one, is counted while it
    lives: the most alive at once is a few shards, not the 3,000 rows of the input."""
    live, most = [0], [0]

    def freed() -> None:
        live[0] -= 1

    class Counted(Record):
        def __new__(cls, *args, **kwargs):
            obj = super().__new__(cls)
            live[0] += 1
            most[0] = max(most[0], live[0])
            weakref.finalize(obj, freed)
            return obj

    monkeypatch.setattr(sources, "Record", Counted)
    _write(tmp_path / "p.jsonl", 3_000)
    result = _run(tmp_path, DEDUP, max_concurrent_shards=2)
    assert result.stages[-1].records_out == 3_000
    assert len(_ids(tmp_path / "run")) == 3_000
    # per stage the shard it works on and its copy (4), 2 queued between the stages, 1 being read
    assert most[0] <= 7 * SHARD, f"{most[0]} records alive at once"


def test_malformed_rows_anywhere_are_found_before_any_work(tmp_path):
    _write(tmp_path / "p.jsonl", 2_000, bad_at=1_990)
    with pytest.raises(RunError, match=r"1 malformed input row\(s\); first: row 1991"):
        _run(tmp_path, DEDUP, on_error="stop")
    run_dir = tmp_path / "run"
    assert not list(run_dir.glob("checkpoints/*/shard-*.parquet"))
    errors = [json.loads(x) for x in (run_dir / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"row": 1991, "field": "<line>", "message": errors[0]["message"]}]
    assert "not valid JSON" in errors[0]["message"]


def test_duplicate_ids_across_shards_name_both_rows(tmp_path):
    _write(tmp_path / "p.jsonl", 1_000, dup=(3, 977))  # row 978 repeats row 4's id, 39 shards on
    result = _run(tmp_path, DEDUP)
    assert [(e.row, e.field, e.message) for e in result.input_errors] == [
        (978, "id", "duplicate of row 4 (id 'r3')")
    ]
    ids = _ids(tmp_path / "run")
    assert len(ids) == 999 and ids.count("r3") == 1


def test_input_fingerprint_is_the_one_a_list_of_the_records_gave(tmp_path):
    _write(tmp_path / "p.jsonl", 130, bad_at=40)
    loaded = _recipe(tmp_path, DEDUP)
    LocalExecutor(loaded, progress=False).run()
    h = hashlib.sha256(str(SHARD).encode())  # the computation before streaming, over a list
    for record in load_records(loaded.recipe)[0]:
        h.update(record.model_dump_json(include={"id", "prompt", "metadata"}).encode())
    assert json.loads((tmp_path / "run" / "run.json").read_text())["input"] == h.hexdigest()


SEEN: dict[str, object] = {}


class ListPrepare(Passthrough):
    """A custom stage written before streaming: its pre-pass expects a list."""

    type_name = "list_prepare"

    def prepare(self, records, recipe=None) -> None:
        SEEN["list"] = records
        assert isinstance(records, list)


class StreamPrepare(Passthrough):
    type_name = "stream_prepare"
    prepare_streams = True

    def prepare(self, records, recipe=None) -> None:
        SEEN["stream_type"] = type(records)
        SEEN["stream"] = [r.id for r in records]


def test_pre_passes_get_a_stream_or_the_list_a_custom_stage_expects(tmp_path):
    SEEN.clear()
    _write(tmp_path / "p.jsonl", 60)
    _run(tmp_path, [{"type": f"{HERE}:ListPrepare"}, {"type": f"{HERE}:StreamPrepare"}])
    assert [r.id for r in SEEN["list"]] == [f"r{i}" for i in range(60)]
    assert SEEN["stream_type"] is not list
    assert SEEN["stream"] == [f"r{i}" for i in range(60)]


class Rewrite(Passthrough):
    """Edits the source after the planning read, before the shards are read again."""

    type_name = "rewrite"

    def prepare(self, records, recipe=None) -> None:
        path = Path(recipe.source.path)
        lines = path.read_text().splitlines()
        lines[60] = json.dumps({"id": "r60", "prompt": "edited meanwhile"})
        path.write_text("\n".join(lines) + "\n")


def test_a_source_changed_after_planning_stops_the_run(tmp_path):
    _write(tmp_path / "p.jsonl", 100)
    with pytest.raises(RunError, match=r"input changed .* shard 2 \(input rows 51-75\)"):
        _run(tmp_path, [{"type": f"{HERE}:Rewrite"}])
    finished = sorted(p.name for p in (tmp_path / "run").glob("checkpoints/*/shard-*.parquet"))
    assert finished == ["shard-00000.parquet", "shard-00001.parquet"]


def test_a_crashed_run_resumes_from_its_checkpoints(tmp_path):
    """A crash on shard 3 of 8; the rerun keeps shards 0-2 and ends as an uninterrupted run."""
    flag = tmp_path / "crash-flag"
    flag.touch()
    crash = {"type": "tests.fault_fixtures:Crash", "flag": str(flag), "on": "r80"}
    _write(tmp_path / "p.jsonl", 200, dup=(5, 150))
    with pytest.raises(RunError, match="shard 3"):
        _run(tmp_path, [*DEDUP, crash])
    run_dir = tmp_path / "run"
    done = {p: p.stat().st_mtime_ns for p in run_dir.glob("checkpoints/02-*/shard-*.parquet")}
    assert sorted(p.name for p in done) == [f"shard-0000{k}.parquet" for k in range(3)]
    flag.unlink()
    result = _run(tmp_path, [*DEDUP, crash])
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    resumed = [s.shards_resumed for s in result.stages]
    assert resumed[2] == 3 and min(resumed) >= 3, resumed
    assert _ids(run_dir) == [f"r{i}" for i in range(200) if i != 150]
