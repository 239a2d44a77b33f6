"""Where the Ray executor puts each model: a plan computed from GPU needs and the cluster's nodes.

Pure (no Ray import), so every decision can be tested without a cluster and printed before a run.
A replica is one Ray placement group on one node (``STRICT_PACK``: a model's tensor-parallel ranks
talk over the node's GPU links, never the network). Bundle 0 holds the replica's actor and the GPUs of
the models that compute in its process (transformers, plugins), packed so that whole-GPU models get
GPUs of their own and fractions share; a model whose engine starts its own Ray workers (vLLM, through
the optional spec method ``worker_bundles``) gets one bundle per worker, at most one GPU each, as vLLM
requires of every bundle in the group it joins.

When every GPU model of the recipe fits one node together, each replica holds them all and takes a
shard through every stage, as the executor always did. When they do not, consecutive stages whose
models fit together form a group with replicas of its own; groups that can all be placed at once run
concurrently (a shard moves on to the next group when it leaves one), otherwise one after the other,
the GPUs of a finished group released before the next starts. Checkpoints are per stage either way,
so resume does not depend on the plan. A model larger than every node is refused: synthpref never
spreads one model over nodes (docs/ray.md says what to do instead).

A recipe without GPU models, or a cluster without GPUs, gets the CPU plan: one replica per node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

from synthpref.executor.common import RunError

#: CPUs the replica's actor reserves in its bundle on a GPU cluster
ACTOR_CPUS = 1.0


@dataclass(frozen=True)
class ModelNeed:
    """One copy of a model (specs with equal ``backend_key`` share it), known by ``names``:
    ``gpus`` in all, and ``worker_bundles``, the GPUs of each of its engine's own Ray workers (empty:
    it computes in the replica's process)."""

    key: str
    names: tuple[str, ...]
    gpus: float
    worker_bundles: tuple[float, ...] = ()

    def label(self) -> str:
        return f"{'/'.join(self.names)} ({self.gpus:g} GPU{'s' if self.gpus != 1 else ''})"


@dataclass(frozen=True)
class StageNeed:
    """A stage by name and the backend keys of the models it calls."""

    name: str
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class Node:
    gpus: float
    cpus: float


@dataclass
class Group:
    """Stages ``first``..``last`` (inclusive) and the replicas that run them. ``bundles`` is one
    replica's placement group (bundle 0: its actor); ``slots`` says per backend key where the model
    sits in it (the keyword arguments of the spec's optional ``placed`` method)."""

    first: int
    last: int
    stages: tuple[str, ...]
    models: tuple[ModelNeed, ...] = ()
    bundles: list[dict[str, float]] = field(default_factory=list)
    slots: dict[str, dict[str, Any]] = field(default_factory=dict)
    replicas: int = 0

    @property
    def actor_gpus(self) -> float:
        return self.bundles[0].get("GPU", 0.0) if self.bundles else 0.0

    @property
    def gpus(self) -> float:
        """GPUs one replica reserves."""
        return sum(b.get("GPU", 0.0) for b in self.bundles)


@dataclass
class PlacementPlan:
    groups: list[Group]
    #: several groups whose replicas are all placed at once (else one group after the other)
    concurrent: bool = False
    #: False: no model needs a GPU or the cluster has none; replicas are the executor's CPU actors
    on_gpus: bool = True

    def describe(self) -> list[str]:
        """One line per group, printed when a run starts."""
        if not self.on_gpus:
            g = self.groups[0]
            return [
                f"ray plan: stages {', '.join(g.stages)}; no GPUs reserved (no model needs one, or "
                f"the cluster has none); {_count(g.replicas, 'replica')} on CPUs"
            ]
        n = len(self.groups)
        mode = "all in one replica" if n == 1 else "concurrent" if self.concurrent else "sequential"
        lines = []
        for i, g in enumerate(self.groups, 1):
            models = ", ".join(m.label() for m in g.models) or "none"
            lines.append(
                f"ray plan, group {i}/{n} ({mode}): stages {', '.join(g.stages)}; models {models}; "
                f"{g.gpus:g} GPU{'s' if g.gpus != 1 else ''} per replica; "
                f"{_count(g.replicas, 'replica')}"
            )
        return lines


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def recipe_needs(loaded) -> tuple[list[StageNeed], dict[str, ModelNeed]]:
    """The stages of a loaded recipe with the models each calls, and each distinct model's needs."""
    models: dict[str, ModelNeed] = {}
    stages: list[StageNeed] = []
    for stage in loaded.stages:
        keys: list[str] = []
        for name in stage.models_used():
            spec = loaded.models[name]
            key = spec.backend_key()
            if key not in models:
                workers = getattr(spec, "worker_bundles", None)
                models[key] = ModelNeed(
                    key,
                    (name,),
                    float(spec.gpus_needed()),
                    tuple(workers()) if workers is not None else (),
                )
            elif name not in models[key].names:
                models[key] = replace(models[key], names=(*models[key].names, name))
            if key not in keys:
                keys.append(key)
        stages.append(StageNeed(stage.name, tuple(keys)))
    return stages, models


