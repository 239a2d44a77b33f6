"""How ``make test`` splits the suite over one pytest-xdist worker per core (``-n auto --dist
loadgroup``): which tests must share a worker, in what order the groups go out, and how many
threads each worker's torch may use.

- Every test that needs vLLM shares one worker: each worker would start its own engines and servers
  (~30-60 s each on two cores), and two at once would fight over the cores vLLM pins its threads to.
- The Ray tests share another (each module starts a local cluster).
- Every other test goes with the rest of its module, so a module's fixtures (a loaded model, a
  reference run) are built once, as in a serial run.

xdist's own ``loadgroup`` reads ``xdist_group`` marks by appending the group to each test's node id,
which pytest 9.2's structured node ids silently ignore (pytest-dev/pytest-xdist#1386: the tests
are then dealt out one by one, and every worker starts its own vLLM servers). So the groups travel
beside the ids instead: each worker writes ``{node id: group}`` to a folder the controller named,
and the scheduler (xdist's scope scheduler, grouped by that map) reads it once every
worker has collected. Groups go out heaviest first (vLLM, Ray, then modules with ``slow`` tests),
so the long ones do not start last and leave one worker running alone at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from synthpref.verifiers.pool import default_workers

#: fixtures that start a vLLM engine or server
VLLM_FIXTURES = {"vllm_server", "vllm_backend", "serve_model_dir", "reward_servers", "attrs_engine"}
#: where the controller tells its workers to write their groups (``workerinput`` key)
GROUPS_KEY = "synthpref_groups"


def share_the_cores() -> None:
    """Under xdist, give each worker (and the runs and servers it starts) its share of the cores:
    on two cores, two workers each running torch on two OpenMP threads spin at every barrier while
    the other process holds the core, and both crawl. Call before torch is imported; a variable
    the environment sets already is left alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2:
        return
    threads = max(1, default_workers() // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    # vLLM binds one OpenMP thread per listed core (tests/vllm_fixtures.py's default: 0-1)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if threads == 1 else f"0-{threads - 1}")


def group_of(item: pytest.Item) -> str:
    """The worker group of a test: its own ``xdist_group`` mark, else ``vllm``, ``ray``, or its
    module's path."""
    mark = item.get_closest_marker("xdist_group")
    if mark is not None:
        return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    path = item.nodeid.split("::", 1)[0]
    if item.get_closest_marker("vllm") or VLLM_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "vllm"
    if Path(path).name.startswith("test_ray_"):
        return "ray"
    return path


def _rank(group: str, slow: bool) -> int:
    return {"vllm": 0, "ray": 1}.get(group, 2 if slow else 3)


# --- hooks (tests/conftest.py imports them) ---------------------------------------------------


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, at most four (each worker loads its own copy of the
    embedded model, ~2 GB with its packed weights, and vLLM tests start servers beside them)."""
    return min(4, default_workers())


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """Tell each worker where to write its groups (one folder per run, removed at its end)."""
    config = node.config
    if not hasattr(config, "_synthpref_groups"):
        config._synthpref_groups = tempfile.mkdtemp(prefix="synthpref-xdist-groups-")
        config.add_cleanup(lambda: shutil.rmtree(config._synthpref_groups, ignore_errors=True))
    node.workerinput[GROUPS_KEY] = config._synthpref_groups


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    return _group_scheduling(config, log)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: order the tests heaviest group first (a stable sort, so a module's
    tests keep their order) and write each test's group where the controller reads it."""
    where = getattr(config, "workerinput", {}).get(GROUPS_KEY)
    if where is None:
        return
    groups = {item.nodeid: group_of(item) for item in items}
    slow = {groups[item.nodeid] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: _rank(groups[item.nodeid], groups[item.nodeid] in slow))
    path = Path(where) / f"{config.workerinput['workerid']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups))
    tmp.replace(path)


def _group_scheduling(config: pytest.Config, log):
    """xdist's scope scheduling with the workers' groups as scopes, in collection order (the
    workers sorted it heaviest first). Built here, not at import, so that conftest imports
    without xdist installed."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        _groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:
                self._groups = {}
                folder = getattr(self.config, "_synthpref_groups", None)
                for path in sorted(Path(folder).glob("*.json")) if folder else ():
                    self._groups.update(json.loads(path.read_text()))
            return self._groups.get(nodeid, nodeid)

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)
