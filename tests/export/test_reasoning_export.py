"""A reasoning model's reasoning in the exported datasets: left out by default (a candidate's text is
its answer), put back before the answer as ``<think>{reasoning}</think>\\n`` with
``output.include_reasoning``; ``records.parquet`` keeps both apart either way."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthpref.executor import checkpoints as ck
from synthpref.export import export_all, with_reasoning
from synthpref.recipes.loader import parse_recipe
from synthpref.records import RECORD_SCHEMA, Record, records_from_arrow, records_to_arrow
from tests.curation_fixtures import record

FORMATS = ["preference", "kto", "reward", "listwise", "pointwise"]
ANSWER, REASONING = "The answer is 4.", "2 + 2: two pairs make four."


def _records() -> list[Record]:
    out = []
    for i in range(2):
        r = record(
            f"p{i}",
            prompt="What is 2 + 2?",
            texts={"a": ANSWER, "c": "Five."},
            scores={"j": {"a": 5.0, "c": 1.0}},
            pairs=[("a", "c", "j")],
        )
        r.candidates[0].reasoning = REASONING  # the rejected one is not a reasoning model's
        r.annotations["ranking"] = {"judge": "j", "candidate_ids": ["a", "c"], "scores": [5.0, 1.0]}
        out.append(r)
    return out


def _export(tmp_path: Path, records: list[Record], **kwargs) -> dict[str, Path]:
    shard = ck.shard_path(tmp_path / "ck", 0)
    ck.write_shard(shard, records, {})
    return export_all(FORMATS, [shard], tmp_path / "data", **kwargs)


def _rows(paths: dict[str, Path], name: str) -> list[dict]:
    lines = paths[name].with_suffix(".jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _texts(paths: dict[str, Path]) -> dict[str, list[str]]:
    """Every exported answer text, per format."""
    pref = _rows(paths, "preference")
    return {
        "preference": [m["content"] for row in pref for m in row["chosen"] + row["rejected"]],
        "kto": [row["completion"][0]["content"] for row in _rows(paths, "kto")],
        "reward": [
            m["content"] for row in _rows(paths, "reward") for m in row["chosen"] + row["rejected"]
        ],
        "listwise": [c[0]["content"] for row in _rows(paths, "listwise") for c in row["completions"]],
        "pointwise": [row["completion"][0]["content"] for row in _rows(paths, "pointwise")],
    }  # fmt: skip


def test_reasoning_is_left_out_by_default(tmp_path):
    paths = _export(tmp_path, _records())
    for name, texts in _texts(paths).items():
        assert ANSWER in texts, name
        assert not any(REASONING in t or "<think>" in t for t in texts), name
    [row, _] = _rows(paths, "preference")
    assert row["chosen"] == [{"role": "assistant", "content": ANSWER}]
    # records.parquet keeps everything, the two apart
    back = records_from_arrow(pq.read_table(paths["records"]))
    assert (back[0].candidates[0].text, back[0].candidates[0].reasoning) == (ANSWER, REASONING)


def test_include_reasoning_puts_it_before_the_answer_in_every_format(tmp_path):
    paths = _export(tmp_path, _records(), include_reasoning=True)
    shown = f"<think>{REASONING}</think>\n{ANSWER}"
    for name, texts in _texts(paths).items():
        assert shown in texts and ANSWER not in texts, name
        assert "Five." in texts, name  # a candidate without reasoning is exported as it is
    [row, _] = _rows(paths, "preference")
    assert row["chosen"] == [{"role": "assistant", "content": shown}]
    assert row["rejected"] == [{"role": "assistant", "content": "Five."}]
    back = records_from_arrow(pq.read_table(paths["records"]))
    assert back[0].candidates[0].text == ANSWER  # the records themselves are not rewritten


def test_with_reasoning_leaves_the_record_it_is_given_alone():
    r = _records()[0]
    shown = with_reasoning(r)
    assert shown.candidates[0].text.startswith("<think>")
    assert r.candidates[0].text == ANSWER
    plain = _records()[0]
    plain.candidates[0].reasoning = None
    assert with_reasoning(plain) is plain


@pytest.mark.parametrize(("given", "expected"), [({}, False), ({"include_reasoning": True}, True)])
def test_recipe_setting(tmp_path, given, expected):
    raw = {
        "source": {"path": "p.jsonl"},
        "stages": [{"type": "generate"}],
        "output": {"dir": "run", "formats": [], **given},
    }
    assert parse_recipe(raw, base_dir=tmp_path).recipe.output.include_reasoning is expected


def _old_table(records: list[Record]) -> pa.Table:
    """``records`` as a checkpoint written before candidates had a ``reasoning`` column."""
    fields = [f for f in RECORD_SCHEMA]
    k = RECORD_SCHEMA.get_field_index("candidates")
    cand = fields[k].type.value_type
    old_cand = pa.struct([f for f in cand if f.name != "reasoning"])
    fields[k] = pa.field("candidates", pa.list_(old_cand))
    rows = records_to_arrow(records).to_pylist()
    for row in rows:
        for c in row["candidates"]:
            del c["reasoning"]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def test_a_checkpoint_without_the_reasoning_column_still_loads_and_exports(tmp_path):
    records = _records()
    for r in records:
        r.candidates[0].reasoning = None
    old = _old_table(records)
    assert "reasoning" not in str(old.schema)
    shard = ck.shard_path(tmp_path / "ck", 0)
    shard.parent.mkdir(parents=True)
    pq.write_table(old, shard)
    loaded, _ = ck.read_shard(shard)
    assert loaded == records
    paths = export_all(FORMATS, [shard], tmp_path / "data", include_reasoning=True)
    assert pq.read_schema(paths["records"]).equals(RECORD_SCHEMA)
    assert records_from_arrow(pq.read_table(paths["records"])) == records
    [row, _] = _rows(paths, "preference")
    assert row["chosen"][0]["content"] == ANSWER


@pytest.mark.parametrize("include", [False, True])
def test_a_run_exports_reasoning_only_when_the_recipe_asks(tmp_path, include):
    """End to end: a reasoning server's candidates keep their reasoning in records.parquet, and the
    dataset formats carry it only with output.include_reasoning."""
    import json

    import pyarrow.parquet as pq

    import synthpref
    from tests.conftest import tiny_recipe
    from tests.fake_openai_server import FakeServer, reasoning_reply

    with FakeServer(reasoning_reply("Counting on fingers.", "Rating: 4")) as server:
        model = {"backend": "openai", "model": "m", "base_url": server.base_url}
        recipe = tiny_recipe(
            tmp_path,
            models={"a": model, "b": {**model, "system_prompt": "Be brief."}},
            stages=[
                {"type": "generate", "models": ["a", "b"], "n": 1, "max_tokens": 16},
                {"type": "rubric_judge", "name": "rating", "model": "a", "score": "parsed"},
            ],
            output={
                "dir": str(tmp_path / "run"),
                "formats": ["pointwise"],
                "include_reasoning": include,
            },
        )
        result = synthpref.run(recipe)
    records = pq.read_table(result.outputs["records"]).to_pylist()
    cand = records[0]["candidates"][0]
    assert (cand["text"], cand["reasoning"]) == ("Rating: 4", "Counting on fingers.")
    rows = pq.read_table(result.outputs["pointwise"]).to_pylist()
    texts = json.dumps(rows)
    assert ("<think>Counting on fingers.</think>" in texts) is include
    assert "Rating: 4" in texts
