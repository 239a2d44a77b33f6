"""Statistics of a finished run, read from its run directory (nothing is recomputed by a model).

Per-stage numbers come from the checkpoints' metadata (the counters every shard carries), so they are
complete even when the last invocation resumed most shards; token, call and dollar counts per stage
and model come from ``summary.json`` (they describe the last invocation only). What the run directory
has cost over every invocation comes from its request cache (``cache.sqlite`` records every paid call
with its result), else from the copy ``summary.json`` keeps. Scores, agreement and lengths come from
``data/records.parquet``, read in batches.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from synthpref.errors import DataError
from synthpref.executor import checkpoints as ck
from synthpref.executor.run_meta import (
    RunInfo,
    RunMetaError,
    RunSpend,
    RunSummary,
    StageSummary,
    changed_files,
    json_object,
    load,
    read_spend,
)
from synthpref.metrics import cohen_kappa, pairwise_labels
from synthpref.records import Record, records_from_arrow
from synthpref.stages.pairs import candidate_scores

REQUIRED = ("run.json", "summary.json", "data/records.parquet")
PAIR_FILTERS = {"margin_filter", "consistency_filter", "length_bias_filter", "reliability_filter"}


class ReportError(DataError, ValueError):
    """A folder that is not a finished, intact run: missing or malformed files, changed exports."""


class CheckedRun(NamedTuple):
    """A run directory that passed :func:`check_run_dir`: its ``run.json`` and ``summary.json``.

    Handed on to whatever reads the run next (the report, the upload), so the exported files are
    hashed and the JSON files parsed once per command, not once per reader."""

    run: RunInfo
    summary: RunSummary


def check_run_dir(run_dir: Path, *, require_digests: bool = False) -> CheckedRun:
    """The run's ``run.json`` and summary, or ReportError naming what makes the directory not a finished run: a
    missing or malformed file, a ``run.json`` of another run than the one ``summary.json`` and
    ``data/`` describe (a later run started and did not finish), or data changed since it was
    exported. ``require_digests``: also refuse a summary that records no digests (older runs)."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory")
    missing = [name for name in REQUIRED if not (run_dir / name).is_file()]
    if missing:
        raise ReportError(
            f"{run_dir} is not a finished synthpref run: missing {', '.join(missing)} "
            "(run `synthpref run RECIPE` until it completes; rerunning resumes)"
        )
    try:
        summary = load(run_dir / "summary.json", RunSummary)
        run = load(run_dir / "run.json", RunInfo)
    except RunMetaError as exc:
        raise ReportError(str(exc)) from None
    if run.fingerprint != summary.fingerprint:
        current = run.fingerprint[:12] if run.fingerprint else "a run that was still being planned"
        raise ReportError(
            f"{run_dir}: summary.json and data/ were written by run {summary.fingerprint[:12]!r}, "
            f"but run.json names {current!r}: a later run (an edited recipe?) started here and did "
            "not finish. Rerun `synthpref run RECIPE` with the recipe you mean to complete it"
        )
    for name, path in summary.outputs.items():
        local = run_dir / "data" / Path(path).name
        if not local.is_file():
            raise ReportError(
                f"{run_dir} is incomplete: the {name!r} output {local} is missing "
                "(rerun `synthpref run RECIPE` to write it again)"
            )
        try:
            pq.ParquetFile(local)
        except (OSError, pa.ArrowException) as exc:
            raise ReportError(f"{local} is not a readable Parquet file: {exc}") from None
    if summary.files is None:
        if require_digests:
            raise ReportError(
                f"{run_dir / 'summary.json'} records no digests of the exported files (an older "
                "synthpref wrote it), so the data cannot be checked against it; rerun "
                "`synthpref run RECIPE` (it resumes from the checkpoints) to record them"
            )
    else:
        changed = changed_files(run_dir, summary.files)
        if changed:
            raise ReportError(
                f"{run_dir}: {', '.join(changed)}; the data no longer matches summary.json. "
                "Rerun `synthpref run RECIPE` to export it again"
            )
    return CheckedRun(run, summary)


@dataclass
class StageStats(StageSummary):
    """A stage's numbers summed over every checkpoint of the run (``summary.json`` counts only the
    last invocation's shards), with the stage's kind and where the numbers came from."""

    kind: str = ""
    shards: int = 0
    source: str = "checkpoints"

    @property
    def pairs_in(self) -> int | None:
        if self.type in PAIR_FILTERS:
            return self.counters.get("pairs_in", 0)
        return self.counters.get("pairs_in")

    @property
    def pairs_out(self) -> int | None:
        if self.kind == "pairs" or self.type == "pairs":
            if "pairs" not in self.counters and "rankings" in self.counters:
                return None  # a listwise ranking stage builds no pairs
            return self.counters.get("pair_rows", self.counters.get("pairs", 0))
        if "pairs_in" in self.counters or self.type in PAIR_FILTERS:
            return self.counters.get("kept", 0)
        return None


