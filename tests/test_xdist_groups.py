"""``make test``'s split of the suite over xdist workers (tests/xdist_groups.py), run on a small
suite of its own: the tests that need vLLM on one worker, each module's others together."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent

MODULE = """
import pytest

@pytest.fixture
def vllm_server():
    return "server"

@pytest.mark.parametrize("i", range(4))
def test_light(i):
    pass

@pytest.mark.vllm
@pytest.mark.parametrize("i", range(3))
def test_marked(i):
    pass

def test_uses_the_server(vllm_server):
    pass
"""


def test_vllm_tests_share_one_worker_and_modules_stay_whole(pytester, monkeypatch):
    pytest.importorskip("xdist")
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest(
        "from tests.xdist_groups import (  # noqa: F401\n"
        "    pytest_collection_modifyitems, pytest_configure_node, pytest_xdist_make_scheduler\n"
        ")\n"
    )
    pytester.makeini("[pytest]\nmarkers =\n    vllm: needs vllm\n")
    pytester.makepyfile(test_one=MODULE, test_two=MODULE, test_three=MODULE)
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadgroup", "-v")
    result.assert_outcomes(passed=24)
    workers: dict[str, set[str]] = defaultdict(set)
    for line in result.outlines:
        found = re.match(r"\[(gw\d)\] .*PASSED (test_\w+)\.py::(test_\w+)", line)
        if found:
            worker, module, test = found.groups()
            group = "vllm" if test in ("test_marked", "test_uses_the_server") else module
            workers[group].add(worker)
    assert set(workers) == {"vllm", "test_one", "test_two", "test_three"}, result.outlines
    assert all(len(w) == 1 for w in workers.values()), dict(workers)
