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
from typing import Any

from synthpref.cache import RequestCache
from synthpref.executor.common import (
    Executor,
    RunError,
    RunPlan,
    RunResult,
    RunTally,
    StageSummary,
    build_clients,
    client_stats,
    finish_run,
    plan_run,
    process_shard,
    read_resume_point,
)
from synthpref.recipes.loader import LoadedRecipe
from synthpref.records import Record
from synthpref.sources import InputError

__all__ = ["LocalExecutor", "RunError", "RunResult", "StageSummary"]


class LocalExecutor(Executor):
    """Runs in this process; ``options`` are :class:`~synthpref.executor.common.Executor`'s."""

    def __init__(
        self,
        loaded: LoadedRecipe,
        *,
        records: list[Record] | None = None,
        input_errors: list[InputError] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(loaded, **options)
        self.records = records  # pre-built records instead of the recipe's source (eval-judges)
        self.input_errors = input_errors

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
        tally = self._tally(plan)
        cache = RequestCache(self.run_dir / "cache.sqlite")
        try:
            with tally:
                clients = build_clients(self.loaded, cache, tally.progress.tokens, self._warn)
                await self._pipeline(plan, tally)
            tally.add_calls(client_stats(clients))
        finally:
            cache.close()
        return finish_run(self.loaded, plan, tally.summaries, t0)

    # internals ----------------------------------------------------------------------------------

    async def _pipeline(self, plan: RunPlan, tally: RunTally) -> None:
        stages, shards = self.loaded.stages, plan.shards
        n_stages = len(stages)
        start_at = [plan.start_at(k) for k in range(len(shards))]
        depth = self.recipe.settings.max_concurrent_shards
        queues = [asyncio.Queue(maxsize=depth) for _ in range(n_stages)]

        async def worker(i: int) -> None:
            for k in range(len(shards)):
                upstream = shards[k] if i == 0 else await queues[i - 1].get()
                path = plan.path(i, k)
                if i < start_at[k]:
                    out = None
                    tally.add_earlier(i, path)
                elif i == start_at[k]:
                    out, info = read_resume_point(path)
                    tally.add(i, info, resumed=True)
                else:
                    out, info = await process_shard(stages[i], k, upstream, path)
                    tally.add(i, info, resumed=False)
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
