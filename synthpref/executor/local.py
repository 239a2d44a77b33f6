"""The local executor: shards flow through the stages as a pipeline, checkpointed and resumable.

Each stage runs as its own asyncio worker that takes shards in order, so a judge works on shard 1 while
the generator works on shard 2 (local engines run in threads, remote ones are I/O). For every shard the
executor starts after the last stage that already has a checkpoint; a checkpoint is keyed by the
stage's fingerprint, so it is reused exactly when its inputs and settings are unchanged. Model calls go
through the request cache, so even a shard interrupted halfway redoes no finished call.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from synthpref.backends.client import ModelClient
from synthpref.cache import RequestCache
from synthpref.executor import checkpoints as ck
from synthpref.executor.fingerprint import digest, input_fingerprint, stage_fingerprints
from synthpref.executor.progress import StageProgress
from synthpref.export import export_all
from synthpref.recipes.loader import LoadedRecipe
from synthpref.records import Record
from synthpref.sources import InputError, load_records
from synthpref.stages.base import Stage, StageContext


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


class LocalExecutor:
    def __init__(
        self,
        loaded: LoadedRecipe,
        *,
        run_dir: Path | None = None,
        fresh: bool = False,
        console: Console | None = None,
        progress: bool = True,
        records: list[Record] | None = None,
        input_errors: list[InputError] | None = None,
    ) -> None:
        self.loaded = loaded
        self.records = records  # pre-built records instead of the recipe's source (eval-judges)
        self.input_errors = input_errors
        self.recipe = loaded.recipe
        self.run_dir = run_dir or self.recipe.resolve(self.recipe.output.dir)
        self.fresh = fresh
        self.console = console or Console(stderr=True)
        self.show_progress = progress

    # public -------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        return asyncio.run(self.arun())

    async def arun(self) -> RunResult:
        t0 = time.perf_counter()
        if self.fresh:
            for name in (
                "checkpoints",
                "cache.sqlite",
                "cache.sqlite-wal",
                "cache.sqlite-shm",
                "data",
            ):
                target = self.run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        if self.records is not None:
            records, errors = list(self.records), list(self.input_errors or [])
        else:
            records, errors = load_records(self.recipe)
        self._write_errors(errors)
        if errors and self.recipe.settings.on_error == "stop":
            raise RunError(
                f"{len(errors)} malformed input row(s); first: {errors[0]} "
                f"(all listed in {self.run_dir / 'errors.jsonl'}; set settings.on_error: skip to skip them)"
            )
        if not records:
            raise RunError("the source holds no usable prompt")
        for e in errors:
            self.console.print(f"[yellow]skipped input {e}[/]")

        stages = self.loaded.stages
        for s in stages:  # run-level pre-pass (e.g. de-duplication across shards), before any shard
            try:
                s.prepare(records, self.recipe)
            except (OSError, ValueError) as exc:
                raise RunError(f"stage {s.name!r} ({s.type_name}): {exc}") from exc
        size = self.recipe.settings.shard_size
        shards = [records[k : k + size] for k in range(0, len(records), size)]
        input_fp = input_fingerprint(records, size)
        fps = stage_fingerprints(input_fp, stages, self.loaded.models)
        run_fp = digest([input_fp, *fps])
        stage_dirs = [
            self.run_dir / "checkpoints" / f"{i:02d}-{s.name}-{fp[:12]}"
            for i, (s, fp) in enumerate(zip(stages, fps, strict=True))
        ]
        self._write_run_info(run_fp, input_fp, fps)

        summaries = [StageSummary(s.name, s.type_name) for s in stages]
        cache = RequestCache(self.run_dir / "cache.sqlite")
        try:
            with StageProgress(self.console, self.show_progress) as progress:
                for s in stages:
                    progress.add(s.name, total=len(records))
                clients = self._clients(stages, cache, progress)
                await self._pipeline(stages, shards, stage_dirs, summaries, clients, progress)
            for s, summary in zip(stages, summaries, strict=True):
                summary.calls = sum(c.calls for c in clients[s.name].values())
                summary.cache_hits = sum(c.cache_hits for c in clients[s.name].values())
                summary.tokens = sum(c.tokens for c in clients[s.name].values())
        finally:
            cache.close()

        final_shards = [ck.shard_path(stage_dirs[-1], k) for k in range(len(shards))]
        outputs = export_all(self.recipe.output.formats, final_shards, self.run_dir / "data")
        result = RunResult(
            self.run_dir,
            run_fp,
            len(records) + len(errors),
            errors,
            summaries,
            outputs,
            time.perf_counter() - t0,
        )
        (self.run_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
        return result

    # internals ----------------------------------------------------------------------------------

    def _clients(self, stages: list[Stage], cache: RequestCache, progress: StageProgress):
        """One client per (stage, model) for per-stage token counts; backends are shared."""
        backends: dict[str, object] = {}
        clients: dict[str, dict[str, ModelClient]] = {}
        for stage in stages:
            per: dict[str, ModelClient] = {}
            for name in stage.models_used():
                spec = self.loaded.models[name]
                key = spec.backend_key()
                if key not in backends:
                    backends[key] = spec.build()

                def count(n: int, stage_name: str = stage.name) -> None:
                    progress.tokens(stage_name, n)

                per[name] = ModelClient(name, spec, backends[key], cache, count)
            clients[stage.name] = per
            stage.ctx = StageContext(per, warn=lambda m: self.console.print(f"[yellow]{m}[/]"))
        return clients

    async def _pipeline(self, stages, shards, stage_dirs, summaries, clients, progress) -> None:
        n_stages = len(stages)
        start_at = []
        for k in range(len(shards)):
            done = [i for i in range(n_stages) if ck.shard_path(stage_dirs[i], k).exists()]
            start_at.append(max(done) if done else -1)
        depth = self.recipe.settings.max_concurrent_shards
        queues = [asyncio.Queue(maxsize=depth) for _ in range(n_stages)]

        async def worker(i: int) -> None:
            stage, summary = stages[i], summaries[i]
            for k in range(len(shards)):
                upstream = shards[k] if i == 0 else await queues[i - 1].get()
                path = ck.shard_path(stage_dirs[i], k)
                if i < start_at[k]:
                    out = None
                elif i == start_at[k]:
                    out, info = ck.read_shard(path)
                    self._account(summary, info, resumed=True)
                    progress.advance(stage.name, info["records_in"], note="resumed")
                else:
                    out = await self._process(stage, k, upstream, path, summary)
                    progress.advance(stage.name, len(upstream))
                if i + 1 < n_stages:
                    await queues[i].put(out)

        tasks = [asyncio.create_task(worker(i)) for i in range(n_stages)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _process(
        self, stage: Stage, k: int, records: list[Record], path: Path, summary
    ) -> list[Record]:
        stage.counters = Counter()
        t0 = time.perf_counter()
        n_in = len(records)
        try:
            out = await stage.process([r.model_copy(deep=True) for r in records])
        except Exception as exc:
            raise RunError(
                f"stage {stage.name!r} ({stage.type_name}) failed on shard {k} "
                f"(input rows {records[0].source_row}-{records[-1].source_row}): "
                f"{type(exc).__name__}: {exc}. Finished shards and model calls are saved; "
                "rerun the same command to resume."
            ) from exc
        seconds = time.perf_counter() - t0
        info = {
            "records_in": n_in,
            "records_out": len(out),
            "counters": dict(stage.counters),
            "seconds": seconds,
        }
        ck.write_shard(path, out, info)
        self._account(summary, info, resumed=False)
        return out

    @staticmethod
    def _account(summary: StageSummary, info: dict, resumed: bool) -> None:
        summary.records_in += info["records_in"]
        summary.records_out += info["records_out"]
        summary.counters.update(info.get("counters", {}))
        summary.seconds += info.get("seconds", 0.0)
        summary.shards_resumed += int(resumed)

    def _write_errors(self, errors: list[InputError]) -> None:
        with (self.run_dir / "errors.jsonl").open("w") as fh:
            for e in errors:
                fh.write(json.dumps({"row": e.row, "field": e.field, "message": e.message}) + "\n")

    def _write_run_info(self, run_fp: str, input_fp: str, fps: list[str]) -> None:
        info = {
            "fingerprint": run_fp,
            "input": input_fp,
            "stages": [
                {"name": s.name, "fingerprint": fp}
                for s, fp in zip(self.loaded.stages, fps, strict=True)
            ],
            "recipe": self.loaded.raw,
        }
        (self.run_dir / "run.json").write_text(json.dumps(info, indent=2, default=str))
