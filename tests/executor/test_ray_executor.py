"""The Ray executor on a local CPU cluster: same dataset as the local executor, same checkpoints, and
resume across executors and after the driver is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from synthpref.cli import app
from tests.conftest import PROMPTS, tiny_recipe, write_recipe
from tests.fault_fixtures import EMBEDDED_TOLERANCE, dataset, differences

ray = pytest.importorskip("ray")
runner = CliRunner()


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (~2 s, ~650 MB); executors reuse an initialised Ray."""
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray enables token auth by default
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = old


def _run(path: Path, *args: str):
    result = runner.invoke(app, ["run", str(path), "--no-progress", *args])
    assert result.exit_code == 0, result.output
    return json.loads((path.parent / "run" / "summary.json").read_text())


def _rows(run_dir: Path, name: str = "preference") -> list[dict]:
    return pl.read_parquet(run_dir / "data" / f"{name}.parquet").sort("prompt_id").to_dicts()


def _records(run_dir: Path) -> list[dict]:
    return pl.read_parquet(run_dir / "data" / "records.parquet").sort("id").to_dicts()


def _journal(run_dir: Path) -> dict[str, int]:
    with sqlite3.connect(run_dir / "cache.sqlite") as db:
        return dict(db.execute("SELECT key, COUNT(*) FROM journal GROUP BY key").fetchall())


def _layout(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in (run_dir / "checkpoints").rglob("*.parquet"))


def ray_recipe(tmp: Path) -> dict:
    """The tiny recipe cut to what a Ray run is checked on: two shards of one prompt (a shard per
    replica for ``--workers 2``), both models sampled and judged, replies of 8 tokens. Each Ray
    run here pays for its actors (torch imported, the model loaded) whatever the recipe; the rows
    and decoding steps are what a smaller recipe saves."""
    recipe = tiny_recipe(tmp, prompts=PROMPTS[:2], settings={"shard_size": 1})
    recipe["stages"][0]["max_tokens"] = 8
    return recipe


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    path = write_recipe(tmp, ray_recipe(tmp))
    summary = _run(path)
    return tmp / "run", summary


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, cluster):
    tmp = tmp_path_factory.mktemp("ray")
    path = write_recipe(tmp, ray_recipe(tmp))
    summary = _run(path, "--executor", "ray", "--workers", "2")
    return tmp / "run", path, summary


def _stage_view(summary: dict) -> list[tuple]:
    return [
        (s["name"], s["records_in"], s["records_out"], s["counters"], s["calls"])
        for s in summary["stages"]
    ]


@pytest.mark.slow
def test_ray_run_matches_the_local_executor(local_reference, ray_run):
    local_dir, local_summary = local_reference
    ray_dir, _, ray_summary = ray_run
    # texts exactly; log-prob scores to float rounding (rows share forward passes with other rows
    # in a different order in each executor, which moves the last bits of a float32 log-prob)
    assert differences(dataset(ray_dir), dataset(local_dir), EMBEDDED_TOLERANCE) == []
    assert _layout(ray_dir) == _layout(local_dir)  # same fingerprints, same checkpoint files
    assert ray_summary["fingerprint"] == local_summary["fingerprint"]
    assert _stage_view(ray_summary) == _stage_view(local_summary)
    assert _journal(ray_dir) == _journal(local_dir)  # every call computed once, none lost
    assert not any((ray_dir / "cache-workers").glob("*.sqlite"))  # merged into cache.sqlite
    with sqlite3.connect(ray_dir / "cache.sqlite") as db:
        pids = {p for (p,) in db.execute("SELECT DISTINCT pid FROM journal")}
    assert len(pids) == 2 and os.getpid() not in pids  # both shards, on two replicas


@pytest.mark.slow
def test_ray_rerun_reuses_every_shard_and_call(ray_run):
    run_dir, path, _ = ray_run
    before_rows, before_journal = _rows(run_dir), _journal(run_dir)
    summary = _run(path, "--executor", "ray", "--workers", "2")
    assert all(s["calls"] == 0 for s in summary["stages"])
    assert summary["stages"][-1]["shards_resumed"] == 2
    assert _rows(run_dir) == before_rows
    assert _journal(run_dir) == before_journal


def _api_ray_run(path: Path) -> dict:
    import synthpref

    return synthpref.run(path, executor="ray", progress=False).to_dict()


