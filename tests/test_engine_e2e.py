"""End to end on the embedded model: a run, its dataset, resume after SIGKILL, bad rows."""

from __future__ import annotations

import json
import os
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
from tests.fault_fixtures import EMBEDDED_TOLERANCE, differences

runner = CliRunner()


def _run(recipe_path: Path, *args: str):
    result = runner.invoke(app, ["run", str(recipe_path), "--no-progress", *args])
    return result


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    path = write_recipe(tmp, tiny_recipe(tmp))
    result = _run(path)
    assert result.exit_code == 0, result.output
    return tmp / "run", path


def _dataset_rows(run_dir: Path) -> list[dict]:
    return pl.read_parquet(run_dir / "data" / "preference.parquet").sort("prompt_id").to_dicts()


def _stage_counts(summary: dict) -> dict:
    return {
        s["name"]: (s["records_in"], s["records_out"], s["counters"]) for s in summary["stages"]
    }


def test_run_produces_a_trl_preference_dataset(reference_run):
    run_dir, _ = reference_run
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files=str(run_dir / "data" / "preference.parquet"), split="train"
    )
    assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin"} <= set(
        ds.column_names
    )
    assert len(ds) >= 1
    row = ds[0]
    assert row["prompt"][-1]["role"] == "user"
    assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
    assert row["score_chosen"] > row["score_rejected"]
    assert row["margin"] == pytest.approx(row["score_chosen"] - row["score_rejected"])

    summary = json.loads((run_dir / "summary.json").read_text())
    by_name = {s["name"]: s for s in summary["stages"]}
    assert by_name["generate"]["records_in"] == len(PROMPTS)
    assert by_name["generate"]["counters"]["candidates"] == 2 * len(PROMPTS)
    assert by_name["rating"]["counters"]["judgments"] == 2 * len(PROMPTS)
    records = pl.read_parquet(run_dir / "data" / "records.parquet")
    assert records.height == len(PROMPTS)
    judgment = records["judgments"][0][0]
    assert judgment["template_hash"].startswith("helpfulness=")
    assert json.loads(judgment["sampling"])["temperature"] == 0.0


def test_rerun_resumes_without_model_calls(reference_run):
    run_dir, path = reference_run
    before = _dataset_rows(run_dir)
    counted = _stage_counts(json.loads((run_dir / "summary.json").read_text()))
    result = _run(path)
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert all(s["calls"] == 0 for s in summary["stages"])
    # every stage's counters come back from its checkpoints, not only the stage resumed from
    assert _stage_counts(summary) == counted
    assert all(s["shards_resumed"] >= 1 for s in summary["stages"][-1:])
    assert _dataset_rows(run_dir) == before


def test_fresh_starts_over(tmp_path):
    recipe_prompts = PROMPTS[:2]
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, prompts=recipe_prompts))
    assert _run(path).exit_code == 0
    result = _run(path, "--fresh")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"][0]["calls"] == 2 * len(recipe_prompts)


def test_resume_after_sigkill_repeats_no_completed_call(tmp_path, reference_run, subprocess_env):
    ref_dir, _ = reference_run
    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "synthpref.cli", "run", str(path), "--no-progress"]
    proc = subprocess.Popen(
        cmd, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    cache = run_dir / "cache.sqlite"
    deadline = time.time() + 300
    killed_with = None
    while time.time() < deadline and proc.poll() is None:
        if cache.exists():
            try:
                with sqlite3.connect(cache) as db:
                    done = db.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
            except sqlite3.OperationalError:
                done = 0
            if done >= 1:
                os.kill(proc.pid, signal.SIGKILL)
                killed_with = done
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_with is not None, "the run finished or hung before any model call completed"
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "data" / "preference.parquet").exists()

    result = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(cache) as db:
        counts = db.execute("SELECT key, COUNT(*) FROM journal GROUP BY key").fetchall()
    assert counts and all(n == 1 for _, n in counts), "a completed model call was made twice"
    # texts exactly, scores to float rounding: the resumed run's rows share forward passes with
    # other rows than they did in the reference run
    assert differences(_dataset_rows(run_dir), _dataset_rows(ref_dir), EMBEDDED_TOLERANCE) == []


def test_bad_rows_are_skipped_and_logged_or_stop_the_run(tmp_path):
    prompts = [
        PROMPTS[0],
        {"id": "bad-empty", "prompt": ""},
        {"id": "bad-type", "prompt": {"x": 1}},
    ]
    recipe = tiny_recipe(tmp_path, prompts=prompts)
    recipe["stages"] = [
        {"type": "generate", "models": ["a"], "n": 2, "max_tokens": 4},
        {"type": "rubric_judge", "model": "a", "max_tokens": 4},
        {"type": "pairs"},
    ]
    path = write_recipe(tmp_path, recipe)
    result = _run(path)
    assert result.exit_code == 0, result.output
    errors = [
        json.loads(line) for line in (tmp_path / "run" / "errors.jsonl").read_text().splitlines()
    ]
    assert [(e["row"], e["field"]) for e in errors] == [(2, "prompt"), (3, "prompt")]
    assert "2 malformed input row(s) skipped" in result.output

    recipe["settings"]["on_error"] = "stop"
    result = _run(write_recipe(tmp_path, recipe, "stop.yaml"))
    assert result.exit_code == 1
    assert "row 2, field 'prompt': empty prompt" in result.output
