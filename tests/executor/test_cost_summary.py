"""Tokens and dollars per stage and per model: ``summary.json``, the CLI summary, the report, the
dataset card and the live progress column.

The models are scripted (``tests/judge_doubles.py``) and bill a fixed ``Usage`` per call, priced by the
recipe's ``price:``, so every dollar is known by hand and no network is needed:

- a generation call bills 1000 uncached input and 200 output tokens: (1000 x 2 + 200 x 8) / 1e6 = $0.0036
- a judge call bills 300 uncached + 200 cached input and 10 output tokens:
  (300 x 2 + 200 x 0.5 + 10 x 8) / 1e6 = $0.00078

Four prompts: ``writer`` (priced) and ``terse`` (no price: free) each answer every prompt once, and the
pairwise judge (priced) reads each prompt's one pair in both orders: 4 + 4 + 8 calls.
"""

from __future__ import annotations

import io
import json
import shutil
from typing import ClassVar, Literal

import pytest
from rich.console import Console
from typer.testing import CliRunner

from synthpref.backends.pricing import table_date
from synthpref.backends.specs import register_backend
from synthpref.backends.types import Usage
from synthpref.cli import app
from synthpref.executor.progress import StageProgress, _Rates
from synthpref.executor.run_meta import (
    RunSummary,
    StageRecord,
    StageSummary,
    format_usd,
    load,
    read_spend,
)
from synthpref.report import build_report
from tests.conftest import PROMPTS, write_recipe
from tests.judge_doubles import ScriptedBackend, ScriptedSpec

runner = CliRunner()
PRICE = {"input": 2.0, "output": 8.0, "cached_input": 0.5}
USAGE = {
    "generation": Usage(input_tokens=1000, output_tokens=200),
    "judge": Usage(input_tokens=300, cached_input_tokens=200, output_tokens=10),
}
GEN_CALL = (1000 * 2.0 + 200 * 8.0) / 1e6
JUDGE_CALL = (300 * 2.0 + 200 * 0.5 + 10 * 8.0) / 1e6
WRITER, JUDGE = 4 * GEN_CALL, 8 * JUDGE_CALL
TOTAL = WRITER + JUDGE


class BilledBackend(ScriptedBackend):
    """The scripted model, with what a provider would have billed on every result."""

    def __init__(self, policy: str, usage: Usage, name: str) -> None:
        super().__init__(policy, name=name)
        self.usage = usage

    async def generate(self, requests, on_result=None):
        def billed(i, result):
            result.usage = self.usage
            if on_result:
                on_result(i, result)

        return await super().generate(requests, billed)


@register_backend
class BilledSpec(ScriptedSpec):
    """A scripted model that bills ``USAGE[bill]`` per call (tests only)."""

    backend_name: ClassVar[str] = "billed"
    backend: str = "billed"
    bill: Literal["generation", "judge"] = "generation"

    def build(self):
        return BilledBackend(self.policy, USAGE[self.bill], f"billed-{self.bill}")


def _recipe(tmp_path) -> dict:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return {
        "name": "priced",
        "source": {"path": str(data), "id_field": "id"},
        "models": {
            "writer": {"backend": "billed", "system_prompt": "Give a long answer.", "price": PRICE},
            "terse": {"backend": "billed"},
            "judge": {
                "backend": "billed",
                "bill": "judge",
                "policy": "prefers_longer",
                "price": PRICE,
            },
        },
        "stages": [
            {"type": "generate", "name": "gen", "models": ["writer", "terse"], "max_tokens": 64},
            {"type": "pairwise_judge", "name": "pw", "model": "judge"},
            {"type": "pairs", "judge": "pw"},
        ],
        "output": {"dir": str(tmp_path / "run")},
        "settings": {"shard_size": 2},
    }


