"""Running one Python program apart from this process, under limits: what the code verifier runs
model-written code in.

What it gives, each run:

- its own interpreter, ``sys.executable -I -S``: no user site-packages, no ``PYTHON*`` variables,
  no site-packages at all (the standard library only: a program importing numpy fails);
- a fresh temporary directory as its working directory (and ``HOME``, ``TMPDIR``), deleted after;
- an environment of ``PATH``, ``LANG``, ``LC_ALL``, ``HOME`` and ``TMPDIR`` only: no API keys or
  other variables of this process;
- resource limits set by a trusted bootstrap inside the child before any of the program's code
  runs: ``RLIMIT_CPU`` (CPU seconds; ``SIGXCPU`` ends it), ``RLIMIT_AS`` (address space: an
  allocation past it raises ``MemoryError``), ``RLIMIT_FSIZE`` (largest file it may write),
  ``RLIMIT_CORE`` 0, and ``RLIMIT_NPROC`` as a brake on fork bombs (it counts every process of the
  user, so it is set to what the user runs now plus ``max_processes``; the kernel does not enforce
  it for root). They are set in the child rather than in a ``preexec_fn``, which is unsafe in the
  threads that run checks;
- its own session and process group (``start_new_session``), killed as a group with ``SIGKILL``
  when the program passes its wall-clock limit, prints past its output cap, or exits (children it
  left behind die with it);
- stdout and stderr read at most ``max_output_bytes`` each: a program printing forever is killed
  at the cap, never buffered whole;
- no network. On Linux, where the kernel lets an unprivileged user make namespaces, the program
  runs in a new user and network namespace (``unshare --user --map-root-user --net``: its only
  device is a loopback left down, so no address is reachable, this host's ``127.0.0.1``
  included; it sees itself as uid 0 there, with no more rights over files than this user);
  whether that works is tried once per process. Elsewhere a ``sys.addaudithook`` guard installed
  by the bootstrap refuses internet sockets, ``connect``, ``bind``, ``sendto`` and name lookups,
  and refuses starting other programs, which the guard would not follow. ``Outcome.network``
  says which one a run had (``"namespace"`` or ``"audit-hook"``).

What it is not: a security sandbox against hostile code. There is no seccomp filter and no
filesystem isolation: the program can read whatever this user can, and write outside its
directory if it names a path there (the file-size limit bounds each file, not the disk). An audit
hook is bypassed by ``ctypes``; a process that calls ``setsid`` leaves the group that is killed;
the CPU limit is per process. What it does: keeps honest but buggy code, such as a model's
attempt at a task, from hanging the run, exhausting memory, printing without end, leaving the
files it writes by relative path anywhere but its own deleted directory, seeing this process's
secrets, and (in namespace mode) reaching the network. Python programs only; POSIX only.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

NetworkMode = Literal["namespace", "audit-hook"]

MEMORY_EXIT = 113
MEMORY_MARKER = "synthpref-sandbox: MemoryError: the program passed its memory limit"
PROGRAM = "main.py"
STDIN = ".stdin"
_KILL_GRACE = 0.5
"""Seconds to keep reading after the program exits, for output its killed children held open."""

BOOTSTRAP = r"""
def _boot():
    import builtins, json, os, resource, sys
    cfg = json.loads(sys.argv[1])
    unset = []

    def limit(name, soft, hard=None):
        res = getattr(resource, name, None)
        if res is None:
            unset.append(name)
            return
        hard = soft if hard is None else hard
        _, cap = resource.getrlimit(res)
        if cap != resource.RLIM_INFINITY:
            soft, hard = min(soft, cap), min(hard, cap)
        try:
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError):
            unset.append(name)

    def own_tasks():
        uid, n = os.getuid(), 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                if int(fields["Uid"].split()[0]) == uid:
                    n += int(fields.get("Threads", "1"))
            except (OSError, KeyError, ValueError):
                pass
        return n

    limit("RLIMIT_CORE", 0)
    limit("RLIMIT_CPU", cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)
    limit("RLIMIT_AS", cfg["memory_mb"] * 1024 * 1024)
    limit("RLIMIT_FSIZE", cfg["file_size_mb"] * 1024 * 1024)
    if os.path.isdir("/proc"):
        limit("RLIMIT_NPROC", own_tasks() + cfg["max_processes"])
    if unset:
        sys.stderr.write("synthpref-sandbox: could not set " + ", ".join(unset) + "\n")

    if cfg["network"] == "audit-hook":
        refused = {
            "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
            "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
            "socket.gethostbyaddr", "socket.getnameinfo",
        }
        programs = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                    "pty.spawn")

        def guard(event, args):
            if event in refused or (event == "socket.__new__" and args[1] != 1):  # 1: AF_UNIX
                raise PermissionError(f"synthpref sandbox: network access is refused ({event})")
            if event.startswith(programs):
                raise PermissionError(
                    f"synthpref sandbox: starting another program is refused ({event}): "
                    "the network guard would not follow it"
                )

        sys.addaudithook(guard)

    path = cfg["program"]
    with open(path, "rb") as f:
        code = compile(f.read(), os.path.basename(path), "exec")
    import __main__
    scope = __main__.__dict__
    scope.clear()
    scope.update(__name__="__main__", __file__=path, __builtins__=builtins, __doc__=None,
                 __package__=None, __spec__=None, __loader__=None)
    sys.argv = [path]
    try:
        exec(code, scope)
    except SystemExit:
        raise
    except BaseException as exc:
        import traceback
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        if isinstance(exc, MemoryError):
            sys.stderr.write(MARKER + "\n")
            sys.exit(MEMORY_EXIT)
        sys.exit(1)


