"""Shared fixtures: a tiny digits config and one pretrained tiny teacher per session.

Everything runs on the CPU with two threads; the tiny config trains a
WRN-10-1 teacher on digits 0-4 and a WRN-10-1 student on digits 5-9 with 10
shots a class (50 training images), so a whole REFILLED run takes about a second.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. Set before torch loads its OpenMP
# runtime: on a busy two-core machine spinning threads slow these tiny runs 10-40x.
# (Subprocesses started by the tests inherit it.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from refilled.schema.config import Config
from support.configs import REPO, TINY, make_tiny_config  # noqa: F401 (the fixtures' base)
from support.processes import run_python, tiny_search  # noqa: F401

# Full garbage collections spaced out (before the test modules import torch and the rest): each
# walks every object the imports made, about 0.3 s
gc.set_threshold(10_000, 50, 1000)


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> None:
    """Two torch threads, one a worker under xdist (two workers fill the two cores). In a
    fixture, not at import: xdist's controller runs no test and need not load torch."""
    import torch

    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture
def tiny_config() -> Config:
    """The tiny Config."""
    return make_tiny_config()


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory) -> Path:
    """A teacher pretrained once per session with the tiny config (2 epochs)."""
    from refilled.runs.single_run import pretrain

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    out, metrics = pretrain(make_tiny_config(), path, progress=False)
    assert out == path and path.is_file()
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    return path


@pytest.fixture(scope="session")
def search_teacher(tmp_path_factory) -> Path:
    """tests/search_tiny.yaml's teacher, pretrained once per session in this process: the
    searches that do not test pre-training take it with `--teacher`."""
    from refilled.runs.single_run import pretrain
    from refilled.schema.config import load_experiment

    cfg, _ = load_experiment(Path(__file__).parent / "search_tiny.yaml")
    path = tmp_path_factory.mktemp("search_teacher") / "teacher.pt"
    pretrain(cfg, path, progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_yaml(tmp_path_factory) -> Path:
    """The tiny config as an experiment file with a `config:` section."""
    import yaml

    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    path.write_text(yaml.safe_dump({"config": values}))
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# The slow tier runs on two pytest-xdist workers (`-n 2 --dist loadgroup`, README). Tests
# that share a module-scoped fixture (a search, a cluster) are one group, run by one worker,
# so that the fixture runs once; every other slow test goes to whichever worker is free.
SHARED_BY_MODULE = {"test_analysis": "analysis_tiny", "test_retrain": "analysis_tiny",  # one search, read by both
                    "test_selection": "selection", "test_cluster": "cluster", "test_cli": "cli"}
SHARED_FIXTURES = ("experiment", "faults")  # test_search.py's two shared searches


@pytest.hookimpl(tryfirst=True)  # before xdist's, which turns the marks into groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if not item.get_closest_marker("slow"):
            continue
        module = item.module.__name__.rsplit(".", 1)[-1]
        shared = [f"{module}.{name}" for name in SHARED_FIXTURES if name in item.fixturenames]
        group = SHARED_BY_MODULE.get(module) or (shared[0] if shared else None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_finish(session) -> None:
    """What collection imported (torch, Ray, pandas, matplotlib: about half a million objects) lives
    to the end of the session: moved out of the garbage collector's reach, so that its full
    collections during the tests do not walk it again (with full collections spaced out from
    the start, above, they took 4-7 s of each worker's minute)."""
    gc.freeze()
