"""Checks a loaded recipe must pass before anything runs, shared by ``synthpref.run()``,
``synthpref.validate()`` and so by the CLI, which only calls those two.

Loading (``recipes.loader``) checks a recipe's shape. These check it against what a run needs besides:
data for every output format, an API key for every hosted model it calls, and a run directory that can
be created. A run stops on any of them before it loads a model or writes a file; ``validate`` reports a
key that is unset only as a warning, since keys are often set just for the run.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from synthpref.errors import DataError
from synthpref.recipes.loader import LoadedRecipe, RecipeError, load_recipe, parse_recipe


class OutputDirError(DataError, ValueError):
    """The run directory cannot be created or written."""


def checked_recipe(
    recipe: str | Path | Mapping, *, for_run: bool
) -> tuple[LoadedRecipe, list[str]]:
    """The loaded recipe and its warnings; RecipeError names every problem by its YAML path."""
    if isinstance(recipe, Mapping):
        loaded = parse_recipe(dict(recipe))
        source = "<recipe>"
    else:
        loaded = load_recipe(recipe)
        source = str(recipe)
    from synthpref.export.needs import recipe_problems

    problems = recipe_problems(loaded.recipe.output.formats, loaded.stages)
    problems += seed_problems(loaded)
    key_problems, key_warnings = api_key_notes(loaded)
    key_warnings += cost_and_batch_notes(loaded)
    if for_run:
        problems += key_problems
    else:
        key_warnings += [f"{p}; `synthpref run` stops until it is set" for p in key_problems]
    if problems:
        raise RecipeError(source, problems)
    return loaded, [*loaded.warnings, *key_warnings]


def api_key_notes(loaded: LoadedRecipe) -> tuple[list[str], list[str]]:
    """(problems, warnings) about API keys of the models the stages call: a model on the OpenAI API
    (no ``base_url``) cannot run without one; a remote ``base_url`` may want one."""
    used = {name for stage in loaded.stages for name in stage.models_used()}
    problems, warnings = [], []
    for name in sorted(used & loaded.models.keys()):
        spec: Any = loaded.models[name]
        env = getattr(spec, "api_key_env", None)
        if not env or os.environ.get(env):
            continue
        where = f"models.{name}.api_key_env"
        base_url = getattr(spec, "base_url", None)
        problem = spec.missing_key()
        if problem:
            problems.append(f"{where}: {problem}")
        elif not _is_local(base_url):
            warnings.append(
                f"{where}: the environment variable {env} is unset, so requests to {base_url} "
                "carry no API key; set it if that server wants one"
            )
    return problems, warnings


def seed_problems(loaded: LoadedRecipe) -> list[str]:
    """A ``source.seeds`` recipe starts from records without prompts: its first stage must write
    them."""
    if loaded.recipe.source.seeds is None or not loaded.stages:
        return []
    first = loaded.stages[0]
    if first.writes_prompts:
        return []
    from synthpref.stages.registry import STAGES

    writers = sorted(
        name
        for name in STAGES.builtin_names()
        if getattr(STAGES.find(name), "writes_prompts", False)
    )
    return [
        f"stages[0] ({first.name}): source.seeds gives records with no prompt, so the first stage "
        f"must write prompts; {first.type_name!r} does not"
        + (f" (prompt-writing stages: {', '.join(writers)})" if writers else "")
    ]


def cost_and_batch_notes(loaded: LoadedRecipe) -> list[str]:
    """Warnings about money: a hosted model without a price under ``max_cost_usd`` (its calls
    could not be counted), and ``mode: batch`` models that some stage calls for scoring or reward
    (only generation goes through batch jobs; those calls go online)."""
    notes = []
    capped = loaded.recipe.settings.max_cost_usd is not None
    for stage in loaded.stages:
        for name, needs in stage.requirements().items():
            spec: Any = loaded.models.get(name)
            if spec is None:
                continue
            if getattr(spec, "mode", "online") == "batch" and needs - {
                "generate",
                "json_schema",
                "top_logprobs",
                "prefill",
            }:
                what = " and ".join(sorted(needs & {"score", "reward"}))
                notes.append(
                    f"models.{name}.mode: batch covers generation only; stage {stage.name!r} asks "
                    f"{name!r} for {what}, which goes online (at online prices)"
                )
    if capped:
        used = {n for stage in loaded.stages for n in stage.models_used()}
        for name in sorted(used & loaded.models.keys()):
            spec = loaded.models[name]
            # a hosted API (no base_url) bills; a self-hosted server or local model does not
            hosted = getattr(spec, "base_url", "local") is None
            if hosted and spec.effective_price() is None:
                notes.append(
                    f"models.{name}.price: {spec.display_name()!r} is not in the shipped price "
                    "table, so its calls are not counted against settings.max_cost_usd; set "
                    "price: {input: ..., output: ...} (US dollars per million tokens)"
                )
    return notes


def executor_problems(loaded: LoadedRecipe, executor: str) -> list[str]:
    """What the chosen executor cannot do: the Ray executor's workers keep their own caches, so
    neither batch jobs (recorded in the run's cache) nor a run-wide spending cap work there, and
    they process shards in parallel, so no stage that carries state across shards does."""
    if executor == "local":
        return []
    problems = []
    if loaded.recipe.settings.max_cost_usd is not None:
        problems.append(
            f"settings.max_cost_usd: the {executor} executor cannot enforce a spending cap "
            "(workers spend independently); run with the local executor or remove the cap"
        )
    for i, stage in enumerate(loaded.stages):
        if stage.carries_state:
            problems.append(
                f"stages[{i}] ({stage.name}): its decisions for a shard depend on every shard "
                f"before it, which the {executor} executor processes in parallel; use the local "
                "executor"
            )
    for name, spec in loaded.models.items():
        if getattr(spec, "mode", "online") == "batch":
            problems.append(
                f"models.{name}.mode: batch jobs are recorded in the run's own cache, which the "
                f"{executor} executor's workers do not write; use the local executor (the "
                "provider does the work in batch mode anyway) or mode: online"
            )
    return problems


def _is_local(base_url: str) -> bool:
    """A server on this machine or a private network (a self-hosted vLLM), which needs no key."""
    host = (urlparse(base_url).hostname or "").lower()
    if (
        host == "localhost"
        or host.endswith((".localhost", ".local", ".internal"))
        or "." not in host
    ):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified


def check_run_dir_writable(run_dir: Path, label: str) -> None:
    """Refuse a run directory that is a file, lies under a file, or cannot be written, before the
    run starts rather than after the input has loaded. ``label`` is where it was named."""
    path = Path(run_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{label}: {run_dir} is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"{label}: cannot create {run_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"{label}: cannot write to {existing} (permission denied)")
