"""A user's own problem: a folder of images and a torchvision teacher fine-tuned elsewhere
(docs/your-data.md). Bad input is refused by `search` in one line before anything starts;
the whole path (pretrain, search, retrain, report) runs on a folder the test writes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.models import get_model

import tune_refilled
from refilled.files import checkpoint
from refilled.method.torchvision_nets import TorchvisionNetwork
from support.image_folders import write_folder
from support.searches import SEARCH_TIMEOUT, RayRun, explain

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]


def experiment(tmp: Path, **config) -> Path:
    """A tiny search on the folder tmp/pets: teacher torchvision:resnet18 on ant, bee, cat (its
    weights a state dict), student WRN-10-1 on dog, eel, fox with 6 shots a class."""
    base = {"data_name": "folder", "data_root": str(tmp / "pets"), "folder_cache": str(tmp / "cache"),
            "image_size": 16, "source_classes": CLASSES[:3], "target_classes": CLASSES[3:], "shots": 6,
            "val_per_class": 3, "teacher_network_name": "torchvision:resnet18",
            "teacher_weights": str(tmp / "teacher_sd.pt"), "teacher_epochs": 4, "teacher_lr": 0.01,
            "teacher_batch_size": 16, "teacher_point": [3], "student_network_name": "wide_resnet", "depth": 10,
            "width": 1, "n_training_epochs1": 2, "n_training_epochs2": 3, "point": [2], "batch_size": 18,
            "bn_stats": "precise", **config}
    search = {"num_samples": 2, "max_concurrent": 2, "start_with": "none", "resources": {"cpu": 1, "gpu": 0},
              "space": {"tau2": {"loguniform": [0.5, 8]}, "lambd": {"loguniform": [0.1, 10]}},
              "asha": {"grace_period": 2, "reduction_factor": 2}, "select": {"top_k": 0}}
    path = tmp / "pets.yaml"
    path.write_text(yaml.safe_dump({"config": {k: v for k, v in base.items() if v is not None}, "search": search}))
    return path


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def main(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = tune_refilled.main([str(a) for a in args])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory) -> Path:
    """A ResNet-18's state dict for three classes, saved once (45 MB): each test copies it."""
    path = tmp_path_factory.mktemp("weights") / "teacher_sd.pt"
    torch.save(get_model("resnet18", weights=None, num_classes=3).state_dict(), path)
    return path


@pytest.fixture
def pets(tmp_path, resnet18_weights) -> Path:
    write_folder(tmp_path / "pets", CLASSES, per_class=10, test_per_class=3)
    shutil.copyfile(resnet18_weights, tmp_path / "teacher_sd.pt")
    return tmp_path


def _weights_of(arch: str):
    def write(tmp: Path) -> None:
        torch.save(get_model(arch, weights=None, num_classes=3).state_dict(), tmp / "teacher_sd.pt")
    return write