def plan_placement(
    stages: Sequence[StageNeed],
    models: Mapping[str, ModelNeed],
    nodes: Sequence[Node],
    *,
    workers: int | None = None,
    shards: int | None = None,
) -> PlacementPlan:
    """The plan for ``stages`` on ``nodes``; ``workers`` (``--workers``) and ``shards`` (the shards
    left to compute) cap the replicas of each group."""
    cap = min(x for x in (workers, shards, math.inf) if x is not None)
    names = tuple(s.name for s in stages)
    used = {k for s in stages for k in s.models}
    on_gpus = {k: m for k, m in models.items() if m.gpus > 0 and k in used}
    if not on_gpus or not any(n.gpus for n in nodes):
        replicas = int(min(workers or max(1, len(nodes)), cap))
        return PlacementPlan([Group(0, len(stages) - 1, names, replicas=replicas)], on_gpus=False)
    largest = max(n.gpus for n in nodes)
    for m in on_gpus.values():
        if not _fits_a_node([m], nodes):
            raise RunError(
                f"model {'/'.join(m.names)} needs {m.gpus:g} GPUs, more than the largest node of "
                f"the cluster has ({largest:g}); a replica stays on one node, so lower its gpus "
                "(tensor_parallel_size), or serve it across nodes with `vllm serve` and call it "
                "as backend: openai (docs/ray.md)"
            )
    groups = _groups(stages, on_gpus, nodes)
    concurrent = _fill(groups, nodes, cap)
    return PlacementPlan(groups, concurrent=concurrent)


def _groups(
    stages: Sequence[StageNeed], on_gpus: Mapping[str, ModelNeed], nodes: Sequence[Node]
) -> list[Group]:
    """Consecutive stages whose GPU models fit one node together; a stage without any joins the
    group before it (the first group, when it comes first)."""
    spans: list[tuple[int, int, list[str]]] = []
    for i, stage in enumerate(stages):
        keys = [k for k in stage.models if k in on_gpus]
        if keys and not _fits_together([on_gpus[k] for k in keys], nodes):
            raise RunError(
                f"stage {stage.name!r} calls {', '.join(on_gpus[k].label() for k in keys)}, which "
                "do not fit on one node together; a stage's models are placed in one replica"
            )
        if spans:
            first, _, held = spans[-1]
            union = held + [k for k in keys if k not in held]
            if not keys or _fits_together([on_gpus[k] for k in union], nodes):
                spans[-1] = (first, i, union)
                continue
        spans.append((i, i, list(keys)))
    groups = []
    for first, last, keys in spans:
        needs = [on_gpus[k] for k in keys]
        bundles, slots = _layout(needs)  # type: ignore[misc]  # checked by _fits_together
        groups.append(
            Group(
                first,
                last,
                tuple(s.name for s in stages[first : last + 1]),
                tuple(needs),
                bundles,
                slots,
            )
        )
    return groups


