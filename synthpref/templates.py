"""Judge prompts are Jinja templates in ``prompts/``; each judgment records its template's hash.

A recipe may name a shipped template (``rubric/helpfulness.jinja``) or a file of its own; every file a
recipe names follows one rule (:func:`find_recipe_file`): relative to the recipe, then among the
shipped prompts. The hash covers the template and every template it extends or includes, so a dataset
row can always be traced to the exact wording that scored it.

Templates and recipe strings are rendered in Jinja's immutable sandbox: a recipe is data, and the one
explicit way it runs code is a ``module:Class`` stage. Without the sandbox, ``{{ cycler.__init__
.__globals__.os.system(...) }}`` in any recipe string would run a shell command during ``validate``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from synthpref.errors import TemplateError


def prompts_dir() -> Path:
    """Shipped templates: inside the installed package, or the repository's ``prompts/``."""
    packaged = Path(__file__).parent / "_prompts"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "prompts"


class RecipeFileNotFound(TemplateError, FileNotFoundError):
    """A file a recipe names is in none of the places the path rule looks."""

    def __init__(self, name: str, tried: list[Path]) -> None:
        self.name = name
        self.tried = tried
        super().__init__(f"{name!r} not found (looked for {', '.join(map(str, tried))})")


class UnsafeTemplate(TemplateError, ValueError):
    """A template or recipe string tried something the sandbox forbids (attribute internals, ...)."""


class InvalidTemplate(TemplateError, ValueError):
    """A template that is not valid Jinja; the message names the template and the line."""


class MissingInclude(TemplateError, FileNotFoundError):
    """A template extends or includes a template that is on none of its search paths."""


def find_recipe_file(name: str, base_dir: str | Path | None = None) -> Path:
    """The one rule for a file a recipe names: a template, CDR exemplars, a follow-up set, ...

    An absolute path is used as given. A relative one is looked up beside the recipe (``base_dir``;
    the working directory for a recipe given as a mapping), then among the shipped prompts, so a
    recipe's own file shadows a shipped one of the same name and a shipped name works from anywhere.
    """
    path = Path(name).expanduser()
    if path.is_absolute():
        tried = [path]
    else:
        tried = [Path(base_dir or Path.cwd()) / path]
        if ".." not in path.parts:
            tried.append(prompts_dir() / path)
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise RecipeFileNotFound(name, tried)


_SANDBOX_HINT = "(templates run sandboxed: use the variables they are given, not Python internals)"


@dataclass(frozen=True)
class Template:
    name: str
    hash: str
    _compiled: jinja2.Template

    def render(self, **variables) -> str:
        try:
            return self._compiled.render(**variables).strip()
        except SecurityError as exc:
            raise UnsafeTemplate(f"template {self.name!r}: {exc} {_SANDBOX_HINT}") from None


@lru_cache(maxsize=16)
def _env(search_path: tuple[str, ...]) -> jinja2.Environment:
    return ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(list(search_path)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
    )


@lru_cache(maxsize=1)
def _string_env() -> jinja2.Environment:
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)


def render_string(text: str, **variables) -> str:
    """Literal text from a recipe, which may use the same variables as a template file."""
    try:
        return _string_env().from_string(text).render(**variables).strip()
    except SecurityError as exc:
        short = text if len(text) <= 80 else text[:77] + "..."
        raise UnsafeTemplate(f"the text {short!r}: {exc} {_SANDBOX_HINT}") from None


def _sources(env: jinja2.Environment, name: str, seen: set[str]) -> list[str]:
    if name in seen:
        return []
    seen.add(name)
    source = env.loader.get_source(env, name)[0]
    out = [source]
    for ref in sorted(r for r in jinja2.meta.find_referenced_templates(env.parse(source)) if r):
        out += _sources(env, ref, seen)
    return out


def load_template(name: str, base_dir: str | Path | None = None) -> Template:
    """A template by the path rule of :func:`find_recipe_file`.

    The templates it extends or includes are looked up beside it, then beside the recipe, then among
    the shipped prompts (so a recipe's template may extend ``rubric/_frame.jinja``).
    """
    return _load_template(name, str(base_dir or Path.cwd()))


@lru_cache(maxsize=256)
def _load_template(name: str, base_dir: str) -> Template:
    path = find_recipe_file(name, base_dir)
    roots = [str(path.parent), base_dir, str(prompts_dir())]
    env = _env(tuple(dict.fromkeys(roots)))
    try:
        compiled = env.get_template(path.name)
        sources = _sources(env, path.name, set())
        digest = hashlib.sha256("\0".join(sources).encode()).hexdigest()[:16]
    except jinja2.TemplateNotFound as exc:
        raise MissingInclude(
            f"template {name!r} ({path}) uses {exc.name!r}, which is not in "
            f"{', '.join(env.loader.searchpath)}"
        ) from None
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidTemplate(
            f"template {name!r} ({path}) line {exc.lineno}: {exc.message}"
        ) from None
    return Template(name, digest, compiled)


def shipped_templates() -> list[str]:
    root = prompts_dir()
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*.jinja") if not p.name.startswith("_")
    )


@lru_cache(maxsize=64)
def inline_template(text: str, name: str = "<inline>") -> Template:
    """A template written in code (a custom judge's ``prompt``), hashed like a template file so a
    changed prompt invalidates checkpoints the same way. It cannot include or extend files."""
    try:
        compiled = _string_env().from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidTemplate(f"template {name} line {exc.lineno}: {exc.message}") from None
    return Template(name, hashlib.sha256(text.encode()).hexdigest()[:16], compiled)
