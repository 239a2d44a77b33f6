"""Reward models on vLLM's offline engine: a ``backend: vllm`` spec with ``task: reward``.

The engine is the one :mod:`synthpref.backends.vllm_backend` builds, started with
``runner="pooling"``: vLLM then runs the model's own sequence-classification head on the hidden
state of the last token (``LlamaForSequenceClassification`` and its kin), as transformers'
``AutoModelForSequenceClassification`` does on an unpadded conversation. Each request asks for the
``classify`` pooling task with ``use_activation=False``, so the values are the head's raw outputs
(``classify`` would otherwise apply a sigmoid or softmax), one per ``id2label`` entry.

Conversations are rendered here with the engine's tokenizer and the model's own chat template
(``apply_chat_template(messages, tokenize=True)``, no generation prompt), cut to the engine's
``max_model_len`` by :func:`synthpref.backends.turns.fit_turns`, and handed to vLLM as token ids.
A whole shard's requests go into the engine at once and the engine is stepped here, so each result
reaches ``on_result`` (and the request cache) in the step it finishes, as for generation.

Before any engine starts, the model's config and safetensors headers are read (cheap: no weights),
so a causal LM, a model without a classification head, or a head whose shape does not match the
config's ``num_labels`` fails at once with what was expected, instead of vLLM quietly converting it
into some other pooling model.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from synthpref.backends.base import (
    BackendError,
    Capability,
    CapabilityError,
    OnGenerated,
    OnRewarded,
    OnScored,
)
from synthpref.backends.turns import chat_ids, fit_request
from synthpref.backends.types import (
    GenerationRequest,
    GenerationResult,
    RewardRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
)
from synthpref.backends.vllm_backend import VLLMBackend, step_until_done

if TYPE_CHECKING:
    from synthpref.backends.vllm_backend import VLLMSpec

#: the names trained classification heads are saved under (decoder models keep theirs as ``score``)
HEAD_TENSORS = ("score.weight", "classifier.weight", "classifier.out_proj.weight")
EXPECTED = (
    "task: reward expects a sequence-classification reward model: a model directory whose "
    "config.json has architectures: [...ForSequenceClassification] (e.g. "
    "LlamaForSequenceClassification) and whose weights include the classification head"
)


class VLLMRewardBackend(VLLMBackend):
    """A reward model on vLLM's offline engine: ``reward()`` only."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({"reward"})

    def __init__(self, spec: VLLMSpec) -> None:
        super().__init__(spec)
        #: the head's output names, in output order (``id2label``)
        self.labels = reward_labels(spec)

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        raise CapabilityError(
            f"{self.spec.model!r} is served with task: reward: a reward model scores conversations "
            "and does not generate; declare the model again with task: generate to generate"
        )

    async def score(
        self, requests: Sequence[ScoreRequest], on_result: OnScored | None = None
    ) -> list[ScoreResult]:
        raise CapabilityError(
            f"{self.spec.model!r} is served with task: reward: a reward model has no language-model "
            "head to score text with"
        )

    async def reward(
        self, requests: Sequence[RewardRequest], on_result: OnRewarded | None = None
    ) -> list[RewardResult]:
        if not requests:
            return []
        reqs = list(requests)
        fitted: list[tuple[list[int], int]] = []

        def inputs() -> tuple[list, list]:
            from vllm import PoolingParams

            fitted.extend(self._fit(reqs))
            # raw head outputs: classify would apply the head's sigmoid or softmax by default
            params = [PoolingParams(task="classify", use_activation=False) for _ in fitted]
            return [_engine_input(ids) for ids, _ in fitted], params

        return await self._stream(
            inputs, lambda i, out: self._reward_result(i, *fitted[i], out), on_result
        )

    def _fit(self, requests: list[RewardRequest]) -> list[tuple[list[int], int]]:
        """(token ids, dropped turns) of each request; a request that cannot fit raises
        :class:`RequestError` with its index before anything reaches the engine."""
        limit = self.context_window  # a pooling model generates nothing: every position is input
        tok = self.tokenizer
        return [
            fit_request(i, r, lambda m: chat_ids(tok, m), limit) for i, r in enumerate(requests)
        ]

    def _drive(self, inputs, report, failure: list) -> list:
        """Add every request to the engine, then step it, reporting each as it finishes.

        ``LLM.enqueue`` takes generation requests only, so pooling requests are added to the
        engine (``LLMEngine.add_request``) directly, under ids unique to this call."""
        prompts, params = inputs()
        call = uuid.uuid4().hex[:12]
        with self._lock:
            engine = self.llm.llm_engine
            ids: list[str] = []
            try:
                for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                    ids.append(engine.add_request(f"reward{call}n{i}", prompt, p))
            except BaseException:
                if ids:
                    engine.abort_request(ids, internal=True)
                raise
            return step_until_done(engine, ids, report, failure)

    def _reward_result(self, i: int, ids: list[int], dropped: int, out: Any) -> RewardResult:
        values = [float(v) for v in out.outputs.data.reshape(-1).tolist()]
        if len(values) != len(self.labels):
            raise BackendError(
                f"reward request {i}: vLLM returned {len(values)} values for a head with "
                f"{len(self.labels)} outputs ({self.labels})"
            )
        return RewardResult(
            values=values, labels=list(self.labels), tokens=len(ids), dropped_turns=dropped
        )


