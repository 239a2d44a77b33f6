"""Scored log-probabilities equal the model's own forward pass on families that rescale their logits.

Granite divides its logits by ``logits_scaling``, Cohere multiplies them by ``logit_scale``, Falcon-H1
by ``lm_head_multiplier``. The backend applies the output head to hidden states itself, so each family
is checked on a tiny randomly initialised model (scale far from 1) against
``model(ids).logits.log_softmax(-1)``, on the plain and the prefix-shared scoring paths, plus one
family whose rescaling the backend does not know.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
import transformers

from synthpref.backends import output_head
from synthpref.backends.segments import render_segment
from synthpref.backends.transformers_backend import TransformersBackend
from synthpref.backends.types import ScoreRequest
from synthpref.records import Message

SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def _configs() -> dict[str, tuple[str, dict]]:
    configs = {
        "llama": ("LlamaConfig", {}),
        "granite": ("GraniteConfig", {"logits_scaling": 0.25}),
        "cohere": ("CohereConfig", {"logit_scale": 4.0}),
    }
    if hasattr(transformers, "FalconH1Config"):
        configs["falcon_h1"] = (
            "FalconH1Config",
            {
                "lm_head_multiplier": 4.0,
                "mamba_d_ssm": 32,
                "mamba_n_heads": 4,
                "mamba_d_head": 8,
                "mamba_d_state": 8,
                "mamba_chunk_size": 16,
                "mamba_expand": 1,
            },
        )
    return configs


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    return transformers.AutoTokenizer.from_pretrained(str(embedded_dir))


def _tiny_model(family: str, tokenizer, root) -> str:
    """Save a randomly initialised model of ``family`` with the embedded model's tokenizer."""
    name, extra = _configs()[family]
    config = getattr(transformers, name)(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SMALL,
        **extra,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # peaked distributions, so a scale error moves log-probs by nats
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    path = root / family
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _conversations() -> list[ScoreRequest]:
    question = Message(role="user", content="What is the capital of France? Answer briefly.")
    answers = ["Paris.", "It is Lyon, I think.", "Paris, on the Seine river."]
    requests = [
        ScoreRequest(messages=[question, Message(role="assistant", content=a)]) for a in answers
    ]
    followup = [
        question,
        Message(role="assistant", content="Paris."),
        Message(role="user", content="And of Italy?"),
        Message(role="assistant", content="Rome."),
    ]
    requests.append(ScoreRequest(messages=followup, include_end_of_turn=True))
    return requests


def _reference(backend, request) -> list[float]:
    """The model's own forward pass over the whole rendered conversation."""
    seg = render_segment(backend.tokenizer, request, None)
    ids = torch.tensor([seg.token_ids])
    with torch.no_grad():
        logp = backend.model(input_ids=ids).logits.float().log_softmax(-1)[0]
    targets = ids[0, seg.start : seg.end]
    return logp[seg.start - 1 : seg.end - 1].gather(-1, targets[:, None])[:, 0].tolist()


def _check(backend, requests) -> None:
    results = asyncio.run(backend.score(requests))
    for request, result in zip(requests, results, strict=True):
        expected = _reference(backend, request)
        assert len(result.token_logprobs) == len(expected)
        worst = max(abs(a - b) for a, b in zip(result.token_logprobs, expected, strict=True))
        assert worst < 1e-4, f"scored log-probs differ from the model's forward by {worst}"


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "prefix_shared"])
@pytest.mark.parametrize("family", list(_configs()))
def test_scores_equal_the_models_forward(family, shared, tokenizer, tmp_path, caplog):
    backend = TransformersBackend(
        _tiny_model(family, tokenizer, tmp_path), device="cpu", dtype="float32", batch_size=4
    )
    backend.prefix_sharing = shared
    backend.min_shared_prefix = 4
    calls = []
    original = backend._score_shared
    backend._score_shared = lambda p, batch: calls.append(len(batch)) or original(p, batch)
    with caplog.at_level(logging.INFO, logger="synthpref.backends.output_head"):
        _check(backend, _conversations())
    assert bool(calls) == shared  # the prefix-shared path was tried when enabled
    if family != "falcon_h1":  # a Mamba hybrid's cache may not copy; its fallback is checked above
        assert backend.prefix_sharing == shared
    assert "output head" in caplog.text  # the chosen path is logged once per model
    assert output_head.logit_head(backend.model).exact  # known families keep the fast path


def test_an_unknown_rescaling_falls_back_to_the_models_forward(
    tokenizer, tmp_path, monkeypatch, caplog
):
    """A family whose rescaling the backend does not know must still score right, only slower."""
    monkeypatch.setattr(
        output_head,
        "KNOWN_TRANSFORMS",
        tuple(t for t in output_head.KNOWN_TRANSFORMS if t[0] != "logits_scaling"),
    )
    backend = TransformersBackend(
        _tiny_model("granite", tokenizer, tmp_path), device="cpu", dtype="float32", batch_size=4
    )
    backend.min_shared_prefix = 4
    with caplog.at_level(logging.WARNING, logger="synthpref.backends.output_head"):
        _check(backend, _conversations())
        backend.prefix_sharing = False
        _check(backend, _conversations())
    assert not output_head.logit_head(backend.model).exact
    assert "does not reproduce" in caplog.text
