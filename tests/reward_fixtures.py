"""Tiny reward models built from the embedded SmolLM2 weights, for tests that need a real one.

A sequence-classification model is the embedded causal LM's decoder with a linear head on the last
token's hidden state (``LlamaForSequenceClassification``), as trained reward models such as
Skywork-Reward are. The head is drawn from a fixed seed, so every backend must reproduce exactly the
numbers :func:`direct_rewards` computes with a plain forward pass of the saved model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ATTRIBUTES = ("helpfulness", "correctness", "verbosity")


def build_reward_model(embedded_dir: Path, out: Path, num_labels: int = 1, seed: int = 0) -> Path:
    """Save a reward model with ``num_labels`` outputs to ``out`` (a model directory) and return it.

    Three outputs get ArmoRM-style attribute names (``id2label``); one output is a scalar reward."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForSequenceClassification

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(embedded_dir)
    config.architectures = ["LlamaForSequenceClassification"]
    config.num_labels = num_labels
    if num_labels == len(ATTRIBUTES):
        config.id2label = dict(enumerate(ATTRIBUTES))
        config.label2id = {name: i for i, name in enumerate(ATTRIBUTES)}
    else:
        config.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    config.problem_type = "regression"
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id
    causal = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    model = LlamaForSequenceClassification(config).to(torch.float32)
    model.model.load_state_dict(causal.model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = torch.randn(model.score.weight.shape, generator=generator) * 0.05
        model.score.weight.copy_(weight)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (embedded_dir / name).exists():
            shutil.copy(embedded_dir / name, out / name)
    return out


def direct_rewards(model_dir: Path, conversations: list[list[dict]]) -> list[list[float]]:
    """The head's outputs for each conversation, one unpadded forward pass each: the reference every
    backend is checked against."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for messages in conversations:
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_tensors="pt")
            if not isinstance(ids, torch.Tensor):
                ids = ids["input_ids"]
            out.append(model(input_ids=ids).logits[0].tolist())
    return out
