"""Judge prompts are Jinja templates in ``prompts/``; each judgment records its template's hash.

A recipe may name a shipped template (``rubric/helpfulness.jinja``) or a file of its own (looked up
relative to the recipe first). The hash covers the template and every template it extends or
includes, so a dataset row can always be traced to the exact wording that scored it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.meta


def prompts_dir() -> Path:
    """Shipped templates: inside the installed package, or the repository's ``prompts/``."""
    packaged = Path(__file__).parent / "_prompts"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "prompts"


@dataclass(frozen=True)
class Template:
    name: str
    hash: str
    _compiled: jinja2.Template

    def render(self, **variables) -> str:
        return self._compiled.render(**variables).strip()


@lru_cache(maxsize=16)
def _env(base_dir: str | None) -> jinja2.Environment:
    paths = [p for p in (base_dir, str(prompts_dir())) if p]
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(paths),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
    )


def _sources(env: jinja2.Environment, name: str, seen: set[str]) -> list[str]:
    if name in seen:
        return []
    seen.add(name)
    source = env.loader.get_source(env, name)[0]
    out = [source]
    for ref in sorted(r for r in jinja2.meta.find_referenced_templates(env.parse(source)) if r):
        out += _sources(env, ref, seen)
    return out


@lru_cache(maxsize=256)
def load_template(name: str, base_dir: str | None = None) -> Template:
    env = _env(base_dir)
    try:
        compiled = env.get_template(name)
        digest = hashlib.sha256("\0".join(_sources(env, name, set())).encode()).hexdigest()[:16]
    except jinja2.TemplateNotFound as exc:
        raise FileNotFoundError(
            f"prompt template {exc.name!r} not found in {', '.join(env.loader.searchpath)}"
        ) from None
    return Template(name, digest, compiled)


def shipped_templates() -> list[str]:
    root = prompts_dir()
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*.jinja") if not p.name.startswith("_")
    )
