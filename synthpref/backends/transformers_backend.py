"""Local Hugging Face transformers backend (CPU or CUDA); the embedded default runs on it.

One module (over 400 lines) because generation and scoring share model loading, device locks,
batching and the KV-cache prefix sharing below; per-row sampling, the output head and reward models
live in ``row_sampling.py``, ``output_head.py`` and ``transformers_reward.py``.

Generation is continuously batched (``decode_loop.py``): every call's requests, shortest prompt first,
join the model's one running batch whatever their sampling parameters, and leave it as they end;
``model.generate`` on left-padded batches grouped by sampling parameters is the fallback. Each
sample of each request draws from its own random stream, seeded from that request and its seed alone
(``row_sampling.py``), and on CPU the running batch computes each row bit for bit as the row alone
(``cpu_attention.py``, ``invariant_linear.py``, at load), so a text does not depend on
``batch_size``, on the number of workers or on which other requests share its batch: a resumed run
that regenerates only its cache misses produces what an uninterrupted run would have.
Raw-text completion (``complete``) runs the same path on text tokenized as given: the same batches,
rows, stop strings and stop ids (EOS and the chat template's end-of-turn token,
``end_of_turn.py``), so completing ``render_chat(messages, True)`` reproduces chat generation.
Scoring runs one forward pass per batch and applies the output head only to the scored positions,
with the model's own logit rescaling; ``output_head.py`` checks once per model that this reproduces
the model's logits and otherwise scores through its forward pass.
Score requests that share a long token prefix (the follow-ups of one response, the candidates of one
prompt under the same system prompt and exemplars) run that prefix once and reuse its KV cache for
each request's remainder; results equal the unshared path's to ~1e-5 nats/token (float32). The
``model.generate`` fallback does the same for the prefix common to a whole batch (a judge's rubric and
system prompt run once per batch); the running batch does not, since a row's keys would then depend
on which prompts joined with it.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, ClassVar

from synthpref.backends.base import Backend, Capability, OnGenerated, OnScored
from synthpref.backends.cpu_attention import use_cpu_attention
from synthpref.backends.end_of_turn import identity_tag, stop_token_ids
from synthpref.backends.invariant_linear import make_row_invariant
from synthpref.backends.reasoning import split_reasoning
from synthpref.backends.segments import render_segment
from synthpref.backends.types import (
    Completion,
    CompletionRequest,
    GenerationRequest,
    GenerationResult,
    ScoreRequest,
    ScoreResult,
)

if TYPE_CHECKING:
    from synthpref.backends.output_head import LogitHead
    from synthpref.records import Message

log = logging.getLogger(__name__)

_DEVICE_LOCKS: dict[str, threading.Lock] = {}


def device_lock(device: str) -> threading.Lock:
    """One lock per device, shared by every backend instance on it.

    Stages run concurrently, but two forward passes on the same CPU cores (or GPU) only fight over
    them: each torch call already spreads its threads over every core, so two at once oversubscribe.
    """
    return _DEVICE_LOCKS.setdefault(device, threading.Lock())


def spread_over(device: str, n_devices: int) -> dict:
    """``from_pretrained`` arguments that spread a model's layers over ``n_devices`` GPUs starting
    at ``device`` (``gpus`` > 1), leaving a Ray replica's other GPUs to its other models."""
    import torch

    first = torch.device(device).index or 0
    gpus = range(first, first + n_devices)
    memory = {i: torch.cuda.get_device_properties(i).total_memory for i in gpus}
    return {"device_map": "auto", "max_memory": memory}


def load_model(
    path: str, device: str, dtype: str, trust_remote_code: bool = False, n_devices: int = 1
):
    """Load weights once per process: stages that share a model share this object, however the
    call spells its arguments (an ``lru_cache`` keys ``f(a, b, c, d)`` apart from ``f(a, b, c, d,
    1)``: a caller that left the defaults out loaded a second copy, ~1 GB for the embedded model)."""
    return _load_model(str(path), str(device), str(dtype), bool(trust_remote_code), int(n_devices))


