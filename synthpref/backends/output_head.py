"""Logits for scored positions only, equal to what the model's own forward pass returns.

Scoring applies the output head to the few hidden states that predict a segment's tokens: projecting
every position onto the vocabulary would dominate the cost of long conversations. But several families
rescale their logits in the forward pass after the head (Granite divides by ``logits_scaling``, Cohere
multiplies by ``logit_scale``, Falcon-H1 by ``lm_head_multiplier``, Gemma 2 soft-caps), and a head
applied by hand silently skips that, giving log-probabilities that disagree with vLLM and with the
model itself. The known rescalings are replayed here, and, because the next family may add one nobody
listed, each loaded model is checked once on a probe sequence: if head-on-hidden-states does not
reproduce ``model(ids).logits``, scoring runs through the model's forward instead (slower, and it
materialises logits for every kept position, which ``max_rows`` bounds).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

#: (config attribute, how the forward pass applies it after the head), in the order applied
KNOWN_TRANSFORMS: tuple[tuple[str, Callable[[torch.Tensor, float], torch.Tensor]], ...] = (
    ("logits_scaling", lambda x, v: x / v),  # Granite family
    ("logit_scale", lambda x, v: x * v),  # Cohere family
    ("lm_head_multiplier", lambda x, v: x * v),  # Falcon-H1
    ("final_logit_softcapping", lambda x, v: torch.tanh(x / v) * v),  # Gemma 2 and 3
)

#: how far the head path's log-softmax may be from the forward's on the probe (nats)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
LOW_PRECISION_TOLERANCE = 2e-2
#: most logit values the forward path materialises in one pass (1 GiB in float32)
FORWARD_LOGITS_BUDGET = 2**28

_PROBE_LENGTH = 12
_HEADS: weakref.WeakKeyDictionary[Any, LogitHead] = weakref.WeakKeyDictionary()


def logit_head(model) -> LogitHead:
    """The checked head of a loaded model, built once per model object.

    The first call runs two forward passes on a short probe; call it under the device lock.
    """
    head = _HEADS.get(model)
    if head is None:
        head = _HEADS[model] = LogitHead(model)
    return head


class LogitHead:
    """Runs the model for scoring and turns what it kept into float32 logits.

    ``exact`` says which path is used: True, the decoder's hidden states are kept and the head plus
    the known rescalings run on the rows that are needed; False, the model's forward returns logits.
    """

    def __init__(self, model) -> None:
        self._model = weakref.ref(model)  # a strong one would keep its weak-keyed cache entry alive
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        config = model.config.get_text_config()
        self.transforms = [
            (name, fn, float(getattr(config, name)))
            for name, fn in KNOWN_TRANSFORMS
            if getattr(config, name, None) not in (None, 0, False)
        ]
        self.vocab = int(self.head.weight.shape[0])
        self._keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.exact = self._verify()

    @property
    def model(self):
        return self._model()

    def forward(self, keep_from: int = 0, **inputs) -> tuple[torch.Tensor, Any]:
        """Run the model on ``inputs`` (``input_ids`` plus decoder kwargs); return its per-position
        outputs from position ``keep_from`` on (hidden states or logits, for ``logits``) and the cache.
        """
        if self.exact:
            out = self.decoder(**inputs)
            return out.last_hidden_state[:, keep_from:], out.past_key_values
        width = inputs["input_ids"].shape[1]
        if self._keeps:
            out = self.model(**inputs, logits_to_keep=width - keep_from)
            return out.logits, out.past_key_values
        out = self.model(**inputs)
        return out.logits[:, keep_from:], out.past_key_values

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits for rows returned by ``forward``."""
        return self._apply_head(rows) if self.exact else rows.float()

    def _apply_head(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.head(hidden)
        for _, fn, value in self.transforms:  # in the head's dtype, as the forward pass does
            x = fn(x, value)
        return x.float()

    def max_rows(self, positions: int) -> int:
        """How many sequences one pass may run when each keeps ``positions`` positions."""
        if self.exact:
            return 2**31
        return max(1, FORWARD_LOGITS_BUDGET // (max(1, positions) * self.vocab))

    def _verify(self) -> bool:
        name = type(self.model).__name__
        device = self.head.weight.device
        probe = (torch.arange(_PROBE_LENGTH, device=device) * 7919 + 11) % self.vocab
        try:
            with torch.inference_mode():
                expected = self.model(input_ids=probe[None]).logits.float().log_softmax(-1)
                hidden = self.decoder(input_ids=probe[None]).last_hidden_state
                got = self._apply_head(hidden).log_softmax(-1)
            gap = float((expected - got).abs().max())
        except Exception as exc:  # a model without a separable decoder and head
            log.warning(
                "output head of %s cannot be applied on its own (%s: %s); scoring through the "
                "model's forward pass",
                name,
                type(exc).__name__,
                exc,
            )
            return False
        dtype = self.head.weight.dtype
        tolerance = TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)
        applied = ", ".join(n for n, _, _ in self.transforms) or "none"
        if gap <= tolerance:
            log.info(
                "output head of %s reproduces its logits (rescaling: %s; gap %.2g): scoring applies "
                "it to the scored positions only",
                name,
                applied,
                gap,
            )
            return True
        log.warning(
            "output head of %s does not reproduce the model's logits (rescaling applied: %s; "
            "log-prob gap %.3g > %.1g on a probe): scoring through the model's forward pass, slower",
            name,
            applied,
            gap,
            tolerance,
        )
        return False
