"""GPUs per model and the Ray executor's placement: the planner alone (no Ray), the specs' GPU
fields, and runs on a local Ray cluster that declares 8 virtual GPUs (placement only, no CUDA)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import Field
from rich.console import Console

from synthpref.backends.base import Backend
from synthpref.backends.builtin import EmbeddedSpec, TransformersSpec
from synthpref.backends.specs import VOLATILE, ModelSpec, register_backend
from synthpref.backends.vllm_backend import VLLMSpec
from synthpref.executor.common import RunError
from synthpref.executor.placement import (
    ModelNeed,
    Node,
    StageNeed,
    plan_placement,
    recipe_needs,
)
from synthpref.recipes.loader import RecipeError, load_recipe
from tests.conftest import write_recipe
from tests.executor.test_ray_executor import _layout, _records, _rows
from tests.judge_doubles import ScriptedBackend

# --- a test double that declares GPUs and reports, from inside its Ray actor, what it was given ---


@register_backend
class GpuDoubleSpec(ModelSpec):
    """A scripted model (tests only) that holds ``gpus``; with ``workers`` it asks, like vLLM, for
    one bundle per worker and starts a probe task in each. Writes one JSON line to ``log`` per
    backend built inside a Ray actor."""

    backend_name: ClassVar[str] = "gpu_double"
    backend: str = "gpu_double"
    model: str = "double"
    policy: str = "prefers_longer"
    gpus: float = Field(0.0, json_schema_extra=VOLATILE)
    workers: int = Field(0, json_schema_extra=VOLATILE)
    log: str | None = Field(None, json_schema_extra=VOLATILE)
    slot: dict | None = Field(None, json_schema_extra=VOLATILE)

    def gpus_needed(self) -> float:
        return self.gpus

    def worker_bundles(self) -> list[float]:
        return [self.gpus / self.workers] * self.workers if self.workers else []

    def placed(self, **slot: Any) -> GpuDoubleSpec:
        return self.model_copy(update={"slot": slot})

    def build(self) -> Backend:
        if self.log:
            _record(self)
        return ScriptedBackend(self.policy, name=self.model)

    def capabilities(self) -> frozenset[str]:
        return ScriptedBackend.capabilities

    def display_name(self) -> str:
        return self.model


def _record(spec: GpuDoubleSpec) -> None:
    import ray
    from ray.util import get_current_placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return  # built by the local executor
    pg = get_current_placement_group()
    probes = []
    for b in (spec.slot or {}).get("bundles", ()):  # as vLLM starts its workers in its bundles
        probe = ray.remote(num_cpus=0, num_gpus=spec.slot["bundle_gpus"])(_gpu_ids)
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=b)
        probes.append(ray.get(probe.options(scheduling_strategy=strategy).remote(), timeout=60))
    live = {
        pg_id: sum(r.get("GPU", 0) for r in t["bundles"].values())
        for pg_id, t in placement_group_table().items()
        if t["state"] == "CREATED"
    }
    entry = {
        "model": spec.model,
        "actor": ray.get_runtime_context().get_actor_id(),
        "pg": pg.id.hex() if pg else None,
        "bundles": pg.bundle_specs if pg else None,
        "assigned": ray.get_runtime_context().get_assigned_resources(),
        "slot": spec.slot,
        "probes": probes,
        "live": live,
    }
    with open(spec.log, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _gpu_ids() -> list:
    import ray

    return [str(i) for i in ray.get_gpu_ids()]


# --- the planner alone ---------------------------------------------------------------------------


def need(key: str, gpus: float, workers: int = 0) -> ModelNeed:
    return ModelNeed(key, (key,), gpus, (gpus / workers,) * workers if workers else ())


def stages(*spec: tuple[str, tuple[str, ...]]) -> list[StageNeed]:
    return [StageNeed(name, models) for name, models in spec]


RECIPE = stages(
    ("dedup", ()),
    ("generate", ("gen",)),
    ("rating", ("judge",)),
    ("pairs", ()),
    ("margin", ()),
)


def test_models_that_fit_one_node_share_every_replica():
    models = {"gen": need("gen", 1), "judge": need("judge", 4, workers=4)}
    plan = plan_placement(RECIPE, models, [Node(8, 64), Node(8, 64)])
    (group,) = plan.groups
    assert (group.first, group.last) == (0, 4)
    # the actor holds the in-process model's GPU; the vLLM-like model one bundle per worker
    assert group.bundles == [{"CPU": 1.0, "GPU": 1.0}] + [{"GPU": 1.0}] * 4
    assert group.slots == {"gen": {"gpu": 0}, "judge": {"bundles": (1, 2, 3, 4), "bundle_gpus": 1}}
    assert group.replicas == 2 * (8 // 5)  # 5 GPUs a replica, 8 a node, 2 nodes
    assert "all in one replica" in plan.describe()[0]


def test_models_that_do_not_fit_together_run_in_stage_groups_one_after_the_other():
    models = {"gen": need("gen", 4), "judge": need("judge", 6, workers=6)}
    plan = plan_placement(RECIPE, models, [Node(8, 64)])
    assert [(g.first, g.last) for g in plan.groups] == [(0, 1), (2, 4)]  # model-less stages join
    assert not plan.concurrent  # 4 + 6 GPUs > 8: never both at once
    assert [g.replicas for g in plan.groups] == [8 // 4, 8 // 6]
    lines = plan.describe()
    assert len(lines) == 2 and all("(sequential)" in line for line in lines)
    assert "stages rating, pairs, margin" in lines[1] and "judge (6 GPUs)" in lines[1]


def test_groups_that_can_all_be_placed_run_concurrently():
    models = {"gen": need("gen", 4), "judge": need("judge", 6, workers=6)}
    plan = plan_placement(RECIPE, models, [Node(8, 64), Node(8, 64)])
    assert plan.concurrent
    # turns: gen on node 1, judge on node 2, gen again on node 1 (4 free), then nothing fits
    assert [g.replicas for g in plan.groups] == [2, 1]
    assert sum(g.gpus * g.replicas for g in plan.groups) <= 16
    assert all("(concurrent)" in line for line in plan.describe())


def test_vllm_workers_never_share_a_group_with_a_bundle_of_several_gpus():
    """vLLM refuses a placement group with a bundle of more than one GPU, so a 2-GPU in-process
    model and a vLLM model go to separate groups although 4 GPUs fit a node."""
    models = {"gen": need("gen", 2), "judge": need("judge", 2, workers=2)}
    plan = plan_placement(RECIPE, models, [Node(8, 64)])
    assert [(g.first, g.last) for g in plan.groups] == [(0, 1), (2, 4)]
    assert plan.concurrent
    assert all(b.get("GPU", 0) <= 1 for b in plan.groups[1].bundles)


def test_a_model_larger_than_every_node_is_refused_by_name():
    models = {"gen": need("gen", 1), "judge": ModelNeed("judge", ("judge70b",), 16, (1.0,) * 16)}
    with pytest.raises(RunError) as err:
        plan_placement(RECIPE, models, [Node(8, 64), Node(4, 64)])
    assert "judge70b needs 16 GPUs" in str(err.value)
    assert "largest node of the cluster has (8)" in str(err.value)


def test_models_of_one_stage_that_cannot_share_a_node_are_refused():
    two = stages(("jury", ("a", "b")))
    with pytest.raises(RunError, match=r"stage 'jury' calls a \(6 GPUs\), b \(6 GPUs\)"):
        plan_placement(two, {"a": need("a", 6), "b": need("b", 6)}, [Node(8, 64)])


def test_fractions_share_a_gpu():
    models = {"gen": need("gen", 0.5), "judge": need("judge", 0.5)}
    (group,) = plan_placement(RECIPE, models, [Node(2, 64)]).groups
    assert group.bundles == [{"CPU": 1.0, "GPU": 1.0}]  # both on one GPU
    assert group.slots == {"gen": {"gpu": 0}, "judge": {"gpu": 0}}
    assert group.replicas == 2
    models = {"gen": need("gen", 0.25)}
    assert plan_placement(RECIPE, models, [Node(2, 64)]).groups[0].replicas == 2 * 4
    # 0.6 + 0.6 cannot share: two GPUs for the actor
    models = {"gen": need("gen", 0.6), "judge": need("judge", 0.6)}
    (group,) = plan_placement(RECIPE, models, [Node(2, 64)]).groups
    assert group.bundles == [{"CPU": 1.0, "GPU": 2.0}]
    assert {s["gpu"] for s in group.slots.values()} == {0, 1}


def test_workers_and_shards_cap_the_replicas():
    models = {"gen": need("gen", 1)}
    assert plan_placement(RECIPE, models, [Node(8, 64)]).groups[0].replicas == 8
    assert plan_placement(RECIPE, models, [Node(8, 64)], workers=3).groups[0].replicas == 3
    assert plan_placement(RECIPE, models, [Node(8, 64)], shards=2).groups[0].replicas == 2
    # CPUs bound it too: each replica's actor reserves one
    assert plan_placement(RECIPE, models, [Node(8, 2)]).groups[0].replicas == 2


def test_no_gpu_model_or_no_gpu_keeps_the_cpu_plan():
    remote = {"gen": need("gen", 0)}
    for models, nodes in ((remote, [Node(8, 64)]), ({"gen": need("gen", 1)}, [Node(0, 8)] * 3)):
        plan = plan_placement(RECIPE, models, nodes, shards=10)
        assert not plan.on_gpus and len(plan.groups) == 1
        assert plan.groups[0].replicas == len(nodes)  # one per node, as before
        assert plan.groups[0].bundles == []


def _recipe(tmp_path: Path, models: dict, **extra) -> dict:
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"p{k}", "prompt": f"What is {k} + {k}?"}) + "\n" for k in range(8)
        )
    )
    return {
        "name": "placed",
        "source": {"path": str(data), "id_field": "id"},
        "models": models,
        "stages": [
            {"type": "generate", "models": ["writer", "plain"], "n": 1, "max_tokens": 16},
            {"type": "pairwise_judge", "name": "pw", "model": "judge", "max_tokens": 8},
            {"type": "pairs", "judge": "pw"},
        ],
        "output": {"dir": str(tmp_path / "run")},
        "settings": {"shard_size": 2},
        **extra,
    }


def test_specs_sharing_a_backend_are_one_copy(tmp_path):
    double = {"backend": "gpu_double", "gpus": 4}
    models = {
        "writer": {**double, "model": "w", "system_prompt": "Give a long answer."},
        "plain": {**double, "model": "w"},
        "judge": {**double, "model": "j", "gpus": 2},
    }
    loaded = load_recipe(write_recipe(tmp_path, _recipe(tmp_path, models)))
    needs, by_key = recipe_needs(loaded)
    assert sorted(m.names for m in by_key.values()) == [("judge",), ("writer", "plain")]
    assert [len(s.models) for s in needs] == [1, 1, 0]
    (group,) = plan_placement(needs, by_key, [Node(8, 64)]).groups
    assert group.gpus == 4 + 2  # not 4 + 4 + 2


# --- the specs' GPU fields ------------------------------------------------------------------------


def test_gpus_default_by_where_the_model_runs():
    assert TransformersSpec(model="m").gpus_needed() == 1
    assert TransformersSpec(model="m", device="cpu").gpus_needed() == 0
    assert TransformersSpec(model="m", gpus=0.5).gpus_needed() == 0.5
    assert EmbeddedSpec().gpus_needed() == 0 and EmbeddedSpec(gpus=1).gpus_needed() == 1
    assert VLLMSpec(model="m").gpus_needed() == 1
    assert VLLMSpec(model="m", tensor_parallel_size=4, pipeline_parallel_size=2).gpus_needed() == 8
    assert VLLMSpec(model="m", engine_args={"tensor_parallel_size": 2}).worker_bundles() == [1, 1]
    assert ModelSpec(backend="remote").gpus_needed() == 0


def test_placement_fields_are_volatile(tmp_path):
    base = VLLMSpec(model=str(tmp_path))
    placed = VLLMSpec(model=str(tmp_path), tensor_parallel_size=2, gpus=2)
    assert placed.fingerprint() == base.fingerprint() and placed.identity() == base.identity()
    t = TransformersSpec(model=str(tmp_path))
    assert TransformersSpec(model=str(tmp_path), gpus=2).fingerprint() == t.fingerprint()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"backend": "vllm", "model": "m", "tensor_parallel_size": 4, "gpus": 2},
            "models.judge: gpus: 2 but tensor_parallel_size x pipeline_parallel_size is 4",
        ),
        (
            {
                "backend": "vllm",
                "model": "m",
                "tensor_parallel_size": 4,
                "engine_args": {"tensor_parallel_size": 2},
            },
            "models.judge: tensor_parallel_size: 4 and engine_args.tensor_parallel_size: 2 "
            "disagree",
        ),
        (
            {"backend": "vllm", "model": "m", "gpus": 0.5},
            "models.judge: gpus: 0.5 shares one GPU, but gpu_memory_utilization 0.9",
        ),
        (
            {"backend": "transformers", "model": "m", "device": "cpu", "gpus": 1},
            "models.judge: gpus: 1 with device: cpu",
        ),
        ({"backend": "transformers", "model": "m", "gpus": 1.5}, "models.judge.gpus: gpus: 1.5"),
    ],
)
def test_contradicting_gpu_settings_are_refused_with_their_yaml_path(tmp_path, spec, message):
    models = {"writer": {"backend": "gpu_double"}, "plain": {"backend": "gpu_double"}}
    path = write_recipe(tmp_path, _recipe(tmp_path, {**models, "judge": spec}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value)


def test_vllm_engine_gets_its_parallelism_and_its_bundles(monkeypatch):
    """What reaches vllm.LLM: the parallel sizes, and inside a replica the Ray backend with the
    bundles the plan gave it (set while the engine starts, restored after)."""
    from synthpref.backends import vllm_backend

    seen: dict = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen["kwargs"] = kwargs
            seen["env"] = {k: os.environ.get(k) for k in ("VLLM_RAY_BUNDLE_INDICES",
                                                          "VLLM_RAY_PER_WORKER_GPUS")}  # fmt: skip

    monkeypatch.setattr(vllm_backend, "_import_vllm", lambda: type("vllm", (), {"LLM": FakeLLM}))
    monkeypatch.setattr(vllm_backend, "_on_cpu", lambda: False)
    monkeypatch.delenv("VLLM_RAY_BUNDLE_INDICES", raising=False)
    spec = VLLMSpec(model="m", tensor_parallel_size=2, pipeline_parallel_size=2)
    vllm_backend._construct(spec)
    assert seen["kwargs"]["tensor_parallel_size"] == 2
    assert seen["kwargs"]["pipeline_parallel_size"] == 2
    assert "distributed_executor_backend" not in seen["kwargs"]
    vllm_backend._construct(spec.placed(bundles=(1, 2, 3, 4), bundle_gpus=1.0))
    assert seen["kwargs"]["distributed_executor_backend"] == "ray"
    assert seen["env"] == {"VLLM_RAY_BUNDLE_INDICES": "1,2,3,4", "VLLM_RAY_PER_WORKER_GPUS": "1"}
    assert "VLLM_RAY_BUNDLE_INDICES" not in os.environ


# --- on a local Ray cluster with 8 virtual GPUs ---------------------------------------------------


@pytest.fixture(scope="module")
def gpu_cluster():
    """A local cluster that declares 8 GPUs and 2 CPUs (so at most two replicas at once)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, num_gpus=8, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = old


