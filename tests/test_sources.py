"""Prompt sources: every file type, and malformed rows reported by row number and field."""

from __future__ import annotations

import json

import polars as pl
import pytest

from synthpref.recipes.loader import parse_recipe
from synthpref.sources import InputError, SourceError, load_records, no_usable_prompt
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
    assert found[(2, "prompt")] == "missing (the row has: id)"
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
    with pytest.raises(SourceError, match=r"did you mean p\.jsonl"):
        (tmp_path / "p.jsonl").write_text("")
        load_records(_recipe(tmp_path, path="p.jsnl"))
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5))
    )
    records, _ = load_records(_recipe(tmp_path, path="p.jsonl", limit=3))
    assert len(records) == 3


def test_jsonl_reads_a_bom_and_reports_lines_that_are_not_utf8(tmp_path):
    """A UTF-8 byte-order mark (Windows editors) is not part of the first row; a line in another
    encoding is that row's error, not a crash of the whole run."""
    good = json.dumps({"prompt": "first"}).encode()
    latin = json.dumps({"prompt": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n" + latin + b"\n")
    records, errors = load_records(_recipe(tmp_path, path="p.jsonl"))
    assert [r.prompt[0].content for r in records] == ["first"]
    assert [(e.row, e.field) for e in errors] == [(2, "<line>")]
    assert "not UTF-8" in errors[0].message and "0xe9" in errors[0].message


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.json", b'[{"prompt": "a",}]', r"p\.json is not valid JSON: .* line 1, column"),
        (
            "p.json",
            b'[{"prompt": "caf\xe9"}]',
            r"p\.json is not UTF-8 text \(byte 0xe9 on line 1\)",
        ),
        ("p.csv", b"", r"p\.csv is empty; a CSV needs a header row"),
        ("p.csv", b"  \n", r"p\.csv is empty"),
        ("p.csv", b"prompt\ncaf\xe9\n", r"p\.csv is not UTF-8 text \(byte 0xe9 on line 2\)"),
        ("p.csv", b'prompt\n"unclosed\n', r"p\.csv is not a readable CSV file"),
        ("p.parquet", b"PAR1 not parquet", r"p\.parquet is not a readable Parquet file"),
    ],
)
def test_unreadable_files_name_the_file_and_place(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SourceError, match=rf"^source\.path: .*{expected}"):
        load_records(_recipe(tmp_path, path=name))


def test_table_header_must_hold_the_prompt_and_id_columns(tmp_path):
    """A wrong CSV header would reject every row one by one; naming the columns shows the fix."""
    (tmp_path / "p.csv").write_text("question,topic\nSay hi.,greeting\n")
    with pytest.raises(SourceError, match=r"source\.prompt_field: .*p\.csv has no column 'prompt'; "
                       r"its columns: question, topic"):  # fmt: skip
        load_records(_recipe(tmp_path, path="p.csv"))
    records, _ = load_records(_recipe(tmp_path, path="p.csv", prompt_field="question"))
    assert len(records) == 1
    pl.DataFrame({"prompt": ["a"]}).write_parquet(tmp_path / "p.parquet")
    with pytest.raises(
        SourceError, match=r"source\.id_field: .*has no column 'uid'; its columns: prompt"
    ):
        load_records(_recipe(tmp_path, path="p.parquet", id_field="uid"))


def test_a_mistyped_local_dataset_path_never_reaches_the_hub(tmp_path, monkeypatch):
    import datasets

    def hub(*args, **kwargs):
        raise AssertionError("a local path was looked up on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts_v1").mkdir()
    with pytest.raises(
        SourceError, match=r"no such file or directory .*prompts_v2 .*; a Hugging Face"
    ):
        load_records(_recipe(tmp_path, dataset="prompts_v2"))
    with pytest.raises(SourceError, match=r"data/prompts_v2 \(did you mean prompts_v1\?\)$"):
        load_records(_recipe(tmp_path, dataset="data/prompts_v2"))


def test_an_unreachable_hub_dataset_names_both_places_tried(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/prompts' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as info:
        load_records(_recipe(tmp_path, dataset="someone/prompts"))
    message = str(info.value)
    assert f"no local file or directory {tmp_path / 'someone' / 'prompts'}" in message
    assert (
        "Hub dataset 'someone/prompts' could not be loaded (offline: HF_HUB_OFFLINE set)" in message
    )
    assert "Couldn't reach" in message


def test_no_usable_prompt_names_file_field_count_and_error_list(tmp_path):
    recipe = _recipe(tmp_path, path="p.jsonl")
    errors = [
        InputError(1, "prompt", "missing (the row has: question)"),
        InputError(2, "prompt", "x"),
    ]
    message = no_usable_prompt(recipe, errors, tmp_path / "run" / "errors.jsonl")
    assert message == (
        f"none of the 2 row(s) of {tmp_path / 'p.jsonl'} holds a usable prompt in field 'prompt' "
        "(source.prompt_field); first: row 1, field 'prompt': missing (the row has: question); all "
        f"listed in {tmp_path / 'run' / 'errors.jsonl'}"
    )
    assert no_usable_prompt(recipe, [], tmp_path / "e") == f"{tmp_path / 'p.jsonl'} holds no rows"
