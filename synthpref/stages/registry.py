"""Finding a stage class from the name a recipe gives.

Three ways, so users extend synthpref without forking it: a built-in name (``generate``), an entry
point in the ``synthpref.stages`` or ``synthpref.judges`` group of an installed package, or a
``module:Class`` import path.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
from typing import get_args

from synthpref.stages.base import Stage, StageKind

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
            where = f"entry point {type_name!r} = {ep.value!r} (group {group}{_dist(ep)})"
            try:
                obj = ep.load()
            except Exception as exc:
                raise UnknownStage(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
            return _checked(obj, where)
    if ":" in type_name:
        module_name, _, attr = type_name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.split(".")[0] != exc.name.split(".")[0]:
                raise UnknownStage(
                    f"importing module {module_name!r} failed: it needs {exc.name!r}, which is not "
                    "installed"
                ) from exc
            raise UnknownStage(
                f"cannot import module {module_name!r}: {exc}. Install the package that provides "
                "it in this environment, or put its directory on PYTHONPATH"
            ) from exc
        except Exception as exc:
            raise UnknownStage(
                f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            obj = getattr(module, attr)
        except AttributeError:
            public = sorted(
                n
                for n, v in vars(module).items()
                if isinstance(v, type) and issubclass(v, Stage) and not inspect.isabstract(v)
            )
            hint = f" (its Stage classes: {', '.join(public)})" if public else ""
            raise UnknownStage(f"module {module_name!r} has no attribute {attr!r}{hint}") from None
        return _checked(obj, repr(type_name))
    known = sorted(stages) + sorted(plugin_stages())
    close = difflib.get_close_matches(type_name, known, n=1)
    did_you_mean = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownStage(
        f"unknown stage type {type_name!r}; {did_you_mean}known: {', '.join(known)} "
        "(or give a custom class as 'module:Class', or install a package that registers it under "
        "the 'synthpref.judges' or 'synthpref.stages' entry-point group)"
    )


def _dist(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f", package {dist.name} {dist.version}" if dist is not None else ""


def _checked(obj: object, where: str) -> type[Stage]:
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
