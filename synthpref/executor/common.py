"""What every executor shares: planning a run, processing one stage of one shard, summaries, export.

An executor only decides *where* and *in what order* shards go through the stages (asyncio workers in
one process, or Ray actors). Everything that makes two executors' runs interchangeable lives here:
the run-dir layout, the fingerprint chain that names checkpoint directories, the resume point of each
shard, the checkpoint written per stage and shard, and the summary and export at the end. A run
started by one executor therefore resumes under the other.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from synthpref.backends.client import ModelClient
from synthpref.executor import checkpoints as ck
from synthpref.executor.fingerprint import digest, input_fingerprint, stage_fingerprints
from synthpref.executor.worker_cache import WORKER_CACHE_DIR, merge_worker_caches
from synthpref.export import export_all
from synthpref.recipes.loader import LoadedRecipe
from synthpref.records import Record
from synthpref.sources import InputError, load_records
from synthpref.stages.base import Stage, StageContext

# what --fresh removes; everything else in the run dir (run.json, errors.jsonl) is rewritten anyway
FRESH_PATHS = (
    "checkpoints",
    "cache.sqlite",
    "cache.sqlite-wal",
    "cache.sqlite-shm",
    WORKER_CACHE_DIR,
    "data",
)


class RunError(RuntimeError):
    pass


@dataclass
class StageSummary:
    name: str
    type: str
    records_in: int = 0
    records_out: int = 0
    shards_resumed: int = 0
    counters: Counter = field(default_factory=Counter)
    tokens: int = 0
    calls: int = 0
    cache_hits: int = 0
    seconds: float = 0.0

    def add(self, info: dict, resumed: bool) -> None:
        """Count one shard's checkpoint info (computed now or read back from a checkpoint)."""
        self.records_in += info["records_in"]
        self.records_out += info["records_out"]
        self.counters.update(info.get("counters", {}))
        self.seconds += info.get("seconds", 0.0)
        self.shards_resumed += int(resumed)

    def add_calls(self, stats: dict[str, int]) -> None:
        self.calls += stats["calls"]
        self.cache_hits += stats["cache_hits"]
        self.tokens += stats["tokens"]


@dataclass
class RunResult:
    run_dir: Path
    fingerprint: str
    input_rows: int
    input_errors: list[InputError]
    stages: list[StageSummary]
    outputs: dict[str, Path]
    seconds: float

    def to_dict(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "fingerprint": self.fingerprint,
            "input_rows": self.input_rows,
            "input_errors": len(self.input_errors),
            "stages": [{**s.__dict__, "counters": dict(s.counters)} for s in self.stages],
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "seconds": round(self.seconds, 2),
        }


@dataclass
class RunPlan:
    """A prepared run: its shards, fingerprints and checkpoint directories (one per stage)."""

    run_dir: Path
    records: list[Record]
    errors: list[InputError]
    shards: list[list[Record]]
    run_fp: str
    stage_dirs: list[Path]

    def path(self, stage: int, shard: int) -> Path:
        return ck.shard_path(self.stage_dirs[stage], shard)

    def start_at(self, shard: int) -> int:
        """The last stage whose checkpoint of this shard exists (-1: none); work resumes after it."""
        done = [i for i in range(len(self.stage_dirs)) if self.path(i, shard).exists()]
        return max(done) if done else -1


