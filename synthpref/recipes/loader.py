"""Reading, validating and instantiating recipes, with errors that name the YAML path."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from synthpref.backends.specs import ModelSpec, spec_class
from synthpref.errors import ConfigError
from synthpref.recipes.schema import Recipe, StageSpec
from synthpref.recipes.yaml_text import read_yaml, yaml_path
from synthpref.stages.base import Stage
from synthpref.stages.registry import UnknownStage, resolve_stage

DEFAULT_MODEL = "default"


class RecipeError(ConfigError, ValueError):
    """Everything wrong with a recipe, one problem per line, each with its YAML path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"invalid recipe {source}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class LoadedRecipe:
    recipe: Recipe
    models: dict[str, ModelSpec]
    stages: list[Stage]
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _problems(exc: ValidationError, prefix: tuple = ()) -> list[str]:
    out = []
    for err in exc.errors():
        loc = yaml_path(prefix + tuple(err["loc"]))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `synthpref stages` lists every parameter)"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        out.append(f"{loc or '<root>'}: {msg}")
    return out


def load_recipe(path: str | Path) -> LoadedRecipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(str(path), [f"cannot read the file: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise RecipeError(
            str(path),
            [
                f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); save it as UTF-8"
            ],
        ) from None
    try:
        raw, duplicates = read_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), [f"not valid YAML: {exc}"]) from exc
    loaded = parse_recipe(
        raw, source=str(path), base_dir=path.parent.resolve(), problems=duplicates
    )
    loaded.path = path
    return loaded


def parse_recipe(
    raw: Any,
    source: str = "<recipe>",
    base_dir: Path | None = None,
    problems: list[str] | None = None,
) -> LoadedRecipe:
    """Validate a recipe mapping; every problem in it is reported at once, each with its YAML path.

    Files the recipe names are relative to ``base_dir`` (a recipe file's folder; by default the
    working directory). ``problems`` are ones already found in the text (duplicate keys).
    """
    problems = list(problems or [])
    if not isinstance(raw, dict):
        raise RecipeError(
            source, ["<root>: a recipe is a mapping (key: value), not " + type(raw).__name__]
        )
    base_dir = base_dir or Path.cwd()
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate({**raw, "base_dir": base_dir})
        stage_specs = list(enumerate(recipe.stages))
        complete = True
        raw_models = dict(recipe.models)
    except ValidationError as exc:
        problems += _problems(exc)
        # the second pass still checks what can be checked, so one run of validate lists everything
        stage_specs = _valid_stage_specs(raw.get("stages"))
        complete = isinstance(raw.get("stages"), list) and len(stage_specs) == len(raw["stages"])
        raw_models = dict(raw["models"]) if isinstance(raw.get("models"), dict) else {}

    models = _models(raw_models, problems)
    stages = _stages(stage_specs, models, base_dir, problems, complete)

    if not problems:
        problems += _capability_problems(stages, models)
    if problems or recipe is None:
        raise RecipeError(source, problems)
    for i, stage in enumerate(stages):
        stage.bind(stages[:i])
    from synthpref.judges.self_preference import self_preference_warnings

    warnings = self_preference_warnings(stages, models)
    return LoadedRecipe(recipe=recipe, models=models, stages=stages, raw=raw, warnings=warnings)


def _valid_stage_specs(raw_stages: Any) -> list[tuple[int, StageSpec]]:
    """The stage entries that are well-formed on their own (the others are reported already)."""
    if not isinstance(raw_stages, list):
        return []
    out = []
    for i, item in enumerate(raw_stages):
        try:
            out.append((i, StageSpec.model_validate(item)))
        except ValidationError:
            continue
    return out


