"""Finding a stage class from the name a recipe gives.

Three ways, so users extend synthpref without forking it: a built-in name (``generate``), an entry
point in the ``synthpref.stages`` or ``synthpref.judges`` group of an installed package, or a
``module:Class`` import path. ``STAGES`` is a :class:`synthpref.registry.Registry`, the type that
backends and output formats use too; the shipped stages fill its built-in table through
``@register_stage`` when ``synthpref.builtin_stages`` is imported (on the first lookup).
"""

from __future__ import annotations

import inspect
from typing import get_args

from synthpref.registry import Registry, UnknownName
from synthpref.stages.base import Stage, StageKind

ENTRY_POINT_GROUPS = ("synthpref.stages", "synthpref.judges")


class UnknownStage(UnknownName):
    """A stage type that does not resolve: unknown, failing to import, or not a usable Stage."""


def _checked(obj: object, where: str, name: str = "") -> type[Stage]:
    if not (isinstance(obj, type) and issubclass(obj, Stage)):
        what = f"the class {obj.__name__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise UnknownStage(
            f"{where} is {what}, not a synthpref Stage subclass; a custom judge subclasses "
            "synthpref.judges.base.JudgeStage (or synthpref.stages.base.Stage), see "
            "docs/custom-judges.md"
        )
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        raise UnknownStage(f"{where}: {obj.__name__} does not implement {missing}")
    if getattr(obj, "kind", None) not in get_args(StageKind):
        raise UnknownStage(
            f"{where}: {obj.__name__} needs a class attribute kind = one of "
            f"{', '.join(repr(k) for k in get_args(StageKind))} (a judge: kind = 'judge')"
        )
    if not isinstance(getattr(obj, "type_name", None), str):
        obj.type_name = f"{obj.__module__}:{obj.__qualname__}"
    return obj


def _is_stage_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, Stage) and not inspect.isabstract(value)


STAGES: Registry[type[Stage]] = Registry(
    "stage",
    ENTRY_POINT_GROUPS,
    validate=_checked,
    name_of=lambda cls: cls.type_name,
    bootstrap=("synthpref.builtin_stages",),
    error=UnknownStage,
    noun="stage type",
    hint=" (or give a custom class as 'module:Class', or install a package that registers it under "
    "the 'synthpref.judges' or 'synthpref.stages' entry-point group)",
    import_paths="Stage classes",
    is_candidate=_is_stage_class,
)


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: a stage under its ``type_name`` (every shipped stage uses it)."""
    return STAGES.register(cls)


def builtin_stages() -> dict[str, type[Stage]]:
    """Every built-in (and run-time registered) stage by type name."""
    return {name: STAGES.get(name) for name in STAGES.builtin_names()}


def plugin_stages() -> dict[str, str]:
    """Entry-point name -> 'module:attr' for every installed plugin stage (nothing is imported)."""
    return STAGES.declared()


def resolve_stage(type_name: str) -> type[Stage]:
    """The stage class a recipe's ``type:`` names; UnknownStage says why there is none."""
    return STAGES.get(type_name)
