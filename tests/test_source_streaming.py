"""Sources read as streams: ``limit`` stops the read, every reader gives what a whole-file read
gives, duplicate ids are caught across the whole input in a compact index, and the input fingerprint
and shards come from reads that never hold the input."""

from __future__ import annotations

import hashlib
import json
import random
import tracemalloc
import weakref

import polars as pl
import pytest

from synthpref import sources
from synthpref.executor.common import RunError, RunInput
from synthpref.recipes.loader import parse_recipe
from synthpref.records import Candidate, Message, Record
from synthpref.sources import IdIndex, InputError, iter_records, iter_rows, load_records
from tests.conftest import tiny_recipe

BIG = 200_000
LIMIT = 1_500


def _recipe(tmp_path, **source):
    recipe = tiny_recipe(tmp_path)
    recipe["source"] = source
    return parse_recipe(recipe, base_dir=tmp_path).recipe


def _big_jsonl(path, usable: int, total: int = BIG) -> None:
    """``usable`` good rows, then malformed ones (not JSON) up to ``total``: a read that went past
    the good rows would report them."""
    good = "".join(f'{{"id": "r{i}", "prompt": "prompt {i}"}}\n' for i in range(usable))
    path.write_text(good + "{not json\n" * (total - usable))


def test_limit_stops_reading_a_big_jsonl(tmp_path, monkeypatch):
    _big_jsonl(tmp_path / "p.jsonl", usable=LIMIT)
    parsed = []
    loads = json.loads
    monkeypatch.setattr(sources.json, "loads", lambda s: parsed.append(1) or loads(s))
    records, errors = load_records(_recipe(tmp_path, path="p.jsonl", id_field="id", limit=LIMIT))
    assert [r.id for r in records] == [f"r{i}" for i in range(LIMIT)]
    assert errors == []  # none of the malformed rows after the limit was read
    assert len(parsed) == LIMIT


def test_limit_counts_usable_rows_and_reports_the_bad_rows_before_it(tmp_path):
    lines = ['{"prompt": "a"}', "{bad", '{"prompt": ""}', '{"prompt": "b"}', '{"prompt": "c"}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    records, errors = load_records(_recipe(tmp_path, path="p.jsonl", limit=2))
    assert [r.prompt[0].content for r in records] == ["a", "b"]
    assert [(e.row, e.field) for e in errors] == [(2, "<line>"), (3, "prompt")]


def test_limit_stops_reading_a_big_parquet_file_after_the_batches_it_needs(tmp_path, monkeypatch):
    prompts = [f"prompt {i}" if i < LIMIT else None for i in range(BIG)]
    frame = pl.DataFrame({"id": [f"r{i}" for i in range(BIG)], "prompt": prompts})
    frame.write_parquet(tmp_path / "p.parquet", row_group_size=10_000)
    batches = []
    from_arrow = pl.from_arrow
    monkeypatch.setattr(sources.pl, "from_arrow", lambda b: batches.append(len(b)) or from_arrow(b))
    records, errors = load_records(_recipe(tmp_path, path="p.parquet", id_field="id", limit=LIMIT))
    assert len(records) == LIMIT and records[-1].id == f"r{LIMIT - 1}"
    assert errors == []  # the rows with no prompt come after the limit
    assert sum(batches) < LIMIT + sources.BATCH_ROWS


@pytest.mark.parametrize("kind", ["parquet", "csv", "dataset"])
def test_batched_tables_read_as_a_whole_file_read_would(tmp_path, monkeypatch, kind):
    """Rows across many small batches equal the rows of the whole table, read as before streaming
    (polars on the whole file), numbered on across batch boundaries."""
    monkeypatch.setattr(sources, "BATCH_ROWS", 7)
    rng = random.Random(3)
    rows = [
        {
            "q": f"line {i}\nwith, a comma" if i % 5 == 0 else f"q{i}",
            "n": rng.randint(-5, 5),
            "tag": None if i % 4 == 0 else f"t{i % 3}",
        }
        for i in range(60)
    ]
    frame = pl.DataFrame(rows)
    if kind == "parquet":
        frame.write_parquet(tmp_path / "t.parquet", row_group_size=16)
        spec, whole = {"path": "t.parquet"}, pl.read_parquet(tmp_path / "t.parquet")
    elif kind == "csv":
        frame.write_csv(tmp_path / "t.csv")
        spec, whole = {"path": "t.csv"}, pl.read_csv(tmp_path / "t.csv", infer_schema_length=0)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
        spec, whole = {"dataset": "ds"}, datasets.load_from_disk(str(tmp_path / "ds")).to_polars()
    recipe = _recipe(tmp_path, prompt_field="q", **spec)
    assert list(iter_rows(recipe.source, recipe)) == list(enumerate(whole.to_dicts(), start=1))


def test_a_hub_stream_is_read_in_batches_and_its_header_checked(tmp_path, monkeypatch):
    """A Hub dataset is loaded with ``streaming=True``; a stream that does not declare its columns
    has them checked on its first batch."""
    import datasets

    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"t{i}", "k": i}) + "\n" for i in range(20))
    )
    calls = []
    load = datasets.load_dataset

    def fake_hub(name, config=None, *, split, streaming=False):
        calls.append(streaming)
        stream = load(str(tmp_path / "hub"), split=split, streaming=True)
        stream.info.features = None  # as a Hub dataset without declared features
        return stream

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    monkeypatch.setattr(sources, "BATCH_ROWS", 6)
    records, errors = load_records(_recipe(tmp_path, dataset="someone/data", prompt_field="text"))
    assert calls == [True]
    assert [(r.source_row, r.prompt[0].content, r.metadata) for r in records] == [
        (i + 1, f"t{i}", {"k": i}) for i in range(20)
    ]
    assert errors == []
    with pytest.raises(sources.SourceError, match=r"has no column 'prompt'; its columns: text, k"):
        load_records(_recipe(tmp_path, dataset="someone/data"))


