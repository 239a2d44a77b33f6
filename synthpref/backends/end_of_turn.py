"""Where a local model's reply ends: its EOS tokens and its chat template's end-of-turn token.

Most instruct models list their end-of-turn token among their EOS ids (SmolLM2's EOS *is*
``<|im_end|>``), but some ship a ``generation_config`` or tokenizer whose EOS is the pre-training
``<|endoftext|>`` while their chat template closes each turn with ``<|im_end|>``. Generation that
stops only at EOS then runs past the end of the reply into an invented next turn. The transformers
and vLLM backends therefore stop chat generation and raw-text completion alike at the EOS ids and
at the template's end-of-turn token, so a raw completion of a chat rendering ends where the chat
reply would.

The end-of-turn token is read from the template itself, as :mod:`segments` finds a message's end:
the first token the template puts after an assistant message's content, when that token is a special
token (a template that closes turns with plain text has none).
"""

from __future__ import annotations

_SENTINEL = "\ue000synthpref-end-of-turn\ue001"


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message, or None (no chat
    template, a template that fails on a plain two-turn conversation, or one that closes turns
    with ordinary text)."""
    messages = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": _SENTINEL},
    ]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # no template, or one that wants another conversation shape
        return None
    parts = rendered.split(_SENTINEL) if isinstance(rendered, str) else []
    if len(parts) != 2 or not parts[1]:
        return None
    ids = tokenizer(parts[1], add_special_tokens=False).input_ids
    if not ids or ids[0] not in _special_ids(tokenizer):
        return None
    return int(ids[0])


def _special_ids(tokenizer) -> set[int]:
    """The named special tokens and every added token marked special (Llama-3's ``<|eot_id|>`` is
    only the latter)."""
    out = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    out.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    return out


def stop_token_ids(eos: int | list[int] | None, tokenizer) -> set[int]:
    """The ids that end a reply: ``eos`` (the model's generation config), the tokenizer's EOS and
    the chat template's end-of-turn token."""
    out = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        out.add(eot)
    return out


def identity_tag(model_path: str, tokenizer_path: str | None = None) -> str:
    """``":eot"`` for a model whose chat template's end-of-turn token is not among its EOS ids, else
    "". Such a model's replies stop earlier since this rule exists, so its backends add the tag to
    their identity: results cached before the rule get no hits. Read from the model's files
    (tokenizer and ``generation_config.json``), without loading weights; "" when they cannot be
    read (a hub id not downloaded, a GGUF)."""
    try:
        from transformers import AutoTokenizer, GenerationConfig

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        try:
            config_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:  # no generation_config.json: the model config's EOS, as transformers uses
            config_eos = None
    except Exception:
        return ""
    eot = end_of_turn_id(tokenizer)
    if eot is None:
        return ""
    eos = set(config_eos if isinstance(config_eos, list) else [config_eos]) - {None}
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return "" if eot in eos else ":eot"