BAD = {
    "no train/": (lambda t: (t / "pets" / "train").rename(t / "pets" / "training"), {}, "no train/ folder"),
    "no test/": (lambda t: (t / "pets" / "test").rename(t / "pets" / "tests"), {}, "no test/ folder"),
    "an empty class": (lambda t: [p.unlink() for p in (t / "pets" / "train" / "dog").iterdir()], {},
                       "class folder .*dog is empty"),
    "a class in train/ only": (lambda t: (t / "pets" / "test" / "fox").rename(t / "pets" / "test" / "foxes"), {},
                               "fox only in train/"),
    "a class name it lacks": (lambda t: None, {"target_classes": ["dog", "eel", "foxx"]},
                              "names class 'foxx'.*did you mean fox"),
    "a file that is no image": (lambda t: (t / "pets" / "train" / "eel" / "README.txt").write_text("hello"), {},
                                "README.txt is not an image"),
    "weights of another architecture": (_weights_of("resnet34"), {}, "do not fit torchvision:resnet18: .*layer1.2"),
    "a torchvision name that does not exist": (lambda t: None, {"teacher_network_name": "torchvision:resnet19"},
                                               "no classification model 'resnet19'"),
    "a teacher with no linear last layer": (_weights_of("squeezenet1_0"),
                                            {"teacher_network_name": "torchvision:squeezenet1_0"},
                                            "no linear last layer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_in_one_line_before_anything_starts(pets, case):
    damage, config, message = BAD[case]
    damage(pets)
    path = experiment(pets, **config)
    before = tree(pets / "pets")
    code, err = main(["search", "--config", path, "--storage", pets / "experiments"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert __import__("re").search(message, lines[0]), lines[0]
    assert tree(pets / "pets") == before  # nothing of the user's folder is written to
    assert not (pets / "experiments").exists()  # nor is any experiment left behind


def test_a_file_that_is_no_image_is_left_out_with_one_note_when_the_config_says_so(pets):
    (pets / "pets" / "train" / "eel" / "README.txt").write_text("hello")
    path = experiment(pets, skip_bad_images=True)
    code, err = main(["pretrain", "--config", path, "--teacher_epochs", "1", "--out", pets / "t.pt"])
    assert code == 0, err
    assert err.count("left out 1 file(s)") == 1 and "README.txt" in err


@pytest.mark.slow
@pytest.mark.timeout(3 * SEARCH_TIMEOUT)
def test_search_retrain_and_report_on_a_folder_with_a_torchvision_teacher(pets):
    """pretrain torchvision:resnet18 on the folder's source classes, save it as a state dict, then
    search, retrain and report on it through the command line."""
    path = experiment(pets)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args: str, timeout: float = SEARCH_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, env=env)

    made = run("tune_refilled.py", "pretrain", "--config", path, "--out", pets / "teacher_ours.pt")
    assert made.returncode == 0, made.stderr[-3000:]
    ours = checkpoint.load(pets / "teacher_ours.pt")
    net = TorchvisionNetwork(ours["arch"])
    net.load_state_dict(ours["model"])
    torch.save(net.torchvision_state_dict(), pets / "teacher_sd.pt")  # as a user saves a model trained elsewhere
    assert set(torch.load(pets / "teacher_sd.pt")) == set(get_model("resnet18", num_classes=3).state_dict())

    before = tree(pets / "pets")
    searched = RayRun().run([sys.executable, "tune_refilled.py", "search", "--config", str(path), "--storage",
                             str(pets / "experiments")])
    assert searched.returncode == 0, explain(searched)
    folder = pets / "experiments" / "pets"
    assert (folder / "best_config.yaml").is_file() and (folder / "trials.csv").is_file()
    assert "torchvision weights" in checkpoint.load(folder / "teacher.pt")["origin"]

    retrained = run("tune_refilled.py", "retrain", "--experiment", folder, "--seeds", "2")
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    results = json.loads((folder / "retrain" / "results.json").read_text())
    assert set(results) >= {"refilled", "student_alone", "gain", "gain_se"}
    assert "| REFILLED (tuned) |" in retrained.stdout and "| student alone (cross-entropy) |" in retrained.stdout

    report = run(REPO / "analysis" / "report.py", folder, "--out", pets / "report")
    assert report.returncode == 0, report.stderr[-3000:]
    assert (pets / "report" / "index.md").is_file()
    assert tree(pets / "pets") == before  # the user's folder is only read


def test_the_example_file_is_a_valid_experiment_file():
    from refilled.schema.config import load_experiment
    from refilled.schema.search import parse_search

    cfg, data = load_experiment(REPO / "search_spaces" / "folder_example.yaml")
    assert cfg.data_name == "folder" and cfg.teacher_network_name == "torchvision:resnet18"
    assert cfg.target_classes == ["cat", "dog", "fox"] and parse_search(data["search"], cfg).num_samples == 16
