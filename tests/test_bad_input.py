"""Bad input, one row per malformed thing a user can hand the CLI.

Every row must end with a non-zero exit, a message naming where the problem is (file, YAML path, row,
field), no traceback, and nothing created or deleted outside the run directory. Every row fails before
a model could load: ``build_clients`` is replaced by a tripwire, so a row that gets that far fails
loudly instead of running a model.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

import synthpref
from synthpref.cli import app
from tests.curation_fixtures import FAKE, PROMPTS, run_recipe

RUN = "run"  # the run directory of every row, relative to its tmp_path


def _tripwire(*args, **kwargs):
    raise AssertionError("a model would load: the bad input was not caught before the run")


@pytest.fixture(autouse=True)
def _no_models(monkeypatch):
    monkeypatch.setattr("synthpref.executor.local.build_clients", _tripwire)
    monkeypatch.setattr("synthpref.executor.common.build_clients", _tripwire)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real, model-free finished run directory that report rows copy and then damage (module
    scope: built before the tripwire of each test is set)."""
    tmp = tmp_path_factory.mktemp("finished")
    stages = [
        {"type": FAKE + "FakeGenerate", "name": "gen", "n": 2},
        {"type": FAKE + "FakeJudge", "name": "length", "mode": "length"},
        {"type": "pairs", "judge": "length"},
    ]
    run_dir, _ = run_recipe(tmp, PROMPTS, stages, ["preference"])
    return run_dir


# inputs -----------------------------------------------------------------------------------------


def recipe(tmp: Path, filename: str = "recipe.yaml", **overrides) -> Path:
    """A valid recipe (embedded generator and judge) with top-level keys replaced by ``overrides``."""
    (tmp / "prompts.jsonl").write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    raw = {
        "name": "bad-input",
        "source": {"path": "prompts.jsonl"},
        "models": {"gen": {"backend": "embedded"}, "judge": {"backend": "embedded"}},
        "stages": [
            {"type": "generate", "models": ["gen"], "n": 2, "max_tokens": 8},
            {"type": "rubric_judge", "name": "rating", "model": "judge", "max_tokens": 6},
            {"type": "pairs", "judge": "rating"},
        ],
        "output": {"dir": RUN},
    }
    raw.update(overrides)
    path = tmp / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_with_source(filename: str, content: bytes, **source) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        (tmp / filename).write_bytes(content)
        return ["run", str(recipe(tmp, source={"path": filename, **source})), "--no-progress"]

    return build


def run_with_dataset(dataset: str, make: Callable[[Path], None] = lambda tmp: None):
    def build(tmp: Path) -> list[str]:
        make(tmp)
        return ["run", str(recipe(tmp, source={"dataset": dataset})), "--no-progress"]

    return build


def recipe_text(text: str | bytes, command: str = "validate") -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        (tmp / "prompts.jsonl").write_text(json.dumps({"prompt": "Say hi."}) + "\n")
        (tmp / "recipe.yaml").write_bytes(text.encode() if isinstance(text, str) else text)
        return [command, str(tmp / "recipe.yaml")]

    return build


def recipe_with(command: str = "validate", **overrides) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        return [command, str(recipe(tmp, **overrides))]

    return build


def stage_with(index: int, **params) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        path = recipe(tmp)
        raw = yaml.safe_load(path.read_text())
        raw["stages"][index].update(params)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return ["validate", str(path)]

    return build


def eval_data(filename: str, content: bytes | None) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        if content is not None:
            (tmp / filename).write_bytes(content)
        path = recipe(tmp)
        return ["eval-judges", str(path), "--data", filename, "-o", RUN, "--no-progress"]

    return build