def _both_ways(tmp_path: Path, models: dict) -> tuple[Path, Path, list[dict], list[str]]:
    """The recipe run by the local executor and by Ray; the Ray run's log lines and plan."""
    import synthpref

    runs = []
    for executor in ("local", "ray"):
        base = tmp_path / executor
        base.mkdir()
        log = base / "actors.jsonl"
        placed = {name: {**m, "log": str(log)} for name, m in models.items()}
        out = io.StringIO()
        path = write_recipe(base, _recipe(base, placed))
        synthpref.run(path, executor=executor, progress=False, console=Console(file=out))
        lines = log.read_text().splitlines() if log.exists() else []
        runs.append((base / "run", [json.loads(line) for line in lines], out.getvalue()))
    (local, no_log, _), (remote, entries, printed) = runs
    assert not no_log  # the local executor started no actor
    return local, remote, entries, printed.splitlines()


def _same_dataset(local: Path, remote: Path) -> None:
    assert _rows(remote) == _rows(local)
    assert _records(remote) == _records(local)
    assert _layout(remote) == _layout(local)


def test_models_that_cannot_share_the_gpus_run_one_group_after_the_other(tmp_path, gpu_cluster):
    double = {"backend": "gpu_double"}
    models = {
        "writer": {**double, "model": "writer", "gpus": 4, "system_prompt": "Give a long answer."},
        "plain": {**double, "model": "writer", "gpus": 4},
        "judge": {**double, "model": "judge", "gpus": 6},
    }
    local, remote, entries, printed = _both_ways(tmp_path, models)
    _same_dataset(local, remote)
    assert [line.split(":")[0] for line in printed if "ray plan" in line] == [
        "ray plan, group 1/2 (sequential)",
        "ray plan, group 2/2 (sequential)",
    ]
    writers = [e for e in entries if e["model"] == "writer"]
    judges = [e for e in entries if e["model"] == "judge"]
    # two replicas of 4 GPUs for the writer (built once per actor for both names), one of 6
    assert len(writers) == 2 and len({e["pg"] for e in writers}) == 2
    assert len(judges) == 1
    for group, gpus in ((writers, 4), (judges, 6)):
        for e in group:
            assert e["assigned"]["GPU"] == gpus and e["bundles"] == [{"CPU": 1, "GPU": gpus}]
            assert e["slot"] == {"gpu": 0}
    # when the judge's replica started, the writers' placement groups had been removed
    (judge,) = judges
    assert not {e["pg"] for e in writers} & set(judge["live"])
    assert sum(judge["live"].values()) <= 8

    # killed after the first group: the rerun starts no writer and counts every stage once
    rows = _rows(remote)
    for stage_dir in sorted((remote / "checkpoints").iterdir())[1:]:
        shutil.rmtree(stage_dir)
    import synthpref

    summary = synthpref.run(remote.parent / "recipe.yaml", executor="ray", progress=False)
    generate, pw, pairs = summary.to_dict()["stages"]
    assert generate["shards_resumed"] == 4 and generate["calls"] == 0
    assert pw["records_in"] == pairs["records_in"] == 8 and pw["shards_resumed"] == 0
    assert pw["calls"] == 0 and pw["cache_hits"] == 16  # the first run's verdicts, from the cache
    assert _rows(remote) == rows
    log = [json.loads(line) for line in (remote.parent / "actors.jsonl").read_text().splitlines()]
    assert [e["model"] for e in log[len(entries) :]] == ["judge"]


