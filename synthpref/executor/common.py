"""What every executor shares: planning a run, processing one stage of one shard, summaries, export.

An executor only decides *where* and *in what order* shards go through the stages (asyncio workers in
one process, or Ray actors). Everything that makes two executors' runs interchangeable lives here:
the run-dir layout, the fingerprint chain that names checkpoint directories, the resume point of each
shard, the checkpoint written per stage and shard, and the summary and export at the end. A run
started by one executor therefore resumes under the other.

The input is never held whole (:class:`RunInput`). Planning reads the source once, keeping only
counts, malformed rows, the input fingerprint and a 16-byte digest per shard; each stage's pre-pass
that reads records gets a fresh read of its own; the executor reads it once more, a shard at a time,
each shard checked against its digest. A source is therefore read at least twice per run (a Hub
dataset is streamed twice), which costs little next to generating for it.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from synthpref.backends.client import ModelClient
from synthpref.backends.cost import CostMeter
from synthpref.backends.pricing import table_date
from synthpref.console import say
from synthpref.errors import RunPaused, SynthprefError
from synthpref.executor import checkpoints as ck
from synthpref.executor.durable import write_json, write_jsonl
from synthpref.executor.fingerprint import InputHasher, digest, record_blob, stage_fingerprints
from synthpref.executor.progress import StageProgress
from synthpref.executor.run_dir import RunDirError, check_output_dir, clear_for_fresh, contained
from synthpref.executor.run_meta import RUN_LAYOUT, StageSummary, file_digest, read_spend
from synthpref.executor.worker_cache import merge_worker_caches
from synthpref.export import export_all
from synthpref.recipes.loader import LoadedRecipe
from synthpref.records import Record
from synthpref.sources import InputError, iter_records, no_usable_prompt
from synthpref.stages.base import Stage, StageContext, candidate_id_problem


class RunError(SynthprefError, RuntimeError):
    """A run stopped; the message names the stage and shard where known, and the cause."""


@dataclass
class RunResult:
    run_dir: Path
    fingerprint: str
    input_rows: int
    input_errors: list[InputError]
    stages: list[StageSummary]
    outputs: dict[str, Path]
    seconds: float
    files: dict[str, dict] = field(default_factory=dict)  # run-dir-relative path -> digest
    #: what the run directory has spent over every invocation (from its cache), per model
    spend: dict | None = None
    #: the shipped price table's date
    price_table: str | None = None

    def to_dict(self) -> dict:
        return {
            "synthpref_run": RUN_LAYOUT,
            "run_dir": str(self.run_dir),
            "fingerprint": self.fingerprint,
            "input_rows": self.input_rows,
            "input_errors": len(self.input_errors),
            "stages": [{**s.__dict__, "counters": dict(s.counters)} for s in self.stages],
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "seconds": round(self.seconds, 2),
            "files": self.files,
            "spend": self.spend,
            "price_table": self.price_table,
        }


#: starts a read of a run's input (see :class:`RunInput`)
Reader = Callable[[Mapping[int, InputError] | None], Iterable[Record | InputError]]


class RunInput:
    """A run's input as the planning read found it, and fresh reads of it, never all in memory.

    :meth:`scan` reads it once and keeps only what the plan needs: the number of records, the
    malformed rows, the input fingerprint (the same value :func:`input_fingerprint` gives over the
    records, so run directories planned from a list resume) and a digest per shard. ``read(known)``
    starts a new read from the beginning, of the source (:func:`iter_records`) or again over
    records built beforehand; ``known`` is None for the planning read, and the errors it found, by
    row, for every read after it, which then needs no duplicate-id index.
    """

    def __init__(self, read: Reader, shard_size: int) -> None:
        self._read = read
        self.shard_size = shard_size
        self.n_records = 0
        self.fingerprint = ""
        self._digests: list[bytes] = []
        self._known: dict[int, InputError] = {}

    @classmethod
    def scan(cls, read: Reader, shard_size: int) -> tuple[RunInput, list[InputError]]:
        """The planning read: the input's counts, fingerprint and shard digests, and its malformed
        rows (in source order)."""
        found = cls(read, shard_size)
        errors: list[InputError] = []
        hasher = InputHasher(shard_size)
        shard, in_shard = hashlib.sha256(), 0
        for item in read(None):
            if isinstance(item, InputError):
                errors.append(item)
                continue
            found.n_records += 1
            blob = record_blob(item)
            hasher.add(blob)
            shard.update(blob)
            in_shard += 1
            if in_shard == shard_size:
                found._digests.append(shard.digest()[:16])
                shard, in_shard = hashlib.sha256(), 0
        if in_shard:
            found._digests.append(shard.digest()[:16])
        found.fingerprint = hasher.hexdigest()
        found._known = {e.row: e for e in errors}
        return found, errors

    @property
    def n_shards(self) -> int:
        return len(self._digests)

    def shards(self) -> Iterator[list[Record]]:
        """The shards in order, read again, one at a time: a shard's records exist only while the
        caller holds them. Each is checked against the planning read's digest, so a source that
        changed since (a file edited or appended to mid-shard, a Hub dataset updated) stops the run
        with :class:`RunError` instead of mixing two inputs under one fingerprint."""
        items = iter(self._read(self._known))
        records = (item for item in items if not isinstance(item, InputError))
        try:
            for k, expected in enumerate(self._digests):
                shard = list(itertools.islice(records, self.shard_size))
                h = hashlib.sha256()
                for record in shard:
                    h.update(record_blob(record))
                if h.digest()[:16] != expected:
                    raise RunError(self._changed(k, shard))
                yield shard
                del shard  # not held while the next one is read
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def records(self) -> Iterator[Record]:
        """Every record in order, read again, a shard at a time (each checked as in
        :meth:`shards`)."""
        for shard in self.shards():
            yield from shard
            del shard  # not held while the next one is read

    def _changed(self, k: int, shard: list[Record]) -> str:
        rows = f" (input rows {shard[0].source_row}-{shard[-1].source_row})" if shard else ""
        return (
            f"the input changed since this run was planned: shard {k}{rows} no longer holds the "
            "records it held when the run started. Rerun the same command to start over on the "
            "input as it is now, or restore the input to resume this run."
        )


@dataclass
class RunPlan:
    """A prepared run: its input (read a shard at a time), fingerprints and checkpoint directories
    (one per stage)."""

    run_dir: Path
    input: RunInput
    errors: list[InputError]
    run_fp: str
    stage_dirs: list[Path]
    warn: Callable[[str], None] = print

    @property
    def n_records(self) -> int:
        return self.input.n_records

    @property
    def n_shards(self) -> int:
        return self.input.n_shards

    def shards(self) -> Iterator[list[Record]]:
        """A fresh read of the input's shards, in order (see :meth:`RunInput.shards`)."""
        return self.input.shards()

    def path(self, stage: int, shard: int) -> Path:
        return ck.shard_path(self.stage_dirs[stage], shard)

    def start_at(self, shard: int) -> int:
        """The last stage with a readable checkpoint of this shard (-1: none); work resumes after
        it. A damaged checkpoint is set aside with a warning, so the shard is recomputed from the
        checkpoint before it (model calls come from the request cache) instead of stopping the run."""
        for i in reversed(range(len(self.stage_dirs))):
            path = self.path(i, shard)
            if not path.exists():
                continue
            try:
                ck.verify_shard(path)
            except ck.CheckpointError as exc:
                moved = ck.set_aside(path)
                self.warn(f"{exc}; moved it to {moved.name}, recomputing shard {shard} from the "
                          "checkpoint before it")  # fmt: skip
                continue
            return i
        return -1


