"""One registry type for stages, backends and output formats: built-ins loaded lazily, plugins from
entry points (listed by the CLI, usable from a recipe, reported by package when they fail to load)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import synthpref
from synthpref.backends.specs import BACKENDS, ModelSpec, UnknownBackend, spec_class
from synthpref.errors import ConfigError
from synthpref.export import (
    FORMATS,
    ExportError,
    Format,
    UnknownFormat,
    export_all,
    formats,
    get_format,
)
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.registry import Registry, UnknownName
from tests.conftest import tiny_recipe, write_recipe

PLUGIN_MODULE = '''
"""A plugin package for synthpref: a backend that echoes the prompt, and a format of candidates."""

from typing import ClassVar

import pyarrow as pa
from pydantic import Field

from synthpref.backends.base import Backend
from synthpref.backends.specs import ModelSpec
from synthpref.backends.types import Completion, GenerationResult
from synthpref.export import Format


class EchoBackend(Backend):
    def __init__(self, prefix):
        self.prefix = prefix

    @property
    def identity(self):
        return f"echo:{self.prefix}"

    async def generate(self, requests, on_result=None):
        out = []
        for i, request in enumerate(requests):
            text = self.prefix + request.messages[-1].content
            done = Completion(text=text, finish_reason="stop", completion_tokens=len(text.split()))
            result = GenerationResult(completions=[done] * request.params.n, prompt_tokens=1)
            if on_result:
                on_result(i, result)
            out.append(result)
        return out


class EchoSpec(ModelSpec):
    """Answers with the prompt, prefixed (a plugin backend)."""

    backend_name: ClassVar[str] = "echo"
    backend: str = "echo"
    prefix: str = Field("echo: ", description="text put before the echoed prompt")

    def build(self):
        return EchoBackend(self.prefix)

    def capabilities(self):
        return EchoBackend.capabilities


class WrongName(EchoSpec):
    """A spec whose backend_name is not its entry point's name."""

    backend_name: ClassVar[str] = "something_else"


def _candidate_rows(record):
    for c in record.candidates:
        yield {"prompt_id": record.id, "model": c.model, "text": c.text}


