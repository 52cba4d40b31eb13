"""Shared fixtures: a tiny digits config and one pretrained tiny teacher per session.

Everything runs on the CPU with two threads; the tiny config trains a
WRN-10-1 teacher on digits 0-4 and a WRN-10-1 student on digits 5-9 with 10
shots a class (50 training images), so a whole REFILLED run takes about a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. Set before torch loads its OpenMP
# runtime: on a busy two-core machine spinning threads slow these tiny runs 10-40x.
# (Subprocesses started by the tests inherit it.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from refilled.config import Config

REPO = Path(__file__).resolve().parent.parent

torch.set_num_threads(2)

# The tiny setting as Config keyword arguments (tests derive variants with
# make_tiny_config(**changes)); the CLI tests get it as a YAML file (`tiny_yaml`).
TINY = dict(
    data_name="digits",
    source_classes="0-4",
    target_classes="5-9",
    shots=10,
    val_fraction=0.3,
    teacher_network_name="wide_resnet",
    teacher_depth=10,
    teacher_width=1,
    teacher_epochs=2,
    teacher_batch_size=64,
    student_network_name="wide_resnet",
    depth=10,
    width=1,
    n_training_epochs1=2,
    n_training_epochs2=3,
    point=(2,),
    batch_size=16,
    lr1=0.05,
    lr2=0.05,
    tau1=4.0,
    tau2=2.0,
    lambd=1.0,
    device="cpu",
)


def make_tiny_config(**changes) -> Config:
    return Config(**TINY).replace(**changes)


@pytest.fixture
def tiny_config() -> Config:
    """A fresh tiny Config (a new object per test: Config is mutable)."""
    return make_tiny_config()


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory) -> Path:
    """A teacher pretrained once per session with the tiny config (2 epochs)."""
    from refilled.run import pretrain

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    out, metrics = pretrain(make_tiny_config(), path, progress=False)
    assert out == path and path.is_file()
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    return path


@pytest.fixture(scope="session")
def search_teacher(tmp_path_factory) -> Path:
    """tests/search_tiny.yaml's teacher, pretrained once per session in this process: the
    searches that do not test pre-training take it with `--teacher`."""
    from refilled.config import load_experiment
    from refilled.run import pretrain

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


def run_python(*args: str, cwd: Path = REPO, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a script of this repo as a user would: a fresh Python process."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def tiny_search(base: Path, name: str, config: Path, extra: tuple[str, ...] = ()) -> Path:
    """A real search through the CLI into <base>/analysis_tiny_storage/<name>, made once
    per session and reused by every test module that asks for the same name."""
    storage = base / "analysis_tiny_storage"
    folder = storage / name
    if (folder / "trials.csv").is_file():
        return folder
    storage.mkdir(parents=True, exist_ok=True)
    result = run_python(str(REPO / "tune_refilled.py"), "search", "--config", str(config), "--storage", str(storage),
                        "--name", name, *extra, cwd=storage)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return folder


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