class Executor:
    """What every executor is given: the loaded recipe, the run directory (default: the recipe's
    ``output.dir``), whether to start ``fresh``, and the console its warnings and (if ``progress``)
    progress bars go to. A subclass decides where and in what order shards go through the stages."""

    def __init__(
        self,
        loaded: LoadedRecipe,
        *,
        run_dir: Path | None = None,
        fresh: bool = False,
        console: Console | None = None,
        progress: bool = True,
    ) -> None:
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.run_dir = Path(run_dir or self.recipe.resolve(self.recipe.output.dir))
        self.fresh = fresh
        self.console = console or Console(stderr=True)
        self.show_progress = progress

    def run(self) -> RunResult:
        raise NotImplementedError

    def _warn(self, message: str) -> None:
        say(self.console, message, style="yellow")

    def _tally(self, plan: RunPlan) -> RunTally:
        return RunTally(self.loaded.stages, plan.n_records, self.console, self.show_progress)


def plan_run(
    loaded: LoadedRecipe,
    run_dir: Path,
    *,
    fresh: bool,
    records: Sequence[Record] | None = None,
    input_errors: list[InputError] | None = None,
    warn: Callable[[str], None] = print,
) -> RunPlan:
    """Check the run dir, read the input through once (:meth:`RunInput.scan`), clear (``fresh``) or
    reopen the run dir, run the stages' run-level pre-pass, and write ``run.json``; merges call
    results left by workers of an interrupted run. Nothing is created or deleted before the run dir
    is known to be safe to use and the whole input has been read. ``records`` (eval-judges) are
    built beforehand and used instead of the recipe's source; they are held by the caller."""
    recipe = loaded.recipe
    size = recipe.settings.shard_size
    try:
        check_output_dir(
            run_dir,
            recipe_dir=recipe.base_dir,
            recipe_file=loaded.path,
            sources=_source_files(loaded),
        )
        if records is not None:
            given = list(records)
            run_input, _ = RunInput.scan(lambda known: given, size)
            errors = list(input_errors or [])
        else:
            run_input, errors = RunInput.scan(lambda known: iter_records(recipe, known), size)
        if fresh:
            clear_for_fresh(run_dir)
    except RunDirError as exc:
        raise RunError(str(exc)) from None
    run_dir.mkdir(parents=True, exist_ok=True)
    # marks the directory as a run before anything else lands in it, and as no longer the run that
    # summary.json and data/ describe until this one finishes
    write_json(run_dir / "run.json", {"synthpref_run": RUN_LAYOUT, "fingerprint": None,
                                      "recipe": loaded.raw}, default=str)  # fmt: skip
    merge_worker_caches(run_dir)
    write_jsonl(
        run_dir / "errors.jsonl",
        ({"row": e.row, "field": e.field, "message": e.message} for e in errors),
    )
    if errors and recipe.settings.on_error == "stop":
        raise RunError(
            f"{len(errors)} malformed input row(s); first: {errors[0]} "
            f"(all listed in {run_dir / 'errors.jsonl'}; set settings.on_error: skip to skip them)"
        )
    if not run_input.n_records:
        raise RunError(no_usable_prompt(recipe, errors, run_dir / "errors.jsonl"))
    for e in errors:
        warn(f"skipped input {e}")

    stages = loaded.stages
    for s in stages:  # run-level pre-pass (e.g. de-duplication across shards), before any shard
        try:
            s.prepare(_prepare_input(s, run_input), recipe)
        except (OSError, ValueError) as exc:
            raise RunError(f"stage {s.name!r} ({s.type_name}): {exc}") from exc
    input_fp = run_input.fingerprint
    fps = stage_fingerprints(input_fp, stages, loaded.models)
    run_fp = digest([input_fp, *fps])
    checkpoints = run_dir / "checkpoints"
    try:
        stage_dirs = [
            contained(checkpoints / ck.stage_dir_name(i, s.name, fp), checkpoints)
            for i, (s, fp) in enumerate(zip(stages, fps, strict=True))
        ]
    except RunDirError as exc:
        raise RunError(str(exc)) from None
    for stage_dir in stage_dirs:
        ck.remove_partial_writes(stage_dir)
    info = {
        "synthpref_run": RUN_LAYOUT,
        "fingerprint": run_fp,
        "input": input_fp,
        "stages": [{"name": s.name, "fingerprint": fp} for s, fp in zip(stages, fps, strict=True)],
        "recipe": loaded.raw,
    }
    write_json(run_dir / "run.json", info, default=str)
    return RunPlan(run_dir, run_input, errors, run_fp, stage_dirs, warn)