_boot()
""".replace("MARKER", repr(MEMORY_MARKER)).replace("MEMORY_EXIT", str(MEMORY_EXIT))
"""Runs in the child before the program: limits, the network guard, then the program as
``__main__`` (tracebacks start at the program's frame and name it by its plain file name, so they
read the same from run to run; a ``MemoryError`` that ends it exits with
:data:`MEMORY_EXIT` after :data:`MEMORY_MARKER`, so the parent can tell the memory limit)."""


@dataclass(frozen=True)
class Limits:
    """What one run may use; ``cpu_seconds`` None: the wall-clock limit, rounded up."""

    wall_seconds: float = 10.0
    cpu_seconds: float | None = None
    memory_mb: int = 512
    max_output_bytes: int = 1_000_000
    file_size_mb: int = 16
    max_processes: int = 16

    @property
    def cpu(self) -> int:
        return max(1, math.ceil(self.cpu_seconds or self.wall_seconds))

    def as_dict(self) -> dict:
        return {**asdict(self), "cpu_seconds": self.cpu}


@dataclass(frozen=True)
class Outcome:
    """How a run ended. ``exit_code`` is negative for a signal (``-9``: ``SIGKILL``). ``limit``
    names the limit that ended it: ``"wall"``, ``"cpu"``, ``"memory"``, ``"output"``, or None.
    ``files`` holds the files asked for with ``collect`` that exist, each capped like output."""

    exit_code: int
    stdout: str
    stderr: str
    limit: str | None
    wall_seconds: float
    network: NetworkMode
    limits: Limits
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def timed_out(self) -> bool:
        return self.limit in ("wall", "cpu")

    def reason(self) -> str | None:
        """Why the run ended early, in words, or None when it exited by itself with code 0."""
        if self.limit == "wall":
            return f"timeout: passed its {self.limits.wall_seconds:g} s wall-clock limit"
        if self.limit == "cpu":
            return f"timeout: used up its {self.limits.cpu} s of CPU time"
        if self.limit == "memory":
            return f"memory: passed its {self.limits.memory_mb} MB memory limit"
        if self.limit == "output":
            return f"output limit: printed more than {self.limits.max_output_bytes} bytes"
        if self.exit_code < 0:
            try:
                name = signal.Signals(-self.exit_code).name
            except ValueError:
                name = f"signal {-self.exit_code}"
            return f"killed by {name}"
        if self.exit_code != 0:
            return f"exited with code {self.exit_code}"
        return None

    def evidence(self) -> dict:
        """What a judgment records about the run; no timings, so a re-check records the same."""
        return {
            "exit_code": self.exit_code,
            "limit": self.limit,
            "timed_out": self.timed_out,
            "network": self.network,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
        }


_PROBE_LOCK = threading.Lock()
_PROBED: list[str | None] = []


def namespace_command() -> list[str] | None:
    """The ``unshare`` prefix that puts a program in a new network namespace, or None where the
    kernel refuses it to this user (tried once per process)."""
    with _PROBE_LOCK:
        if not _PROBED:
            _PROBED.append(_probe_unshare())
    path = _PROBED[0]
    return None if path is None else [path, "--user", "--map-root-user", "--net"]


def _probe_unshare() -> str | None:
    if not sys.platform.startswith("linux"):
        return None
    path = shutil.which("unshare")
    if path is None:
        return None
    try:
        done = subprocess.run(
            [path, "--user", "--map-root-user", "--net", "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            env=_environment(tempfile.gettempdir()),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return path if done.returncode == 0 else None


def _environment(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
    }


def run_python(
    source: str,
    *,
    limits: Limits | None = None,
    stdin: str | bytes = b"",
    files: Mapping[str, str | bytes] | None = None,
    collect: Sequence[str] = (),
    network: Literal["auto", "namespace", "audit-hook"] = "auto",
) -> Outcome:
    """Run ``source`` as ``__main__`` in a fresh directory under ``limits``; see the module
    docstring for what is isolated. ``files`` are written into the directory first (plain names);
    ``collect`` names files to read back after the run. ``network="auto"`` uses a network
    namespace where the kernel allows one, else the audit-hook guard; ``"namespace"`` raises
    ``OSError`` where there is none. Raises ``OSError`` when the program cannot be started."""
    limits = limits or Limits()
    prefix = namespace_command() if network in ("auto", "namespace") else None
    if network == "namespace" and prefix is None:
        raise OSError("this system does not let this user create a network namespace")
    mode: NetworkMode = "namespace" if prefix is not None else "audit-hook"
    workdir = tempfile.mkdtemp(prefix="synthpref-sandbox-")
    try:
        for name, content in {**(files or {}), PROGRAM: source, STDIN: stdin}.items():
            _write(workdir, name, content)
        config = {
            "program": os.path.join(workdir, PROGRAM),
            "cpu_seconds": limits.cpu,
            "memory_mb": limits.memory_mb,
            "file_size_mb": limits.file_size_mb,
            "max_processes": limits.max_processes,
            "network": mode,
        }
        command = [*(prefix or []), sys.executable, "-I", "-S", "-c", BOOTSTRAP]
        command.append(json.dumps(config))
        with open(os.path.join(workdir, STDIN), "rb") as stdin_file:
            outcome = _supervise(command, workdir, stdin_file, limits, mode)
        found = {}
        for name in collect:
            path = os.path.join(workdir, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    found[name] = f.read(limits.max_output_bytes)
        return Outcome(**{**outcome, "files": found})
    finally:
        _remove(workdir)


def _write(workdir: str, name: str, content: str | bytes) -> None:
    if os.path.basename(name) != name or name in ("", ".", ".."):
        raise ValueError(f"sandbox file names are plain names, not {name!r}")
    data = content.encode("utf-8", errors="replace") if isinstance(content, str) else content
    with open(os.path.join(workdir, name), "wb") as f:
        f.write(data)


def _supervise(command, workdir, stdin_file, limits: Limits, mode: NetworkMode) -> dict:
    start = time.monotonic()
    deadline = start + limits.wall_seconds
    proc = subprocess.Popen(
        command,
        cwd=workdir,
        env=_environment(workdir),
        stdin=stdin_file,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    streams = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    truncated = dict.fromkeys(streams, False)
    killed_for: str | None = None
    exited_at: float | None = None
    selector = selectors.DefaultSelector()
    try:
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if proc.poll() is not None:
                if exited_at is None:
                    exited_at = now
                    _kill_group(proc.pid)
                if not selector.get_map() or now - exited_at > _KILL_GRACE:
                    break
            elif now >= deadline:
                killed_for = "wall"
                _kill_group(proc.pid)
                break
            if not selector.get_map():
                time.sleep(min(0.02, max(0.0, deadline - now)))
                continue
            for key, _ in selector.select(min(0.1, max(0.0, deadline - now))):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buffer = streams[key.fd]
                room = limits.max_output_bytes - len(buffer)
                buffer += chunk[:room]
                if len(chunk) > room:
                    truncated[key.fd] = True
                    if killed_for is None and proc.poll() is None:
                        killed_for = "output"
                        _kill_group(proc.pid)
            if killed_for == "output":
                break
    finally:
        selector.close()
        _kill_group(proc.pid)
        exit_code = proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    wall = time.monotonic() - start
    out, err = (bytes(b).decode("utf-8", errors="replace") for b in streams.values())
    out_fd, err_fd = streams
    return {
        "exit_code": exit_code,
        "stdout": out,
        "stderr": err,
        "limit": killed_for or _limit_from_exit(exit_code, err),
        "wall_seconds": wall,
        "network": mode,
        "limits": limits,
        "stdout_truncated": truncated[out_fd],
        "stderr_truncated": truncated[err_fd],
    }


def _limit_from_exit(exit_code: int, stderr: str) -> str | None:
    if exit_code == -signal.SIGXCPU:
        return "cpu"
    if exit_code == MEMORY_EXIT and stderr.rstrip().endswith(MEMORY_MARKER):
        return "memory"
    return None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove(workdir: str) -> None:
    """Delete the run's directory, making read-only folders the program left writable first."""
    try:
        os.chmod(workdir, 0o700)
    except OSError:
        pass
    for root, dirs, _ in os.walk(workdir):
        for name in dirs:
            try:
                os.chmod(os.path.join(root, name), 0o700)
            except OSError:
                pass
    shutil.rmtree(workdir, ignore_errors=True)