@dataclass
class JudgeStats:
    name: str
    judgments: int = 0
    failed: int = 0
    pairwise: bool = False
    scores: list[float] = field(default_factory=list)  # one per successful judgment
    candidate_scores: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)


@dataclass
class CostStats:
    """What the run's model calls cost: the last invocation's per stage and model are in
    :class:`StageStats` (``dollars``, ``models``); this is the run directory's over every invocation
    and where the prices came from."""

    spend: RunSpend | None = None  # None: neither the cache nor summary.json records it
    spend_source: str = ""  # "cache.sqlite" or "summary.json"
    price_sources: dict[str, str] = field(default_factory=dict)  # model -> "recipe" | "table" | ...
    price_table: str = ""  # the shipped table's date, when a model was priced from it

    @property
    def dollars(self) -> float:
        return self.spend.dollars if self.spend is not None else 0.0


@dataclass
class RunStats:
    run_dir: Path
    name: str
    description: str
    fingerprint: str
    input_rows: int
    input_errors: list[dict]
    stages: list[StageStats]
    records: int = 0
    candidates: int = 0
    judges: dict[str, JudgeStats] = field(default_factory=dict)
    kappas: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    pair_lengths: list[tuple[int, int, float]] = field(
        default_factory=list
    )  # chosen, rejected, margin
    rankings: int = 0
    flags: Counter = field(default_factory=Counter)
    formats: dict[str, dict[str, Any]] = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    seconds: float = 0.0
    cost: CostStats = field(default_factory=CostStats)

    @property
    def model_calls(self) -> bool:
        """Whether any stage called (or asked the cache for) a model in the last invocation."""
        return any(s.models for s in self.stages)

    def dropped_reasons(self) -> list[tuple[str, str, int]]:
        """(stage, reason, count) for every drop or skip, most frequent first."""
        out = []
        for s in self.stages:
            for key, n in s.counters.items():
                if not n:
                    continue
                if key.startswith("dropped:"):
                    out.append((s.name, key.removeprefix("dropped:"), n))
                elif key.startswith("skipped_"):
                    out.append((s.name, key.removeprefix("skipped_"), n))
        return sorted(out, key=lambda t: (-t[2], t[0], t[1]))


def words(text: str) -> int:
    """Word count as the length-bias guard counts it (word tokens, punctuation aside)."""
    from synthpref.filters._common import length

    return length(text, "words")


def collect(run_dir: Path, checked: CheckedRun | None = None) -> RunStats:
    """Everything the report shows; ``checked``: the run as :func:`check_run_dir` already read it."""
    run_dir = Path(run_dir)
    run, summary = checked or check_run_dir(run_dir)
    recipe = run.recipe
    stats = RunStats(
        run_dir=run_dir,
        name=str(recipe.get("name", run_dir.name)),
        description=str(recipe.get("description", "")),
        fingerprint=run.fingerprint or "",
        input_rows=summary.input_rows,
        input_errors=_input_errors(run_dir / "errors.jsonl"),
        stages=_stages(run_dir, run, summary),
        recipe=recipe,
        seconds=summary.seconds,
    )
    records_path = run_dir / "data" / "records.parquet"
    try:
        _scan_records(records_path, stats)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise ReportError(f"{records_path}: cannot read its records: {exc}") from None
    stats.formats = _formats(run_dir, summary)
    stats.cost = _cost(run_dir, summary, recipe, stats.stages)
    return stats


#: backends whose unpriced specs take the shipped table's price (on the provider's own API)
TABLE_BACKENDS = ("openai", "anthropic")


def _cost(run_dir: Path, summary: RunSummary, recipe: dict, stages: list[StageStats]) -> CostStats:
    """The run directory's spending and each paid model's price source. A model whose spec names a
    ``price:`` was priced by the recipe; a hosted OpenAI/Anthropic model without one that cost money
    was priced by synthpref's shipped table (its date as the run recorded it, else this install's)."""
    from synthpref.backends.pricing import table_date

    spend, source = read_spend(run_dir), "cache.sqlite"
    if spend is None and summary.spend is not None:
        spend, source = summary.spend, "summary.json"
    paid = {n for s in stages for n, m in s.models.items() if m.get("dollars")}
    if spend is not None:
        paid |= {n for n, d in spend.models.items() if d}
    specs = recipe.get("models") if isinstance(recipe.get("models"), dict) else {}
    sources: dict[str, str] = {}
    for name in sorted(paid):
        spec = specs.get(name) if isinstance(specs.get(name), dict) else {}
        if spec.get("price") is not None:
            sources[name] = "recipe"
        elif spec.get("backend") in TABLE_BACKENDS and not spec.get("base_url"):
            sources[name] = "table"
        else:
            sources[name] = "backend"
    table = ""
    if "table" in sources.values():
        table = summary.price_table or table_date()
    return CostStats(spend, source if spend is not None else "", sources, table)