CANDIDATES = Format(
    "candidates",
    _candidate_rows,
    pa.schema([("prompt_id", pa.string()), ("model", pa.string()), ("text", pa.string())]),
    "every candidate response, one row each (a plugin format)",
)
'''

ENTRY_POINTS = """
[synthpref.backends]
echo = synthpref_test_plugin:EchoSpec
not_a_spec = synthpref_test_plugin:CANDIDATES
wrong_name = synthpref_test_plugin:WrongName

[synthpref.formats]
candidates = synthpref_test_plugin:CANDIDATES
missing_dep = synthpref_test_plugin_missing_xyz:FORMAT
preference = synthpref_test_plugin:CANDIDATES

[synthpref.stages]
broken_stage = synthpref_test_plugin:NoSuchStage
"""

PACKAGE = "package synthpref-test-plugin 0.1"


def install_plugin(site: Path) -> Path:
    """A plugin 'installed' by hand: a module and its dist-info (METADATA + entry_points.txt)."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "synthpref_test_plugin.py").write_text(PLUGIN_MODULE)
    info = site / "synthpref_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: synthpref-test-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS).lstrip())
    return site


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    site = install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    sys.modules.pop("synthpref_test_plugin", None)


def cli_json(*args: str) -> dict:
    from synthpref.cli import app

    result = CliRunner().invoke(app, [*args, "--json"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# the generic registry ------------------------------------------------------------------------------


class Thing:
    def __init__(self, name: str, origin: str = "things:one") -> None:
        self.name = name
        self.origin = origin


def _things(**kw) -> Registry[Thing]:
    def validate(obj, where, name):
        if not isinstance(obj, Thing):
            raise UnknownName(f"{where} is not a Thing")
        return obj

    return Registry("thing", ("synthpref.test_things",), validate=validate,
                    name_of=lambda t: t.name, origin_of=lambda t: t.origin, **kw)  # fmt: skip


def test_unknown_names_get_a_typed_error_with_did_you_mean_and_every_known_name():
    things = _things()
    things.register(Thing("apple"))
    things.register(Thing("banana"))
    with pytest.raises(UnknownName) as info:
        things.get("aple")
    assert str(info.value).startswith("unknown thing 'aple'; did you mean 'apple'? known: apple, ")
    assert "'synthpref.test_things' entry-point group" in str(info.value)
    assert (info.value.kind, info.value.name, info.value.known) == ("thing", "aple", ["apple", "banana"])  # fmt: skip
    assert isinstance(info.value, ConfigError)  # the CLI prints it without a traceback, exit 2
    assert things.find("aple") is None


def test_register_refuses_a_second_object_under_a_taken_name():
    things = _things()
    apple = things.register(Thing("apple"))
    assert things.register(apple) is apple  # the same object again is fine
    again = things.register(Thing("apple"))  # the same definition again (a module re-imported)
    assert things.get("apple") is again
    with pytest.raises(ValueError, match="two things claim the name 'apple': things:one and x:Y"):
        things.register(Thing("apple", origin="x:Y"))


def test_builtin_table_is_imported_only_on_lookup(tmp_path, monkeypatch):
    (tmp_path / "lazy_things_xyz.py").write_text(
        "from tests.test_registry import Thing\nPEAR = Thing('pear')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    things = _things(builtins={"pear": "lazy_things_xyz:PEAR", "plum": "lazy_things_xyz:NOPE"})
    assert things.names() == ["pear", "plum"]
    assert "lazy_things_xyz" not in sys.modules
    try:
        assert things.get("pear").name == "pear"
        with pytest.raises(UnknownName, match=r"built-in thing 'plum' .* failed to load"):
            things.get("plum")
        listed = {e.name: e for e in things.items()}
        assert listed["pear"].obj is things.get("pear") and listed["pear"].error is None
        assert listed["plum"].obj is None and "AttributeError" in listed["plum"].error
    finally:
        sys.modules.pop("lazy_things_xyz", None)


# backends ------------------------------------------------------------------------------------------


def test_resolving_one_backend_imports_no_other_backend_module():
    code = (
        "import sys\n"
        "from synthpref.backends.specs import spec_class\n"
        "spec_class('embedded')\n"
        "print(sorted(m for m in ('synthpref.backends.vllm_backend', "
        "'synthpref.backends.openai_backend', 'torch', 'vllm') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_listing_backends_and_formats_imports_neither_torch_nor_vllm():
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from synthpref.cli import app\n"
        "for command in ('backends', 'formats'):\n"
        "    result = CliRunner().invoke(app, [command, '--json'])\n"
        "    assert result.exit_code == 0, result.output\n"
        "    assert 'vllm' in json.loads(result.output) or command == 'formats'\n"
        "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_builtin_backend_is_listed_with_its_settings_described():
    catalogue = cli_json("backends")
    assert {"embedded", "transformers", "vllm", "openai", "anthropic"} <= set(catalogue)
    for name in ("embedded", "transformers", "vllm", "openai", "anthropic"):
        info = catalogue[name]
        assert info["doc"] and info["source"] == "built-in" and info["error"] is None
        assert "backend" not in info["params"]
        missing = {p for p, d in info["params"].items() if not d["help"].strip()}
        assert not missing, (name, missing)
    assert catalogue["transformers"]["params"]["dtype"]["type"].startswith("Literal[")


def test_unknown_backend_names_the_yaml_path_and_a_close_name(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["models"]["a"] = {"backend": "vlm", "model": "x"}
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe)
    (problem,) = [p for p in info.value.problems if p.startswith("models.a.backend")]
    assert problem.startswith("models.a.backend: unknown backend 'vlm'; did you mean 'vllm'?")
    with pytest.raises(UnknownBackend) as error:
        spec_class("vlm")
    assert isinstance(error.value, ValueError) and "embedded" in error.value.known


# formats -------------------------------------------------------------------------------------------


def test_builtin_formats_are_format_objects_listed_with_their_columns():
    catalogue = cli_json("formats")
    assert {"preference", "kto", "reward", "listwise", "pointwise"} <= set(catalogue)
    preference = get_format("preference")
    assert isinstance(preference, Format) and preference.name == "preference"
    info = catalogue["preference"]
    assert info["doc"] == preference.description and info["source"] == "built-in"
    assert list(info["columns"]) == preference.schema.names
    assert info["columns"]["margin"] == "double"
    for name, info in catalogue.items():
        assert info["doc"].strip() and info["columns"], name
    # the older view still answers (rows, schema), as hub push and the run directory read it
    rows, schema = formats()["kto"]
    assert (
        rows is get_format("kto").rows
        and schema == get_format("kto").schema
        and "nope" not in formats()
    )


def test_format_objects_check_what_they_are_given():
    schema = pa.schema([("x", pa.string())])
    with pytest.raises(ValueError, match=r"taken by data/records\.parquet"):
        Format("records", lambda r: [], schema, "d")
    with pytest.raises(ValueError, match="letters, digits"):
        Format("../x", lambda r: [], schema, "d")
    with pytest.raises(ValueError, match="one line"):
        Format("x", lambda r: [], schema, "two\nlines")
    with pytest.raises(TypeError, match=r"pyarrow\.Schema"):
        Format("x", lambda r: [], {"x": "string"}, "d")


def test_export_refuses_unknown_formats_with_a_typed_error(tmp_path):
    with pytest.raises(
        UnknownFormat, match="unknown format 'prefrence'; did you mean 'preference'"
    ):
        export_all(["prefrence"], [], tmp_path / "data")
    with pytest.raises(ExportError):  # what callers caught before
        export_all(["preference", "nope", "nada"], [], tmp_path / "data")
    assert not (tmp_path / "data").exists()


# plugins -------------------------------------------------------------------------------------------


def test_plugins_are_listed_by_the_cli_with_built_ins(plugin):
    backends = cli_json("backends")
    assert backends["echo"]["source"] == PACKAGE and backends["echo"]["error"] is None
    assert backends["echo"]["doc"] == "Answers with the prompt, prefixed (a plugin backend)."
    assert backends["echo"]["params"]["prefix"]["help"] == "text put before the echoed prompt"
    assert backends["embedded"]["source"] == "built-in"

    fmts = cli_json("formats")
    assert fmts["candidates"] == {
        "doc": "every candidate response, one row each (a plugin format)",
        "columns": {"prompt_id": "string", "model": "string", "text": "string"},
        "source": PACKAGE,
        "error": None,
        "shadowed": [],
    }
    # a plugin may not take a built-in's name: listed as not used, the built-in stays
    assert fmts["preference"]["source"] == "built-in"
    (note,) = fmts["preference"]["shadowed"]
    assert "'preference' = 'synthpref_test_plugin:CANDIDATES'" in note and PACKAGE in note

    stages = cli_json("stages")
    assert {"generate", "rubric_judge", "broken_stage"} <= set(stages)


def test_a_broken_plugin_is_reported_by_name_and_package_not_a_crash(plugin):
    backends = cli_json("backends")
    assert backends["echo"]["error"] is None  # its neighbours still load
    for name, why in [
        ("not_a_spec", "is a Format, not a model spec"),
        ("wrong_name", "WrongName.backend_name is 'something_else', not 'wrong_name'"),
    ]:
        assert backends[name]["source"] == PACKAGE
        assert f"entry point {name!r}" in backends[name]["error"]
        assert why in backends[name]["error"]
        assert backends[name]["params"] == {}

    missing = cli_json("formats")["missing_dep"]
    assert missing["source"] == PACKAGE and missing["columns"] == {}
    assert "failed to load: ModuleNotFoundError" in missing["error"]
    assert "synthpref_test_plugin_missing_xyz" in missing["error"]

    broken = cli_json("stages")["broken_stage"]
    assert broken["source"] == PACKAGE and broken["kind"] is None
    assert "failed to load: AttributeError" in broken["error"]

    from synthpref.cli import app

    text = CliRunner().invoke(app, ["backends"], terminal_width=300)
    assert text.exit_code == 0
    assert f"not_a_spec ({PACKAGE}): entry point 'not_a_spec'" in text.output
    assert "echo: Answers with the prompt" in text.output


def test_a_plugin_backend_and_format_work_from_a_recipe(plugin, tmp_path):
    recipe = tiny_recipe(tmp_path, prompts=[{"id": "p1", "prompt": "Hello there."}])
    recipe["models"] = {
        "a": {"backend": "echo"},
        "b": {"backend": "echo", "prefix": "B says: "},
    }
    recipe["stages"] = [{"type": "generate", "models": ["a", "b"], "n": 1, "max_tokens": 8}]
    recipe["output"]["formats"] = ["candidates"]
    assert synthpref.validate(recipe) == []
    result = synthpref.run(write_recipe(tmp_path, recipe), progress=False)
    table = pq.read_table(result.run_dir / "data" / "candidates.parquet")
    assert table.schema.names == ["prompt_id", "model", "text"]
    rows = sorted(table.to_pylist(), key=lambda r: r["model"])
    assert [r["text"] for r in rows] == ["echo: Hello there.", "B says: Hello there."]
    jsonl = (result.run_dir / "data" / "candidates.jsonl").read_text().splitlines()
    assert len(jsonl) == 2


def test_broken_plugins_named_in_a_recipe_say_why(plugin, tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["models"]["a"] = {"backend": "wrong_name"}
    recipe["models"]["b"] = {"backend": "ech"}
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe)
    problems = " | ".join(info.value.problems)
    assert "models.a.backend: entry point 'wrong_name'" in problems and PACKAGE in problems
    assert "models.b.backend: unknown backend 'ech'; did you mean 'echo'?" in problems

    recipe = tiny_recipe(tmp_path)
    recipe["output"]["formats"] = ["preference", "missing_dep"]
    # reported like every recipe problem, by its YAML path, beside the others
    with pytest.raises(
        RecipeError, match=r"output\.formats: entry point 'missing_dep' .* failed to load"
    ):
        synthpref.validate(recipe)


def test_run_time_registration_still_works_for_backends_and_formats():
    class Temp(ModelSpec):
        """A spec registered at run time."""

        backend_name = "temp_registered_xyz"

    schema = pa.schema([("x", pa.string())])
    fmt = Format("temp_registered_xyz", lambda r: [], schema, "registered at run time")
    try:
        BACKENDS.register(Temp)
        FORMATS.register(fmt)
        assert spec_class("temp_registered_xyz") is Temp
        assert get_format("temp_registered_xyz") is fmt
        listed = {e.name: e for e in FORMATS.items()}["temp_registered_xyz"]
        assert listed.source == "registered by tests.test_registry"
    finally:
        BACKENDS.unregister("temp_registered_xyz")
        FORMATS.unregister("temp_registered_xyz")