def test_duplicate_ids_far_apart_name_both_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BATCH_ROWS", 10)
    ids = [f"r{i}" for i in range(5000)]
    ids[4321] = "r17"
    frame = pl.DataFrame({"id": ids, "prompt": [f"p{i}" for i in range(5000)]})
    frame.write_parquet(tmp_path / "p.parquet", row_group_size=100)
    records, errors = load_records(_recipe(tmp_path, path="p.parquet", id_field="id"))
    assert len(records) == 4999
    assert errors == [InputError(4322, "id", "duplicate of row 18 (id 'r17')")]


def test_id_index_agrees_with_a_dict_of_every_id(tmp_path):
    """Through many growths, first rows equal those of an exact dict; rows past 2**32 survive."""
    rng = random.Random(7)
    index, exact = IdIndex(), {}
    for row in range(1, 60_001):
        record_id = f"id-{rng.randrange(40_000)}"
        expected = exact.setdefault(record_id, row)
        assert index.first_row(record_id, row) == (None if expected == row else expected)
    assert len(index) == len(exact)
    huge = 2**33 + 5
    assert index.first_row("late", huge) is None
    assert index.first_row("late", huge + 1) == huge
    assert index.first_row("id-0", huge + 2) == exact.get("id-0")


def test_id_index_costs_a_few_tens_of_bytes_per_id():
    ids = [f"row-{i:08d}" for i in range(50_000)]  # built before measuring
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = IdIndex()
        for row, record_id in enumerate(ids, start=1):
            index.first_row(record_id, row)
        per_id = (tracemalloc.get_traced_memory()[0] - before) / len(ids)
    finally:
        tracemalloc.stop()
    assert per_id <= 32, f"{per_id:.1f} bytes per id"


def _old_input_fingerprint(records: list[Record], shard_size: int) -> str:
    """The fingerprint as computed before streaming, over a list (copied here on purpose)."""
    h = hashlib.sha256(str(shard_size).encode())
    for r in records:
        fields = {"id", "prompt", "metadata"} | ({"candidates"} if r.candidates else set())
        h.update(r.model_dump_json(include=fields).encode())
    return h.hexdigest()


def test_streamed_fingerprint_equals_the_list_based_one(tmp_path):
    lines = [
        {"id": "a", "prompt": "first", "topic": "x"},
        {"id": "b", "prompt": [{"role": "user", "content": "second"}], "n": 2},
        "not an object",
        {"id": "c", "prompt": "third"},
        {"id": "a", "prompt": "again"},
        {"id": "d", "prompt": "fourth"},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    recipe = _recipe(tmp_path, path="p.jsonl", id_field="id")
    run_input, errors = RunInput.scan(lambda known: iter_records(recipe, known), 2)
    records = load_records(recipe)[0]
    assert run_input.fingerprint == _old_input_fingerprint(records, 2)
    assert [e.row for e in errors] == [3, 5]
    assert (run_input.n_records, run_input.n_shards) == (4, 2)
    with_candidates = [
        Record(
            id="e",
            prompt=[Message(role="user", content="q")],
            candidates=[Candidate(id="A", model="m", text="yes")],
        ),
        *records,
    ]
    prebuilt, _ = RunInput.scan(lambda known: with_candidates, 3)
    assert prebuilt.fingerprint == _old_input_fingerprint(with_candidates, 3)


def test_shards_are_read_one_at_a_time(tmp_path, monkeypatch):
    """Only the shard the caller holds is alive, never the input: records are counted as the
    source builds them and as they are freed."""
    live, most = [0], [0]

    def freed() -> None:
        live[0] -= 1

    class Counted(Record):
        def __init__(self, **data):
            super().__init__(**data)
            live[0] += 1
            most[0] = max(most[0], live[0])
            weakref.finalize(self, freed)

    monkeypatch.setattr(sources, "Record", Counted)
    _big_jsonl(tmp_path / "p.jsonl", usable=2_000, total=2_000)
    recipe = _recipe(tmp_path, path="p.jsonl", id_field="id")
    run_input, _ = RunInput.scan(lambda known: iter_records(recipe, known), 50)
    assert most[0] <= 2 and run_input.n_shards == 40
    seen = 0
    for shard in run_input.shards():
        assert len(shard) == 50 and shard[0].id == f"r{seen}"
        seen += len(shard)
        del shard
    assert seen == 2_000
    assert most[0] <= 51, f"{most[0]} records alive at once"


def test_rereads_skip_the_known_errors_without_an_id_index(tmp_path, monkeypatch):
    """The planning read keeps the duplicate-id index; the reads after it take its errors instead
    and keep none, and a duplicate that appears in the source after planning stops the read."""
    built = []
    monkeypatch.setattr(sources, "IdIndex", lambda: built.append(1) or IdIndex())
    _big_jsonl(tmp_path / "p.jsonl", usable=300, total=300)
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    lines[250] = lines[10]  # row 251 repeats row 11
    lines[120] = "{bad"
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    recipe = _recipe(tmp_path, path="p.jsonl", id_field="id")
    run_input, errors = RunInput.scan(lambda known: iter_records(recipe, known), 40)
    assert [(e.row, e.field) for e in errors] == [(121, "<line>"), (251, "id")]
    assert built == [1]
    ids = [r.id for shard in run_input.shards() for r in shard]
    assert built == [1]
    assert ids == [f"r{i}" for i in range(300) if i not in (120, 250)]
    lines[280] = lines[20]  # a new duplicate, read as a record by a read without an index
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match=r"input changed since this run was planned: shard 6"):
        list(run_input.shards())
