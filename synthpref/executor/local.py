"""The local executor: shards flow through the stages as a pipeline, checkpointed and resumable.

Each stage runs as its own asyncio worker that takes shards in order, so a judge works on shard 1 while
the generator works on shard 2 (local engines run in threads, remote ones are I/O). For every shard the
executor starts after the last stage that already has a checkpoint; a checkpoint is keyed by the
stage's fingerprint, so it is reused exactly when its inputs and settings are unchanged. Model calls go
through the request cache, so even a shard interrupted halfway redoes no finished call. Planning,
per-shard processing, summaries and export are shared with the Ray executor (``common.py``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from rich.console import Console

from synthpref.cache import RequestCache
from synthpref.console import say
from synthpref.executor.common import (
    RunError,
    RunPlan,
    RunResult,
    StageSummary,
    build_clients,
    client_stats,
    earlier_info,
    finish_run,
    plan_run,
    process_shard,
    read_resume_point,
)
from synthpref.executor.progress import StageProgress
from synthpref.recipes.loader import LoadedRecipe
from synthpref.records import Record
from synthpref.sources import InputError

__all__ = ["LocalExecutor", "RunError", "RunResult", "StageSummary"]


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
        plan = plan_run(
            self.loaded,
            self.run_dir,
            fresh=self.fresh,
            records=self.records,
            input_errors=self.input_errors,
            warn=self._warn,
        )
        stages = self.loaded.stages
        summaries = [StageSummary(s.name, s.type_name) for s in stages]
        cache = RequestCache(self.run_dir / "cache.sqlite")
        try:
            with StageProgress(self.console, self.show_progress) as progress:
                for s in stages:
                    progress.add(s.name, total=len(plan.records))
                clients = build_clients(self.loaded, cache, progress.tokens, self._warn)
                await self._pipeline(plan, summaries, progress)
            stats = client_stats(clients)
            for summary in summaries:
                summary.add_calls(stats[summary.name])
        finally:
            cache.close()
        return finish_run(self.loaded, plan, summaries, t0)

    # internals ----------------------------------------------------------------------------------

    def _warn(self, message: str) -> None:
        say(self.console, message, style="yellow")

    async def _pipeline(
        self, plan: RunPlan, summaries: list[StageSummary], progress: StageProgress
    ) -> None:
        stages, shards = self.loaded.stages, plan.shards
        n_stages = len(stages)
        start_at = [plan.start_at(k) for k in range(len(shards))]
        depth = self.recipe.settings.max_concurrent_shards
        queues = [asyncio.Queue(maxsize=depth) for _ in range(n_stages)]

        async def worker(i: int) -> None:
            stage, summary = stages[i], summaries[i]
            for k in range(len(shards)):
                upstream = shards[k] if i == 0 else await queues[i - 1].get()
                path = plan.path(i, k)
                if i < start_at[k]:
                    out = None
                    info = earlier_info(path)
                    if info is not None:
                        summary.add(info, resumed=True)
                        progress.advance(stage.name, info["records_in"], note="resumed")
                elif i == start_at[k]:
                    out, info = read_resume_point(path)
                    summary.add(info, resumed=True)
                    progress.advance(stage.name, info["records_in"], note="resumed")
                else:
                    out, info = await process_shard(stage, k, upstream, path)
                    summary.add(info, resumed=False)
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