def _models(raw_models: dict[str, Any], problems: list[str]) -> dict[str, ModelSpec]:
    models: dict[str, ModelSpec] = {}
    raw_models.setdefault(DEFAULT_MODEL, {"backend": "embedded"})
    for name, spec in raw_models.items():
        if not isinstance(spec, dict):
            problems.append(f"models.{name}: a model is a mapping with at least 'backend'")
            continue
        spec = {"backend": "embedded", **spec}
        if not isinstance(spec["backend"], str):
            problems.append(
                f"models.{name}.backend: one backend name (embedded, transformers, vllm, openai, "
                f"...), not a {type(spec['backend']).__name__}"
            )
            continue
        try:
            models[name] = spec_class(spec["backend"]).model_validate(spec)
        except ValueError as exc:
            if isinstance(exc, ValidationError):
                problems += _problems(exc, ("models", name))
            else:
                problems.append(f"models.{name}.backend: {exc}")
    return models


def _stages(
    specs: list[tuple[int, StageSpec]],
    models: dict[str, ModelSpec],
    base_dir: Path,
    problems: list[str],
    complete: bool = True,
) -> list[Stage]:
    """Build each stage and check it against the stages before it.

    Once a stage cannot be built (or its entry was malformed, ``complete`` false), later stages skip
    the checks of their place in the recipe: those would compare against a list missing that stage
    ("put a generate stage before it" when there is one). Their parameters and models are still
    checked.
    """
    stages: list[Stage] = []
    names: set[str] = set()
    for i, spec in specs:
        where = f"stages[{i}]"
        try:
            cls = resolve_stage(spec.type)
        except UnknownStage as exc:
            problems.append(f"{where}.type: {exc}")
            complete = False
            continue
        name = spec.name or getattr(cls, "type_name", spec.type)
        if name in names:
            problems.append(
                f"{where}.name: another stage is already named {name!r}; give each a unique name"
            )
        names.add(name)
        try:
            params = cls.Params.model_validate(spec.params())
        except ValidationError as exc:
            problems += _problems(exc, ("stages", i))
            complete = False
            continue
        stage = cls(name, params)
        stage.base_dir = base_dir
        for model in stage.models_used():
            if model not in models and f"models.{model}" not in " ".join(problems):
                problems.append(
                    f"{where}: uses model {model!r}, which is not declared under 'models' "
                    f"(declared: {', '.join(sorted(models))})"
                )
        if complete:
            problems += [f"{where}: {p}" for p in stage.check(stages)]
        stages.append(stage)
    return stages


def _capability_problems(stages: list[Stage], models: dict[str, ModelSpec]) -> list[str]:
    problems = []
    for i, stage in enumerate(stages):
        for model, needed in stage.requirements().items():
            caps = models[model].capabilities()
            missing = sorted(set(needed) - caps)
            if missing:
                problems.append(
                    f"stages[{i}] ({stage.name}): model {model!r} (backend "
                    f"{models[model].backend}) cannot {', '.join(missing)}; "
                    + _capability_hint(missing)
                )
    return problems


def _capability_hint(missing: list[str]) -> str:
    if "reward" in missing:
        return (
            "reward-model judges need a sequence-classification reward model: a transformers or "
            "vllm model with task: reward (an AutoModelForSequenceClassification directory), or "
            "openai with task: reward pointing at a pooling server (vllm serve of a reward model)"
        )
    if "generate" in missing:
        return (
            "a model with task: reward only scores conversations for reward-model judges; give "
            "this stage a generating model (task: generate, the default) declared as its own spec"
        )
    if "score" in missing:
        return (
            "scoring judges need a backend that returns log-probabilities of given text: embedded, "
            "transformers, vllm, or openai with a completions server and a 'tokenizer' (e.g. vllm serve), "
            "with task: generate (the default; a task: reward model only runs reward-model judges)"
        )
    if "complete" in missing:
        return (
            "prompt synthesis from the chat template (magpie) needs a model that continues raw "
            "text: embedded, transformers, vllm, or openai with a 'tokenizer' (a local copy of the "
            "served model's) on a server with /v1/completions (e.g. vllm serve)"
        )
    return "choose a backend that supports it"
