"""Model specs: how a recipe declares a model once and names it everywhere else.

Each backend is a pydantic spec class found by its ``backend:`` name in ``BACKENDS`` (a
:class:`synthpref.registry.Registry`): the shipped ones from a lazy table, others from the
``synthpref.backends`` entry-point group of an installed package (a ``ModelSpec`` subclass whose
``backend_name`` is the entry point's name). Fields marked ``volatile`` (batch sizes, concurrency,
timeouts, credentials' location) change how fast a run goes, never what it produces, so they stay out
of run fingerprints.

A spec's fields name a model but do not pin it (a checkpoint retrained in place keeps its path), so
``weights_identity`` adds what the fields cannot show (see :mod:`synthpref.backends.identity`), and
both the stage fingerprints (``fingerprint``) and the request cache keys (``identity``) include it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from synthpref.backends.base import Backend
from synthpref.backends.pricing import Price
from synthpref.registry import Registry, UnknownName

VOLATILE = {"volatile": True}


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str
    system_prompt: str | None = Field(
        None, description="prepended as a system message to every request without one"
    )
    price: Price | None = Field(
        None,
        description="US dollars per million tokens ({input, output, cached_input, cache_write, "
        "batch_discount}); unset: the shipped table's price for hosted OpenAI and Anthropic "
        "models, nothing for the rest",
        json_schema_extra=VOLATILE,
    )
    backend_name: ClassVar[str]

    def effective_price(self) -> Price | None:
        """What this model's tokens cost: ``price``, else what the backend knows (the shipped
        table, for a hosted API), else None (free: a local model or a self-hosted server)."""
        return self.price

    def build(self) -> Backend:
        raise NotImplementedError

    def missing_key(self) -> str | None:
        """Why this model cannot be called for want of an API key, or None (the default: it needs
        none). Checked before a run (``synthpref.checks``) and when the backend is built."""
        return None

    def capabilities(self) -> frozenset[str]:
        """What the built backend will support, known without loading weights or connecting."""
        raise NotImplementedError

    def gpus_needed(self) -> float:
        """GPUs one copy of this model holds, for the Ray executor's placement
        (``executor/placement.py``): 0 (the default) for a model that runs on CPU or behind an API,
        so a recipe of such models never waits for a GPU; local-weight specs override it."""
        return 0.0

    def backend_key(self) -> str:
        """Specs with equal keys share one backend object (and so one copy of the weights)."""
        return self.model_dump_json(exclude={"system_prompt"})

    def display_name(self) -> str:
        return self.backend

    def weights_identity(self) -> str | None:
        """What the fields cannot show about the model: its weights, config and tokenizer files.

        ``None`` where nothing more can be known (a remote API). Cheap: no weights are read.
        """
        return None

    def result_fields(self) -> dict[str, Any]:
        """The fields that change results; specs override this to drop volatile nested settings."""
        return fingerprint_fields(self)

    def fingerprint(self) -> dict[str, Any]:
        """What enters the fingerprint of every stage that calls this model."""
        out = self.result_fields()
        weights = self.weights_identity()
        if weights is not None:
            out["weights"] = weights
        return out

    def identity(self) -> str:
        """What keys this model's cached results: everything in ``fingerprint`` except the system
        prompt, which the client puts into every request and so is in every key already."""
        fields = self.fingerprint()
        fields.pop("system_prompt", None)
        blob = json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
        digest = hashlib.sha256(blob.encode()).hexdigest()[:24]
        return f"{self.backend}:{self.display_name()}:{digest}"


class UnknownBackend(UnknownName, ValueError):
    """A ``backend:`` name that does not resolve, or a backend plugin that is not a usable spec."""


def _checked_spec(obj: object, where: str, name: str) -> type[ModelSpec]:
    if not (isinstance(obj, type) and issubclass(obj, ModelSpec)):
        what = f"the class {obj.__name__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise UnknownBackend(
            f"{where} is {what}, not a model spec; a backend plugin subclasses "
            f"synthpref.backends.specs.ModelSpec with backend_name = {name!r}"
        )
    declared = getattr(obj, "backend_name", None)
    if declared != name:
        raise UnknownBackend(
            f"{where}: {obj.__name__}.backend_name is {declared!r}, not {name!r}; a recipe's "
            "'backend:' names a spec by its backend_name, so the two must agree"
        )
    missing = [m for m in ("build", "capabilities") if getattr(obj, m) is getattr(ModelSpec, m)]
    if missing:
        raise UnknownBackend(f"{where}: {obj.__name__} does not implement {', '.join(missing)}")
    return obj


#: the shipped backends, imported only when named (listing them imports no torch or vllm: each spec
#: module imports its engine only when a backend is built)
BUILTIN_BACKENDS = {
    "embedded": "synthpref.backends.builtin:EmbeddedSpec",
    "transformers": "synthpref.backends.builtin:TransformersSpec",
    "vllm": "synthpref.backends.vllm_backend:VLLMSpec",
    "openai": "synthpref.backends.openai_backend:OpenAISpec",
    "anthropic": "synthpref.backends.anthropic_backend:AnthropicSpec",
}

BACKENDS: Registry[type[ModelSpec]] = Registry(
    "backend",
    ("synthpref.backends",),
    validate=_checked_spec,
    name_of=lambda cls: cls.backend_name,
    builtins=BUILTIN_BACKENDS,
    error=UnknownBackend,
)


def register_backend(cls: type[ModelSpec]) -> type[ModelSpec]:
    """Class decorator: a spec under its ``backend_name`` at run time (test doubles use it)."""
    return BACKENDS.register(cls)


def spec_class(backend: str) -> type[ModelSpec]:
    """The spec class of a ``backend:`` name; UnknownBackend (a ValueError) says why there is none."""
    return BACKENDS.get(backend)


def backend_names() -> list[str]:
    """Every backend name: built-ins, then installed plugins."""
    return BACKENDS.names()


def fingerprint_fields(model: BaseModel) -> dict[str, Any]:
    """The model's fields that affect results, recursively, as plain data."""
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        if (info.json_schema_extra or {}) == VOLATILE:
            continue
        value = getattr(model, name)
        out[name] = fingerprint_fields(value) if isinstance(value, BaseModel) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return fingerprint_fields(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def batch_mode_field() -> Any:
    """The ``mode`` field of specs whose backend has a provider batch API (``batch_provider``)."""
    return Field(
        "online",
        description="batch: generation requests go to the provider's batch API as jobs (half the "
        "price, results within 24 h); job ids are kept in the run's cache, so a killed run "
        "resumes them (settings.batch says whether a run waits)",
        json_schema_extra=VOLATILE,
    )


def missing_api_key(provider: str, env: str, base_url: str | None, without: str) -> str | None:
    """The one rule for hosted APIs: the provider's own endpoint (no ``base_url``) needs the key in
    ``env``; a ``base_url`` (``without`` says what it is for) may do without."""
    if base_url is not None or os.environ.get(env):
        return None
    return (
        f"the {provider} API needs a key: set the environment variable {env} (or point "
        f"api_key_env at the variable that holds it), or set base_url for {without}"
    )
