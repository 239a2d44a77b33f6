"""Shared fixtures: a tiny recipe on the embedded model that runs in seconds on two CPU cores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.xdist_groups import (  # noqa: F401 - hooks that split the suite over xdist workers
    pytest_collection_modifyitems,
    pytest_configure_node,
    pytest_xdist_auto_num_workers,
    pytest_xdist_make_scheduler,
    share_the_cores,
)

share_the_cores()

PROMPTS = [
    {"id": "p1", "prompt": "Name a primary colour."},
    {"id": "p2", "prompt": "What is 3 + 4?"},
    {"id": "p3", "prompt": [{"role": "user", "content": "Say hello in French."}]},
    {"id": "p4", "prompt": "Give one word that rhymes with cat."},
]


def tiny_recipe(tmp_path: Path, prompts=PROMPTS, **overrides) -> dict:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    recipe = {
        "name": "tiny",
        "source": {"path": str(data), "id_field": "id"},
        "models": {
            "a": {"backend": "embedded"},
            "b": {"backend": "embedded", "system_prompt": "Answer in one short sentence."},
        },
        "stages": [
            {"type": "generate", "models": ["a", "b"], "n": 1, "max_tokens": 16},
            {"type": "rubric_judge", "name": "rating", "model": "a", "max_tokens": 6},
            # 16-token generations are cut off by design: pair them anyway
            {"type": "pairs", "judge": "rating", "allow_truncated": True},
        ],
        "output": {"dir": str(tmp_path / "run")},
        "settings": {"shard_size": 2},
    }
    for key, value in overrides.items():
        recipe[key] = value
    return recipe


def write_recipe(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from synthpref.backends.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="module")
def all_cores():
    """torch on every core for a module, as a user's run is: for the tests that hold a row's bits
    to be independent of its batch, which depends on how a kernel splits its work over threads.
    A worker of ``make test`` otherwise runs torch on its share of the cores
    (tests/xdist_groups.py); a serial run already uses them all."""
    import torch

    from synthpref.verifiers.pool import default_workers

    before = torch.get_num_threads()
    torch.set_num_threads(default_workers())
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def subprocess_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# vLLM server and engine fixtures (they skip cleanly when vllm is not installed)
from tests.vllm_fixtures import (  # noqa: E402,F401
    transformers_reference,
    vllm_backend,
    vllm_server,
)


@pytest.fixture(scope="session")
def reward_model_dir(embedded_dir, tmp_path_factory) -> Path:
    """A one-output reward model built from the embedded weights (see tests/reward_fixtures.py)."""
    from tests.reward_fixtures import build_reward_model

    return build_reward_model(embedded_dir, tmp_path_factory.mktemp("rm") / "scalar")


@pytest.fixture(scope="session")
def reward_model3_dir(embedded_dir, tmp_path_factory) -> Path:
    """A three-attribute reward model (helpfulness, correctness, verbosity), ArmoRM-style."""
    from tests.reward_fixtures import build_reward_model

    return build_reward_model(embedded_dir, tmp_path_factory.mktemp("rm") / "attrs", num_labels=3)
