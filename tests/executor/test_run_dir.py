"""The run directory: durable checkpoints, recovery from a damaged one, atomic JSON files, and
``--fresh`` / ``output.dir`` handling that never touches files a run did not write.

Every run here is model-free (``tests.curation_fixtures`` stages) and goes through the real executor.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from synthpref.executor.common import RunError, plan_run
from synthpref.executor.local import LocalExecutor
from synthpref.recipes.loader import parse_recipe
from synthpref.sources import InputError, SourceError
from tests.curation_fixtures import FAKE, PROMPTS, write_prompts

STAGES = [
    {"type": FAKE + "FakeGenerate", "name": "gen", "n": 3},
    {"type": FAKE + "FakeJudge", "name": "judge"},
    {"type": "pairs", "judge": "judge"},
]
FORMATS = ["preference", "kto"]


def _loaded(
    tmp: Path, *, out: str | Path | None = None, stages=STAGES, base_dir: Path | None = None
):
    data = tmp / "prompts.jsonl"
    if not data.exists():
        write_prompts(data, PROMPTS)
    raw = {
        "name": "run-dir-test",
        "source": {"path": str(data), "id_field": "id"},
        "stages": stages,
        "output": {"dir": str(out if out is not None else tmp / "run"), "formats": FORMATS},
        "settings": {"shard_size": 2},
    }
    return parse_recipe(raw, base_dir=base_dir or tmp)


def _run(loaded, *, fresh: bool = False, run_dir: Path | None = None):
    """Run with the real local executor; returns (result, everything it warned)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=10_000, color_system=None)
    result = LocalExecutor(
        loaded, run_dir=run_dir, fresh=fresh, console=console, progress=False
    ).run()
    return result, buffer.getvalue()


def _dataset(run_dir: Path) -> dict[str, object]:
    return {
        name: pq.read_table(run_dir / "data" / f"{name}.parquet")
        for name in ("preference", "kto", "records")
    }


def _tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# --- durable, recoverable checkpoints --------------------------------------------------------------


def test_checkpoints_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    from synthpref.executor import checkpoints as ck
    from tests.curation_fixtures import record

    synced: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "stage" / "shard-00000.parquet"
    ck.write_shard(path, [record("r1")], {"records_in": 1, "records_out": 1})
    assert path.stat().st_ino in synced  # the data reached the disk before the rename
    assert path.parent.stat().st_ino in synced  # and the rename itself did
    assert [p.name for p in path.parent.iterdir()] == ["shard-00000.parquet"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not parquet\n" * 50)


def _no_metadata(path: Path) -> None:
    pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _no_metadata], ids=lambda f: f.__name__)
@pytest.mark.parametrize("stages_hit", [1, 2], ids=["last-stage", "last-two-stages"])
def test_a_damaged_checkpoint_is_recomputed_with_a_warning(tmp_path, damage, stages_hit):
    loaded = _loaded(tmp_path)
    run_dir = tmp_path / "run"
    _run(loaded)
    before = _dataset(run_dir)
    stage_dirs = sorted((run_dir / "checkpoints").iterdir())
    bad = [d / "shard-00001.parquet" for d in stage_dirs[-stages_hit:]]
    for path in bad:
        damage(path)

    result, warnings = _run(_loaded(tmp_path))

    for path in bad:
        assert str(path) in warnings
    assert "recomputing" in warnings
    after = _dataset(run_dir)
    for name, table in before.items():
        assert after[name].equals(table), name
    for path in bad:  # rewritten whole; the damaged file was moved aside
        assert pq.read_table(path).num_rows > 0
        assert path.with_name(path.name + ".corrupt").is_file()
    last = result.stages[-1]
    assert last.shards_resumed == 2  # shards 0 and 2 untouched, shard 1 recomputed
    assert last.records_in == len(PROMPTS)


def test_partial_writes_left_by_a_kill_are_removed_on_resume(tmp_path):
    loaded = _loaded(tmp_path)
    run_dir = tmp_path / "run"
    _run(loaded)
    stage_dir = sorted((run_dir / "checkpoints").iterdir())[0]
    leftover = stage_dir / ".tmp-shard-00001.parquet-abc.parquet"  # a write SIGKILL interrupted
    leftover.write_bytes(b"PAR1 half a file")
    _run(_loaded(tmp_path))
    assert not leftover.exists()
    assert sorted(p.name for p in stage_dir.iterdir()) == [
        f"shard-{k:05d}.parquet" for k in range(3)
    ]


