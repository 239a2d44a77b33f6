"""synthpref: synthetic preference datasets from YAML recipes.

The one obvious entry point is :func:`run`, and :func:`validate` checks a recipe without running it;
the CLI's ``synthpref run`` and ``synthpref validate`` call them.

    import synthpref
    result = synthpref.run("recipes/quickstart.yaml")
    result.outputs["preference"]   # path of the TRL preference dataset
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from synthpref.backends.types import GenerationRequest, SamplingParams, ScoreRequest
from synthpref.recipes.loader import RecipeError, load_recipe, parse_recipe
from synthpref.records import Candidate, Judgment, Message, Pair, Record
from synthpref.sources import SourceError
from synthpref.stages.base import Stage, StageParams

if TYPE_CHECKING:
    from rich.console import Console

    from synthpref.executor.local import RunResult

__version__ = "0.1.0"
__all__ = [
    "Candidate",
    "GenerationRequest",
    "Judgment",
    "Message",
    "Pair",
    "RecipeError",
    "Record",
    "SamplingParams",
    "ScoreRequest",
    "SourceError",
    "Stage",
    "StageParams",
    "load_recipe",
    "parse_recipe",
    "run",
    "validate",
]


def validate(recipe: str | Path | dict) -> list[str]:
    """Check a recipe without running anything: its schema, models, stages, capabilities, what its
    output formats need, and its models' API keys. Returns the warnings (self-preference, keys that
    are unset now); raises :class:`RecipeError` naming every problem by its YAML path."""
    from synthpref.checks import checked_recipe

    return checked_recipe(recipe, for_run=False)[1]


def run(
    recipe: str | Path | dict,
    *,
    fresh: bool = False,
    output: str | Path | None = None,
    progress: bool = True,
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
    console: Console | None = None,
    batch_wait: bool | None = None,
) -> RunResult:
    """Run a recipe (a YAML path or an already-parsed mapping); resumes unless ``fresh``.

    Every check of :func:`validate` runs first, and an unset API key or an unusable run directory
    stops the run too, all before any model loads. Warnings and progress go to ``console`` (default:
    standard error).

    ``executor="ray"`` spreads shards over Ray actors (``pip install 'synthpref[ray]'``): ``address``
    of an existing cluster (``"auto"``, ``"ray://host:10001"``; default: start a local one) and
    ``workers``, the most model replicas per stage group (default: as many as the placement plan
    fits, docs/ray.md).
    ``batch_wait`` overrides ``settings.batch.wait`` (``mode: batch`` models)."""
    from rich.console import Console

    from synthpref.checks import check_run_dir_writable, checked_recipe, executor_problems
    from synthpref.console import say
    from synthpref.executor import create_executor
    from synthpref.recipes.loader import RecipeError

    console = console or Console(stderr=True)
    loaded, warnings = checked_recipe(recipe, for_run=True)
    problems = executor_problems(loaded, executor)
    if problems:
        raise RecipeError(str(loaded.path or "<recipe>"), problems)
    if batch_wait is not None:
        settings = loaded.recipe.settings
        batch = settings.batch.model_copy(update={"wait": batch_wait})
        loaded.recipe = loaded.recipe.model_copy(
            update={"settings": settings.model_copy(update={"batch": batch})}
        )
    for warning in warnings:
        say(console, warning, label="warning:", style="yellow")
    if output is not None:
        run_dir, label = Path(output), "output (--output)"
    else:
        run_dir, label = loaded.recipe.resolve(loaded.recipe.output.dir), "output.dir"
    check_run_dir_writable(run_dir, label)
    return create_executor(
        loaded,
        executor,
        address=address,
        workers=workers,
        run_dir=run_dir,
        fresh=fresh,
        console=console,
        progress=progress,
    ).run()
