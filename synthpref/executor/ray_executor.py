"""The Ray executor: shards spread over data-parallel model replicas, one Ray actor each.

The driver plans the run exactly as the local executor does (``common.plan_run``: same run dir,
fingerprints and checkpoint paths), reads back the shards that are already finished, and hands every
other shard, with the stage it resumes at, to the least busy :class:`ShardWorker`. An actor loads each
model once, then takes a shard through all its remaining stages, writing the same per-stage
checkpoints a local run writes; up to ``settings.max_concurrent_shards`` shards are in one actor at a
time, one per stage, so generation and judging overlap as in the local pipeline. A shard's result
does not depend on the actor that computed it (backends seed each batch from its requests), so a run
may switch between executors and between cluster sizes at any point and still resume.

Where replicas go is planned by ``placement.py``: on a GPU cluster each replica is a placement group
holding its models' GPUs (models that do not fit one node together run in stage groups of their own,
concurrently or one after the other); without GPU models or GPUs, one actor per node. ``workers`` caps
the replicas. Workers read and write checkpoints in the run dir, so on a multi-node cluster it must be
on a filesystem every node mounts at the same path. How workers share the request cache:
``worker_cache.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from synthpref.console import say
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
from synthpref.executor.placement import Group, Node, PlacementPlan, plan_placement, recipe_needs
from synthpref.executor.worker_cache import WORKER_CACHE_DIR, WorkerCache, merge_worker_caches
from synthpref.recipes.loader import LoadedRecipe

#: how long a run waits for the cluster to grant a group's placement groups before it gives up
PLACEMENT_WAIT_S = 600.0


def import_ray():
    """Ray is an optional dependency: import it only when the Ray executor is asked for."""
    try:
        import ray
    except ImportError:
        raise RunError("the Ray executor needs Ray: pip install 'synthpref[ray]'") from None
    return ray


class ShardWorker:
    """One model replica: stages ``first``..``last`` of the recipe with their own backends and cache
    file (every stage when the plan has one group).

    Wrapped by ``ray.remote`` at run time, so this module imports without Ray. ``slots`` (per
    backend key, from the placement plan) tell each model where it sits in the replica's placement
    group, through the spec's optional ``placed`` method."""

    def __init__(
        self,
        loaded: LoadedRecipe,
        run_dir: str,
        stage_dirs: list[str],
        worker_id: str,
        first: int = 0,
        last: int | None = None,
        slots: dict[str, dict] | None = None,
    ) -> None:
        self.first = first
        self.last = len(loaded.stages) - 1 if last is None else last
        self.stages = loaded.stages
        self.stage_dirs = [Path(d) for d in stage_dirs]
        run = Path(run_dir)
        self.cache = WorkerCache(
            run / "cache.sqlite", run / WORKER_CACHE_DIR / f"{worker_id}.sqlite"
        )
        mine = dataclasses.replace(
            loaded,
            stages=self.stages[self.first : self.last + 1],
            models=_placed(loaded.models, slots or {}),
        )
        self.clients = build_clients(mine, self.cache, warn=_warn)
        self._locks: list[asyncio.Lock] | None = None

    async def run_shard(
        self, k: int, records: list | None, start_at: int
    ) -> list[tuple[int, dict, bool]]:
        """Take shard ``k`` through this replica's stages after ``start_at`` (reading that stage's
        checkpoint when ``start_at >= 0``); returns ``(stage index, checkpoint info, resumed)`` for
        each of this replica's stages (a checkpoint before ``first`` is another group's to count)."""
        if self._locks is None:  # one shard per stage at a time: a stage owns its counters
            self._locks = [asyncio.Lock() for _ in self.stages]
        done: list[tuple[int, dict, bool]] = []
        for i in range(self.first, start_at):
            info = earlier_info(ck.shard_path(self.stage_dirs[i], k))
            if info is not None:
                done.append((i, info, True))
        if start_at >= 0:
            records, info = read_resume_point(ck.shard_path(self.stage_dirs[start_at], k))
            if start_at >= self.first:
                done.append((start_at, info, True))
        for i in range(start_at + 1, self.last + 1):
            async with self._locks[i]:
                path = ck.shard_path(self.stage_dirs[i], k)
                records, info = await process_shard(self.stages[i], k, records, path)
            done.append((i, info, False))
        return done

    async def close(self) -> dict[str, dict[str, int]]:
        """Close the cache file (so the driver can merge it); returns calls per stage."""
        self.cache.close()
        return client_stats(self.clients)