# --- atomic JSON files -----------------------------------------------------------------------------


class _Unserializable:
    pass


def test_atomic_json_writer_keeps_the_old_file_when_serialising_fails(tmp_path):
    from synthpref.executor.durable import write_json

    path = tmp_path / "summary.json"
    write_json(path, {"fingerprint": "old", "stages": [1, 2, 3]})
    with pytest.raises(TypeError):
        write_json(path, {"fingerprint": "new", "stages": [1, _Unserializable()]})
    assert json.loads(path.read_text()) == {"fingerprint": "old", "stages": [1, 2, 3]}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_errors_jsonl_is_replaced_whole_or_not_at_all(tmp_path):
    loaded = _loaded(tmp_path)
    run_dir = tmp_path / "run"
    records = _records(loaded)
    first = [InputError(1, "prompt", "empty"), InputError(2, "prompt", "empty")]
    plan_run(loaded, run_dir, fresh=False, records=records, input_errors=first)
    kept = (run_dir / "errors.jsonl").read_text()
    broken = [InputError(3, "prompt", "empty"), InputError(4, "prompt", _Unserializable())]
    with pytest.raises(TypeError):
        plan_run(loaded, run_dir, fresh=False, records=records, input_errors=broken)
    assert (run_dir / "errors.jsonl").read_text() == kept


def _records(loaded):
    from synthpref.sources import load_records

    return load_records(loaded.recipe)[0]


# --- --fresh and output.dir ------------------------------------------------------------------------


def test_fresh_refuses_a_folder_that_is_not_a_run_and_deletes_nothing(tmp_path):
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "important.csv").write_text("a,b\n1,2\n")
    (mine / "checkpoints").mkdir()
    (mine / "checkpoints" / "notes.txt").write_text("mine")
    before = _tree(mine)
    for fresh in (True, False):
        with pytest.raises(RunError, match=r"is not a synthpref run directory") as info:
            _run(_loaded(tmp_path, out=mine), fresh=fresh)
        assert str(mine) in str(info.value)
        assert _tree(mine) == before  # no cache.sqlite, run.json or errors.jsonl either


def test_fresh_loads_the_source_before_deleting_anything(tmp_path):
    _run(_loaded(tmp_path))
    run_dir = tmp_path / "run"
    loaded = _loaded(tmp_path)
    before = _tree(run_dir)
    (tmp_path / "prompts.jsonl").unlink()
    with pytest.raises(SourceError):
        _run(loaded, fresh=True)
    assert _tree(run_dir) == before


def test_a_failing_source_creates_no_run_dir(tmp_path):
    loaded = _loaded(tmp_path, out=tmp_path / "new-run")
    (tmp_path / "prompts.jsonl").unlink()
    with pytest.raises(SourceError):
        _run(loaded)
    assert not (tmp_path / "new-run").exists()


def test_fresh_refuses_unknown_files_in_data(tmp_path):
    _run(_loaded(tmp_path))
    run_dir = tmp_path / "run"
    (run_dir / "data" / "important.csv").write_text("keep me")
    before = _tree(run_dir)
    with pytest.raises(RunError, match=r"important\.csv") as info:
        _run(_loaded(tmp_path), fresh=True)
    assert "did not write" in str(info.value)
    assert _tree(run_dir) == before


def test_fresh_deletes_only_what_the_run_wrote(tmp_path):
    _run(_loaded(tmp_path))
    run_dir = tmp_path / "run"
    old_stage = run_dir / "checkpoints" / "00-gen-000000000000"
    old_stage.mkdir()
    (old_stage / "shard-00000.parquet").write_bytes(b"stale")
    (run_dir / "notes.md").write_text("my notes about this run")
    result, _ = _run(_loaded(tmp_path), fresh=True)
    assert not old_stage.exists()
    assert (run_dir / "notes.md").read_text() == "my notes about this run"
    assert all(s.shards_resumed == 0 for s in result.stages)
    assert pq.read_table(run_dir / "data" / "preference.parquet").num_rows > 0


