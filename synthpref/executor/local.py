"""The local executor: shards flow through the stages as a pipeline, checkpointed and resumable.

Each stage runs as its own asyncio worker that takes shards in order, so a judge works on shard 1 while
the generator works on shard 2 (local engines run in threads, remote ones are I/O). For every shard the
executor starts after the last stage that already has a checkpoint; a checkpoint is keyed by the
stage's fingerprint, so it is reused exactly when its inputs and settings are unchanged. Model calls go
through the request cache, so even a shard interrupted halfway redoes no finished call. Planning,
per-shard processing, summaries and export are shared with the Ray executor (``common.py``).

The input streams in: the first stage's worker reads the next shard from the source only when it is
ready to take it, and the queues between workers hold at most ``settings.max_concurrent_shards``
shards each, so only the shards in flight are in memory, whatever the size of the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthpref.backends.batch import BatchPending, drain_submissions
from synthpref.backends.cost import BudgetExceeded, CostMeter
from synthpref.cache import RequestCache
from synthpref.errors import RunPaused
from synthpref.executor import checkpoints as ck
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
        records: Sequence[Record] | None = None,
        input_errors: list[InputError] | None = None,
        cache_path: Path | None = None,
        **options: Any,
    ) -> None:
        super().__init__(loaded, **options)
        #: the request cache (default: the run directory's); ``synthpref estimate`` runs its pilot
        #: in a scratch directory on the real run's cache
        self.cache_path = cache_path
        self.records = records  # pre-built records instead of the recipe's source (eval-judges)
        self.input_errors = input_errors
        #: per stage, per model: the clients of the last run (``synthpref estimate`` reads them)
        self.clients: dict[str, dict[str, Any]] = {}

    # public -------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        return asyncio.run(self.arun())

    async def arun(self) -> RunResult:
        """Passes over the shards until none is paused: a shard whose stage waits on provider
        batch jobs is passed over (the shards after it go on) and taken up again by the next pass,
        ``settings.batch.poll_seconds`` later, or by the next run with ``settings.batch.wait``
        false. A spending cap reached pauses every shard that needs more calls; the shards and
        calls in flight finish first, so nothing paid for is lost."""
        t0 = time.perf_counter()
        plan = plan_run(
            self.loaded,
            self.run_dir,
            fresh=self.fresh,
            records=self.records,
            input_errors=self.input_errors,
            warn=self._warn,
        )
        settings = self.recipe.settings
        cache = RequestCache(self.cache_path or self.run_dir / "cache.sqlite")
        meter = CostMeter(settings.max_cost_usd, spent_before=cache.spent())
        try:
            clients = None
            while True:
                tally = self._tally(plan)
                with tally:
                    if clients is None:
                        clients = build_clients(
                            self.loaded,
                            cache,
                            tally.progress.tokens,
                            self._warn,
                            meter=meter,
                            on_cost=tally.progress.cost,
                        )
                        self.clients = clients
                    else:
                        self._rewire(clients, tally)
                    paused = await self._pipeline(plan, tally)
                if not paused:
                    break
                budget = [p for p in paused if isinstance(p.error, BudgetExceeded)]
                if budget:
                    raise BudgetExceeded(f"{budget[0].error}\n{self._how_far(plan, paused)}")
                if not settings.batch.wait:
                    raise BatchPending(
                        f"{self._how_far(plan, paused)}\nSubmitted to the provider; run the "
                        "same command later to collect (nothing is submitted twice).",
                        jobs=sorted({j for p in paused for j in p.error.jobs}),
                    )
                self._warn(
                    f"{self._how_far(plan, paused)}\nchecking again in "
                    f"{settings.batch.poll_seconds:g}s (Ctrl-C is safe: a rerun picks the jobs up)"
                )
                await asyncio.sleep(settings.batch.poll_seconds)
            tally.add_calls(client_stats(clients))
        finally:
            cache.close()
        return finish_run(self.loaded, plan, tally.summaries, t0)

    @staticmethod
    def _rewire(clients, tally: RunTally) -> None:
        """Point the clients' live counts at this pass's progress display."""
        for stage, per in clients.items():
            for client in per.values():
                client.on_tokens = lambda n, s=stage: tally.progress.tokens(s, n)
                client.on_cost = lambda d, s=stage: tally.progress.cost(s, d)

    def _how_far(self, plan: RunPlan, paused: list[Paused]) -> str:
        stages = self.loaded.stages
        done = [
            sum(plan.start_at(k) >= i for k in range(plan.n_shards)) for i in range(len(stages))
        ]
        lines = [
            f"  {s.name}: {d} of {plan.n_shards} shards done"
            for s, d in zip(stages, done, strict=True)
        ]
        waiting = sorted({(p.stage, p.shard) for p in paused})
        where = ", ".join(f"{stages[i].name} shard {k}" for i, k in waiting[:5])
        more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
        return "\n".join([f"paused at {where}{more}; progress:", *lines])

    # internals ----------------------------------------------------------------------------------

    def _start_at(self, plan: RunPlan, k: int) -> int:
        """Where shard ``k`` resumes: after its last readable checkpoint (``plan.start_at``), but
        a stage that carries state replays its own checkpoint of every shard it is not given, so
        where one of those is missing or damaged (set aside) the shard resumes before that stage
        instead, which then processes it again in order."""
        at = plan.start_at(k)
        for j, stage in enumerate(self.loaded.stages):
            if j >= at:
                break
            if stage.carries_state and not self._readable(plan.path(j, k), k):
                at = next((i for i in reversed(range(j)) if self._readable(plan.path(i, k), k)), -1)
        return at

    def _readable(self, path: Path, k: int) -> bool:
        if not path.exists():
            return False
        try:
            ck.verify_shard(path)
        except ck.CheckpointError as exc:
            moved = ck.set_aside(path)
            self._warn(f"{exc}; moved it to {moved.name}, recomputing shard {k} from the "
                       "checkpoint before it")  # fmt: skip
            return False
        return True

    async def _pipeline(self, plan: RunPlan, tally: RunTally) -> list[Paused]:
        """One pass; returns the (stage, shard)s that paused (their later stages are skipped). The
        input is read afresh, a shard at a time, as the first stage's worker takes it (in a thread,
        so a slow read, a Hub stream, never stalls the stages working on earlier shards)."""
        stages = self.loaded.stages
        paused: list[Paused] = []
        n_stages, n_shards = len(stages), plan.n_shards
        shards = plan.shards()
        start_at = [self._start_at(plan, k) for k in range(n_shards)]
        depth = self.recipe.settings.max_concurrent_shards
        queues = [asyncio.Queue(maxsize=depth) for _ in range(n_stages)]

        for stage in stages:
            if stage.carries_state:
                stage.start()

        async def worker(i: int) -> None:
            stage = stages[i]
            held = False  # a stateful stage takes no shard after one it could not take
            for k in range(n_shards):
                upstream = await _next_shard(shards) if i == 0 else await queues[i - 1].get()
                path = plan.path(i, k)
                if upstream is PAUSED or (held and i >= start_at[k]):
                    out = PAUSED
                    held = stage.carries_state
                elif i < start_at[k]:
                    out = None
                    tally.add_earlier(i, path)
                    if stage.carries_state:
                        stage.replay(read_resume_point(path)[0])
                elif i == start_at[k]:
                    out, info = read_resume_point(path)
                    tally.add(i, info, resumed=True)
                    if stage.carries_state:
                        stage.replay(out)
                else:
                    try:
                        out, info = await process_shard(stages[i], k, upstream, path)
                    except RunPaused as exc:
                        paused.append(Paused(i, k, exc))
                        out = PAUSED
                        held = stage.carries_state
                    else:
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
        finally:
            # a read still running in its thread (the pipeline stopped meanwhile) is left to finish
            # there; the reader is then closed when it is dropped
            with contextlib.suppress(ValueError):
                shards.close()
            await drain_submissions()  # a job the provider accepted is recorded before we go on
        return paused


async def _next_shard(shards: Iterator[list[Record]]) -> list[Record]:
    """The next shard of the input; ``RunInput.shards`` yields exactly the planned number, or
    raises."""
    return await asyncio.to_thread(next, shards)


#: what a paused shard hands the stages after it: nothing to do this pass
PAUSED = object()


@dataclass(frozen=True)
class Paused:
    stage: int
    shard: int
    error: RunPaused