def forget_loaded_models() -> None:
    """Drop this process's loaded models: the next :func:`load_model` reads the weights from disk
    again, as a new process would."""
    _load_model.cache_clear()


@lru_cache(maxsize=8)
def _load_model(path: str, device: str, dtype: str, trust_remote_code: bool, n_devices: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # synthpref draws its own progress; a second bar garbles it
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    spread = spread_over(device, n_devices) if n_devices > 1 else {}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **spread
    )
    if not spread:
        model.to(device)
    model.eval()
    use_cpu_attention(model)
    make_row_invariant(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on macOS and Windows
    except (OSError, AttributeError):
        return None


def _release_freed_memory() -> None:
    """Hand the heap memory freed by a finished batch back to the OS.

    Each batch allocates and frees hundreds of MB of activations and KV cache whose shapes change
    with the prompts' lengths. glibc keeps freed chunks in its heaps, and the holes left between
    longer-lived allocations grow with every batch, so without this a run's peak RSS creeps up with
    the number of prompts instead of staying at one batch's worth. ``malloc_trim`` costs about a
    millisecond per call.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def even_chunks(items: list[int], most: int) -> list[list[int]]:
    """Split into as few chunks of at most ``most`` as possible, of near-equal size.

    40 requests at most 32 a batch run as 20 + 20, not 32 + 8: the second batch of a greedy split
    costs nearly as much wall time per decode step as a full one.
    """
    n = -(-len(items) // most)
    size, extra = divmod(len(items), n) if n else (0, 0)
    out, k = [], 0
    for c in range(n):
        step = size + (c < extra)
        out.append(items[k : k + step])
        k += step
    return out


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class LocalModelBackend(Backend):
    """What every backend running weights in this process holds: the device, the dtype (``auto``:
    bfloat16 on CUDA, float32 on CPU), the identity pinned at construction and the device's lock.
    :class:`TransformersBackend` generates and scores;
    :class:`~synthpref.backends.transformers_reward.TransformersRewardBackend` runs reward models."""

    #: marks the identity of a backend whose outputs differ for the same weights (``reward:``)
    identity_tag: ClassVar[str] = ""

    def __init__(
        self,
        model_path: str,
        *,
        identity: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        max_context: int | None = None,
        trust_remote_code: bool = False,
        n_devices: int = 1,
    ) -> None:
        self.model_path = model_path
        self.n_devices = n_devices  # > 1: layers spread over GPUs device.. (inputs go to device)
        self.device = resolve_device(device)
        self.dtype = (
            dtype
            if dtype != "auto"
            else ("bfloat16" if self.device.startswith("cuda") else "float32")
        )
        self.batch_size = batch_size
        if identity is None:  # built without a spec: the path and what is in it
            from synthpref.backends.identity import model_identity

            identity = f"transformers:{model_path}:{self.identity_tag}{model_identity(model_path)}"
        self._identity = identity
        self._max_context = max_context
        self._trust = trust_remote_code
        self._lock = device_lock(self.device)

    @property
    def identity(self) -> str:
        """Pinned at construction, so a model rewritten mid-run cannot split one run's cache keys."""
        return f"{self._identity}:{self.dtype}"


class TransformersBackend(LocalModelBackend):
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {"generate", "score", "top_logprobs", "prefill", "complete"}
    )

    @cached_property
    def identity(self) -> str:
        """The local model's identity, tagged ``:eot`` where replies now stop at a chat template
        end-of-turn token that is not an EOS (``end_of_turn.identity_tag``)."""
        return super().identity + identity_tag(self.model_path)

    #: run a token prefix shared by several requests (score groups, a generation batch) once and reuse
    #: its KV cache (set False on an instance to compare, or if a model's cache cannot be copied)
    prefix_sharing: bool = True
    #: shortest shared prefix (tokens) worth a separate prefix pass
    min_shared_prefix: int = 16
    #: generate through ``decode_loop`` (rows leave the batch as they end, waiting rows join);
    #: False: ``model.generate`` on fixed batches (set on models whose cache cannot be stacked)
    continuous_batching: bool = True

    @property
    def model(self):
        return load_model(self.model_path, self.device, self.dtype, self._trust, self.n_devices)[0]

    @property
    def tokenizer(self):
        return load_model(self.model_path, self.device, self.dtype, self._trust, self.n_devices)[1]

    @property
    def context_window(self) -> int:
        return self._max_context or int(getattr(self.model.config, "max_position_embeddings", 2048))

    @cached_property
    def stop_ids(self) -> set[int]:
        """Token ids that end a reply, chat or raw: EOS and the chat template's end-of-turn."""
        return stop_token_ids(self.model.generation_config.eos_token_id, self.tokenizer)

    # generation -------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def render_prompt(self, request: GenerationRequest) -> str:
        if request.continue_final_message:
            return self.tokenizer.apply_chat_template(
                [m.model_dump() for m in request.messages],
                tokenize=False,
                continue_final_message=True,
            )
        return self.render_chat(request.messages, add_generation_prompt=True)

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        tok = self.tokenizer
        ids = [tok(self.render_prompt(r), add_special_tokens=False).input_ids for r in requests]
        return await self._generate_all(requests, ids, on_result, raw=False)

    async def complete(
        self, requests: Sequence[CompletionRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        """Raw text continued as chat generation would continue its rendering (same batching,
        seeded rows, stops), without splitting ``<think>`` reasoning off the text."""
        tok = self.tokenizer
        ids = [tok(r.prompt, add_special_tokens=False).input_ids for r in requests]
        return await self._generate_all(requests, ids, on_result, raw=True)

    async def _generate_all(
        self,
        requests: Sequence[GenerationRequest | CompletionRequest],
        ids: list[list[int]],
        on_result: OnGenerated | None,
        raw: bool,
    ) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)

        def report(i: int, out: GenerationResult) -> None:
            results[i] = out
            if on_result:
                on_result(i, out)

        if self.continuous_batching:
            try:
                await self._generate_continuous(requests, ids, raw, report)
            except Exception as exc:  # a cache the loop cannot stack, or a model it cannot run
                log.warning(
                    "continuous batching failed on %s (%s: %s); generating with model.generate",
                    self.model_path,
                    type(exc).__name__,
                    exc,
                )
                self.continuous_batching = False
            else:
                return results  # type: ignore[return-value]
        left = [i for i in range(len(requests)) if results[i] is None]
        for group in self._plan_generation([requests[i] for i in left], [ids[i] for i in left]):
            group = [left[k] for k in group]
            per = max(1, self.batch_size // requests[group[0]].params.n)
            for batch in even_chunks(group, per):
                outs = await asyncio.to_thread(
                    self._generate_batch, [requests[i] for i in batch], [ids[i] for i in batch], raw
                )
                for i, out in zip(batch, outs, strict=True):
                    report(i, out)
        return results  # type: ignore[return-value]

    def _plan_generation(
        self,
        requests: Sequence[GenerationRequest | CompletionRequest],
        ids: Sequence[list[int]],
    ) -> list[list[int]]:
        """Requests grouped by sampling parameters (``model.generate`` takes one set per batch),
        each group sorted by prompt length (rows that start together pad little)."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            key = r.params.model_copy(update={"seed": None}).model_dump_json() + str(_top_k(r))
            groups.setdefault(key, []).append(i)
        return [_shortest_first(groups[key], requests, ids) for key in sorted(groups)]

    @cached_property
    def _engine(self):
        """This backend's running batch (``decode_loop.DecodeEngine``), shared by its calls."""
        from synthpref.backends.decode_loop import DecodeEngine, DecodeLoop

        loop = DecodeLoop(self.model, self.tokenizer, after_prefill=_release_freed_memory)
        return DecodeEngine(
            loop,
            self._lock,
            max_rows=self.batch_size,
            refill_at=max(1, self.batch_size // 4),
            on_idle=_release_freed_memory,
        )

    async def _generate_continuous(
        self,
        requests: Sequence[GenerationRequest | CompletionRequest],
        ids: list[list[int]],
        raw: bool,
        report: Callable[[int, GenerationResult], None],
    ) -> None:
        """Every request through the model's shared running batch, shortest prompt first; each
        reported as it ends. Raises the engine's error if a forward pass failed."""
        from synthpref.backends.decode_loop import Job, Settings
        from synthpref.backends.row_sampling import row_generators

        loop = asyncio.get_running_loop()
        # results are reported in the caller's context, as they were from asyncio.to_thread (a
        # context variable set around this call, e.g. the stage and shard, reaches on_result)
        context = contextvars.copy_context()
        order = _shortest_first(range(len(requests)), requests, ids)
        futures: list[asyncio.Future] = []
        jobs: list[Job] = []
        stop_ids = frozenset(self.stop_ids)
        for i in order:
            req = requests[i]
            p, top_k = req.params, _top_k(req)
            future = loop.create_future()

            def done(rows, i=i, req=req, top_k=top_k, future=future) -> None:
                def finish() -> None:
                    if future.done():  # the call was cancelled or failed meanwhile
                        return
                    completions = []
                    for row in rows:
                        top = ([v for v, _ in row.top], [t for _, t in row.top]) if top_k else None
                        completions.append(self._completion(row.tokens, stop_ids, req, top, raw))
                    report(i, GenerationResult(completions=completions, prompt_tokens=len(ids[i])))
                    future.set_result(None)

                loop.call_soon_threadsafe(finish, context=context)

            def failed(exc, future=future) -> None:
                loop.call_soon_threadsafe(
                    lambda: future.done() or future.set_exception(exc)  # type: ignore[func-returns-value]
                )

            gens = (
                row_generators([req], self.identity, p.n, self.device)
                if p.temperature
                else [None] * p.n
            )
            settings = Settings(
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                stop_ids=stop_ids,
                stop_strings=tuple(p.stop),
                top_k=top_k,
            )
            jobs.append(Job(ids[i], p.n, settings, gens, done, failed))
            futures.append(future)
        engine = self._engine
        engine.submit(jobs)
        try:
            await asyncio.gather(*futures)
        except BaseException:
            engine.cancel(jobs)
            for f in futures:  # the others' outcomes are dropped with this call
                if f.done() and not f.cancelled():
                    f.exception()
                else:
                    f.cancel()
            raise

    def _generate_batch(
        self,
        batch: list[GenerationRequest] | list[CompletionRequest],
        ids: list[list[int]],
        raw: bool = False,
    ) -> list[GenerationResult]:
        import torch
        from transformers import LogitsProcessorList

        from synthpref.backends.row_sampling import RowSampler, row_generators

        tok, model = self.tokenizer, self.model
        params, top_k = batch[0].params, _top_k(batch[0])
        kwargs = dict(
            max_new_tokens=params.max_tokens,
            do_sample=False,  # sampling, when asked for, happens in RowSampler
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=sorted(self.stop_ids) or None,
            return_dict_in_generate=True,
            output_logits=top_k > 0,
        )
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=tok)

        def sampler() -> dict:
            if params.temperature == 0:
                return {}
            gens = row_generators(batch, self.identity, params.n, self.device)
            warp = RowSampler(gens, params.temperature, params.top_p)
            return {"logits_processor": LogitsProcessorList([warp])}

        with self._lock, torch.inference_mode():
            inputs = self._generation_inputs(ids, params.n)
            try:
                out = model.generate(**inputs, **kwargs, **sampler())
            except Exception as exc:
                if "past_key_values" not in inputs:
                    raise
                log.warning(
                    "shared-prefix generation failed on %s (%s: %s); generating without it",
                    self.model_path,
                    type(exc).__name__,
                    exc,
                )
                self.prefix_sharing = False
                inputs = self._generation_inputs(ids, params.n)
                out = model.generate(**inputs, **kwargs, **sampler())
            new = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
            top = None
            if top_k:  # one request group: every request asks for the same k
                logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
                vals, idx = logprobs.topk(top_k, dim=-1)
                top = (vals.tolist(), idx.tolist())
                del logprobs
            del inputs, out
        results, stop_ids = [], self.stop_ids
        for bi, req in enumerate(batch):
            completions = []
            for s in range(params.n):
                row = bi * params.n + s
                mine = (top[0][row], top[1][row]) if top else None
                completions.append(self._completion(new[row], stop_ids, req, mine, raw))
            results.append(GenerationResult(completions=completions, prompt_tokens=len(ids[bi])))
        _release_freed_memory()
        return results

    def _generation_inputs(self, ids: list[list[int]], n: int) -> dict:
        """``generate`` inputs for prompts ``ids``, each repeated ``n`` times (row ``b * n + s``).

        When the prompts share a token prefix (a judge's rubric, a common system prompt) of at least
        ``min_shared_prefix`` tokens, the prefix runs once and its KV cache is copied to every row;
        each row then holds [prefix][padding][rest of its prompt], and the positions that ``generate``
        derives from the attention mask skip the padding, so every row is computed as if unpadded.
        Otherwise the rows are left-padded as usual.
        """
        import torch

        tok, dev = self.tokenizer, self.device
        shortest = min(len(x) for x in ids)
        p = 0
        if self.prefix_sharing and len(ids) * n > 1:
            p = shortest - 1  # every row keeps at least one token of its own to run
            for row in ids[1:]:
                p = _shared_length(ids[0], row, p)
        if p < self.min_shared_prefix:
            p = 0
        width = max(len(x) for x in ids) - p
        rows = len(ids) * n
        input_ids = torch.full((rows, p + width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, p + width), dtype=torch.long)
        input_ids[:, :p] = torch.tensor(ids[0][:p], dtype=torch.long)
        mask[:, :p] = 1
        for b, x in enumerate(ids):
            rest = torch.tensor(x[p:], dtype=torch.long)
            input_ids[b * n : (b + 1) * n, p + width - len(rest) :] = rest
            mask[b * n : (b + 1) * n, p + width - len(rest) :] = 1
        inputs = {"input_ids": input_ids.to(dev), "attention_mask": mask.to(dev)}
        if p:
            decoder = self.model.get_decoder()
            cache = decoder(input_ids=input_ids[:1, :p].to(dev), use_cache=True).past_key_values
            cache.batch_repeat_interleave(rows)
            inputs["past_key_values"] = cache
        return inputs

    def _completion(self, ids, stop_ids, req, top_k, raw: bool = False) -> Completion:
        """One row's tokens as a completion: cut after the first of ``stop_ids``, then at the
        first stop string; the reasoning split off unless ``raw``. ``top_k``: the row's top
        log-probabilities and token ids per step, or None."""
        tok = self.tokenizer
        finish = "length"
        end = len(ids)
        for k, t in enumerate(ids):
            if t in stop_ids:
                finish, end = "stop", k + 1
                break
        text = tok.decode(ids[:end], skip_special_tokens=True)
        for s in req.params.stop:
            pos = text.find(s)
            if pos >= 0:
                text, finish = text[:pos], "stop"
        top = None
        if top_k is not None:
            vals, idx = top_k
            top = [
                {tok.decode([i]): v for v, i in zip(vals[k], idx[k], strict=True)}
                for k in range(end)
            ]
        answer, reasoning = (text, None) if raw else split_reasoning(text)
        return Completion(
            text=answer,
            reasoning=reasoning,
            finish_reason=finish,
            completion_tokens=end,
            top_logprobs=top,
        )

    # scoring ----------------------------------------------------------------------------------

    async def score(
        self, requests: Sequence[ScoreRequest], on_result: OnScored | None = None
    ) -> list[ScoreResult]:
        rendered = [render_segment(self.tokenizer, r, self.context_window) for r in requests]
        results: list[ScoreResult | None] = [None] * len(requests)
        rest = await self._score_shared_groups(rendered, results, on_result)
        order = sorted(rest, key=lambda i: len(rendered[i].token_ids))
        for k in range(0, len(order), self.batch_size):
            batch = order[k : k + self.batch_size]
            outs = await asyncio.to_thread(self._score_batch, [rendered[i] for i in batch])
            for i, out in zip(batch, outs, strict=True):
                results[i] = out
                if on_result:
                    on_result(i, out)
        return results  # type: ignore[return-value]

    def _score_batch(self, batch) -> list[ScoreResult]:
        import torch

        from synthpref.backends.output_head import logit_head

        with self._lock, torch.inference_mode():
            head = logit_head(self.model)
            kept = max(len(r.token_ids) for r in batch) - min(r.start for r in batch) + 1
            results = []
            for rows in even_chunks(list(range(len(batch))), head.max_rows(kept)):
                results += self._score_rows(head, [batch[i] for i in rows])
            _release_freed_memory()
        return results

    def _score_rows(self, head: LogitHead, batch) -> list[ScoreResult]:
        """One right-padded forward pass; only positions from the earliest segment's on are kept."""
        import torch

        tok = self.tokenizer
        width = max(len(r.token_ids) for r in batch)
        lo = min(r.start for r in batch) - 1
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : len(r.token_ids)] = torch.tensor(r.token_ids)
            mask[b, : len(r.token_ids)] = 1
        out, _ = head.forward(
            lo,
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            use_cache=False,
        )
        results = [
            _segment_result(head, tok, out[b, r.start - 1 - lo : r.end - 1 - lo], r)
            for b, r in enumerate(batch)
        ]
        del out
        return results

    # prefix sharing ---------------------------------------------------------------------------

    async def _score_shared_groups(self, rendered, results, on_result) -> list[int]:
        """Score the requests that share a prefix with others; return the indices left to score."""
        if not self.prefix_sharing or len(rendered) < 2:
            return list(range(len(rendered)))
        groups, rest = plan_shared_prefixes(
            [r.token_ids for r in rendered], [r.start for r in rendered], self.min_shared_prefix
        )
        for n, (prefix_len, members) in enumerate(groups):
            try:
                outs = await asyncio.to_thread(
                    self._score_shared, prefix_len, [rendered[i] for i in members]
                )
            except Exception as exc:  # e.g. a model whose cache cannot be copied: score unshared
                log.warning(
                    "prefix sharing failed on %s (%s: %s); scoring without it",
                    self.model_path,
                    type(exc).__name__,
                    exc,
                )
                self.prefix_sharing = False
                return sorted(rest + [i for _, m in groups[n:] for i in m])
            for i, out in zip(members, outs, strict=True):
                results[i] = out
                if on_result:
                    on_result(i, out)
        return rest

    def _score_shared(self, prefix_len: int, batch) -> list[ScoreResult]:
        """Run ``token_ids[:prefix_len]`` (equal in every request of ``batch``) once, then each
        request's remainder on a copy of its KV cache, in batches of at most as many tokens as the
        unshared path would run."""
        import copy

        import torch

        from synthpref.backends.output_head import logit_head

        tok = self.tokenizer
        p = prefix_len
        width = max(len(r.token_ids) - p for r in batch)
        results = []
        with self._lock, torch.inference_mode():
            head = logit_head(self.model)
            per = min(max(1, self.batch_size * (p + width) // width), head.max_rows(width))
            out, prefix_cache = head.forward(
                p - 1,
                input_ids=torch.tensor([batch[0].token_ids[:p]], device=self.device),
                use_cache=True,
            )
            last = out[0, -1:]
            for k in range(0, len(batch), per):
                chunk = batch[k : k + per]
                w = max(len(r.token_ids) - p for r in chunk)
                ids = torch.full((len(chunk), w), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), p + w), dtype=torch.long)
                mask[:, :p] = 1
                for b, r in enumerate(chunk):
                    suffix = r.token_ids[p:]
                    ids[b, : len(suffix)] = torch.tensor(suffix)
                    mask[b, p : p + len(suffix)] = 1
                cache = copy.deepcopy(prefix_cache)
                if len(chunk) > 1:
                    cache.batch_repeat_interleave(len(chunk))
                positions = torch.arange(p, p + w, device=self.device)[None].expand(len(chunk), -1)
                out, _ = head.forward(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                )
                for b, r in enumerate(chunk):
                    # row j of `rows` is position p - 1 + j of the full sequence
                    rows = torch.cat([last, out[b]], dim=0)
                    results.append(_segment_result(head, tok, rows[r.start - p : r.end - p], r))
                del cache, out
            _release_freed_memory()
        return results


def _segment_result(head: LogitHead, tok, rows, r) -> ScoreResult:
    """Log-probabilities of a segment's tokens from the model outputs (``head.forward``'s rows) at
    the positions that predict them."""
    import torch

    logits = head.logits(rows)
    targets = torch.tensor(r.token_ids[r.start : r.end], device=logits.device)
    lp = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    return ScoreResult(
        token_logprobs=lp.tolist(),
        tokens=tok.convert_ids_to_tokens(r.token_ids[r.start : r.end]),
        truncated_tokens=r.truncated_tokens,
    )


def plan_shared_prefixes(
    token_ids: Sequence[Sequence[int]], starts: Sequence[int], min_shared: int
) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Group requests by a common token prefix that ends at or before each one's scored segment.

    First, requests whose whole context (every token before the scored segment) is identical form a
    group: the follow-ups of one response, or the candidates of one prompt. The requests left over are
    sorted, which puts token lists with long common prefixes next to each other, and grouped greedily:
    a request joins the current group when it shares the group's whole prefix (a group of one may
    shorten its prefix to what the two share). Groups of two or more with a prefix of at least
    ``min_shared`` tokens are returned as ``(prefix_length, indices)``, the other indices separately.
    """
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, ids in enumerate(token_ids):
        by_context.setdefault(tuple(ids[: starts[i]]), []).append(i)
    groups: list[tuple[int, list[int]]] = []
    single: list[int] = []
    for context, members in by_context.items():
        if len(members) >= 2 and len(context) >= min_shared:
            groups.append((len(context), members))
        else:
            single += members

    rest: list[int] = []
    members = []
    length = 0

    def close() -> None:
        if len(members) >= 2 and length >= min_shared:
            groups.append((length, list(members)))
        else:
            rest.extend(members)

    for i in sorted(single, key=lambda i: list(token_ids[i])):
        if members:
            first = token_ids[members[0]]
            n = _shared_length(first, token_ids[i], min(length, starts[i]))
            if n == length or (len(members) == 1 and n >= min_shared):
                members.append(i)
                length = n
                continue
            close()
        members, length = [i], starts[i]
    if members:
        close()
    return groups, sorted(rest)


def _shared_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, counting at most ``limit`` tokens."""
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _shortest_first(
    indices: Iterable[int],
    requests: Sequence[GenerationRequest | CompletionRequest],
    ids: Sequence[list[int]],
) -> list[int]:
    """``indices`` by prompt length (rows that start together pad little), ties by request, so the
    order does not depend on the order given."""
    return sorted(indices, key=lambda i: (len(ids[i]), requests[i].cache_key("")))


def _top_k(request: GenerationRequest | CompletionRequest) -> int:
    """Top log-probabilities asked per token (a raw completion asks for none)."""
    return getattr(request, "top_logprobs", 0)
