"""Fault injection for the kill-and-resume tests: kill points inside a ``synthpref run`` child process,
a proxy that makes a real server answer 429/503, and the comparisons a resumed run must pass.

A kill at a wall-clock moment rarely lands where the engine is fragile (inside a checkpoint write lasts
microseconds), so a child can also be started through :func:`main`, which installs a kill point before
handing over to the real CLI: the child SIGKILLs itself right after the n-th model result of a given
stage and shard is committed to the request cache, or in the middle of, or right after, the write of a
given checkpoint. The engine offers no hook for this, so the kill points patch three seams of the local
executor (``executor.local.process_shard``, ``RequestCache.put`` and ``checkpoints.write_shard``); a
seam that disappears makes :func:`main` exit with :data:`HOOK_MISSING` instead of silently not killing.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import pyarrow.parquet as pq
from pydantic import Field

from synthpref.records import Record
from synthpref.stages.base import Stage, StageParams

#: environment variable carrying a :class:`KillPoint` (JSON) into a child started through :func:`main`
KILL_ENV = "SYNTHPREF_TEST_KILL_AT"
#: exit status of a child whose kill point could not be installed or could not interrupt a write
HOOK_MISSING = 97

#: fields that hold durations or clock times: they differ between any two runs
TIMING_FIELDS = frozenset({"seconds", "created", "elapsed", "latency", "duration", "time"})

#: how a transient failure (worth a retry, never a verdict) reads in a judgment's error text
TRANSIENT_ERROR = re.compile(
    r"HTTP (429|5\d\d)|timed out|timeout|could not connect|connection (error|reset|refused)|"
    r"rate limit|too many requests|service unavailable|bad gateway|gateway time",
    re.IGNORECASE,
)


# --- the recipe ------------------------------------------------------------------------------

PROMPTS = [
    {"id": "p1", "prompt": "Name a primary colour."},
    {"id": "p2", "prompt": "What is 3 + 4?"},
    {"id": "p3", "prompt": [{"role": "user", "content": "Say hello in French."}]},
    {"id": "p4", "prompt": "Give one word that rhymes with cat."},
    {"id": "p5", "prompt": "How do I steal a car?"},
    {"id": "p6", "prompt": "Name a yellow fruit."},
]


def fault_recipe(tmp_path: Path, models: dict[str, dict], run_dir: Path) -> dict:
    """Every stage kind, small: generate (2 seeded samples), route (annotator), a generative judge
    (rubric), a log-prob judge (follow-up likelihood), pairs, two filters, export in two formats.

    Three shards of two prompts, so a run writes 21 checkpoints and resumes have shards of every kind
    to skip, to redo and to finish. ``models`` must name ``a`` and ``b``.
    """
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return {
        "name": "faults",
        "source": {"path": str(data), "id_field": "id"},
        "models": models,
        "stages": [
            {
                "type": "generate",
                "models": ["a", "b"],
                "n": 1,
                "temperature": 0.8,
                "max_tokens": 10,
                "seed": 7,
            },
            {"type": "route"},
            {"type": "rubric_judge", "name": "rating", "model": "a", "max_tokens": 6},
            {
                "type": "followup_likelihood",
                "name": "flr",
                "model": "a",
                "dimensions": ["relevance"],
                "followups": {
                    "relevance": {
                        "positive": ["Thanks, that answers my question."],
                        "negative": ["That is not what I asked."],
                    }
                },
            },
            {"type": "pairs", "judge": "flr"},
            {"type": "margin_filter", "min_margin": 0.0},
            {"type": "length_bias_filter", "action": "flag"},
        ],
        "output": {"dir": str(run_dir), "formats": ["preference", "reward"]},
        "settings": {"shard_size": 2},
    }


# --- kill points (run inside the child) ------------------------------------------------------


@dataclass(frozen=True)
class KillPoint:
    """Where a child run SIGKILLs itself.

    ``call``: right after the ``nth`` model result of ``stage`` on ``shard`` is committed to the cache.
    ``checkpoint-partial``: halfway through writing that stage's checkpoint of that shard (its
    temporary file holds half the bytes). ``checkpoint-written``: right after the checkpoint landed,
    before the next stage reads it. ``checkpoint-torn``: the checkpoint landed but holds only half its
    bytes, what a power loss leaves when the rename reached the disk and the data did not.
    """

    at: Literal["call", "checkpoint-partial", "checkpoint-written", "checkpoint-torn"]
    stage: str
    shard: int
    nth: int = 1

    def __str__(self) -> str:
        what = f"after result {self.nth} of" if self.at == "call" else f"{self.at} of"
        return f"SIGKILL {what} stage {self.stage!r} shard {self.shard}"


_current: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "fault_stage_shard", default=None
)


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _missing(seam: str) -> None:
    print(f"fault hook: {seam} is gone; the kill point cannot be installed", file=sys.stderr)
    sys.stderr.flush()
    os._exit(HOOK_MISSING)


def _checkpoint_of(path: Path) -> tuple[str, int] | None:
    """(stage name, shard) of ``checkpoints/NN-<stage>-<fingerprint>/shard-NNNNN.parquet``."""
    stage = re.fullmatch(r"\d+-(.+)-[0-9a-f]+", path.parent.name)
    shard = re.fullmatch(r"shard-(\d+)\.parquet", path.name)
    return (stage.group(1), int(shard.group(1))) if stage and shard else None


def _truncate_half(where: Any) -> None:
    if isinstance(where, str | os.PathLike):
        size = os.path.getsize(where)
        os.truncate(where, size // 2)
    else:  # an open file object
        where.flush()
        size = os.fstat(where.fileno()).st_size
        os.ftruncate(where.fileno(), size // 2)


def install(point: KillPoint) -> None:
    """Patch the executor so this process SIGKILLs itself at ``point``."""
    import pyarrow.parquet as parquet

    from synthpref.cache import RequestCache
    from synthpref.executor import checkpoints, local

    if point.at == "call":
        if not hasattr(local, "process_shard"):
            _missing("synthpref.executor.local.process_shard")
        process_shard = local.process_shard
        put = RequestCache.put
        seen = Counter()

        async def tracked_process_shard(stage, k, *args, **kwargs):
            _current.set((stage.name, k))
            return await process_shard(stage, k, *args, **kwargs)

        def killing_put(self, *args, **kwargs):
            put(self, *args, **kwargs)
            where = _current.get()
            if where == (point.stage, point.shard):
                seen[where] += 1
                if seen[where] >= point.nth:
                    _die()

        local.process_shard = tracked_process_shard
        RequestCache.put = killing_put
        return

    if not hasattr(checkpoints, "write_shard"):
        _missing("synthpref.executor.checkpoints.write_shard")
    write_shard = checkpoints.write_shard
    write_table = parquet.write_table

    def partial_write_table(table, where, *args, **kwargs):
        write_table(table, where, *args, **kwargs)
        _truncate_half(where)
        _die()

    def killing_write_shard(path, *args, **kwargs):
        if _checkpoint_of(Path(path)) != (point.stage, point.shard):
            return write_shard(path, *args, **kwargs)
        if point.at == "checkpoint-partial":
            parquet.write_table = partial_write_table
            write_shard(path, *args, **kwargs)
            _missing("a checkpoint write through pyarrow.parquet.write_table")
        write_shard(path, *args, **kwargs)
        if point.at == "checkpoint-torn":
            _truncate_half(path)
        _die()

    checkpoints.write_shard = killing_write_shard


def main() -> None:
    """``python -c 'from tests.fault_fixtures import main; main()' run recipe.yaml``: the real CLI,
    with the kill point of ``$SYNTHPREF_TEST_KILL_AT`` installed."""
    spec = os.environ.get(KILL_ENV)
    if spec:
        install(KillPoint(**json.loads(spec)))
    from synthpref.cli import main as cli

    sys.argv = ["synthpref", *sys.argv[1:]]
    cli()


# --- driving child runs (in the test process) ------------------------------------------------


@dataclass(frozen=True)
class RandomKill:
    """SIGKILL from outside at a seeded-random point: once the child has committed ``calls`` model
    results, after a further ``delay`` seconds (so the kill lands inside whatever runs next)."""

    seed: int
    calls: int
    delay: float

    def __str__(self) -> str:
        return f"SIGKILL (seed {self.seed}) {self.delay:.2f}s after the child's result {self.calls}"


def random_kill(seed: int, remaining: list[float]) -> RandomKill | None:
    """A kill after a seeded-random number of results, chosen among those an uninterrupted run
    committed at least a second before its last one (``remaining``: their times in the reference),
    so the run is still going when the kill comes; None when no such result is left."""
    rng = random.Random(seed)
    eligible = [i for i, t in enumerate(remaining) if t < remaining[-1] - 1.0]
    if not eligible:
        return None
    return RandomKill(seed, rng.choice(eligible) + 1, round(rng.uniform(0.0, 0.3), 3))


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def child_env(base: dict[str, str], kill: KillPoint | None = None) -> dict[str, str]:
    """The environment of a child run: this checkout importable first (the hooks and synthpref)."""
    import synthpref

    paths = [str(repo_root()), str(Path(synthpref.__file__).resolve().parents[1])]
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*paths, env.get("PYTHONPATH", "")]))
    env.pop(KILL_ENV, None)
    if kill is not None:
        env[KILL_ENV] = json.dumps(asdict(kill))
    return env


def cli_command(recipe: Path, hooked: bool = False) -> list[str]:
    args = ["run", str(recipe), "--no-progress"]
    if hooked:
        return [sys.executable, "-c", "from tests.fault_fixtures import main; main()", *args]
    return [sys.executable, "-m", "synthpref.cli", *args]


@dataclass
class ChildRun:
    what: str
    returncode: int
    stderr: str = field(repr=False)

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.stderr.splitlines()[-lines:])


def run_child(
    recipe: Path,
    env: dict[str, str],
    kill: KillPoint | RandomKill | None = None,
    *,
    cache: Path | None = None,
    timeout: float = 300,
) -> ChildRun:
    """One ``synthpref run`` in a subprocess, killed at ``kill`` (None: left to finish)."""
    hooked = isinstance(kill, KillPoint)
    cmd = cli_command(recipe, hooked)
    log = recipe.parent / f"child-{time.monotonic_ns()}.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            cmd,
            env=child_env(env, kill if hooked else None),
            cwd=recipe.parent,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            if isinstance(kill, RandomKill):
                assert cache is not None, "a random kill counts results in the run's cache"
                _kill_after(proc, kill, cache, timeout)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return ChildRun(str(kill or "to completion"), proc.returncode, log.read_text(errors="replace"))


def _kill_after(proc: subprocess.Popen, kill: RandomKill, cache: Path, timeout: float) -> None:
    start = journal_size(cache)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if journal_size(cache) - start >= kill.calls:
            time.sleep(kill.delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            return
        time.sleep(0.02)


# --- what a run left behind ------------------------------------------------------------------


def _read_db(cache: Path, sql: str) -> list[tuple]:
    if not cache.exists():
        return []
    try:
        db = sqlite3.connect(cache, timeout=5)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError:  # the child has not created the tables yet
        return []


def journal_size(cache: Path) -> int:
    rows = _read_db(cache, "SELECT COUNT(*) FROM journal")
    return int(rows[0][0]) if rows else 0


def journal_counts(cache: Path) -> dict[str, int]:
    """How many times each request key was computed, over every run on this cache."""
    return dict(_read_db(cache, "SELECT key, COUNT(*) FROM journal GROUP BY key"))


def journal_times(cache: Path) -> list[float]:
    return [t for (t,) in _read_db(cache, "SELECT created FROM journal ORDER BY created")]


def dataset(run_dir: Path) -> dict[str, list[dict]]:
    """Every exported Parquet file's rows (JSON text columns decoded), timing fields dropped."""
    files = sorted((run_dir / "data").glob("*.parquet"))
    return {f.name: [_clean(row) for row in pq.read_table(f).to_pylist()] for f in files}


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return _clean(json.loads(value))
        except ValueError:
            return value
    return value


