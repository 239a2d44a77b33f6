"""The run report: numbers from a real (model-free) run directory, figures that are real PNGs, the
CLI, resumed runs, and clear errors for run directories that are not finished runs."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from synthpref.cli import app
from synthpref.report import ReportError, build_report
from tests.curation_fixtures import FAKE, PROMPTS, run_recipe

runner = CliRunner()

STAGES = [
    {"type": "dedup"},
    {"type": FAKE + "FakeGenerate", "name": "gen", "n": 3},
    {"type": FAKE + "FakeJudge", "name": "length_a", "mode": "length"},
    {"type": FAKE + "FakeJudge", "name": "length_b", "mode": "length"},
    {"type": FAKE + "FakeJudge", "name": "inverse", "mode": "inverse", "fail_every": 4},
    {"type": "pairs", "judge": "length_a"},
    {"type": "consistency_filter", "judges": ["length_a", "inverse"], "min_agree": 1},
    {"type": "length_bias_filter", "max_ratio": 1.6},
    {"type": "margin_filter", "min_margin": 1.0},
]
FORMATS = ["preference", "kto", "pointwise"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    prompts = [*PROMPTS, {"id": "copy", "prompt": PROMPTS[0]["prompt"].upper()}]
    (tmp / "prompts-with-a-bad-row.jsonl").write_text("")
    run_dir, _ = run_recipe(tmp, prompts, STAGES, FORMATS)
    return run_dir


def test_cli_report_writes_markdown_json_and_figures(run_dir):
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    out = run_dir / "report"
    md = (out / "report.md").read_text()
    for section in ("## Stages", "## Dropped rows", "## Failures", "## Judge scores",
                    "## Agreement between judges", "## Pairs: lengths and margins",
                    "## Length-bias guard", "## Consistency filter", "## Dataset formats"):  # fmt: skip
        assert section in md, section
    for png in ("funnel.png", "scores.png", "agreement.png", "lengths.png", "dropped.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, png
        assert f"]({png})" in md


def test_report_numbers(run_dir):
    report = build_report(run_dir)
    data = json.loads(report.json.read_text())
    assert data["input_rows"] == 7 and data["records"] == 6 and data["candidates"] == 18
    stages = {s["name"]: s for s in data["stages"]}
    assert stages["dedup"]["records_in"] == 7 and stages["dedup"]["records_out"] == 6
    assert {"stage": "dedup", "reason": "exact_duplicate", "rows": 1} in data["dropped"]
    margin = stages["margin_filter"]
    assert margin["pairs_out"] == data["pairs"]
    assert margin["pairs_in"] == stages["length_bias_filter"]["pairs_out"]
    # identical judges agree perfectly; a judge with the opposite taste agrees worse than chance
    kappa = {tuple(k["judges"]): k for k in data["kappa"]}
    assert kappa[("length_a", "length_b")]["kappa"] == pytest.approx(1.0)
    assert kappa[("inverse", "length_a")]["kappa"] < 0
    inverse = data["judges"]["inverse"]
    assert inverse["failed"] > 0 and inverse["judgments"] == 18
    md = report.markdown.read_text()
    assert f"judge `inverse`: {inverse['failed']} of 18 judgments failed: no rating found" in md
    assert data["formats"]["kto"]["balance"]["desirable"] == data["pairs"]


def test_report_of_a_resumed_run_counts_every_stage(run_dir, tmp_path):
    """A rerun resumes everything from the last stage's checkpoints; summary and report still have the
    full numbers of every stage."""
    before = json.loads(build_report(run_dir).json.read_text())
    copy = tmp_path / "copy"
    shutil.copytree(run_dir.parent, copy)
    again, result = run_recipe(copy, [*PROMPTS, {"id": "copy", "prompt": PROMPTS[0]["prompt"].upper()}],
                               STAGES, FORMATS)  # fmt: skip
    # nothing recomputed, yet every stage's counts come back from its checkpoints
    assert all(s.calls == 0 and s.shards_resumed == 4 for s in result.stages)
    assert {s.name: s.records_in for s in result.stages}["dedup"] == len(PROMPTS) + 1
    after = json.loads(build_report(again).json.read_text())
    for key in ("records", "pairs", "stages", "dropped", "kappa"):
        assert after[key] == before[key], key


def test_report_rejects_incomplete_run_dirs(run_dir, tmp_path):
    with pytest.raises(ReportError, match="is not a directory"):
        build_report(tmp_path / "nope")
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    (partial / "summary.json").unlink()
    with pytest.raises(ReportError, match=r"not a finished synthpref run: missing summary.json"):
        build_report(partial)
    shutil.copy(run_dir / "summary.json", partial / "summary.json")
    (partial / "data" / "kto.parquet").unlink()
    result = runner.invoke(app, ["report", str(partial)])
    assert result.exit_code == 1
    assert "the 'kto' output" in result.output and "missing" in result.output


def test_report_names_the_line_of_a_malformed_errors_file(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "errors.jsonl").write_text('{"row": 1}\n\n[2]\n')
    with pytest.raises(ReportError, match=r"errors\.jsonl line 3 holds a JSON list, not an object"):
        build_report(copy)
    (copy / "errors.jsonl").write_text('{"row": 1\n')
    with pytest.raises(ReportError, match=r"errors\.jsonl line 1 is not valid JSON: "):
        build_report(copy)