def _prepare_input(stage: Stage, run_input: RunInput) -> Iterable[Record]:
    """What a stage's pre-pass is given: a fresh read of the input (nothing is read unless the
    stage iterates it) for a stage that declares ``prepare_streams`` or keeps the default no-op
    ``prepare``; for any other, a list of every record, as custom stages written before streaming
    expect, which holds the whole input in memory while that stage prepares."""
    if stage.prepare_streams or type(stage).prepare is Stage.prepare:
        return run_input.records()
    return list(run_input.records())


def _source_files(loaded: LoadedRecipe) -> list[Path]:
    """The local files or directories the recipe reads prompts from."""
    source = loaded.recipe.source
    paths = [loaded.recipe.resolve(source.path)] if source.path else []
    if source.dataset:
        local = loaded.recipe.resolve(source.dataset)
        if local.exists():
            paths.append(local)
    return paths


def build_clients(
    loaded: LoadedRecipe,
    cache,
    on_tokens: Callable[[str, int], None] | None = None,
    warn: Callable[[str], None] = print,
    meter: CostMeter | None = None,
    on_cost: Callable[[str, float], None] | None = None,
) -> dict[str, dict[str, ModelClient]]:
    """One client per (stage, model) for per-stage token and dollar counts; specs with the same
    backend key share one backend, so each process loads a model's weights once. Gives every stage
    its context. ``meter`` is the run's spending (and cap), shared by every client."""
    backends: dict[str, object] = {}
    clients: dict[str, dict[str, ModelClient]] = {}
    for stage in loaded.stages:
        per: dict[str, ModelClient] = {}
        for name in stage.models_used():
            spec = loaded.models[name]
            key = spec.backend_key()
            if key not in backends:
                backends[key] = spec.build()

            def count(n: int, stage_name: str = stage.name) -> None:
                if on_tokens is not None:
                    on_tokens(stage_name, n)

            def paid(dollars: float, stage_name: str = stage.name) -> None:
                if on_cost is not None:
                    on_cost(stage_name, dollars)

            per[name] = ModelClient(
                name, spec, backends[key], cache, count, meter=meter, on_cost=paid
            )
        clients[stage.name] = per
        stage.ctx = StageContext(per, warn=warn)
    return clients