def _input_errors(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json_object(line, f"{path} line {n}"))
        except RunMetaError as exc:
            raise ReportError(str(exc)) from None
    return out


def _stages(run_dir: Path, run: RunInfo, summary: RunSummary) -> list[StageStats]:
    from synthpref.stages.registry import UnknownStage, resolve_stage

    by_name = {s.name: s for s in summary.stages}
    out = []
    for i, entry in enumerate(run.stages):
        name, fp = entry.name, entry.fingerprint
        info = by_name.get(name)
        stage = StageStats(name=name, type=info.type if info else "")
        try:
            stage.kind = resolve_stage(stage.type).kind if stage.type else ""
        except UnknownStage:
            stage.kind = ""
        if info is not None:
            stage.add_calls(info.model_dump())
        folder = run_dir / "checkpoints" / ck.stage_dir_name(i, name, fp)
        shards = sorted(folder.glob("shard-*.parquet")) if folder.is_dir() else []
        for path in shards:
            try:
                stage.add(ck.read_info(path), resumed=False)
            except ck.CheckpointError as exc:
                raise ReportError(f"{exc}; rerun `synthpref run RECIPE` to recompute it") from None
        stage.shards = len(shards)
        if not shards:
            stage.source = "summary"
            if (
                info is not None
            ):  # checkpoints deleted: the last invocation's summary is all there is
                stage.add(info.model_dump(), resumed=False)
        out.append(stage)
    return out


def iter_records(path: Path, batch_size: int = 256):
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=batch_size):
        yield from records_from_arrow(pa.Table.from_batches([batch]))


def _scan_records(path: Path, stats: RunStats) -> None:
    labels: dict[tuple[str, str], tuple[list, list]] = {}
    for record in iter_records(path):
        stats.records += 1
        stats.candidates += len(record.candidates)
        _judges(record, stats)
        per_judge = {
            name: candidate_scores(record, name) for name in stats.judges if _judged(record, name)
        }
        ids = [c.id for c in record.candidates]
        for a, b in itertools.combinations(sorted(per_judge), 2):
            la, lb = pairwise_labels(per_judge[a], ids), pairwise_labels(per_judge[b], ids)
            xs, ys = labels.setdefault((a, b), ([], []))
            for key in la.keys() & lb.keys():
                xs.append(la[key])
                ys.append(lb[key])
        for pair in record.pairs:
            stats.pair_lengths.append(
                (
                    words(record.candidate(pair.chosen_id).text),
                    words(record.candidate(pair.rejected_id).text),
                    pair.margin,
                )
            )
        if record.annotations.get("ranking"):
            stats.rankings += 1
        for item in record.annotations.get("flags", []):
            stats.flags[item.get("flag", "?")] += 1
    for pair, (xs, ys) in labels.items():
        if xs:
            agree = sum(x == y for x, y in zip(xs, ys, strict=True))
            stats.kappas[pair] = {
                "kappa": cohen_kappa(xs, ys),
                "agreement": agree / len(xs),
                "n": len(xs),
            }


def _judged(record: Record, judge: str) -> bool:
    return any(j.judge == judge for j in record.judgments)


def _judges(record: Record, stats: RunStats) -> None:
    for j in record.judgments:
        judge = stats.judges.setdefault(j.judge, JudgeStats(j.judge))
        judge.judgments += 1
        judge.pairwise = judge.pairwise or len(j.candidate_ids) == 2
        if j.status == "ok" and j.score is not None:
            judge.scores.append(float(j.score))
        else:
            judge.failed += 1
            judge.errors[_error_kind(j.error)] += 1
    for name in {j.judge for j in record.judgments}:
        stats.judges[name].candidate_scores += list(candidate_scores(record, name).values())


def _error_kind(error: str | None) -> str:
    if not error:
        return "no score"
    return error.split(":")[0].split(";")[0].strip()[:80]


def _formats(run_dir: Path, summary: RunSummary) -> dict[str, dict[str, Any]]:
    out = {}
    for name, path in summary.outputs.items():
        if name == "records":
            continue
        local = run_dir / "data" / Path(path).name
        info: dict[str, Any] = {"rows": pq.ParquetFile(local).metadata.num_rows, "path": local}
        if name == "kto" and info["rows"]:
            from synthpref.export.kto import kto_balance

            labels = pq.read_table(local, columns=["label"]).column("label").to_pylist()
            info["balance"] = kto_balance(sum(labels), len(labels) - sum(labels))
        out[name] = info
    return out