def test_groups_that_fit_at_once_run_concurrently_and_vllm_style_workers_get_bundles(
    tmp_path, gpu_cluster
):
    double = {"backend": "gpu_double"}
    models = {
        "writer": {**double, "model": "writer", "gpus": 2, "system_prompt": "Give a long answer."},
        "plain": {**double, "model": "writer", "gpus": 2},
        "judge": {**double, "model": "judge", "gpus": 2, "workers": 2},
    }
    local, remote, entries, printed = _both_ways(tmp_path, models)
    _same_dataset(local, remote)
    assert sum("(concurrent)" in line for line in printed) == 2
    (writer,) = [e for e in entries if e["model"] == "writer"]
    (judge,) = [e for e in entries if e["model"] == "judge"]
    assert writer["assigned"]["GPU"] == 2
    # the judge's actor holds no GPU: its two workers each got one GPU of their own bundles
    assert "GPU" not in judge["assigned"] or judge["assigned"]["GPU"] == 0
    assert judge["slot"] == {"bundles": [1, 2], "bundle_gpus": 1.0}
    assert judge["bundles"] == [{"CPU": 1}, {"GPU": 1}, {"GPU": 1}]
    probes = [ids for probe in judge["probes"] for ids in probe]
    assert len(probes) == 2 and len(set(probes)) == 2
    # both groups' placement groups were held at the same time
    assert {writer["pg"], judge["pg"]} <= set(judge["live"]) | set(writer["live"])
    assert any({writer["pg"], judge["pg"]} <= set(e["live"]) for e in (writer, judge))
