"""Prompt sources: every file type, and malformed rows reported by row number and field."""

from __future__ import annotations

import json

import polars as pl
import pytest

from synthpref.recipes.loader import parse_recipe
from synthpref.sources import SourceError, load_records
from tests.conftest import tiny_recipe


def _recipe(tmp_path, **source):
    recipe = tiny_recipe(tmp_path)
    recipe["source"] = source
    return parse_recipe(recipe, base_dir=tmp_path).recipe


def test_malformed_rows_are_named(tmp_path):
    lines = [
        json.dumps({"id": "ok", "prompt": "fine"}),
        json.dumps({"id": "nofield"}),
        json.dumps({"id": "empty", "prompt": "   "}),
        json.dumps({"id": "num", "prompt": 42}),
        "{not json",
        json.dumps({"id": "ok", "prompt": "duplicate id"}),
        json.dumps({"id": "badmsg", "prompt": [{"role": "robot", "content": "x"}]}),
        json.dumps({"id": "lastasst", "prompt": [{"role": "assistant", "content": "x"}]}),
        json.dumps({"prompt": "no id"}),
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    records, errors = load_records(_recipe(tmp_path, path="p.jsonl", id_field="id"))
    assert [r.id for r in records] == ["ok"]
    found = {(e.row, e.field): e.message for e in errors}
    assert found[(2, "prompt")] == "missing"
    assert found[(3, "prompt")] == "empty prompt"
    assert "got int" in found[(4, "prompt")]
    assert "not valid JSON" in found[(5, "<line>")]
    assert "duplicate of row 1" in found[(6, "id")]
    assert "role" in found[(7, "prompt")] or "message 0" in found[(7, "prompt")]
    assert "last message must be from the user" in found[(8, "prompt")]
    assert found[(9, "id")] == "missing"
    assert str(errors[0]).startswith("row 2, field 'prompt'")


@pytest.mark.parametrize("kind", ["parquet", "csv", "json", "dataset"])
def test_file_types_and_datasets(tmp_path, kind):
    rows = [{"q": "first prompt", "topic": "a"}, {"q": "second prompt", "topic": "b"}]
    frame = pl.DataFrame(rows)
    if kind == "parquet":
        frame.write_parquet(tmp_path / "p.parquet")
        source = {"path": "p.parquet"}
    elif kind == "csv":
        frame.write_csv(tmp_path / "p.csv")
        source = {"path": "p.csv"}
    elif kind == "json":
        (tmp_path / "p.json").write_text(json.dumps(rows))
        source = {"path": "p.json"}
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
        source = {"dataset": "ds"}
    records, errors = load_records(_recipe(tmp_path, prompt_field="q", **source))
    assert not errors
    assert [r.prompt[0].content for r in records] == ["first prompt", "second prompt"]
    assert records[0].metadata == {"topic": "a"}
    assert records[0].id != records[1].id


def test_missing_file_and_limit(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        load_records(_recipe(tmp_path, path="absent.jsonl"))
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5))
    )
    records, _ = load_records(_recipe(tmp_path, path="p.jsonl", limit=3))
    assert len(records) == 3
