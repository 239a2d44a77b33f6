"""Kill runs with SIGKILL at random and at fragile points, resume them, and hold the result to an
uninterrupted run's: the same dataset, no completed model call made twice, and no judgment that failed
only because a server said 429 or 503.

Every stage kind runs (:func:`fault_fixtures.fault_recipe`), on the embedded backend and on the
OpenAI-compatible backend against a real ``vllm serve`` behind a proxy that injects 429/503. Kill
points are fixed per scenario and random ones are seeded, so a failure names what to rerun: each
scenario prints its kills (``pytest -s``) and every assertion message repeats them.

Every child costs a model load and its run up to the kill, so the default run holds one embedded
scenario that meets each kind of kill point once and one server run; the other scenarios are marked
``soak`` (``pytest -m soak tests/executor/test_fault_injection.py`` runs them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import write_recipe
from tests.fault_fixtures import (
    EMBEDDED_TOLERANCE,
    HOOK_MISSING,
    ChildRun,
    FaultProxy,
    KillPoint,
    dataset,
    differences,
    fault_recipe,
    journal_counts,
    journal_size,
    journal_times,
    leftover_temp_files,
    random_kill,
    run_child,
    run_in_process,
    stage_counters,
    transient_failures,
)

EMBEDDED_MODELS = {
    "a": {"backend": "embedded"},
    "b": {"backend": "embedded", "system_prompt": "Answer in one short sentence."},
}

#: a seeded-random kill yet to be placed: ("random", seed, share of the remaining results it may
#: land after, so that the fixed kill points after it are still ahead)
RANDOM = "random"

#: kills in order, each in a fresh child of the same run, every one reached only after the previous
#: resume: a scenario costs about one run of compute plus a child (imports, model load) per kill.
#: The first meets every kind of kill point once; the others (``soak``) vary where they land.
SCENARIOS: dict[str, list] = {
    "one-of-each": [
        # among the first third of the results: generate shard 2 is not checkpointed before then
        (RANDOM, 1, 1 / 3),
        KillPoint("checkpoint-torn", "generate", shard=2),
        KillPoint("call", "rating", shard=2, nth=1),  # between the results of one batch
        KillPoint("checkpoint-partial", "rating", shard=2),
        KillPoint("checkpoint-written", "flr", shard=2),  # the last model stage's last shard
    ],
    "mid-call-and-checkpoint-writes": [
        KillPoint("call", "generate", shard=1, nth=1),  # between the results of one batch
        KillPoint("checkpoint-partial", "rating", shard=1),
        KillPoint("call", "flr", shard=1, nth=3),
        KillPoint("checkpoint-written", "flr", shard=2),
    ],
    "torn-checkpoint-then-annotator-rubric-filter": [
        KillPoint("checkpoint-torn", "generate", shard=1),
        KillPoint("checkpoint-partial", "route", shard=2),
        KillPoint("call", "rating", shard=2, nth=1),
        KillPoint("checkpoint-partial", "length_bias_filter", shard=2),
    ],
}
#: seeds of scenarios killed three times at seeded-random points (see fault_fixtures.random_kill)
RANDOM_SEEDS = [1, 2]
for _seed in RANDOM_SEEDS:
    SCENARIOS[f"random-seed-{_seed}"] = [(RANDOM, _seed + 100 * k, 1.0) for k in range(3)]
DEFAULT_SCENARIOS = {"one-of-each"}

#: the same server answering the same requests in other batches
SERVER_TOLERANCE = 1e-4


@dataclass
class Reference:
    run_dir: Path
    dataset: dict[str, list[dict]] = field(repr=False)
    counters: dict[str, dict] = field(repr=False)
    times: list[float] = field(repr=False)


def _uninterrupted(tmp: Path, models: dict) -> Reference:
    tmp.mkdir(parents=True, exist_ok=True)
    run_dir = tmp / "run"
    run_in_process(write_recipe(tmp, fault_recipe(tmp, models, run_dir)))
    cache = run_dir / "cache.sqlite"
    twice = {k: n for k, n in journal_counts(cache).items() if n > 1}
    assert not twice, f"an uninterrupted run computed {len(twice)} request(s) twice"
    return Reference(run_dir, dataset(run_dir), stage_counters(run_dir), journal_times(cache))


@pytest.fixture(scope="module")
def embedded_reference(tmp_path_factory) -> Reference:
    return _uninterrupted(tmp_path_factory.mktemp("reference"), EMBEDDED_MODELS)


def _kill(
    recipe: Path, env: dict, kill, cache: Path, ref: Reference, log: list[str]
) -> ChildRun | None:
    """Start a child and kill it at ``kill``; None when a random kill found no point left."""
    if isinstance(kill, tuple):
        _, seed, share = kill
        kill = random_kill(seed, ref.times[journal_size(cache) :], share)
        if kill is None:
            return None
    print(f"  kill {len(log) + 1}: {kill}")
    child = run_child(recipe, env, kill, cache=cache)
    log.append(str(kill) if child.killed else f"{kill} (exited {child.returncode} first)")
    assert child.returncode != HOOK_MISSING, f"{kill}: {child.tail()}"
    return child


def _finish(recipe: Path, env: dict, log: list[str], attempts: int = 1) -> None:
    """Rerun to completion; ``attempts`` > 1 allows runs that stop on an error worth a rerun."""
    for _ in range(attempts):
        child = run_child(recipe, env)
        if child.returncode == 0:
            return
        log.append(f"resume exited {child.returncode}: {child.tail(3)}")
    pytest.fail(f"no resume completed after {' -> '.join(log)}:\n{child.tail()}")


def _check_resumed(run_dir: Path, ref: Reference, tol: float, log: list[str]) -> None:
    story = " -> ".join(log)
    twice = {k[:12]: n for k, n in journal_counts(run_dir / "cache.sqlite").items() if n > 1}
    assert not twice, f"after {story}: completed calls computed again: {twice}"
    transient = transient_failures(run_dir)
    assert not transient, f"after {story}: transient errors became failed judgments: {transient}"
    diffs = differences(dataset(run_dir), ref.dataset, tol)
    assert not diffs, (
        f"after {story}: the dataset differs from the uninterrupted run's in {len(diffs)} "
        "place(s):\n" + "\n".join(diffs[:15])
    )
    counters = differences(stage_counters(run_dir), ref.counters, 0.0, "summary")
    assert not counters, f"after {story}: stage counters differ: {counters}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario",
    [pytest.param(s, marks=() if s in DEFAULT_SCENARIOS else pytest.mark.soak) for s in SCENARIOS],
)
def test_killed_and_resumed_run_equals_an_uninterrupted_one(
    scenario, tmp_path, embedded_reference, subprocess_env
):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, fault_recipe(tmp_path, EMBEDDED_MODELS, run_dir))
    cache = run_dir / "cache.sqlite"
    print(f"\nscenario {scenario}")
    log: list[str] = []
    for kill in SCENARIOS[scenario]:
        child = _kill(recipe, subprocess_env, kill, cache, embedded_reference, log)
        # the default scenario must meet each of its kill points; a soak one may run out of them
        assert child is not None or scenario not in DEFAULT_SCENARIOS, (
            f"{' -> '.join(log)}: no result was left for the random kill {kill}"
        )
        assert child is None or child.killed, (
            f"{' -> '.join(log)}: the run was not killed (exit {child.returncode}); the kill "
            f"point was never reached:\n{child.tail()}"
        )
    _finish(recipe, subprocess_env, log)
    print(f"  leftover temporary files: {leftover_temp_files(run_dir) or 'none'}")
    _check_resumed(run_dir, embedded_reference, EMBEDDED_TOLERANCE, log)


#: retries of the server spec: few, so that a storm outlasts them
MAX_RETRIES = 2
#: scoring requests of one shard of fault_recipe: 1 prompt x 2 candidates x 2 follow-ups
FLR_REQUESTS = 4
#: a 429 storm on scoring as long as every attempt of one shard's score requests: it cannot end
#: before one of those requests has run out of retries
STORM = (1.0, (MAX_RETRIES + 1) * FLR_REQUESTS, (429,))


def _server_models(server, proxy: FaultProxy) -> dict:
    spec = {
        "backend": "openai",
        "model": server.model,
        "base_url": proxy.base_url,
        "tokenizer": str(server.model_dir),
        "max_concurrency": 4,
        "max_retries": MAX_RETRIES,
    }
    return {"a": spec, "b": {**spec, "system_prompt": "Answer in one short sentence."}}


def _faulty_run(tmp: Path, models: dict) -> tuple[Path, Path]:
    tmp.mkdir()
    run_dir = tmp / "run"
    return write_recipe(tmp, fault_recipe(tmp, models, run_dir)), run_dir


@contextmanager
def _proxied(tmp_path: Path, vllm_server, seed: int) -> Iterator[tuple]:
    """The server tests' set-up: a fault proxy (``seed``) in front of ``vllm_server``, the
    reference run through it before any fault, and the recipe and run dir of the faulty run;
    yields (proxy, reference, recipe, run dir)."""
    with FaultProxy(vllm_server.base_url.removesuffix("/v1"), seed=seed) as proxy:
        models = _server_models(vllm_server, proxy)
        ref = _uninterrupted(tmp_path / "reference", models)
        assert not proxy.stats[429] and not proxy.stats[503]
        recipe, run_dir = _faulty_run(tmp_path / "faulty", models)
        yield proxy, ref, recipe, run_dir


@pytest.mark.vllm
def test_server_returning_429_and_503_and_sigkill_change_nothing(
    tmp_path, vllm_server, subprocess_env
):
    """Three children: one killed inside the log-prob judge (it scores through /v1/completions)
    while both endpoints answer scattered 429/503, each request meeting at most ``max_retries`` of
    them, so retries get past every one; one stopped by a 429 storm on scoring that outlasts every
    retry (the shard stops, no judgment is written); one that finishes."""
    seed = 5
    with _proxied(tmp_path, vllm_server, seed) as (proxy, ref, recipe, run_dir):
        cache = run_dir / "cache.sqlite"
        log: list[str] = [f"proxy seed {seed}"]

        proxy.inject(
            per_request=MAX_RETRIES, chat=(0.3, 10, (429, 503)), completions=(0.5, 6, (429, 503))
        )
        print(f"\nproxy seed {seed}: faults {proxy.faults}, per request {MAX_RETRIES}")
        kill = KillPoint("call", "flr", shard=1, nth=2)
        child = _kill(recipe, subprocess_env, kill, cache, ref, log)
        assert child and child.killed, (
            f"{' -> '.join(log)}: not killed: retries did not get past scattered faults, or the "
            f"kill point was never reached:\n{child and child.tail()}"
        )
        scattered = {k: n for k, n in proxy.stats.items() if isinstance(k, str) and " " in k}
        assert any(k.startswith("chat") for k in scattered), f"no fault on generation: {scattered}"
        assert any(k.startswith("completions") for k in scattered), f"none on scoring: {scattered}"

        proxy.inject(completions=STORM)
        print(f"  429 storm on scoring: {proxy.faults}")
        stopped = run_child(recipe, subprocess_env)
        log.append(f"429 storm: exited {stopped.returncode}")
        assert not stopped.killed and stopped.returncode != 0, (
            f"{' -> '.join(log)}: the storm did not stop the run:\n{stopped.tail()}"
        )
        assert "HTTP 429" in stopped.stderr, f"stopped on something else:\n{stopped.tail()}"
        storm = proxy.stats["completions 429"] - scattered.get("completions 429", 0)
        assert storm > MAX_RETRIES, f"a run stopped after {storm} 429s on scoring"

        proxy.inject()
        _finish(recipe, subprocess_env, log)
        print(f"  proxy: {dict(proxy.stats)}")
    _check_resumed(run_dir, ref, SERVER_TOLERANCE, log)


#: the soak variant's kills: at a seeded-random point, then inside the log-prob judge
SERVER_KILLS = [(RANDOM, 5, 1.0), KillPoint("call", "flr", shard=1, nth=2)]


@pytest.mark.vllm
@pytest.mark.soak
def test_server_storm_and_random_kills_change_nothing(tmp_path, vllm_server, subprocess_env):
    """Faults with no cap per request, long enough that runs stop on them again and again, a
    random kill among them, each kill and the finish rerun until they get through."""
    seed = 5
    with _proxied(tmp_path, vllm_server, seed) as (proxy, ref, recipe, run_dir):
        cache = run_dir / "cache.sqlite"
        # scattered 429/503 on generation; on scoring a rate-limit storm that outlasts every retry
        proxy.inject(chat=(0.5, 20, (429, 503)), completions=(1.0, 60, (429,)))
        print(f"\nproxy seed {seed}: faults {proxy.faults}")
        log: list[str] = [f"proxy seed {seed}"]
        landed = 0
        for kill in SERVER_KILLS:
            # A run may stop first on a transient error that outlasted its retries: rerun it.
            for _ in range(6):
                child = _kill(recipe, subprocess_env, kill, cache, ref, log)
                if child is None or child.killed or child.returncode == 0:
                    landed += bool(child and child.killed)
                    break
        _finish(recipe, subprocess_env, log, attempts=10)
        print(f"  proxy: {dict(proxy.stats)}")
        assert proxy.stats[429] + proxy.stats[503] > 0, "the proxy injected no fault"
        assert landed, f"no kill landed: {' -> '.join(log)}"
    _check_resumed(run_dir, ref, SERVER_TOLERANCE, log)
