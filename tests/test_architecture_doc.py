"""docs/architecture.md names every built-in stage type and every module under synthpref/.

A module counts as named by its dotted path (``synthpref.judges.logprob``) or its file path, in full
(``synthpref/judges/logprob.py``) or, below a subpackage, relative to ``synthpref/``
(``judges/logprob.py``); a package by its folder (``synthpref/judges/``) or its ``__init__.py``. A
stage type counts as named when it appears in backticks (`` `dedup` ``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from synthpref.stages.registry import builtin_stages

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "synthpref"
DOC = (REPO / "docs" / "architecture.md").read_text()


def _module_patterns(path: Path) -> list[str]:
    rel = path.relative_to(PACKAGE)
    parts = rel.with_suffix("").parts
    if rel.name == "__init__.py":
        if len(parts) == 1:  # the root package: synthpref/__init__.py
            return [r"synthpref/__init__\.py"]
        folder = "/".join(parts[:-1])
        return [
            rf"(?<![\w./])synthpref/{re.escape(folder)}/(?![\w.])",
            rf"(?<![\w./])(?:synthpref/)?{re.escape(folder)}/__init__\.py",
        ]
    dotted = ".".join(("synthpref", *parts))
    patterns = [
        rf"(?<![\w.])synthpref/{re.escape(rel.as_posix())}",
        rf"{re.escape(dotted)}(?![\w])",
    ]
    if len(parts) > 1:  # judges/logprob.py; a bare cache.py would be ambiguous
        patterns.append(rf"(?<![\w./]){re.escape(rel.as_posix())}")
    return patterns


MODULES = sorted(
    p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts and ".venv" not in p.parts
)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_module_is_named(path):
    patterns = _module_patterns(path)
    assert any(re.search(p, DOC) for p in patterns), (
        f"docs/architecture.md does not name {path.relative_to(REPO).as_posix()}: add it to the "
        "table of concepts and their files"
    )


@pytest.mark.parametrize("name", sorted(builtin_stages()))
def test_every_builtin_stage_type_is_named(name):
    assert f"`{name}`" in DOC, f"docs/architecture.md does not name the stage type `{name}`"


def test_the_check_sees_modules_and_stages():
    assert len(MODULES) > 50 and {"generate", "pairs", "route", "jury"} <= set(builtin_stages())


def test_tests_mirror_the_package_layout():
    """A test folder is named after the synthpref subpackage its tests cover (tests/judges/ tests
    synthpref/judges/...); tests of top-level modules stay in tests/."""
    tests = REPO / "tests"
    folders = [d.name for d in tests.iterdir() if (d / "__init__.py").exists()]
    assert folders, "no test folders"
    for name in folders:
        assert (PACKAGE / name / "__init__.py").exists(), f"tests/{name}/ has no synthpref/{name}/"
