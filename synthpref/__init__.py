"""synthpref: synthetic preference datasets from YAML recipes.

The one obvious entry point is :func:`run`; the CLI's ``synthpref run`` calls it.

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
from synthpref.stages.base import Stage, StageParams

if TYPE_CHECKING:
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
    "Stage",
    "StageParams",
    "load_recipe",
    "parse_recipe",
    "run",
]


def run(
    recipe: str | Path | dict,
    *,
    fresh: bool = False,
    output: str | Path | None = None,
    progress: bool = True,
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
) -> RunResult:
    """Run a recipe (a YAML path or an already-parsed mapping); resumes unless ``fresh``.

    ``executor="ray"`` spreads shards over Ray actors (``pip install 'synthpref[ray]'``): ``address``
    of an existing cluster (``"auto"``, ``"ray://host:10001"``; default: start a local one) and
    ``workers``, the number of model replicas (default: one per GPU, else one per node)."""
    from synthpref.executor import create_executor

    loaded = parse_recipe(recipe) if isinstance(recipe, dict) else load_recipe(recipe)
    run_dir = Path(output) if output is not None else None
    return create_executor(
        loaded,
        executor,
        address=address,
        workers=workers,
        run_dir=run_dir,
        fresh=fresh,
        progress=progress,
    ).run()