def _run(recipe_path):
    result = runner.invoke(app, ["run", str(recipe_path), "--no-progress"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _stages(run_dir) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((run_dir / "summary.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def priced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("priced")
    path = write_recipe(tmp, _recipe(tmp))
    return path, tmp / "run", _run(path)


def test_summary_counts_billed_tokens_and_dollars_per_stage_and_model(priced):
    _, run_dir, _ = priced
    stages = _stages(run_dir)
    gen, pw, pairs = stages["gen"], stages["pw"], stages["pairs"]
    assert gen["models"]["writer"] == {
        "calls": 4, "cache_hits": 0, "tokens": gen["models"]["writer"]["tokens"],
        "input_tokens": 4000, "cached_input_tokens": 0, "cache_write_tokens": 0,
        "output_tokens": 800, "batch_calls": 0, "dollars": pytest.approx(WRITER),
    }  # fmt: skip
    terse = gen["models"]["terse"]  # no price: its tokens are counted, it costs nothing
    assert (terse["calls"], terse["input_tokens"], terse["dollars"]) == (4, 4000, 0.0)
    judge = pw["models"]["judge"]
    assert (judge["calls"], judge["input_tokens"], judge["cached_input_tokens"]) == (8, 2400, 1600)
    assert judge["output_tokens"] == 80 and judge["dollars"] == pytest.approx(JUDGE)
    assert gen["dollars"] == pytest.approx(WRITER) and pw["dollars"] == pytest.approx(JUDGE)
    assert pairs["dollars"] == 0 and pairs["models"] == {}
    # the run directory's record of what it spent (the request cache) agrees
    spend = read_spend(run_dir)
    assert spend.dollars == pytest.approx(TOTAL)
    # and summary.json keeps a copy, with the price table's date
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["spend"]["dollars"] == pytest.approx(TOTAL)
    assert summary["price_table"] == table_date()
    assert spend.models == {"judge": pytest.approx(JUDGE), "writer": pytest.approx(WRITER)}


def test_cli_prints_the_dollars(priced):
    _, _, output = priced
    assert "cost" in output and format_usd(WRITER) in output and format_usd(JUDGE) in output
    assert f"cost: {format_usd(TOTAL)} in this invocation (cache hits cost nothing)" in output
    assert "for this run directory in all" not in output  # the first invocation is all of it


def test_report_and_card_show_calls_tokens_and_dollars(priced, tmp_path):
    from synthpref.hub.push import stage_folder

    _, run_dir, _ = priced
    md = build_report(run_dir).markdown.read_text()
    assert "## Model calls and cost" in md and "cost*" in md
    assert f"| `gen` | `writer` | 4 | 0 | 4000 | 0 | 800 | {format_usd(WRITER)} |" in md
    assert f"| `pw` | `judge` | 8 | 0 | 2400 | 1600 | 80 | {format_usd(JUDGE)} |" in md
    assert f"| total |  | 16 | 0 | 10400 | 1600 | 1680 | {format_usd(TOTAL)} |" in md
    assert f"have cost **{format_usd(TOTAL)}** in all, over every invocation" in md
    assert "Prices: `judge`, `writer` from the recipe's `price:`." in md
    assert "shipped price table" not in md  # no model was priced from it

    folder = tmp_path / "upload"
    stage_folder(run_dir, "org/priced", folder)
    card = (folder / "README.md").read_text()
    assert "### Model calls and cost" in card
    assert f"| `pw` | `judge` | 8 | 0 | 2400 | 1600 | 80 | {format_usd(JUDGE)} |" in card
    assert f"have cost **{format_usd(TOTAL)}** in all" in card and "cost nothing" in card


def test_a_rerun_answered_from_the_cache_costs_nothing_new(priced, tmp_path):
    """Checkpoints gone, every call answered by the request cache: 0 calls and $0 in this
    invocation; the run directory's total is still what the first invocation paid."""
    path, _, _ = priced
    copy = tmp_path / "copy"
    shutil.copytree(path.parent, copy)
    raw = _recipe(copy)
    recipe = write_recipe(copy, raw)
    shutil.rmtree(copy / "run" / "checkpoints")
    output = _run(recipe)
    stages = _stages(copy / "run")
    assert stages["gen"]["models"]["writer"]["cache_hits"] == 4
    assert stages["pw"]["models"]["judge"]["cache_hits"] == 8
    for s in stages.values():
        assert s["calls"] == 0 and s["dollars"] == 0
        assert all(m["dollars"] == 0 and m["input_tokens"] == 0 for m in s["models"].values())
    assert (
        f"cost: $0 in this invocation (cache hits cost nothing); {format_usd(TOTAL)} for this "
        "run directory in all" in output
    )
    md = build_report(copy / "run").markdown.read_text()
    assert "| `pw` | `judge` | 0 | 8 | 0 | 0 | 0 | $0 |" in md
    assert f"have cost **{format_usd(TOTAL)}** in all" in md
    # a plain resume (every shard checkpointed) says the same
    output = _run(recipe)
    assert f"{format_usd(TOTAL)} for this run directory in all" in output


def test_older_summaries_read_back_without_costs(priced, tmp_path):
    _, run_dir, _ = priced
    copy = tmp_path / "old"
    shutil.copytree(run_dir, copy)
    data = json.loads((copy / "summary.json").read_text())
    for s in data["stages"]:
        del s["dollars"], s["models"]
    del data["spend"], data["price_table"]
    (copy / "summary.json").write_text(json.dumps(data))
    (copy / "cache.sqlite").unlink()
    summary = load(copy / "summary.json", RunSummary)
    assert summary.spend is None and all(s.dollars == 0 and s.models == {} for s in summary.stages)
    merged = StageSummary("gen", "generate")
    merged.add_calls(summary.stages[0].model_dump())
    merged.add_calls({"calls": 1, "cache_hits": 2, "tokens": 3})  # an old executor's stats
    assert (merged.calls, merged.dollars, merged.models) == (8 + 1, 0.0, {})
    md = build_report(copy).markdown.read_text()
    assert "Model calls and cost" not in md and "cost*" not in md


def test_stage_summary_sums_models_over_workers():
    """The Ray executor adds one set of stats per actor."""
    s = StageSummary("gen", "generate")
    one = {"calls": 2, "cache_hits": 1, "tokens": 10, "dollars": 0.5,
           "models": {"m": {"calls": 2, "cache_hits": 1, "tokens": 10, "input_tokens": 7,
                            "cached_input_tokens": 3, "cache_write_tokens": 0,
                            "output_tokens": 10, "batch_calls": 2, "dollars": 0.5}}}  # fmt: skip
    s.add_calls(one)
    s.add_calls(one)
    assert s.dollars == 1.0 and s.models["m"]["input_tokens"] == 14
    assert s.models["m"]["batch_calls"] == 4 and s.models["m"]["dollars"] == 1.0
    record = StageRecord.model_validate({**s.__dict__, "counters": {}})
    assert record.models["m"].cached_input_tokens == 6


def test_a_hosted_model_priced_by_the_shipped_table_names_its_date(tmp_path):
    from synthpref.backends.pricing import table_date
    from synthpref.report.collect import StageStats, _cost
    from synthpref.report.markdown import _cost_section

    recipe = {"models": {"gpt": {"backend": "openai", "model": "gpt-4o"},
                         "local": {"backend": "openai", "model": "x", "base_url": "http://h/v1"}}}  # fmt: skip
    stage = StageStats(name="judge", type="rubric_judge")
    stage.add_calls({"calls": 1, "dollars": 0.25, "models": {"gpt": {"calls": 1, "dollars": 0.25},
                                                             "local": {"calls": 1}}})  # fmt: skip
    summary = RunSummary(stages=[], price_table="2024-01")
    cost = _cost(tmp_path, summary, recipe, [stage])
    assert cost.price_sources == {"gpt": "table"} and cost.price_table == "2024-01"
    assert cost.spend is None  # no cache here, and the summary recorded none
    assert _cost(tmp_path, RunSummary(), recipe, [stage]).price_table == table_date()

    class Stats:
        stages, model_calls = [stage], True

    Stats.cost = cost
    text = "\n".join(_cost_section(Stats, "##"))
    assert "`gpt` from synthpref's shipped price table as of 2024-01" in text
    assert "This run directory" not in text


def test_progress_shows_dollars_and_notes():
    progress = StageProgress(Console(file=io.StringIO(), width=200), enabled=True)
    progress.add("gen", total=4)
    task = progress.progress.tasks[0]
    assert _Rates().render(task).plain == ""  # not started, nothing spent
    progress.cost("gen", 0.01)
    progress.cost("gen", 0.0023)
    progress.tokens("gen", 5)
    progress.tokens("gen", 7)
    assert _Rates().render(task).plain == "$0.0123"
    assert task.fields["tokens"] == 12
    progress.note("gen", "2 batch jobs waiting")
    assert task.fields["note"] == "2 batch jobs waiting"


def test_format_usd():
    assert [format_usd(d) for d in (0, 0.00001, 0.01234, 0.5, 12.345, 1234.5)] == [
        "$0", "<$0.0001", "$0.0123", "$0.5000", "$12.35", "$1,234.50"
    ]  # fmt: skip
