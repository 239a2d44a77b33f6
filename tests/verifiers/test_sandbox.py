"""The sandbox: each limit ends a program the way it says, and what it isolates stays isolated."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from synthpref.verifiers.sandbox import MEMORY_EXIT, Limits, namespace_command, run_python

QUICK = Limits(wall_seconds=3, memory_mb=256)

NETWORK_MODES = [
    pytest.param(
        "namespace",
        marks=pytest.mark.skipif(
            namespace_command() is None, reason="no unprivileged network namespaces here"
        ),
    ),
    "audit-hook",
]


def test_a_plain_program_runs_isolated_in_a_directory_of_its_own(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    program = "import os, sys\nprint(os.getcwd())\nprint(sys.flags.isolated, sys.flags.no_site)\n"
    out = run_python(program, limits=QUICK)
    cwd, flags = out.stdout.splitlines()
    assert (out.exit_code, out.limit, flags) == (0, None, "1 1")
    assert Path(cwd).parent == Path(tempfile.gettempdir()) and Path(cwd) != tmp_path
    assert not Path(cwd).exists()  # removed after the run


def test_a_program_that_loops_forever_is_killed_at_the_wall_limit():
    out = run_python("while True:\n    pass\n", limits=Limits(wall_seconds=1, cpu_seconds=60))
    assert (out.limit, out.timed_out, out.exit_code) == ("wall", True, -9)
    assert 1 <= out.wall_seconds < 30
    assert out.reason() == "timeout: passed its 1 s wall-clock limit"


def test_a_sleeping_program_is_killed_at_the_wall_limit_too():
    out = run_python("import time\ntime.sleep(60)\n", limits=Limits(wall_seconds=1))
    assert (out.limit, out.timed_out) == ("wall", True)


def test_cpu_time_past_its_limit_ends_the_program():
    out = run_python("while True:\n    pass\n", limits=Limits(wall_seconds=30, cpu_seconds=1))
    assert (out.limit, out.timed_out) == ("cpu", True)
    assert out.reason() == "timeout: used up its 1 s of CPU time"


def test_an_allocation_past_the_memory_limit_ends_the_program_as_memory():
    small = run_python("x = bytearray(16 * 1024 * 1024)\nprint(len(x))\n", limits=QUICK)
    assert (small.exit_code, small.stdout) == (0, f"{16 * 1024 * 1024}\n")
    big = run_python("x = bytearray(1024 * 1024 * 1024)\n", limits=Limits(memory_mb=128))
    assert (big.limit, big.exit_code) == ("memory", MEMORY_EXIT)
    assert "MemoryError" in big.stderr
    assert big.reason() == "memory: passed its 128 MB memory limit"


def test_a_memory_error_the_program_handles_is_not_reported_as_the_limit():
    program = "try:\n    bytearray(1024 ** 3)\nexcept MemoryError:\n    print('coped')\n"
    out = run_python(program, limits=Limits(memory_mb=128))
    assert (out.exit_code, out.limit, out.stdout) == (0, None, "coped\n")


def test_a_program_printing_forever_is_killed_at_the_output_cap():
    out = run_python(
        "while True:\n    print('x' * 99)\n",
        limits=Limits(wall_seconds=10, max_output_bytes=10_000),
    )
    assert (out.limit, out.stdout_truncated, len(out.stdout)) == ("output", True, 10_000)
    assert set(out.stdout) == {"x", "\n"}


def test_stdin_is_the_given_text_and_stderr_is_kept_apart():
    program = (
        "import sys\ndata = sys.stdin.read()\nprint(data.upper())\nprint('log', file=sys.stderr)\n"
    )
    out = run_python(program, limits=QUICK, stdin="abc\ndef")
    assert (out.stdout, out.stderr) == ("ABC\nDEF\n", "log\n")


def test_an_exception_exits_1_with_a_traceback_naming_the_program_not_its_folder():
    out = run_python("def f():\n    raise ValueError('boom')\nf()\n", limits=QUICK)
    assert out.exit_code == 1 and out.reason() == "exited with code 1"
    assert 'File "main.py", line 2, in f' in out.stderr
    assert out.stderr.rstrip().endswith("ValueError: boom")
    assert "synthpref-sandbox" not in out.stderr and "_boot" not in out.stderr


def test_written_files_land_in_the_run_directory_which_is_removed(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    program = (
        "import os\nopen('out.txt', 'w').write('made here')\nprint(os.path.abspath('out.txt'))\n"
    )
    out = run_python(program, limits=QUICK, collect=["out.txt", "absent.txt"])
    written = Path(out.stdout.strip())
    assert out.files == {"out.txt": b"made here"}
    assert written.name == "out.txt" and written.parent.parent == Path(tempfile.gettempdir())
    assert not written.exists() and not written.parent.exists()
    assert not (tmp_path / "out.txt").exists()


def test_a_file_past_the_size_limit_cannot_be_written():
    program = (
        "try:\n    open('big', 'wb').write(b'x' * (2 * 1024 * 1024))\n"
        "except OSError as e:\n    print(e.errno)\n"
    )
    out = run_python(program, limits=Limits(wall_seconds=5, file_size_mb=1))
    assert out.stdout.strip() == "27"  # EFBIG: File too large


def test_environment_secrets_do_not_reach_the_program(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak")
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    program = "import json, os, sys\nprint(json.dumps([dict(os.environ), sys.path]))\n"
    outside = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    )
    assert json.loads(outside.stdout)[0]["OPENAI_API_KEY"] == "sk-should-not-leak"
    environ, path = json.loads(run_python(program, limits=QUICK).stdout)
    assert set(environ) == {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"}
    assert "/nowhere" not in path and not any("site-packages" in p for p in path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a killed child nobody has reaped yet is a zombie: dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return not sys.platform.startswith("linux")


def test_a_child_that_outlives_the_program_is_killed_with_its_group(tmp_path):
    program = (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
    )
    out = run_python(program, limits=Limits(wall_seconds=10))
    child = int(out.stdout)
    assert out.exit_code == 0 and out.limit is None
    assert out.wall_seconds < 10  # the run did not wait for the child's sleep
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


@pytest.fixture
def listening_port():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


@pytest.mark.parametrize("mode", NETWORK_MODES)
def test_the_network_is_unreachable_from_inside(mode, listening_port):
    program = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {listening_port}), timeout=2).close()\n"
        "except OSError as e:\n"
        "    print('refused:', e)\n"
        "else:\n"
        "    print('connected')\n"
    )
    outside = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert outside.stdout.strip() == "connected"
    out = run_python(program, limits=QUICK, network=mode)
    assert out.network == mode
    assert out.stdout.startswith("refused:"), out.stdout + out.stderr
    if mode == "audit-hook":
        assert "network access is refused (socket." in out.stdout


def test_the_audit_hook_guard_refuses_other_programs_it_could_not_follow():
    program = "import subprocess\nsubprocess.run(['true'])\n"
    out = run_python(program, limits=QUICK, network="audit-hook")
    assert out.exit_code == 1 and "starting another program is refused" in out.stderr
    if namespace_command() is not None:  # the namespace holds children too: they may run
        assert run_python(program, limits=QUICK, network="namespace").exit_code == 0


def test_automatic_network_mode_is_the_namespace_where_there_is_one():
    out = run_python("pass\n", limits=QUICK)
    assert out.network == ("namespace" if namespace_command() else "audit-hook")
    assert out.evidence() == {
        "exit_code": 0,
        "limit": None,
        "timed_out": False,
        "network": out.network,
        "stdout_truncated": False,
        "stderr_truncated": False,
    }


def test_file_names_are_plain_names():
    with pytest.raises(ValueError, match="plain names"):
        run_python("pass\n", files={"../escape.py": "x"})
