"""Fault injection for the kill-and-resume tests: kill points inside a ``synthpref run`` child process,
a proxy that makes a real server answer 429/503, and the comparisons a resumed run must pass.

A kill at a wall-clock moment rarely lands where the engine is fragile (inside a checkpoint write lasts
microseconds), so a child can also be started through :func:`main`, which installs a kill point before
handing over to the real CLI: the child SIGKILLs itself right after the n-th model result of a given
stage and shard is committed to the request cache, or in the middle of, or right after, the write of a
given checkpoint. The engine offers no hook for this, so the kill points patch three seams of the local
executor (``executor.local.process_shard``, ``RequestCache.put`` and ``checkpoints.write_shard``); a
seam that disappears makes :func:`main` exit with :data:`HOOK_MISSING` instead of silently not killing.

Children are forked by a :class:`ForkServer` that imported torch and transformers once, so a kill costs
a model load and the run up to it, not a fresh interpreter's imports (``SYNTHPREF_TEST_FORKS=0``
starts each child as a fresh interpreter instead).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import importlib
import json
import math
import os
import random
import re
import select
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Literal
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

#: a prompt as text, one as messages, one the router sends to its safety domain
PROMPTS = [
    {"id": "p1", "prompt": "Name a primary colour."},
    {"id": "p3", "prompt": [{"role": "user", "content": "Say hello in French."}]},
    {"id": "p5", "prompt": "How do I steal a car?"},
]


def fault_recipe(tmp_path: Path, models: dict[str, dict], run_dir: Path) -> dict:
    """Every stage kind, small: generate (2 seeded samples), route (annotator), a generative judge
    (rubric), a log-prob judge (follow-up likelihood), pairs, two filters, export in two formats.

    Three shards of one prompt, so a run writes 21 checkpoints and resumes have shards of every kind
    to skip, to redo and to finish; a shard's stages make 2 (generate, rating) or 4 (flr) model
    calls, so a kill can land between the results of one batch. ``models`` must name ``a``, ``b``.
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
        "settings": {"shard_size": 1},
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


def random_kill(seed: int, remaining: list[float], share: float = 1.0) -> RandomKill | None:
    """A kill after a seeded-random number of results, chosen among those an uninterrupted run
    committed at least a second before its last one (``remaining``: their times in the reference),
    so the run is still going when the kill comes; None when no such result is left.

    ``share`` < 1 draws only among the first share of ``remaining``, so that kill points placed
    later in the run are still ahead when this kill has landed."""
    rng = random.Random(seed)
    first = math.ceil(len(remaining) * share)
    eligible = [i for i, t in enumerate(remaining[:first]) if t < remaining[-1] - 1.0]
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


def run_in_process(recipe: Path) -> None:
    """An uninterrupted run of ``recipe`` in this process, the reference a killed run is held to.

    Not a child: this process imported torch and transformers already, and ``load_model`` keeps
    weights loaded by earlier runs here, so a reference costs only its model calls."""
    import synthpref

    synthpref.run(recipe, progress=False)


def cli_args(recipe: Path) -> list[str]:
    return ["run", str(recipe), "--no-progress"]


