"""Local Hugging Face transformers backend (CPU or CUDA); the embedded default runs on it.

Generation is batched and left-padded; requests are grouped by sampling parameters and sorted by length
so padding stays small. A batch's random seed is derived from its requests, so rerunning the same
unfinished batches after a crash reproduces exactly what an uninterrupted run would have produced.
Scoring runs one forward pass per batch and applies the output head only to the scored positions.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import ClassVar

from synthpref.backends.base import Backend, Capability, OnGenerated, OnScored
from synthpref.backends.segments import render_segment
from synthpref.backends.types import (
    Completion,
    GenerationRequest,
    GenerationResult,
    ScoreRequest,
    ScoreResult,
)


@lru_cache(maxsize=8)
def load_model(path: str, device: str, dtype: str, trust_remote_code: bool = False):
    """Load weights once per process: stages that share a model share this object."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TransformersBackend(Backend):
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {"generate", "score", "top_logprobs", "prefill"}
    )

    def __init__(
        self,
        model_path: str,
        *,
        identity: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        max_context: int | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.model_path = model_path
        self.device = resolve_device(device)
        self.dtype = (
            dtype
            if dtype != "auto"
            else ("bfloat16" if self.device.startswith("cuda") else "float32")
        )
        self.batch_size = batch_size
        self._identity = identity or f"transformers:{model_path}"
        self._max_context = max_context
        self._trust = trust_remote_code
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        return f"{self._identity}:{self.dtype}"

    @property
    def model(self):
        return load_model(self.model_path, self.device, self.dtype, self._trust)[0]

    @property
    def tokenizer(self):
        return load_model(self.model_path, self.device, self.dtype, self._trust)[1]

    @property
    def context_window(self) -> int:
        return self._max_context or int(getattr(self.model.config, "max_position_embeddings", 2048))

    # generation -------------------------------------------------------------------------------

    def render_prompt(self, request: GenerationRequest) -> str:
        messages = [m.model_dump() for m in request.messages]
        if request.continue_final_message:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, continue_final_message=True
            )
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        for batch in self._plan_generation(requests):
            outs = await asyncio.to_thread(self._generate_batch, [requests[i] for i in batch])
            for i, out in zip(batch, outs, strict=True):
                results[i] = out
                if on_result:
                    on_result(i, out)
        return results  # type: ignore[return-value]

    def _plan_generation(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        tok = self.tokenizer
        lengths = [
            len(tok(self.render_prompt(r), add_special_tokens=False).input_ids) for r in requests
        ]
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            key = r.params.model_copy(update={"seed": None}).model_dump_json() + str(r.top_logprobs)
            groups.setdefault(key, []).append(i)
        batches = []
        for key in sorted(groups):
            idx = sorted(groups[key], key=lambda i: (lengths[i], requests[i].cache_key("")))
            per = max(1, self.batch_size // requests[idx[0]].params.n)
            batches += [idx[k : k + per] for k in range(0, len(idx), per)]
        return batches

    def _generate_batch(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        import torch

        tok, model = self.tokenizer, self.model
        params = batch[0].params
        texts = [self.render_prompt(r) for r in batch]
        tok.padding_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.device
        )
        seed_src = "|".join(r.cache_key(self.identity) for r in batch) + str(params.seed)
        seed = int(hashlib.sha256(seed_src.encode()).hexdigest()[:8], 16)
        sample = params.temperature > 0
        kwargs = dict(
            max_new_tokens=params.max_tokens,
            do_sample=sample,
            num_return_sequences=params.n,
            pad_token_id=tok.pad_token_id,
            return_dict_in_generate=True,
            output_logits=batch[0].top_logprobs > 0,
        )
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=tok)
        with self._lock, torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(seed)
            out = model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        new = out.sequences[:, prompt_len:].tolist()
        eos_ids = _eos_ids(model, tok)
        logprobs = None
        if batch[0].top_logprobs:
            logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        results = []
        for bi, req in enumerate(batch):
            completions = []
            for s in range(params.n):
                row = bi * params.n + s
                completions.append(self._completion(new[row], eos_ids, req, logprobs, row))
            n_prompt = int(enc["attention_mask"][bi].sum())
            results.append(GenerationResult(completions=completions, prompt_tokens=n_prompt))
        return results

    def _completion(self, ids, eos_ids, req, logprobs, row) -> Completion:
        tok = self.tokenizer
        finish = "length"
        end = len(ids)
        for k, t in enumerate(ids):
            if t in eos_ids:
                finish, end = "stop", k + 1
                break
        text = tok.decode(ids[:end], skip_special_tokens=True)
        for s in req.params.stop:
            pos = text.find(s)
            if pos >= 0:
                text, finish = text[:pos], "stop"
        top = None
        if logprobs is not None:
            top = []
            for k in range(end):
                vals, idx = logprobs[row, k].topk(req.top_logprobs)
                top.append({tok.decode([int(i)]): float(v) for v, i in zip(vals, idx, strict=True)})
        return Completion(text=text, finish_reason=finish, completion_tokens=end, top_logprobs=top)

    # scoring ----------------------------------------------------------------------------------

    async def score(
        self, requests: Sequence[ScoreRequest], on_result: OnScored | None = None
    ) -> list[ScoreResult]:
        rendered = [render_segment(self.tokenizer, r, self.context_window) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(rendered[i].token_ids))
        results: list[ScoreResult | None] = [None] * len(requests)
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

        tok, model = self.tokenizer, self.model
        width = max(len(r.token_ids) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : len(r.token_ids)] = torch.tensor(r.token_ids)
            mask[b, : len(r.token_ids)] = 1
        head = model.get_output_embeddings()
        cap = getattr(model.config, "final_logit_softcapping", None)
        with self._lock, torch.inference_mode():
            hidden = model.get_decoder()(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).last_hidden_state
            results = []
            for b, r in enumerate(batch):
                logits = head(hidden[b, r.start - 1 : r.end - 1]).float()
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                targets = torch.tensor(r.token_ids[r.start : r.end], device=logits.device)
                lp = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
                results.append(
                    ScoreResult(
                        token_logprobs=lp.tolist(),
                        tokens=tok.convert_ids_to_tokens(r.token_ids[r.start : r.end]),
                        truncated_tokens=r.truncated_tokens,
                    )
                )
        return results


def _eos_ids(model, tok) -> set[int]:
    ids = model.generation_config.eos_token_id
    out = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    if tok.eos_token_id is not None:
        out.add(tok.eos_token_id)
    return out