def _layout(needs: Sequence[ModelNeed]) -> tuple[list[dict[str, float]], dict] | None:
    """One replica's bundles and each model's slot in them, or None where vLLM would refuse the
    group (its workers join a group only when no bundle holds more than one GPU)."""
    fill: list[Fraction] = []  # the actor's GPUs, by local index: how much of each is taken
    slots: dict[str, dict[str, Any]] = {}
    for m in sorted((m for m in needs if not m.worker_bundles), key=lambda m: (-m.gpus, m.key)):
        g = _frac(m.gpus)
        if g >= 1:
            slots[m.key] = {"gpu": len(fill)}
            fill += [Fraction(1)] * int(g)
            continue
        fits = [i for i, used in enumerate(fill) if used + g <= 1]
        i = max(fits, key=lambda i: fill[i]) if fits else len(fill)  # fullest that still fits
        if i == len(fill):
            fill.append(Fraction(0))
        fill[i] += g
        slots[m.key] = {"gpu": i}
    actor_gpus = float(len(fill)) if len(fill) > 1 else float(fill[0]) if fill else 0.0
    actor = {"CPU": ACTOR_CPUS, **({"GPU": actor_gpus} if actor_gpus else {})}
    bundles = [actor]
    with_workers = sorted((m for m in needs if m.worker_bundles), key=lambda m: m.key)
    if with_workers and actor_gpus > 1:
        return None
    for m in with_workers:
        start = len(bundles)
        bundles += [{"GPU": g} for g in m.worker_bundles]
        slots[m.key] = {
            "bundles": tuple(range(start, len(bundles))),
            "bundle_gpus": m.worker_bundles[0],
        }
    return bundles, slots


def _frac(x: float) -> Fraction:
    return Fraction(x).limit_denominator(10**6)


def _fits_together(needs: Sequence[ModelNeed], nodes: Sequence[Node]) -> bool:
    return _layout(needs) is not None and _fits_a_node(needs, nodes)


def _fits_a_node(needs: Sequence[ModelNeed], nodes: Sequence[Node]) -> bool:
    layout = _layout(needs)
    return layout is not None and any(_NodeState(n).take(layout[0]) for n in nodes)


class _NodeState:
    """What is left of a node as replicas are placed on it: each GPU's free share, and CPUs."""

    def __init__(self, node: Node) -> None:
        self.free = [Fraction(1)] * int(node.gpus)
        self.cpus = _frac(node.cpus)

    def take(self, bundles: list[dict[str, float]]) -> bool:
        """Reserve one replica's bundles here if they all fit (STRICT_PACK: all or none)."""
        free, cpus = list(self.free), self.cpus - sum(_frac(b.get("CPU", 0)) for b in bundles)
        if cpus < 0:
            return False
        for b in sorted(bundles, key=lambda b: -b.get("GPU", 0)):
            g = _frac(b.get("GPU", 0))
            if g > 1:  # whole GPUs
                whole = [i for i, f in enumerate(free) if f == 1][: int(g)]
                if len(whole) < g:
                    return False
                for i in whole:
                    free[i] = Fraction(0)
            elif g:
                fits = [i for i, f in enumerate(free) if f >= g]
                if not fits:
                    return False
                i = min(fits, key=lambda i: free[i])  # the fullest that still fits
                free[i] -= g
        self.free, self.cpus = free, cpus
        return True


def _place(states: list[_NodeState], group: Group) -> bool:
    return any(s.take(group.bundles) for s in states)


def _fill(groups: list[Group], nodes: Sequence[Node], cap: float) -> bool:
    """Set each group's replicas; True when the groups run concurrently. One replica of every group
    placed at once means concurrent, and further replicas are then added in turns; otherwise each
    group gets the whole cluster in its turn."""
    states = [_NodeState(n) for n in nodes]
    concurrent = len(groups) > 1 and all(_place(states, g) for g in groups)
    if concurrent:
        for g in groups:
            g.replicas = 1
        growing = [g for g in groups if g.replicas < cap]
        while growing:
            growing = [g for g in growing if _place(states, g)]
            for g in growing:
                g.replicas += 1
            growing = [g for g in growing if g.replicas < cap]
        return True
    for g in groups:
        states = [_NodeState(n) for n in nodes]
        while g.replicas < cap and _place(states, g):
            g.replicas += 1
    return False