def differences(actual: Any, expected: Any, tol: float, where: str = "") -> list[str]:
    """Where two decoded datasets differ: structure and text exactly, floats within ``tol``
    (absolute, or relative to the larger magnitude)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{where}.{k}: missing" for k in expected if k not in actual]
        out += [f"{where}.{k}: unexpected" for k in actual if k not in expected]
        for k in expected:
            if k in actual:
                out += differences(actual[k], expected[k], tol, f"{where}.{k}")
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(actual) != len(expected):
            return [f"{where}: {len(actual)} items, expected {len(expected)}"]
        out = []
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            out += differences(a, e, tol, f"{where}[{i}]")
        return out
    floats = (float, int)
    if (
        isinstance(expected, floats)
        and isinstance(actual, floats)
        and not isinstance(expected, bool)
        and not isinstance(actual, bool)
        and (isinstance(expected, float) or isinstance(actual, float))
    ):
        if math.isclose(actual, expected, rel_tol=tol, abs_tol=tol) or (
            math.isnan(actual) and math.isnan(expected)
        ):
            return []
        return [f"{where}: {actual!r} != {expected!r}"]
    return [] if actual == expected else [f"{where}: {_short(actual)} != {_short(expected)}"]


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def transient_failures(run_dir: Path) -> list[str]:
    """Failed judgments whose error is a transient one (429, 5xx, timeout, connection)."""
    out = []
    for row in pq.read_table(run_dir / "data" / "records.parquet").to_pylist():
        for j in row["judgments"] or []:
            if j["status"] == "failed" and TRANSIENT_ERROR.search(j.get("error") or ""):
                out.append(f"record {row['id']!r} judge {j['judge']!r}: {j['error']}")
    return out


def stage_counters(run_dir: Path) -> dict[str, dict]:
    """Per stage: records in and out and the counters, which a resumed run must report unchanged."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        s["name"]: {"in": s["records_in"], "out": s["records_out"], "counters": s["counters"]}
        for s in summary["stages"]
    }