def _engine_input(ids: list[int]) -> Any:
    """Token ids as vLLM's engine takes them (its renderer's output, so no text is re-tokenized)."""
    try:
        from vllm.inputs import tokens_input
    except ImportError:  # a vLLM before the renderer: the raw prompt form
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=ids)
    return tokens_input(ids)


def reward_labels(spec: VLLMSpec) -> list[str]:
    """The head's output names (``id2label``, in order), after checking that ``spec.model`` is a
    sequence-classification model whose head matches its config. Reads no weights."""
    config = _config(spec)
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        what = f"architectures {archs}" if archs else "no architectures"
        causal = [a for a in archs if a.endswith(("ForCausalLM", "ForConditionalGeneration"))]
        kind = f", a {causal[0]} generates text and has no reward head" if causal else ""
        raise BackendError(
            f"{spec.model!r} is not a reward model: its config.json has {what}{kind}. {EXPECTED}"
        )
    num_labels = int(config.num_labels)
    id2label = getattr(config, "id2label", None) or {}
    labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(num_labels)]
    online = getattr(config, "classifier_from_token", None) or getattr(config, "method", None)
    heads = _head_shapes(Path(spec.model)) if Path(spec.model).is_dir() else None
    if heads is None or online:  # a hub id, non-safetensors weights, or a head vLLM derives
        return labels
    if not heads:
        raise BackendError(
            f"{spec.model!r} declares {archs[0]} but its safetensors files hold no classification "
            f"head ({' / '.join(HEAD_TENSORS)}). {EXPECTED}"
        )
    for name, shape in heads.items():
        if not shape or shape[0] != num_labels:
            raise BackendError(
                f"{spec.model!r}: the classification head {name} has shape {shape}, but config.json "
                f"declares num_labels={num_labels} (id2label {labels}); the head's first dimension "
                "must equal num_labels. The weights and the config do not belong together."
            )
    return labels


def _config(spec: VLLMSpec) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            spec.model,
            revision=spec.engine_args.get("revision"),
            trust_remote_code=spec.trust_remote_code,
        )
    except Exception as exc:
        raise BackendError(
            f"task: reward: cannot read the config of {spec.model!r}: {type(exc).__name__}: {exc}"
        ) from exc
    overrides = spec.engine_args.get("hf_overrides")
    if isinstance(overrides, dict):  # vLLM applies them to the config it loads; so do we
        for key, value in overrides.items():
            setattr(config, key, value)
    return config


def _head_shapes(model_dir: Path) -> dict[str, list[int]] | None:
    """Shapes of the classification-head tensors in the directory's safetensors files, read from
    their headers; ``None`` when there are no safetensors files to read."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot read the safetensors header of {path}: {exc}") from exc
        for name, meta in header.items():
            if name in HEAD_TENSORS or name.endswith(tuple(f".{h}" for h in HEAD_TENSORS)):
                shapes[name] = list(meta.get("shape") or [])
    return shapes
