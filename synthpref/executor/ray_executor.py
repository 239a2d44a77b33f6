"""The Ray executor: shards spread over data-parallel model replicas, one Ray actor each.

The driver plans the run exactly as the local executor does (``common.plan_run``: same run dir,
fingerprints and checkpoint paths), reads back the shards that are already finished, and hands every
other shard, with the stage it resumes at, to the least busy :class:`ShardWorker`. An actor loads each
model once, then takes a shard through all its remaining stages, writing the same per-stage
checkpoints a local run writes; up to ``settings.max_concurrent_shards`` shards are in one actor at a
time, one per stage, so generation and judging overlap as in the local pipeline. A shard's result
does not depend on the actor that computed it (backends seed each batch from its requests), so a run
may switch between executors and between cluster sizes at any point and still resume.

One actor per GPU when the cluster has GPUs, else one per node; ``workers`` overrides either. Workers
read and write checkpoints in the run dir, so on a multi-node cluster it must be on a filesystem
every node mounts at the same path. How workers share the request cache: ``worker_cache.py``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from synthpref.executor import checkpoints as ck
from synthpref.executor.common import (
    Executor,
    RunError,
    RunPlan,
    RunResult,
    RunTally,
    build_clients,
    client_stats,
    earlier_info,
    finish_run,
    plan_run,
    process_shard,
    read_resume_point,
)
from synthpref.executor.worker_cache import WORKER_CACHE_DIR, WorkerCache, merge_worker_caches
from synthpref.recipes.loader import LoadedRecipe


def import_ray():
    """Ray is an optional dependency: import it only when the Ray executor is asked for."""
    try:
        import ray
    except ImportError:
        raise RunError("the Ray executor needs Ray: pip install 'synthpref[ray]'") from None
    return ray


class ShardWorker:
    """One model replica: the recipe's stages with their own backends and cache file.

    Wrapped by ``ray.remote`` at run time, so this module imports without Ray."""

    def __init__(
        self, loaded: LoadedRecipe, run_dir: str, stage_dirs: list[str], worker_id: str
    ) -> None:
        self.stages = loaded.stages
        self.stage_dirs = [Path(d) for d in stage_dirs]
        run = Path(run_dir)
        self.cache = WorkerCache(
            run / "cache.sqlite", run / WORKER_CACHE_DIR / f"{worker_id}.sqlite"
        )
        self.clients = build_clients(loaded, self.cache, warn=_warn)
        self._locks: list[asyncio.Lock] | None = None

    async def run_shard(
        self, k: int, records: list | None, start_at: int
    ) -> list[tuple[int, dict, bool]]:
        """Take shard ``k`` through the stages after ``start_at`` (reading that stage's checkpoint
        when ``start_at >= 0``); returns ``(stage index, checkpoint info, resumed)`` per stage."""
        if self._locks is None:  # one shard per stage at a time: a stage owns its counters
            self._locks = [asyncio.Lock() for _ in self.stages]
        done: list[tuple[int, dict, bool]] = []
        for i in range(start_at):
            info = earlier_info(ck.shard_path(self.stage_dirs[i], k))
            if info is not None:
                done.append((i, info, True))
        if start_at >= 0:
            records, info = read_resume_point(ck.shard_path(self.stage_dirs[start_at], k))
            done.append((start_at, info, True))
        for i in range(start_at + 1, len(self.stages)):
            async with self._locks[i]:
                path = ck.shard_path(self.stage_dirs[i], k)
                records, info = await process_shard(self.stages[i], k, records, path)
            done.append((i, info, False))
        return done

    async def close(self) -> dict[str, dict[str, int]]:
        """Close the cache file (so the driver can merge it); returns calls per stage."""
        self.cache.close()
        return client_stats(self.clients)


def _shard(shards: Iterator[tuple[int, list]], k: int) -> list:
    """Shard ``k`` of a numbered read of the input that has not passed it yet."""
    for j, records in shards:
        if j == k:
            return records
    raise RunError(f"the input ended before shard {k}")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class RayExecutor(Executor):
    """Runs on a Ray cluster; ``options`` are :class:`~synthpref.executor.common.Executor`'s."""

    def __init__(
        self,
        loaded: LoadedRecipe,
        *,
        address: str | None = None,
        workers: int | None = None,
        **options: Any,
    ) -> None:
        if workers is not None and workers < 1:
            raise ValueError("workers must be at least 1")
        super().__init__(loaded, **options)
        # absolute: actors do not share the driver's working directory
        self.run_dir = self.run_dir.resolve()
        self.address = address
        self.workers = workers

    def run(self) -> RunResult:
        ray = import_ray()
        t0 = time.perf_counter()
        plan = plan_run(self.loaded, self.run_dir, fresh=self.fresh, warn=self._warn)
        stages = self.loaded.stages
        last = len(stages) - 1
        tally = self._tally(plan)
        todo: list[tuple[int, int]] = []
        with tally:
            for k in range(plan.n_shards):
                start = plan.start_at(k)
                if start == last:  # finished: only its counters are needed
                    for i in range(last + 1):
                        tally.add_earlier(i, plan.path(i, k))
                else:
                    todo.append((k, start))
            if todo:
                started = not ray.is_initialized()
                if started:
                    ray.init(
                        address=self.address, include_dashboard=False, logging_level=logging.WARNING
                    )
                try:
                    self._distribute(ray, plan, todo, tally)
                finally:
                    if started:
                        ray.shutdown()
        merge_worker_caches(self.run_dir)
        return finish_run(self.loaded, plan, tally.summaries, t0)

    # internals ----------------------------------------------------------------------------------

    def _actor_options(self, ray, n_shards: int) -> tuple[int, dict]:
        """How many replicas, and the resources of each: a GPU each where the cluster has GPUs
        (a share of one when ``workers`` exceeds them), else an equal part of a node's CPUs."""
        gpus = ray.cluster_resources().get("GPU", 0)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if gpus:
            n = self.workers or int(gpus)
            options = {"num_gpus": min(1.0, gpus / n), "num_cpus": 1}
        else:
            n = self.workers or len(nodes)
            per_node = math.ceil(n / max(1, len(nodes)))
            cpus = min(node["Resources"].get("CPU", 1) for node in nodes) if nodes else 1
            # Scheduling asks for a share of a node's CPUs, but torch runs with as many threads as a
            # local run would (Ray would set OMP_NUM_THREADS to the share): a CPU matmul's rounding
            # depends on its thread count, and sampled text on that rounding, so only equal thread
            # counts give the local executor's results bit for bit.
            import torch

            threads = str(torch.get_num_threads())
            options = {
                "num_cpus": max(1, int(cpus // per_node)),
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads}},
            }
        return min(n, n_shards), options

    def _distribute(self, ray, plan: RunPlan, todo, tally: RunTally) -> None:
        n, options = self._actor_options(ray, len(todo))
        depth = self.loaded.recipe.settings.max_concurrent_shards
        worker_cls = ray.remote(ShardWorker).options(
            **options, max_concurrency=depth, scheduling_strategy="SPREAD"
        )
        loaded_ref = ray.put(self.loaded)
        stage_dirs = [str(d) for d in plan.stage_dirs]
        actors = [
            worker_cls.remote(loaded_ref, str(self.run_dir), stage_dirs, uuid.uuid4().hex[:16])
            for _ in range(n)
        ]
        try:
            self._dispatch(ray, actors, depth, plan, todo, tally)
            stats = ray.get([a.close.remote() for a in actors])
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, RunError) else exc
            raise RunError(str(cause)) from None
        except ray.exceptions.RayActorError as exc:
            raise RunError(
                f"a Ray worker died ({exc}). Finished shards and model calls are saved; "
                "rerun the same command to resume."
            ) from None
        finally:
            for a in actors:
                ray.kill(a)
        for per_actor in stats:
            tally.add_calls(per_actor)

    def _dispatch(self, ray, actors, depth, plan: RunPlan, todo, tally: RunTally) -> None:
        """Keep every actor busy with up to ``depth`` shards, in shard order, least busy first. The
        input is read as shards are handed out (one read, in order), so the driver holds none but
        the shard it is sending."""
        queue = list(reversed(todo))
        load = [0] * len(actors)
        in_flight: dict = {}
        shards = enumerate(plan.shards())
        while queue or in_flight:
            while queue and min(load) < depth:
                a = load.index(min(load))
                k, start = queue.pop()
                records = _shard(shards, k) if start < 0 else None
                in_flight[actors[a].run_shard.remote(k, records, start)] = a
                load[a] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                load[in_flight.pop(ref)] -= 1
                for i, info, resumed in ray.get(ref):
                    tally.add(i, info, resumed=resumed)