def cli_command(recipe: Path, hooked: bool = False, imports: tuple[str, ...] = ()) -> list[str]:
    args = cli_args(recipe)
    if hooked or imports:
        code = (
            "".join(f"import {m}; " for m in imports)
            + "from tests.fault_fixtures import main; main()"
        )
        return [sys.executable, "-c", code, *args]
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
    imports: tuple[str, ...] = (),
) -> ChildRun:
    """One ``synthpref run`` in a child process, killed at ``kill`` (None: left to finish);
    ``imports``: modules the child imports first (plugins a recipe names).

    The child is forked by a :class:`ForkServer` (see :func:`forks`; otherwise a fresh
    interpreter each time)."""
    hooked = isinstance(kill, KillPoint)
    log = recipe.parent / f"child-{time.monotonic_ns()}.log"
    child_vars = child_env(env, kill if hooked else None)
    proc: subprocess.Popen | Forked
    if forks():
        server = ForkServer.for_env(child_env(env))
        proc = server.fork(cli_args(recipe), child_vars, recipe.parent, log, imports)
    else:
        with log.open("wb") as err:
            proc = subprocess.Popen(
                cli_command(recipe, hooked, imports),
                env=child_vars,
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


def _kill_after(
    proc: subprocess.Popen | Forked, kill: RandomKill, cache: Path, timeout: float
) -> None:
    start = journal_size(cache)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if journal_size(cache) - start >= kill.calls:
            time.sleep(kill.delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            return
        time.sleep(0.02)


# --- a fork server: children that skip the imports ------------------------------------------

#: set to 0 to start each child as a fresh interpreter instead of a fork of a ForkServer
FORKS_ENV = "SYNTHPREF_TEST_FORKS"


def forks() -> bool:
    """Whether children are forked: on Linux unless ``$SYNTHPREF_TEST_FORKS`` is 0 (macOS
    frameworks do not survive a fork)."""
    return sys.platform.startswith("linux") and os.environ.get(FORKS_ENV, "1") != "0"


#: what a fork server imports once for all its children: the seconds of a child's start that are
#: not its run. Only imports: no torch op runs in the server, since a process whose OpenMP pool
#: has started forks children that hang in their first parallel op, and no weights are loaded
#: (each child loads its own, as a freshly started run does).
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.generation",
    "openai",
    "synthpref.cli",
    "synthpref.builtin_stages",
    "synthpref.backends.transformers_backend",
    "synthpref.backends.openai_backend",
)


class Forked:
    """A child of a :class:`ForkServer`, with the part of ``subprocess.Popen`` that
    :func:`run_child` uses. The server reaps it and reports its exit status."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server, self.pid = server, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.status(self.pid, timeout=0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.server.status(self.pid, timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout or 0.0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # exited between the poll and the signal
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """A process that imported :data:`PRELOAD` once and forks a ``synthpref run`` child per
    request: a child starts in a fraction of a second instead of paying for torch and
    transformers again. A child is still a process of its own, killed and resumed as any
    other: it has run nothing before its run, loads its weights itself, and exits through the
    interpreter's own shutdown. One server per environment, one child at a time; the server
    exits when this process closes its stdin (or dies).

    Protocol (lines of JSON): request ``{args, env, cwd, stderr, imports}`` on the server's
    stdin; answers ``{pid}`` when forked, then ``{pid, returncode}`` when reaped."""

    _servers: ClassVar[dict[tuple, ForkServer]] = {}

    @classmethod
    def for_env(cls, env: dict[str, str]) -> ForkServer:
        key = tuple(sorted(env.items()))
        server = cls._servers.get(key)
        if server is None or server.proc.poll() is not None:
            server = cls._servers[key] = cls(env)
        return server

    def __init__(self, env: dict[str, str]) -> None:
        self.log = Path(tempfile.mkdtemp(prefix="synthpref-forks-")) / "server.log"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from tests.fault_fixtures import serve_forks; serve_forks()",
                ],
                env=env,
                cwd=repo_root(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                bufsize=0,
            )
        self._buffer = b""
        self._running: int | None = None
        atexit.register(self.close)

    def fork(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: Path,
        stderr: Path,
        imports: tuple[str, ...],
    ) -> Forked:
        assert self._running is None, "a fork server runs one child at a time"
        request = {"args": args, "env": env, "cwd": str(cwd), "stderr": str(stderr),
                   "imports": list(imports)}  # fmt: skip
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        answer = self._read(timeout=600.0)  # the first one waits for the imports
        if answer is None:
            raise RuntimeError(f"the fork server did not fork in 600 s; log {self.log}")
        self._running = answer["pid"]
        return Forked(self, answer["pid"])

    def status(self, pid: int, timeout: float | None) -> int | None:
        """The exit status of child ``pid``; None if it is still running after ``timeout``."""
        assert self._running == pid, f"child {pid} is not the one running ({self._running})"
        answer = self._read(timeout)
        if answer is None:
            return None
        assert answer["pid"] == pid, answer
        self._running = None
        return int(answer["returncode"])

    def _read(self, timeout: float | None) -> dict | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the fork server exited ({self.proc.poll()}):\n{tail}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve_forks() -> None:
    """The fork server's loop (see :class:`ForkServer`). A child leaves the loop for good: it
    becomes ``synthpref run`` (the CLI through :func:`main`, with its kill point) and exits
    through the interpreter's own shutdown, as a freshly started one would."""
    for module in PRELOAD:
        with contextlib.suppress(ImportError):  # an optional backend: its child imports it or fails
            importlib.import_module(module)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _become_child(request)
            main()
            raise SystemExit(0)
        answers.write(json.dumps({"pid": pid}).encode() + b"\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        answers.write(json.dumps({"pid": pid, "returncode": code}).encode() + b"\n")
        answers.flush()


def _become_child(request: dict) -> None:
    """What ``subprocess.Popen`` would have given the child: its environment, working
    directory, stdin and stdout on /dev/null, stderr into its log, its arguments; then the
    modules it asked for."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    sys.argv = [sys.argv[0], *request["args"]]
    for module in request["imports"]:
        importlib.import_module(module)


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


#: embedded log-prob scores computed in other batches (after a kill, on other executors, beside
#: other rows of a running batch): padding and batch shape move the last bits of float32 sums
EMBEDDED_TOLERANCE = 1e-5


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
    retries get past. ``per_request`` caps the faults one request body (every retry of a request
    sends the same one) may meet: at the client's ``max_retries`` no request runs out of retries,
    so the run goes on however the seeded draws fall.
    ``with FaultProxy(upstream, seed=..) as proxy:`` serves on ``proxy.base_url`` (``.../v1``);
    ``stats`` counts what it did: faults by status and by ``"<endpoint> <status>"``.
    """

    upstream: str
    seed: int = 0
    faults: dict[str, tuple[float, int, tuple[int, ...]]] = field(default_factory=dict)
    per_request: int | None = None
    stats: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._met: Counter = Counter()  # faults per request body
        target = urlsplit(self.upstream)
        self._host, self._port = target.hostname or "127.0.0.1", target.port or 80

    def inject(
        self, per_request: int | None = None, **faults: tuple[float, int, tuple[int, ...]]
    ) -> None:
        """Replace the faults still to come (none given: stop injecting)."""
        with self._lock:
            self.faults = dict(faults)
            self.per_request = per_request

    def _fault(self, path: str, body: bytes) -> tuple[str, int] | None:
        endpoint = "chat" if path.endswith("/chat/completions") else path.rsplit("/", 1)[-1]
        with self._lock:
            rate, left, statuses = self.faults.get(endpoint, (0.0, 0, ()))
            if left <= 0 or self._rng.random() >= rate:
                return None
            if self.per_request is not None:
                if self._met[body] >= self.per_request:
                    return None
                self._met[body] += 1
            self.faults[endpoint] = (rate, left - 1, statuses)
            return endpoint, self._rng.choice(statuses)

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
                fault = proxy._fault(self.path, body)
                if fault is None:
                    self._forward(body)
                    return
                endpoint, status = fault
                proxy.stats[status] += 1
                proxy.stats[f"{endpoint} {status}"] += 1
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
