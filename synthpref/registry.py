"""One lazy registry type for everything a recipe names by a string: stages (judges among them),
model backends and output formats.

A registry finds a name in this order:

1. built-ins: a table ``name -> "module:attr"`` whose module is imported only when that name is
   looked up (as vLLM's model table), plus objects registered at run time with ``register`` (the
   ``@register_stage`` decorators, tests); built-in names win over plugins;
2. plugins: entry points of installed packages in the registry's group(s) (``synthpref.stages`` and
   ``synthpref.judges``, ``synthpref.backends``, ``synthpref.formats``);
3. where the registry allows it (stages), a ``module:attr`` import path.

``get`` raises the registry's typed error (an :class:`UnknownName`) with a did-you-mean and every
known name; each registry's ``validate`` hook checks what a plugin or import path hands over.
``items`` lists built-ins, then plugins: a plugin that fails to load is listed with its package and
the reason, never ending the listing.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Generic, TypeVar

from synthpref.errors import ConfigError

T = TypeVar("T")

#: checks what a table entry, plugin or import path gave: (object, where it came from, the name it
#: was looked up by) -> the object, or the registry's error naming ``where``
Validate = Callable[[object, str, str], T]


class UnknownName(ConfigError, LookupError):
    """A name that no entry of a registry answers to, or whose entry cannot be loaded or is invalid.

    ``kind`` is the registry's ("stage", "backend", "format"), ``known`` every name it knows."""

    def __init__(
        self, message: str, *, kind: str = "", name: str = "", known: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name
        self.known = list(known)


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One listed name: its object, or why it could not be loaded (``error``, ``obj`` None)."""

    name: str
    obj: T | None
    #: "built-in", "package NAME VERSION" for a plugin, or "registered by MODULE"
    source: str
    #: where it is loaded from: "module:attr"
    target: str
    #: the entry-point group of a plugin; None for a built-in
    group: str | None = None
    error: str | None = None
    #: other entry points that claim the same name and so are not used, each described
    shadowed: tuple[str, ...] = ()


class Registry(Generic[T]):
    """Names -> objects of one kind, built-ins loaded lazily, plugins found by entry point."""

    def __init__(
        self,
        kind: str,
        groups: Sequence[str],
        *,
        validate: Validate[T],
        name_of: Callable[[T], str],
        builtins: Mapping[str, str] | None = None,
        bootstrap: Sequence[str] = (),
        error: type[UnknownName] = UnknownName,
        noun: str | None = None,
        hint: str | None = None,
        import_paths: str | None = None,
        is_candidate: Callable[[object], bool] | None = None,
        origin_of: Callable[[T], str] | None = None,
    ) -> None:
        """``builtins``: name -> "module:attr", imported on first use; ``bootstrap``: modules whose
        import registers built-ins through ``register`` (decorators), imported on first use;
        ``noun``: how errors call a name ("stage type"); ``hint``: appended to the unknown-name
        error; ``import_paths``: allow ``module:attr`` names, the label of the hint that lists a
        module's candidates (those ``is_candidate`` accepts) when the attribute is missing;
        ``origin_of``: "module:attr" that defines a registered object (default: its own)."""
        self.kind = kind
        self.groups = tuple(groups)
        self.noun = noun or kind
        self.error = error
        self._validate = validate
        self._name_of = name_of
        self._table = dict(builtins or {})
        self._bootstrap = tuple(bootstrap)
        self._booted = not self._bootstrap
        self._registered: dict[str, T] = {}
        self._loaded: dict[str, T] = {}
        self._import_paths = import_paths
        self._is_candidate = is_candidate
        self._origin_of = origin_of or _target_of
        groups_text = " or ".join(repr(g) for g in self.groups)
        self._hint = (
            hint
            if hint is not None
            else f" (or install a package that registers one under the {groups_text} entry-point "
            "group)"
        )

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, groups={self.groups!r})"

    # registering ---------------------------------------------------------------------------------

    def register(self, obj: T) -> T:
        """Add ``obj`` under its own name (run-time registration: decorators, tests); returns it.

        It wins over the built-in table and plugins of the same name. Registering another object
        under a name already registered is an error; the same object again, or the same definition
        again (its module re-imported), is not."""
        name = self._name_of(obj)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name, not {name!r}")
        current = self._registered.get(name)
        if current is not None and self._origin_of(current) != self._origin_of(obj):
            raise ValueError(
                f"two {self.kind}s claim the name {name!r}: {self._origin_of(current)} and "
                f"{self._origin_of(obj)}"
            )
        self._registered[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Forget a run-time registration (tests)."""
        self._registered.pop(name, None)

    # names ---------------------------------------------------------------------------------------

    def builtin_names(self) -> list[str]:
        self._boot()
        return sorted(set(self._table) | set(self._registered))

    def plugin_names(self) -> list[str]:
        """Names that installed packages declare and no built-in takes (nothing is imported)."""
        builtin = set(self.builtin_names())
        return sorted({ep.name for _, ep in self._entry_points()} - builtin)

    def declared(self) -> dict[str, str]:
        """Entry-point name -> "module:attr" of every plugin (the first claim of a name wins, as in
        ``get``); built-in names included, nothing imported."""
        found: dict[str, str] = {}
        for _, ep in self._entry_points():
            found.setdefault(ep.name, ep.value)
        return found

    def names(self) -> list[str]:
        """Every known name: built-ins, then plugins, each sorted; nothing is imported."""
        return self.builtin_names() + self.plugin_names()

    # lookup --------------------------------------------------------------------------------------

    def get(self, name: str) -> T:
        """The object for ``name``, or the registry's error saying why there is none."""
        self._boot()
        if name in self._registered:
            return self._registered[name]
        if name in self._table:
            return self._load_builtin(name)
        for group, ep in self._entry_points():
            if ep.name == name:
                return self._load_plugin(group, ep)
        if self._import_paths is not None and ":" in name:
            return self._load_import_path(name)
        raise self.unknown(name)

    def find(self, name: str) -> T | None:
        """``get`` without the error: None for a name that is unknown or does not load."""
        try:
            return self.get(name)
        except UnknownName:
            return None

    def unknown(self, name: str) -> UnknownName:
        """The error for a name nothing answers to: a did-you-mean and every known name."""
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        did_you_mean = f"did you mean {close[0]!r}? " if close else ""
        return self.error(
            f"unknown {self.noun} {name!r}; {did_you_mean}known: {', '.join(known) or '(none)'}"
            f"{self._hint}",
            kind=self.kind,
            name=name,
            known=known,
        )

    # listing -------------------------------------------------------------------------------------

    def items(self) -> list[Entry[T]]:
        """Every entry, built-ins then plugins (each by name); what fails to load has ``error``."""
        out: list[Entry[T]] = []
        builtin = self.builtin_names()
        claims: dict[str, list[tuple[str, importlib.metadata.EntryPoint]]] = {}
        for group, ep in self._entry_points():
            claims.setdefault(ep.name, []).append((group, ep))
        for name in builtin:
            if name in self._registered:
                origin = self._origin_of(self._registered[name])
                module = origin.partition(":")[0]
                in_table = name in self._table or module.split(".")[0] == "synthpref"
                source = "built-in" if in_table else f"registered by {module}"
                target = self._table.get(name) or origin
            else:
                source, target = "built-in", self._table[name]
            shadowed = tuple(
                f"{_describe_ep(g, ep)}: not used, the built-in {self.kind} has this name"
                for g, ep in claims.get(name, [])
            )
            try:
                out.append(Entry(name, self.get(name), source, target, shadowed=shadowed))
            except UnknownName as exc:
                out.append(Entry(name, None, source, target, error=str(exc), shadowed=shadowed))
        for name in sorted(set(claims) - set(builtin)):
            (group, ep), *others = claims[name]
            shadowed = tuple(
                f"{_describe_ep(g, other)}: not used, {_describe_ep(group, ep)} has this name"
                for g, other in others
            )
            source = _package(ep) or "an installed package"
            try:
                obj = self._load_plugin(group, ep)
            except UnknownName as exc:
                out.append(Entry(name, None, source, ep.value, group, str(exc), shadowed))
            else:
                out.append(Entry(name, obj, source, ep.value, group, None, shadowed))
        return out

    # loading -------------------------------------------------------------------------------------

    def _boot(self) -> None:
        if self._booted:
            return
        self._booted = True  # first: the modules imported call register()
        try:
            for module in self._bootstrap:
                importlib.import_module(module)
        except BaseException:
            self._booted = False
            raise

    def _entry_points(self) -> list[tuple[str, importlib.metadata.EntryPoint]]:
        """Every (group, entry point) of this registry, read afresh (packages come and go)."""
        return [
            (group, ep)
            for group in self.groups
            for ep in importlib.metadata.entry_points(group=group)
        ]

    def _load_builtin(self, name: str) -> T:
        if name in self._loaded:
            return self._loaded[name]
        target = self._table[name]
        where = f"built-in {self.kind} {name!r} ({target})"
        module_name, _, attr = target.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:
            raise self.error(
                f"{where} failed to load: {type(exc).__name__}: {exc}", kind=self.kind, name=name
            ) from exc
        obj = self._checked(obj, where, name)
        self._loaded[name] = obj
        return obj

    def _load_plugin(self, group: str, ep: importlib.metadata.EntryPoint) -> T:
        where = _describe_ep(group, ep)
        try:
            obj = ep.load()
        except Exception as exc:
            raise self.error(
                f"{where} failed to load: {type(exc).__name__}: {exc}", kind=self.kind, name=ep.name
            ) from exc
        return self._checked(obj, where, ep.name)

    def _load_import_path(self, name: str) -> T:
        module_name, _, attr = name.partition(":")
        fail = self._failure(name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.split(".")[0] != exc.name.split(".")[0]:
                raise fail(
                    f"importing module {module_name!r} failed: it needs {exc.name!r}, which is not "
                    "installed"
                ) from exc
            raise fail(
                f"cannot import module {module_name!r}: {exc}. Install the package that provides "
                "it in this environment, or put its directory on PYTHONPATH"
            ) from exc
        except Exception as exc:
            raise fail(
                f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise fail(
                f"module {module_name!r} has no attribute {attr!r}{self._candidates(module)}"
            ) from None
        return self._checked(obj, repr(name), name)

    def _candidates(self, module: ModuleType) -> str:
        if self._is_candidate is None:
            return ""
        found = sorted(n for n, v in vars(module).items() if self._is_candidate(v))
        return f" (its {self._import_paths}: {', '.join(found)})" if found else ""

    def _failure(self, name: str) -> Callable[[str], UnknownName]:
        return lambda message: self.error(message, kind=self.kind, name=name)

    def _checked(self, obj: object, where: str, name: str) -> T:
        try:
            return self._validate(obj, where, name)
        except UnknownName:
            raise
        except Exception as exc:  # a validator's own failure still names the entry
            raise self.error(
                f"{where}: {type(exc).__name__}: {exc}", kind=self.kind, name=name
            ) from exc


def _package(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return f"package {dist.name} {dist.version}" if dist is not None else None


def _describe_ep(group: str, ep: importlib.metadata.EntryPoint) -> str:
    package = _package(ep)
    return (
        f"entry point {ep.name!r} = {ep.value!r} (group {group}{', ' + package if package else ''})"
    )


def _target_of(obj: object) -> str:
    named = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(named, '__module__', '?')}:{getattr(named, '__qualname__', '?')}"