def _placed(models: dict, slots: dict[str, dict]) -> dict:
    """The recipe's specs, each told its slot in the replica (specs without ``placed`` run where
    their backend puts them, with the GPUs Ray gave the actor)."""
    out = {}
    for name, spec in models.items():
        slot, place = slots.get(spec.backend_key()), getattr(spec, "placed", None)
        out[name] = place(**slot) if slot is not None and place is not None else spec
    return out


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
                    placement = self._plan(ray, len(todo))
                    for line in placement.describe():
                        say(self.console, line)
                    if placement.concurrent or len(placement.groups) == 1:
                        self._pass(ray, plan, placement, placement.groups, dict(todo), tally)
                    else:  # each group on the whole cluster in turn, its GPUs freed after it
                        for group in placement.groups:
                            self._pass(ray, plan, placement, [group], dict(todo), tally)
                            merge_worker_caches(self.run_dir)  # what it computed, for the next
                finally:
                    if started:
                        ray.shutdown()
        merge_worker_caches(self.run_dir)
        return finish_run(self.loaded, plan, tally.summaries, t0)

    # internals ----------------------------------------------------------------------------------

    def _plan(self, ray, n_shards: int) -> PlacementPlan:
        nodes = [
            Node(n["Resources"].get("GPU", 0.0), n["Resources"].get("CPU", 0.0))
            for n in ray.nodes()
            if n.get("Alive")
        ]
        stages, models = recipe_needs(self.loaded)
        return plan_placement(stages, models, nodes, workers=self.workers, shards=n_shards)

    def _cpu_options(self, ray) -> dict:
        """An equal part of a node's CPUs for each replica (the plan without GPUs)."""
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        n = self.workers or len(nodes)
        per_node = math.ceil(n / max(1, len(nodes)))
        cpus = min(node["Resources"].get("CPU", 1) for node in nodes) if nodes else 1
        # Scheduling asks for a share of a node's CPUs, but torch runs with as many threads as a
        # local run would (Ray would set OMP_NUM_THREADS to the share): a CPU matmul's rounding
        # depends on its thread count, and sampled text on that rounding, so only equal thread
        # counts give the local executor's results bit for bit.
        import torch

        threads = str(torch.get_num_threads())
        return {
            "num_cpus": max(1, int(cpus // per_node)),
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads}},
            "scheduling_strategy": "SPREAD",
        }

    def _crew(self, ray, plan: RunPlan, placement: PlacementPlan, group: Group, pgs: list) -> list:
        """The group's actors; on GPUs each in a placement group of its own, reserved first (and
        appended to ``pgs`` for the caller to remove)."""
        depth = self.loaded.recipe.settings.max_concurrent_shards
        worker_cls = ray.remote(ShardWorker)
        loaded_ref = ray.put(self.loaded)
        args = (loaded_ref, str(self.run_dir), [str(d) for d in plan.stage_dirs])
        extra = (group.first, group.last, group.slots)
        if not placement.on_gpus:
            options = self._cpu_options(ray)
            return [
                worker_cls.options(**options, max_concurrency=depth).remote(
                    *args, uuid.uuid4().hex[:16], *extra
                )
                for _ in range(group.replicas)
            ]
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        mine = [
            placement_group(group.bundles, strategy="STRICT_PACK") for _ in range(group.replicas)
        ]
        pgs += mine
        ready, _ = ray.wait([pg.ready() for pg in mine], num_returns=len(mine),
                            timeout=PLACEMENT_WAIT_S)  # fmt: skip
        if len(ready) < len(mine):
            raise RunError(
                f"the cluster did not grant {len(mine) - len(ready)} of {len(mine)} placement "
                f"groups for stages {', '.join(group.stages)} ({group.bundles} each) within "
                f"{PLACEMENT_WAIT_S:g} s; check `ray status` for GPUs held by other jobs"
            )
        actor = group.bundles[0]
        return [
            worker_cls.options(
                num_cpus=actor.get("CPU", 0.0),
                num_gpus=actor.get("GPU", 0.0),
                max_concurrency=depth,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
                ),
            ).remote(*args, uuid.uuid4().hex[:16], *extra)
            for pg in mine
        ]

    def _pass(
        self,
        ray,
        plan: RunPlan,
        placement: PlacementPlan,
        groups: list[Group],
        starts: dict[int, int],
        tally: RunTally,
    ) -> None:
        """Every unfinished shard through ``groups`` (consecutive, all placed at once): into the
        first group it has work in, then on to the next as it leaves one."""
        queues: list[deque] = [deque() for _ in groups]
        for k, s in sorted(starts.items()):
            for g, group in enumerate(groups):
                if s < group.last:
                    queues[g].append((k, max(s, group.first - 1)))
                    break
                for i in range(group.first, group.last + 1):  # done before this run
                    tally.add_earlier(i, plan.path(i, k))
        if not any(queues):
            return
        crews: list[list] = []
        pgs: list = []
        try:
            for group in groups:
                crews.append(self._crew(ray, plan, placement, group, pgs))
            self._dispatch(ray, crews, groups, queues, plan, tally)
            stats = ray.get([a.close.remote() for crew in crews for a in crew])
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, RunError) else exc
            raise RunError(str(cause)) from None
        except ray.exceptions.RayActorError as exc:
            raise RunError(
                f"a Ray worker died ({exc}). Finished shards and model calls are saved; "
                "rerun the same command to resume."
            ) from None
        finally:
            for crew in crews:
                for a in crew:
                    ray.kill(a)
            if pgs:
                from ray.util.placement_group import remove_placement_group

                for pg in pgs:
                    remove_placement_group(pg)
        names = [s.name for s in self.loaded.stages]
        for per_actor in stats:
            tally.add_calls({name: per_actor.get(name, {}) for name in names})

    def _dispatch(self, ray, crews, groups, queues, plan: RunPlan, tally: RunTally) -> None:
        """Keep every actor busy with up to ``depth`` shards, least busy first; a shard that leaves
        one group joins the next one's queue. The input is read as shards are handed out (one read,
        in order), so the driver holds none but the shard it is sending."""
        depth = self.loaded.recipe.settings.max_concurrent_shards
        load = [[0] * len(crew) for crew in crews]
        in_flight: dict = {}
        shards = enumerate(plan.shards())
        while any(queues) or in_flight:
            for g, crew in enumerate(crews):
                while queues[g] and min(load[g]) < depth:
                    a = load[g].index(min(load[g]))
                    k, start = queues[g].popleft()
                    records = _shard(shards, k) if start < 0 else None
                    in_flight[crew[a].run_shard.remote(k, records, start)] = (g, a, k)
                    load[g][a] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                g, a, k = in_flight.pop(ref)
                load[g][a] -= 1
                for i, info, resumed in ray.get(ref):
                    tally.add(i, info, resumed=resumed)
                if g + 1 < len(groups):
                    queues[g + 1].append((k, groups[g + 1].first - 1))