@pytest.mark.slow
def test_runs_resume_across_executors(local_reference, ray_run, tmp_path, cluster):
    """Judge and pairs checkpoints removed: the other executor redoes them from the first one's
    checkpoints and cache, without computing any model call again."""
    for source, rerun in ((local_reference[0], _api_ray_run), (ray_run[0], _run)):
        run_dir = tmp_path / source.parent.name / "run"
        shutil.copytree(source, run_dir)
        path = write_recipe(run_dir.parent, ray_recipe(run_dir.parent))
        for stage_dir in sorted((run_dir / "checkpoints").iterdir())[1:]:
            shutil.rmtree(stage_dir)
        journal, rows = _journal(run_dir), _rows(run_dir)
        first = json.loads((run_dir / "summary.json").read_text())["stages"]
        generate, rating, pairs = rerun(path)["stages"]
        assert generate["shards_resumed"] == 2 and generate["calls"] == 0
        assert rating["shards_resumed"] == 0 and rating["calls"] == 0 and rating["cache_hits"] > 0
        assert pairs["counters"] == first[-1]["counters"]
        assert _journal(run_dir) == journal
        assert _rows(run_dir) == rows


@pytest.mark.slow
def test_ray_driver_killed_mid_run_resumes(tmp_path, local_reference, cluster, subprocess_env):
    path = write_recipe(tmp_path, ray_recipe(tmp_path))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "synthpref.cli", "run", str(path), "--no-progress"]
    cmd += ["--executor", "ray", "--address", cluster]
    env = {**subprocess_env, "RAY_AUTH_MODE": "disabled"}
    log = (tmp_path / "driver.log").open("w")  # a file, not a pipe: Ray's worker logs can fill one
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline, killed_with = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        done = 0
        for worker_cache in (run_dir / "cache-workers").glob("*.sqlite"):
            try:
                with sqlite3.connect(worker_cache) as db:
                    done += db.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
            except sqlite3.OperationalError:
                pass
        if done >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            killed_with = done
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    log.close()
    assert killed_with is not None, (tmp_path / "driver.log").read_text()[-2000:]
    assert not (run_dir / "data").exists()
    time.sleep(1.0)  # Ray kills the actors of a dead driver; let them go

    summary = _run(path, "--executor", "ray")
    assert sum(s["calls"] for s in summary["stages"]) < sum(
        s["calls"] for s in json.loads((local_reference[0] / "summary.json").read_text())["stages"]
    )
    journal = _journal(run_dir)
    assert journal and all(n == 1 for n in journal.values()), "a completed call was made twice"
    assert differences(_rows(run_dir), _rows(local_reference[0]), EMBEDDED_TOLERANCE) == []


def test_missing_ray_names_the_extra(monkeypatch):
    from synthpref.executor.common import RunError
    from synthpref.executor.ray_executor import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RunError, match=r"pip install 'synthpref\[ray\]'"):
        import_ray()


def test_ray_options_need_the_ray_executor(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    result = runner.invoke(app, ["run", str(path), "--workers", "2"])
    assert result.exit_code == 2 and "--executor ray" in result.output
    result = runner.invoke(app, ["run", str(path), "--executor", "spark"])
    assert result.exit_code == 2 and "local, ray" in result.output


def test_worker_caches_read_the_run_cache_and_merge_back(tmp_path):
    from synthpref.cache import RequestCache
    from synthpref.executor.worker_cache import WorkerCache, merge_worker_caches

    run_cache = RequestCache(tmp_path / "cache.sqlite")
    run_cache.put("old", "generate", '"o"')
    run_cache.close()
    merge_worker_caches(tmp_path)  # checkpoints the WAL: an immutable reader sees "old"
    one = WorkerCache(tmp_path / "cache.sqlite", tmp_path / "cache-workers" / "one.sqlite")
    two = WorkerCache(tmp_path / "cache.sqlite", tmp_path / "cache-workers" / "two.sqlite")
    one.put("a", "generate", '"1"')
    two.put("b", "score", '"2"')
    assert one.get_many(["old", "a", "b"]) == {"old": '"o"', "a": '"1"'}
    one.close()  # two is left open, as by a killed worker: its committed rows still merge
    assert merge_worker_caches(tmp_path) == 2
    two.close()
    assert not any((tmp_path / "cache-workers").iterdir())
    merged = RequestCache(tmp_path / "cache.sqlite")
    assert merged.get_many(["old", "a", "b"]) == {"old": '"o"', "a": '"1"', "b": '"2"'}
    assert merged.journal_counts() == {"old": 1, "a": 1, "b": 1}
    merged.close()
