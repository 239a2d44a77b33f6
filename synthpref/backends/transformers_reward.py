"""Reward models on transformers: a sequence classifier's head over whole conversations.

A ``transformers`` spec with ``task: reward`` builds :class:`TransformersRewardBackend` instead of
the generating backend. It loads the directory with ``AutoModelForSequenceClassification`` and
refuses, before any number is produced, a directory that is not a trained reward model: a causal
LM (its config names a ``...ForCausalLM``), a checkpoint without head weights (transformers would
initialise a random head) or with a head of another shape than ``num_labels``.

Each conversation is rendered with the tokenizer's chat template exactly as a plain
``apply_chat_template(messages, tokenize=True)`` does, fitted to the context by the one rule of
``turns.py``, sorted by length and run in right-padded batches. The model pools the rightmost token
that is not its ``pad_token_id`` (transformers' sequence classifiers), so rows are padded with that
very id: every value equals an unpadded forward pass of the same conversation. Values are the head's
raw outputs, in ``id2label`` order.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from synthpref.backends.base import (
    BackendError,
    Capability,
    CapabilityError,
    OnGenerated,
    OnRewarded,
    OnScored,
    RequestError,
)
from synthpref.backends.transformers_backend import (
    LocalModelBackend,
    _release_freed_memory,
    even_chunks,
    spread_over,
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

_EXPECTED = (
    "a sequence-classification reward model (AutoModelForSequenceClassification, e.g. "
    "architectures: [LlamaForSequenceClassification]) with its trained head"
)
_GENERATING = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


class RewardModelError(BackendError, ValueError):
    """A model directory given as a reward model (``task: reward``) is not one: a causal LM, or a
    checkpoint whose head is missing or does not match its config. Every request would fail alike,
    so it is a fault of the configuration (and a ValueError, so a spec validator may raise it)."""


def check_reward_config(path: str) -> None:
    """Refuse a local directory whose ``config.json`` names only generating architectures.

    Cheap (one small file, no weights) and silent where nothing can be known yet: a hub id, a
    directory that does not exist yet, a config that names no architecture.
    """
    config = Path(path) / "config.json"
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text())
        architectures = data.get("architectures") or []
        remote_classifier = "AutoModelForSequenceClassification" in (data.get("auto_map") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        return
    if remote_classifier:  # the repository's own code maps a classifier (trust_remote_code)
        return
    if architectures and all(str(a).endswith(_GENERATING) for a in architectures):
        raise RewardModelError(
            f"{path} is a generating model (config.json architectures: {architectures}), not a "
            f"reward model: task: reward expects {_EXPECTED}; use task: generate for this model"
        )


@lru_cache(maxsize=4)
def load_reward_model(
    path: str, device: str, dtype: str, trust_remote_code: bool = False, n_devices: int = 1
):
    """(model, tokenizer), once per process; refuses what is not a trained reward model.
    ``n_devices`` > 1: the layers spread over that many GPUs from ``device`` (``gpus`` on Ray)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # synthpref draws its own progress
    check_reward_config(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    spread = spread_over(device, n_devices) if n_devices > 1 else {}
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            dtype=getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            # a mismatched head is reported in `info` (and refused below) rather than raised
            # as a bare RuntimeError that does not say what was expected
            ignore_mismatched_sizes=True,
            **spread,
        )
    except ValueError as exc:  # no sequence-classification class for this config
        raise RewardModelError(f"{path} cannot be loaded as {_EXPECTED}: {exc}") from exc
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        shapes = "; ".join(
            f"{key}: checkpoint {list(ckpt)}, config {list(want)}" for key, ckpt, want in mismatched
        )
        raise RewardModelError(
            f"{path}: the checkpoint's head does not match its config ({shapes}); expected "
            f"{_EXPECTED} whose num_labels (id2label in config.json) equals the head's outputs"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise RewardModelError(
            f"{path}: the checkpoint has no weights for {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}, which transformers would fill with random "
            f"numbers; expected {_EXPECTED}"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise RewardModelError(
            f"{path}: the tokenizer has no chat template, so conversations cannot be rendered the "
            f"way the reward model was trained to read them; expected {_EXPECTED} and its template"
        )
    if not spread:
        model.to(device)
    model.eval()
    return model, tokenizer


def pooling_pad_id(config_pad: int | None, fallback: int, last_tokens: Sequence[int]) -> int:
    """The id to pad a batch with, which the model's pooling must also take for its pad id.

    A model with a ``pad_token_id`` pools the rightmost token that is not it, alone or padded, so
    padding with it changes nothing. A model without one pools the last token when run alone; padding
    with an id that ends none of the batch's rows keeps that (the tokenizer's pad or eos by default).
    """
    if config_pad is not None:
        return config_pad
    taken = set(last_tokens)
    # among fallback, 0, 1, ... len(taken) one is free, and all are valid ids of any vocabulary
    return next(c for c in (fallback, *range(len(taken) + 1)) if c not in taken)


class TransformersRewardBackend(LocalModelBackend):
    capabilities: ClassVar[frozenset[Capability]] = frozenset({"reward"})
    identity_tag = "reward:"

    def __init__(self, model_path: str, **settings: Any) -> None:
        check_reward_config(model_path)  # a causal LM fails the run before anything else runs
        super().__init__(model_path, **settings)

    def _loaded(self):
        return load_reward_model(
            self.model_path, self.device, self.dtype, self._trust, self.n_devices
        )

    @property
    def model(self):
        return self._loaded()[0]

    @property
    def tokenizer(self):
        return self._loaded()[1]

    @property
    def text_config(self):
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def context_window(self) -> int:
        return self._max_context or int(
            getattr(self.text_config, "max_position_embeddings", None) or 2048
        )

    @property
    def labels(self) -> list[str]:
        config = self.model.config
        id2label = getattr(config, "id2label", None) or {}
        return [str(id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        raise CapabilityError(self._only_rewards("generate text"))

    async def score(
        self, requests: Sequence[ScoreRequest], on_result: OnScored | None = None
    ) -> list[ScoreResult]:
        raise CapabilityError(self._only_rewards("score given text (teacher forcing)"))

    def _only_rewards(self, what: str) -> str:
        return (
            f"{self.model_path} is loaded as a reward model (task: reward): it scores whole "
            f"conversations for reward-model judges and cannot {what}; declare the generating "
            "model as its own spec with task: generate (the default)"
        )

    async def reward(
        self, requests: Sequence[RewardRequest], on_result: OnRewarded | None = None
    ) -> list[RewardResult]:
        if not requests:
            return []
        fitted = [self._fit(i, r) for i, r in enumerate(requests)]
        results: list[RewardResult | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: len(fitted[i][0]))
        for batch in even_chunks(order, self.batch_size):
            values = await asyncio.to_thread(self._reward_batch, [fitted[i][0] for i in batch])
            labels = self.labels
            for i, row in zip(batch, values, strict=True):
                ids, dropped = fitted[i]
                results[i] = RewardResult(
                    values=row, labels=labels, tokens=len(ids), dropped_turns=dropped
                )
                if on_result:
                    on_result(i, results[i])
        return results  # type: ignore[return-value]

    def _fit(self, i: int, request: RewardRequest) -> tuple[list[int], int]:
        """(token ids of the conversation that fits, turns dropped); RequestError with the index."""
        tok = self.tokenizer
        ids, dropped = fit_request(i, request, lambda m: chat_ids(tok, m), self.context_window)
        if not ids:
            raise RequestError(f"reward request {i}: the chat template rendered no token", index=i)
        return ids, dropped

    def _reward_batch(self, batch: list[list[int]]) -> list[list[float]]:
        """One right-padded forward pass; the model's own pooling picks each row's last token."""
        import torch

        tok, model, config = self.tokenizer, self.model, self.text_config
        with self._lock, torch.inference_mode():
            own_pad = getattr(config, "pad_token_id", None)
            fallback = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            pad = pooling_pad_id(own_pad, fallback or 0, [ids[-1] for ids in batch])
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, ids in enumerate(batch):
                input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[b, : len(ids)] = 1
            _set_pad(model, config, pad)
            try:
                out = model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    use_cache=False,
                )
            finally:
                _set_pad(model, config, own_pad)
            logits = getattr(out, "logits", None)
            if logits is None:
                raise BackendError(
                    f"{self.model_path}: the model's forward returned no logits "
                    f"({type(out).__name__}); expected {_EXPECTED}"
                )
            values = logits.float().reshape(len(batch), -1).tolist()
            del out, logits
        _release_freed_memory()
        return values


def _set_pad(model, text_config, pad: int | None) -> None:
    """Point the model's pooling at ``pad`` (config and text config, which may be two objects)."""
    for config in {id(model.config): model.config, id(text_config): text_config}.values():
        config.pad_token_id = pad