@pytest.mark.parametrize("where", ["recipe-dir", "source-dir", "parent-of-recipe", "home"])
def test_output_dir_may_not_hold_the_recipe_the_source_or_home(tmp_path, monkeypatch, where):
    recipes = tmp_path / "project" / "recipes"
    inputs = tmp_path / "project" / "inputs"
    recipes.mkdir(parents=True)
    inputs.mkdir()
    (recipes / "recipe.yaml").write_text("# the recipe\n")
    write_prompts(inputs / "prompts.jsonl", PROMPTS)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    out = {
        "recipe-dir": recipes,
        "source-dir": inputs,
        "parent-of-recipe": tmp_path / "project",
        "home": home,
    }[where]
    loaded = _loaded(inputs, out=out, base_dir=recipes)
    loaded.path = recipes / "recipe.yaml"
    before = _tree(tmp_path)
    with pytest.raises(RunError, match=r"output\.dir") as info:
        _run(loaded, fresh=True)
    assert str(out) in str(info.value)
    assert _tree(tmp_path) == before


def test_root_is_never_a_run_dir(tmp_path):
    with pytest.raises(RunError, match="filesystem root"):
        _run(_loaded(tmp_path, out="/"), fresh=True)


def test_a_stage_name_cannot_lead_checkpoints_out_of_the_run_dir(tmp_path):
    loaded = _loaded(tmp_path)
    loaded.stages[0].name = "../../../../escape"
    try:
        _run(loaded)
    except RunError:
        pass  # refusing is as good as containing
    outside = {p.name for p in tmp_path.iterdir()}
    assert outside <= {"run", "prompts.jsonl"}
    run_dir = tmp_path / "run"
    for path in run_dir.rglob("shard-*.parquet"):
        assert path.resolve().parent.parent == (run_dir / "checkpoints").resolve()


# --- reading a damaged run dir: report and push name the file ------------------------------------


def _write(rel: str, content: bytes | str):
    def damage(run_dir: Path) -> None:
        path = run_dir / rel
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return damage


def _unlink(rel: str):
    return lambda run_dir: (run_dir / rel).unlink()


def _checkpoint(run_dir: Path) -> None:
    _garbage(sorted((run_dir / "checkpoints").iterdir())[-1] / "shard-00000.parquet")


DAMAGE = {
    "run.json missing": (_unlink("run.json"), "run.json"),
    "run.json not JSON": (_write("run.json", "{not json"), "run.json"),
    "run.json a list": (_write("run.json", "[1, 2]"), "run.json"),
    "run.json stage without name": (
        _write("run.json", json.dumps({"fingerprint": "x", "stages": [{"fingerprint": "y"}]})),
        "run.json",
    ),
    "summary.json a string": (_write("summary.json", '"done"'), "summary.json"),
    "summary.json outputs a list": (_write("summary.json", '{"outputs": []}'), "summary.json"),
    "records.parquet garbage": (_write("data/records.parquet", b"garbage" * 20), "records.parquet"),
    "preference.parquet empty": (_write("data/preference.parquet", b""), "preference.parquet"),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    _run(_loaded(tmp))
    return tmp / "run"


@pytest.mark.parametrize("command", ["report", "push"])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_run_dir_is_named_not_a_traceback(finished_run, tmp_path, command, case):
    import shutil

    from typer.testing import CliRunner

    from synthpref.cli import app

    damage, name = DAMAGE[case]
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    damage(run_dir)
    args = [command, str(run_dir)] + (["org/prefs", "--dry-run"] if command == "push" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert name in result.output.replace("\n", "")  # rich wraps long paths anywhere


@pytest.mark.parametrize(
    "damage, name",
    [
        (_checkpoint, "shard-00000.parquet"),
        (_write("errors.jsonl", "{not json\n"), "errors.jsonl"),
    ],
    ids=["checkpoint", "errors.jsonl"],
)
def test_report_names_a_damaged_checkpoint_or_error_log(finished_run, tmp_path, damage, name):
    import shutil

    from synthpref.report import ReportError, build_report

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    damage(run_dir)
    with pytest.raises(ReportError, match=name.replace(".", r"\.")):
        build_report(run_dir)