def plan_run(
    loaded: LoadedRecipe,
    run_dir: Path,
    *,
    fresh: bool,
    records: list[Record] | None = None,
    input_errors: list[InputError] | None = None,
    warn: Callable[[str], None] = print,
) -> RunPlan:
    """Clear (``fresh``) or reopen the run dir, load and shard the input, run the stages' run-level
    pre-pass, and write ``run.json``; merges call results left by workers of an interrupted run."""
    recipe = loaded.recipe
    if fresh:
        for name in FRESH_PATHS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    merge_worker_caches(run_dir)

    if records is not None:
        records, errors = list(records), list(input_errors or [])
    else:
        records, errors = load_records(recipe)
    _write_errors(run_dir, errors)
    if errors and recipe.settings.on_error == "stop":
        raise RunError(
            f"{len(errors)} malformed input row(s); first: {errors[0]} "
            f"(all listed in {run_dir / 'errors.jsonl'}; set settings.on_error: skip to skip them)"
        )
    if not records:
        raise RunError("the source holds no usable prompt")
    for e in errors:
        warn(f"skipped input {e}")

    stages = loaded.stages
    for s in stages:  # run-level pre-pass (e.g. de-duplication across shards), before any shard
        try:
            s.prepare(records, recipe)
        except (OSError, ValueError) as exc:
            raise RunError(f"stage {s.name!r} ({s.type_name}): {exc}") from exc
    size = recipe.settings.shard_size
    shards = [records[k : k + size] for k in range(0, len(records), size)]
    input_fp = input_fingerprint(records, size)
    fps = stage_fingerprints(input_fp, stages, loaded.models)
    run_fp = digest([input_fp, *fps])
    stage_dirs = [
        run_dir / "checkpoints" / f"{i:02d}-{s.name}-{fp[:12]}"
        for i, (s, fp) in enumerate(zip(stages, fps, strict=True))
    ]
    info = {
        "fingerprint": run_fp,
        "input": input_fp,
        "stages": [{"name": s.name, "fingerprint": fp} for s, fp in zip(stages, fps, strict=True)],
        "recipe": loaded.raw,
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2, default=str))
    return RunPlan(run_dir, records, errors, shards, run_fp, stage_dirs)


def _write_errors(run_dir: Path, errors: list[InputError]) -> None:
    with (run_dir / "errors.jsonl").open("w") as fh:
        for e in errors:
            fh.write(json.dumps({"row": e.row, "field": e.field, "message": e.message}) + "\n")


def build_clients(
    loaded: LoadedRecipe,
    cache,
    on_tokens: Callable[[str, int], None] | None = None,
    warn: Callable[[str], None] = print,
) -> dict[str, dict[str, ModelClient]]:
    """One client per (stage, model) for per-stage token counts; specs with the same backend key
    share one backend, so each process loads a model's weights once. Gives every stage its context."""
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

            per[name] = ModelClient(name, spec, backends[key], cache, count)
        clients[stage.name] = per
        stage.ctx = StageContext(per, warn=warn)
    return clients


def client_stats(clients: dict[str, dict[str, ModelClient]]) -> dict[str, dict[str, int]]:
    """Calls, cache hits and tokens per stage, summed over its models."""
    return {
        stage: {
            "calls": sum(c.calls for c in per.values()),
            "cache_hits": sum(c.cache_hits for c in per.values()),
            "tokens": sum(c.tokens for c in per.values()),
        }
        for stage, per in clients.items()
    }


async def process_shard(
    stage: Stage, k: int, records: list[Record], path: Path
) -> tuple[list[Record], dict]:
    """Run one stage on one shard and write its checkpoint; returns the output and the checkpoint
    info. Callers must not run the same stage object on two shards at once (it owns ``counters``)."""
    stage.counters = Counter()
    t0 = time.perf_counter()
    try:
        out = await stage.process([r.model_copy(deep=True) for r in records])
    except Exception as exc:
        raise RunError(
            f"stage {stage.name!r} ({stage.type_name}) failed on shard {k} "
            f"(input rows {records[0].source_row}-{records[-1].source_row}): "
            f"{type(exc).__name__}: {exc}. Finished shards and model calls are saved; "
            "rerun the same command to resume."
        ) from exc
    info = {
        "records_in": len(records),
        "records_out": len(out),
        "counters": dict(stage.counters),
        "seconds": time.perf_counter() - t0,
    }
    ck.write_shard(path, out, info)
    return out, info


def finish_run(
    loaded: LoadedRecipe, plan: RunPlan, summaries: list[StageSummary], started: float
) -> RunResult:
    """Export the last stage's checkpoints into ``data/`` and write ``summary.json``."""
    last = len(plan.stage_dirs) - 1
    final_shards = [plan.path(last, k) for k in range(len(plan.shards))]
    outputs = export_all(loaded.recipe.output.formats, final_shards, plan.run_dir / "data")
    result = RunResult(
        plan.run_dir,
        plan.run_fp,
        len(plan.records) + len(plan.errors),
        plan.errors,
        summaries,
        outputs,
        time.perf_counter() - started,
    )
    (plan.run_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result
