"""`synthpref stages` describes every built-in stage and every one of its parameters."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from synthpref.cli import app
from synthpref.stages.registry import builtin_stages


@pytest.fixture(scope="module")
def catalogue() -> dict:
    result = CliRunner().invoke(app, ["stages", "--json"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _cases():
    for name in sorted(builtin_stages()):
        yield pytest.param(name, id=name)


def test_every_builtin_stage_is_listed(catalogue):
    assert set(builtin_stages()) <= set(catalogue)


@pytest.mark.parametrize("name", list(_cases()))
def test_builtin_stage_has_a_description(catalogue, name):
    assert catalogue[name]["doc"].strip(), f"stage {name!r} has no description (class docstring)"


@pytest.mark.parametrize("name", sorted(builtin_stages()))
def test_every_parameter_of_a_builtin_stage_has_a_description(catalogue, name):
    missing = [p for p, info in catalogue[name]["params"].items() if not info["help"].strip()]
    assert not missing, f"stage {name!r}: parameters without description=: {missing}"