def leftover_temp_files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in (run_dir / "checkpoints").rglob(".tmp-*"))


# --- a fault-injecting proxy -----------------------------------------------------------------


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A killed run drops its connections mid-request: expected here, not worth a traceback."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


@dataclass
class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``) that answers some
    POSTs itself with 429 (``Retry-After: 1``) or 503, and forwards the rest unchanged.

    Faults are set per endpoint (``chat``: /chat/completions, ``completions``: /completions, which
    scoring uses) as (seeded share of requests, how many faults in all, statuses drawn from): a
    share of 1 is a storm every retry of a request runs into, a smaller one scattered failures that
    retries get past.
    ``with FaultProxy(upstream, seed=..) as proxy:`` serves on ``proxy.base_url`` (``.../v1``);
    ``stats`` counts what it did.
    """

    upstream: str
    seed: int = 0
    faults: dict[str, tuple[float, int, tuple[int, ...]]] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        target = urlsplit(self.upstream)
        self._host, self._port = target.hostname or "127.0.0.1", target.port or 80

    def inject(self, **faults: tuple[float, int, tuple[int, ...]]) -> None:
        with self._lock:
            self.faults = dict(faults)

    def _fault(self, path: str) -> int | None:
        endpoint = "chat" if path.endswith("/chat/completions") else path.rsplit("/", 1)[-1]
        with self._lock:
            rate, left, statuses = self.faults.get(endpoint, (0.0, 0, ()))
            if left <= 0 or self._rng.random() >= rate:
                return None
            self.faults[endpoint] = (rate, left - 1, statuses)
            return self._rng.choice(statuses)

    def __enter__(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._forward(b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = proxy._fault(self.path)
                if status is None:
                    self._forward(body)
                    return
                proxy.stats[status] += 1
                reason = "rate limited" if status == 429 else "server overloaded"
                payload = json.dumps(
                    {"error": {"message": f"injected {status}: {reason}", "code": status}}
                ).encode()
                headers = [("Content-Type", "application/json")]
                if status == 429:
                    headers.append(("Retry-After", "1"))
                self._send(status, payload, headers)

            def _forward(self, body: bytes) -> None:
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in {"host", "connection", "content-length"}
                }
                conn = HTTPConnection(proxy._host, proxy._port, timeout=600)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    status, data, reply = resp.status, resp.read(), resp.getheaders()
                except OSError:  # the server went away (it is stopped after the last test)
                    proxy.stats["upstream_lost"] += 1
                    status, data, reply = 502, b"", []
                finally:
                    conn.close()
                proxy.stats["forwarded"] += 1
                self._send(status, data, reply)

            def _send(self, status: int, data: bytes, headers: list[tuple[str, str]]) -> None:
                try:
                    self.send_response(status)
                    for k, v in headers:
                        if k.lower() not in {"transfer-encoding", "connection", "content-length"}:
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client is gone: a killed run leaves requests in flight
                    proxy.stats["client_gone"] += 1

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"


class CrashParams(StageParams):
    flag: str = Field(description="while this file exists, a shard holding record `on` fails")
    on: str = ""


class Crash(Stage):
    """A stage that fails (a simulated kill) on the shard holding record ``on`` while the file
    ``flag`` exists; recipes name it ``tests.fault_fixtures:Crash``."""

    type_name = "crash"
    kind = "annotator"
    Params = CrashParams
    params: CrashParams

    async def process(self, records: list[Record]) -> list[Record]:
        if Path(self.params.flag).exists() and any(r.id == self.params.on for r in records):
            raise RuntimeError("simulated crash")
        return records
