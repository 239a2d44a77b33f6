"""Reading, validating and instantiating recipes, with errors that name the YAML path."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from synthpref.backends.specs import ModelSpec, spec_class
from synthpref.recipes.schema import Recipe
from synthpref.stages.base import Stage
from synthpref.stages.registry import UnknownStage, resolve_stage

DEFAULT_MODEL = "default"


class RecipeError(ValueError):
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


def _loc(parts: tuple) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _problems(exc: ValidationError, prefix: tuple = ()) -> list[str]:
    out = []
    for err in exc.errors():
        loc = _loc(prefix + tuple(err["loc"]))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `synthpref stages` lists every parameter)"
        out.append(f"{loc or '<root>'}: {msg}")
    return out


def load_recipe(path: str | Path) -> LoadedRecipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(str(path), [f"cannot read the file: {exc.strerror}"]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), [f"not valid YAML: {exc}"]) from exc
    loaded = parse_recipe(raw, source=str(path), base_dir=path.parent.resolve())
    loaded.path = path
    return loaded


def parse_recipe(raw: Any, source: str = "<recipe>", base_dir: Path | None = None) -> LoadedRecipe:
    if not isinstance(raw, dict):
        raise RecipeError(
            source, ["<root>: a recipe is a mapping (key: value), not " + type(raw).__name__]
        )
    try:
        recipe = Recipe.model_validate({**raw, "base_dir": base_dir or Path.cwd()})
    except ValidationError as exc:
        raise RecipeError(source, _problems(exc)) from exc
    problems: list[str] = []

    models: dict[str, ModelSpec] = {}
    raw_models = dict(recipe.models)
    raw_models.setdefault(DEFAULT_MODEL, {"backend": "embedded"})
    for name, spec in raw_models.items():
        if not isinstance(spec, dict):
            problems.append(f"models.{name}: a model is a mapping with at least 'backend'")
            continue
        spec = {"backend": "embedded", **spec}
        try:
            models[name] = spec_class(spec["backend"]).model_validate(spec)
        except ValueError as exc:
            if isinstance(exc, ValidationError):
                problems += _problems(exc, ("models", name))
            else:
                problems.append(f"models.{name}.backend: {exc}")

    stages: list[Stage] = []
    names: set[str] = set()
    for i, spec in enumerate(recipe.stages):
        where = f"stages[{i}]"
        try:
            cls = resolve_stage(spec.type)
        except UnknownStage as exc:
            problems.append(f"{where}.type: {exc}")
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
            continue
        stage = cls(name, params)
        for model in stage.models_used():
            if model not in models and f"models.{model}" not in " ".join(problems):
                problems.append(
                    f"{where}: uses model {model!r}, which is not declared under 'models' "
                    f"(declared: {', '.join(sorted(models))})"
                )
        problems += [f"{where}: {p}" for p in stage.check(stages)]
        stages.append(stage)

    if not problems:
        problems += _capability_problems(stages, models)
    if problems:
        raise RecipeError(source, problems)
    from synthpref.judges.base import self_preference_warnings

    warnings = self_preference_warnings(stages, models)
    return LoadedRecipe(recipe=recipe, models=models, stages=stages, raw=raw, warnings=warnings)


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
    if "score" in missing:
        return (
            "scoring judges need a backend that returns log-probabilities of given text: embedded, "
            "transformers, vllm, or openai with a completions server and a 'tokenizer' (e.g. vllm serve)"
        )
    return "choose a backend that supports it"