def client_stats(clients: dict[str, dict[str, ModelClient]]) -> dict[str, dict[str, Any]]:
    """Calls, cache hits, tokens and dollars per stage, summed over its models, and per model
    (``models``: billed tokens by kind, batch calls, dollars) of this invocation."""
    out: dict[str, dict[str, Any]] = {}
    for stage, per in clients.items():
        models = {
            name: {
                "calls": c.calls,
                "cache_hits": c.cache_hits,
                "tokens": c.tokens,
                **asdict(c.spend),
            }
            for name, c in per.items()
        }
        out[stage] = {
            "calls": sum(c.calls for c in per.values()),
            "cache_hits": sum(c.cache_hits for c in per.values()),
            "tokens": sum(c.tokens for c in per.values()),
            "dollars": sum(c.spend.dollars for c in per.values()),
            "models": models,
        }
    return out


async def process_shard(
    stage: Stage, k: int, records: list[Record], path: Path
) -> tuple[list[Record], dict]:
    """Run one stage on one shard and write its checkpoint; returns the output and the checkpoint
    info. Callers must not run the same stage object on two shards at once (it owns ``counters``)."""
    stage.counters = Counter()
    t0 = time.perf_counter()
    try:
        out = await stage.process([r.model_copy(deep=True) for r in records])
    except RunPaused:
        raise  # a clean stop the executor handles: not a failure of this stage
    except Exception as exc:
        raise RunError(
            f"stage {stage.name!r} ({stage.type_name}) failed on shard {k} "
            f"(input rows {records[0].source_row}-{records[-1].source_row}): "
            f"{type(exc).__name__}: {exc}. Finished shards and model calls are saved; "
            "rerun the same command to resume."
        ) from exc
    problem = candidate_id_problem(out)
    if problem:
        raise RunError(f"stage {stage.name!r} ({stage.type_name}) on shard {k}: {problem}")
    info = {
        "records_in": len(records),
        "records_out": len(out),
        "counters": dict(stage.counters),
        "seconds": time.perf_counter() - t0,
    }
    ck.write_shard(path, out, info)
    return out, info