def damaged_run(damage: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def build(tmp: Path, finished: Path) -> list[str]:
        shutil.copytree(finished, tmp / RUN)
        damage(tmp / RUN)
        return ["report", str(tmp / RUN)]

    return build


def write(relative: str, content: bytes) -> Callable[[Path], None]:
    def damage(run_dir: Path) -> None:
        (run_dir / relative).write_bytes(content)

    return damage


def first_checkpoint(run_dir: Path) -> None:
    shard = sorted((run_dir / "checkpoints").glob("*/shard-*.parquet"))[0]
    shard.write_bytes(b"not parquet")


PAIRS_JSONL = (
    json.dumps({"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}) + "\n"
).encode()


def api_key_env(tmp: Path) -> list[str]:
    models = {
        "gen": {"backend": "embedded"},
        "judge": {"backend": "openai", "model": "gpt-4o-mini", "api_key_env": "SYNTHPREF_TEST_KEY"},
    }
    return ["run", str(recipe(tmp, models=models)), "--no-progress"]


def bracket_folder(tmp: Path) -> list[str]:
    path = tmp / "[draft]" / "recipe.yaml"
    path.parent.mkdir()
    path.write_text("source: {path: prompts.jsonl}\nstages: [{type: generate}]\n")
    return ["validate", str(path)]


def output_is_file(tmp: Path) -> list[str]:
    (tmp / "taken.txt").write_text("not a directory")
    return ["run", str(recipe(tmp)), "--no-progress", "-o", "taken.txt"]


def output_under_file(tmp: Path) -> list[str]:
    (tmp / "taken.txt").write_text("not a directory")
    return ["run", str(recipe(tmp)), "--no-progress", "-o", "taken.txt/run"]


def output_unwritable(tmp: Path) -> list[str]:
    (tmp / "locked").mkdir()
    return ["run", str(recipe(tmp)), "--no-progress", "-o", "locked/run"]


def locked_folder(monkeypatch) -> None:
    """Tests run as root, where permissions do not stop writes: the folder reports itself locked."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path).name == "locked" and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def hub_unreachable(monkeypatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'someone/prompts' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)


@dataclass
class Case:
    id: str
    build: Callable[..., list[str]]
    expect: tuple[str, ...]
    env: dict[str, str | None] = field(default_factory=dict)
    patch: Callable | None = None
    needs_run: bool = False  # build takes the finished run directory too


CASES = [
    # recipes ------------------------------------------------------------------------------------
    Case("recipe-in-bracket-folder", bracket_folder, ("[draft]", "output")),
    Case(
        "recipe-markup-close-tag",
        recipe_with(stages=[{"type": "[/x]"}]),
        ("stages[0].type", "[/x]"),
    ),
    Case(
        "recipe-not-utf8",
        recipe_text("name: caf\xe9\n".encode("latin-1")),
        ("recipe.yaml", "UTF-8"),
    ),
    Case(
        "recipe-format-needs-ranking",
        recipe_with("run", output={"dir": RUN, "formats": ["listwise"]}),
        ("output.formats", "listwise"),
    ),
    Case(
        "recipe-openai-key-unset",
        api_key_env,
        ("models.judge.api_key_env", "SYNTHPREF_TEST_KEY"),
        env={"SYNTHPREF_TEST_KEY": None},
    ),
    Case(
        "recipe-duplicate-key",
        recipe_text(
            "source: {path: prompts.jsonl}\nstages: [{type: generate}]\n"
            "output: {dir: run}\noutput: {dir: other}\n"
        ),
        ("output", "duplicate"),
    ),
    Case("recipe-stage-name-escapes", stage_with(1, name="../../x"), ("stages[1]", "../../x")),
    Case(
        "recipe-output-dir-root",
        recipe_with("run", output={"dir": "/"}, source={"path": "absent.jsonl"}),
        ("output.dir",),
    ),
    Case(
        "recipe-embedded-other-model",
        recipe_with(
            models={
                "gen": {"backend": "embedded", "model": "Llama-3.1-70B"},
                "judge": {"backend": "embedded"},
            }
        ),
        ("models.gen.model", "Llama-3.1-70B"),
    ),
    Case("recipe-no-generator-models", stage_with(0, models=[]), ("stages[0]", "models")),
    Case(
        "recipe-temperature-inf",
        stage_with(0, temperature=float("inf")),
        ("stages[0]", "temperature"),
    ),
    Case("recipe-n-huge", stage_with(0, n=1e24), ("stages[0]", "n")),
    Case(
        "recipe-backend-list",
        recipe_with(
            models={"gen": {"backend": ["embedded", "openai"]}, "judge": {"backend": "embedded"}}
        ),
        ("models.gen.backend",),
    ),
    Case(
        "recipe-template-code",
        recipe_with(
            models={"strong": {"backend": "embedded"}, "weak": {"backend": "embedded"}},
            stages=[
                {"type": "generate", "models": ["strong"], "n": 2, "max_tokens": 8},
                {
                    "type": "density_ratio",
                    "strong": "strong",
                    "weak": "weak",
                    "customisations": {
                        "default": {
                            "criteria": "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}"
                        }
                    },
                },
            ],
            output={"dir": RUN, "formats": ["pointwise"]},
        ),
        ("stages[1]", "criteria"),
    ),
    # source files -------------------------------------------------------------------------------
    Case(
        "source-jsonl-not-utf8",
        run_with_source("p.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1")),
        ("p.jsonl", "row 1", "UTF-8", "errors.jsonl"),
    ),
    Case(
        "source-json-malformed",
        run_with_source("p.json", b'[{"prompt": "hi",}]'),
        ("p.json", "line 1"),
    ),
    Case(
        "source-json-not-utf8",
        run_with_source("p.json", b'[{"prompt": "caf\xe9"}]'),
        ("p.json", "UTF-8"),
    ),
    Case("source-csv-empty", run_with_source("p.csv", b""), ("p.csv", "empty")),
    Case(
        "source-csv-wrong-header",
        run_with_source("p.csv", b"question,topic\nSay hi.,greeting\n"),
        ("p.csv", "'prompt'", "question, topic", "source.prompt_field"),
    ),
    Case(
        "source-csv-not-utf8",
        run_with_source("p.csv", b"prompt\ncaf\xe9\n"),
        ("p.csv", "UTF-8", "line 2"),
    ),
    Case(
        "source-parquet-corrupt",
        run_with_source("p.parquet", b"PAR1 garbage"),
        ("p.parquet", "Parquet"),
    ),
    Case(
        "source-every-row-rejected",
        run_with_source("p.jsonl", b'{"question": "a"}\n{"question": "b"}\n{"question": "c"}\n'),
        ("p.jsonl", "3 row", "'prompt'", "question", "errors.jsonl"),
    ),
    Case(
        "source-id-column-absent",
        run_with_source("p.csv", b"prompt\nSay hi.\n", id_field="uid"),
        ("p.csv", "'uid'", "source.id_field"),
    ),
    Case(
        "source-local-path-typo",
        run_with_dataset("prompts_v2"),
        ("source.dataset", "prompts_v2", "no such file or directory"),
    ),
    Case(
        "source-local-path-typo-in-folder",
        run_with_dataset("data/prompts_v2", lambda tmp: (tmp / "data").mkdir()),
        ("source.dataset", "data/prompts_v2", "no such file or directory"),
    ),
    Case(
        "source-hub-unreachable",
        run_with_dataset("someone/prompts"),
        ("source.dataset", "someone/prompts", "no local file or directory", "Hub"),
        patch=hub_unreachable,
    ),
    # labelled pairs for eval-judges -------------------------------------------------------------
    Case(
        "pairs-not-utf8",
        eval_data("pairs.jsonl", PAIRS_JSONL.replace(b"Hi!", b"H\xe9")),
        ("pairs.jsonl", "row 1", "UTF-8"),
    ),
    Case("pairs-json-malformed", eval_data("pairs.json", b"[{"), ("pairs.json", "line 1")),
    Case("pairs-csv-empty", eval_data("pairs.csv", b""), ("pairs.csv", "empty")),
    Case("pairs-parquet-corrupt", eval_data("pairs.parquet", b"nope"), ("pairs.parquet",)),
    Case(
        "pairs-csv-no-chosen",
        eval_data("pairs.csv", b"prompt,rejected\nSay hi.,Go away.\n"),
        ("pairs.csv", "row 1", "chosen"),
    ),
    Case("pairs-path-typo", eval_data("pairs_v2", None), ("--data", "pairs_v2", "no such file")),
    # run directories for report -----------------------------------------------------------------
    Case("report-no-run-dir", lambda tmp: ["report", str(tmp / RUN)], ("run", "not a directory")),
    Case(
        "report-summary-not-utf8",
        damaged_run(write("summary.json", b'{"name": "caf\xe9"}')),
        ("summary.json", "utf-8"),
        needs_run=True,
    ),
    Case(
        "report-summary-not-object",
        damaged_run(write("summary.json", b"[1, 2]")),
        ("summary.json", "object"),
        needs_run=True,
    ),
    Case(
        "report-run-json-stage-shape",
        damaged_run(write("run.json", b'{"stages": [{"nam": "gen"}]}')),
        ("run.json", "stages", "name"),
        needs_run=True,
    ),
    Case(
        "report-records-corrupt",
        damaged_run(write("data/records.parquet", b"PAR1 not really")),
        ("records.parquet",),
        needs_run=True,
    ),
    Case(
        "report-errors-jsonl-corrupt",
        damaged_run(write("errors.jsonl", b'{"row": 1, "field": "prompt"\n')),
        ("errors.jsonl", "line 1"),
        needs_run=True,
    ),
    Case(
        "report-checkpoint-corrupt",
        damaged_run(first_checkpoint),
        ("shard-00000.parquet",),
        needs_run=True,
    ),
    # paths --------------------------------------------------------------------------------------
    Case("path-recipe-missing", lambda tmp: ["run", str(tmp / "nope.yaml")], ("nope.yaml",)),
    Case("path-recipe-is-dir", lambda tmp: ["validate", str(tmp)], ("cannot read",)),
    Case("path-output-is-file", output_is_file, ("taken.txt", "not a directory")),
    Case("path-output-under-file", output_under_file, ("taken.txt", "not a directory")),
    Case(
        "path-output-unwritable",
        output_unwritable,
        ("--output", "locked", "permission denied"),
        patch=locked_folder,
    ),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` except the run directory, with size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [d for d in dirnames if d != RUN]
        for name in dirnames + filenames:
            path = here / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_fails_cleanly(case: Case, finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, value in case.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    if case.patch is not None:
        case.patch(monkeypatch)
    if case.needs_run:
        args = case.build(tmp_path, finished_run)
    else:
        args = case.build(tmp_path)
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(app, args)
    output = result.output
    assert result.exit_code != 0, output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}"
    )
    assert "Traceback" not in output
    for expected in case.expect:
        assert expected.lower() in output.lower(), f"{expected!r} not in:\n{output}"
    assert _snapshot(tmp_path) == before, "files outside the run directory changed"


# the public API does what the CLI does --------------------------------------------------------


def test_run_checks_format_needs_before_any_model_call(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = recipe(tmp_path, output={"dir": RUN, "formats": ["listwise"]})
    with pytest.raises(synthpref.RecipeError, match=r"output\.formats: format 'listwise' needs"):
        synthpref.run(path, progress=False)
    assert not (tmp_path / RUN / "cache.sqlite").exists()


def test_run_checks_api_key_before_any_model_call(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SYNTHPREF_TEST_KEY", raising=False)
    api_key_env(tmp_path)
    with pytest.raises(synthpref.RecipeError, match=r"models\.judge\.api_key_env"):
        synthpref.run(tmp_path / "recipe.yaml", progress=False)
    assert not (tmp_path / RUN).exists()


def test_run_prints_recipe_warnings(tmp_path, monkeypatch):
    """The self-preference warning the CLI printed reaches API users too (the run then stops on a
    missing source, before any model)."""
    monkeypatch.chdir(tmp_path)
    models = {"gen": {"backend": "embedded"}}
    stages = [
        {"type": "generate", "models": ["gen"], "n": 2, "max_tokens": 8},
        {"type": "rubric_judge", "name": "rating", "model": "gen", "max_tokens": 6},
        {"type": "pairs", "judge": "rating"},
    ]
    path = recipe(tmp_path, models=models, stages=stages, source={"path": "absent.jsonl"})
    assert any("self-preference" in w for w in synthpref.validate(path))
    buffer = io.StringIO()
    with pytest.raises(synthpref.SourceError, match=r"absent\.jsonl"):
        synthpref.run(path, progress=False, console=Console(file=buffer, width=300))
    assert "self-preference" in buffer.getvalue()


def test_validate_warns_about_unset_api_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("SYNTHPREF_TEST_KEY", raising=False)
    models = {
        "gen": {"backend": "embedded"},
        "judge": {"backend": "openai", "model": "gpt-4o-mini", "api_key_env": "SYNTHPREF_TEST_KEY"},
        "remote": {
            "backend": "openai",
            "model": "m",
            "base_url": "https://api.example.com/v1",
            "api_key_env": "SYNTHPREF_TEST_KEY",
        },
        "local": {
            "backend": "openai",
            "model": "m",
            "base_url": "http://127.0.0.1:8000/v1",
            "api_key_env": "SYNTHPREF_TEST_KEY",
        },
    }
    stages = [
        {"type": "generate", "models": ["gen", "remote", "local"], "n": 1, "max_tokens": 8},
        {"type": "rubric_judge", "name": "rating", "model": "judge", "max_tokens": 6},
        {"type": "pairs", "judge": "rating"},
    ]
    path = recipe(tmp_path, models=models, stages=stages)
    warnings = synthpref.validate(path)
    assert any("models.judge.api_key_env" in w and "SYNTHPREF_TEST_KEY" in w for w in warnings)
    assert any("models.remote.api_key_env" in w for w in warnings)
    assert not any("models.local" in w for w in warnings)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "SYNTHPREF_TEST_KEY" in result.output
    monkeypatch.setenv("SYNTHPREF_TEST_KEY", "sk-test")
    assert not any("api_key_env" in w for w in synthpref.validate(path))


# user text is printed literally ---------------------------------------------------------------


def test_summary_and_warnings_print_user_text_literally(tmp_path):
    from synthpref.cli import print_summary
    from synthpref.executor.common import RunResult, StageSummary
    from synthpref.executor.local import LocalExecutor
    from synthpref.executor.progress import StageProgress
    from synthpref.recipes.loader import parse_recipe

    buffer = io.StringIO()
    console = Console(file=buffer, width=300, force_terminal=False)
    stage = StageSummary("[bold]judge[/bold]", "rubric_judge", counters={"[/x]": 1})
    # a run directory longer than the table is wide: printed whole, on one line
    run_dir = tmp_path / ("a-long-folder-name-" * 4) / "[draft]"
    result = RunResult(run_dir, "fp", 1, [], [stage], {"[p]": tmp_path / "x"}, 1.0)
    print_summary(result, console)
    with StageProgress(console, enabled=True) as progress:
        progress.add("[i]gen[/i]", total=1)
        progress.advance("[i]gen[/i]", 1)
    raw = {"source": {"path": "p.jsonl"}, "stages": [{"type": "generate"}], "output": {"dir": "r"}}
    LocalExecutor(parse_recipe(raw, base_dir=tmp_path), console=console)._warn("skipped [/x] row")
    text = buffer.getvalue()
    assert f"synthpref run · {run_dir}\n" in text, text
    for literal in ("[bold]judge[/bold]", "[/x]=1", "[draft]", "[p]", "[i]gen[/i]", "skipped [/x]"):
        assert literal in text, f"{literal!r} not in:\n{text}"
