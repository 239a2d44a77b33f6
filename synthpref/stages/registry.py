"""Finding a stage class from the name a recipe gives.

Three ways, so users extend synthpref without forking it: a built-in name (``generate``), an entry
point in the ``synthpref.stages`` or ``synthpref.judges`` group of an installed package, or a
``module:Class`` import path.
"""

from __future__ import annotations

import importlib
import importlib.metadata

from synthpref.stages.base import Stage

ENTRY_POINT_GROUPS = ("synthpref.stages", "synthpref.judges")
_BUILTIN: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    if cls.type_name in _BUILTIN and _BUILTIN[cls.type_name] is not cls:
        raise ValueError(f"two stages claim the type name {cls.type_name!r}")
    _BUILTIN[cls.type_name] = cls
    return cls


class UnknownStage(LookupError):
    pass


def builtin_stages() -> dict[str, type[Stage]]:
    import synthpref.builtin_stages  # noqa: F401  (registers every shipped stage)

    return dict(_BUILTIN)


def plugin_stages() -> dict[str, str]:
    """Entry-point name -> 'module:attr' for every installed plugin stage."""
    found = {}
    for group in ENTRY_POINT_GROUPS:
        for ep in importlib.metadata.entry_points(group=group):
            found[ep.name] = ep.value
    return found


def resolve_stage(type_name: str) -> type[Stage]:
    stages = builtin_stages()
    if type_name in stages:
        return stages[type_name]
    for group in ENTRY_POINT_GROUPS:
        for ep in importlib.metadata.entry_points(group=group, name=type_name):
            return _checked(ep.load(), type_name)
    if ":" in type_name:
        module_name, _, attr = type_name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UnknownStage(f"cannot import module {module_name!r}: {exc}") from exc
        try:
            return _checked(getattr(module, attr), type_name)
        except AttributeError:
            raise UnknownStage(f"module {module_name!r} has no attribute {attr!r}") from None
    known = sorted(stages) + sorted(plugin_stages())
    raise UnknownStage(
        f"unknown stage type {type_name!r}; known: {', '.join(known)} "
        "(or give a custom class as 'module:Class')"
    )


def _checked(obj: object, type_name: str) -> type[Stage]:
    if not (isinstance(obj, type) and issubclass(obj, Stage)):
        raise UnknownStage(f"{type_name!r} is not a synthpref Stage subclass")
    return obj