def earlier_info(path: Path) -> dict | None:
    """Counters of a stage a shard resumed *after*, from its checkpoint's footer (no rows read), so a
    resumed run's summary counts every stage as an uninterrupted run's does; None if the file is
    gone or unreadable (its rows are not needed, only its counts are lost)."""
    try:
        return ck.read_info(path)
    except ck.CheckpointError:
        return None


class RunTally:
    """A run's per-stage summaries and progress bars, advanced together: each stage of each shard
    counts once, whether computed now or found in a checkpoint (the local and the Ray executor count
    alike). A context manager: the progress bars show while it is open."""

    def __init__(
        self, stages: list[Stage], records: int, console: Console, show_progress: bool = True
    ) -> None:
        self.summaries = [StageSummary(s.name, s.type_name) for s in stages]
        self.progress = StageProgress(console, show_progress)
        self._records = records

    def __enter__(self) -> RunTally:
        self.progress.__enter__()
        for s in self.summaries:
            self.progress.add(s.name, total=self._records)
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def add(self, stage: int, info: dict, resumed: bool) -> None:
        """Stage ``stage`` of one shard is done: its checkpoint ``info``, computed now or not."""
        summary = self.summaries[stage]
        summary.add(info, resumed=resumed)
        self.progress.advance(summary.name, info["records_in"], note="resumed" if resumed else "")

    def add_earlier(self, stage: int, path: Path) -> None:
        """A stage the shard resumes *after*: its counts from the checkpoint's footer, if readable."""
        info = earlier_info(path)
        if info is not None:
            self.add(stage, info, resumed=True)

    def add_calls(self, stats: dict[str, dict[str, int]]) -> None:
        """Calls, cache hits and tokens per stage, as :func:`client_stats` returns them."""
        for summary in self.summaries:
            summary.add_calls(stats[summary.name])


def read_resume_point(path: Path) -> tuple[list[Record], dict]:
    """The checkpoint a shard resumes from (``RunPlan.start_at`` has checked it already)."""
    try:
        return ck.verify_shard(path)
    except ck.CheckpointError as exc:
        raise RunError(f"{exc}; rerun the same command to recompute it") from None


def finish_run(
    loaded: LoadedRecipe, plan: RunPlan, summaries: list[StageSummary], started: float
) -> RunResult:
    """Export the last stage's checkpoints into ``data/`` and write ``summary.json``."""
    last = len(plan.stage_dirs) - 1
    final_shards = [plan.path(last, k) for k in range(plan.n_shards)]
    outputs = export_all(
        loaded.recipe.output.formats,
        final_shards,
        plan.run_dir / "data",
        include_reasoning=loaded.recipe.output.include_reasoning,
    )
    exported = [*outputs.values(), *(p.with_suffix(".jsonl") for p in outputs.values())]
    files = {
        p.relative_to(plan.run_dir).as_posix(): file_digest(p).model_dump()
        for p in exported
        if p.is_file()
    }
    result = RunResult(
        plan.run_dir,
        plan.run_fp,
        plan.n_records + len(plan.errors),
        plan.errors,
        summaries,
        outputs,
        time.perf_counter() - started,
        files,
    )
    spent = read_spend(plan.run_dir)
    result.spend = spent.model_dump() if spent is not None else None
    result.price_table = table_date()
    write_json(plan.run_dir / "summary.json", result.to_dict())
    return result
