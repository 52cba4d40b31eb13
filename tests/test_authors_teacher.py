"""The authors' released networks as the teacher: `train --teacher FILE` on a
CIFAR-100 set in the official format (written here), and one-line refusals of
a file that does not hold the teacher the config describes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tune_refilled
from refilled.files import checkpoint
from support.cifar_files import make_cifar

WRN16_1 = Path(__file__).resolve().parents[2] / "shared" / "authors_checkpoints" / "cifar100_wrn16_1.model"


@pytest.fixture(scope="module")
def cifar_yaml(tmp_path_factory) -> Path:
    """CIFAR-100 files (300 random training images) and a config whose teacher is
    the authors' WRN-16-1 on all 100 classes; the student learns classes 0-9."""
    root = tmp_path_factory.mktemp("cifar")
    make_cifar(root, n_train=300, n_test=100)
    config = {"data_name": "CIFAR-100", "data_root": str(root), "source_classes": "all", "target_classes": "0-9",
              "teacher_network_name": "wide_resnet", "teacher_depth": 16, "teacher_width": 1,
              "student_network_name": "wide_resnet", "depth": 10, "width": 1,
              "n_training_epochs1": 1, "n_training_epochs2": 1, "point": [1], "batch_size": 16,
              "lr1": 0.01, "lr2": 0.01, "lambd": 1.0, "teacher_bank": "off", "device": "cpu"}
    path = root / "cifar_authors_teacher.yaml"
    path.write_text(yaml.safe_dump({"config": config}))
    return path


def test_train_with_the_authors_checkpoint_as_teacher(cifar_yaml, tmp_path):
    out = tmp_path / "run"
    code = tune_refilled.main(["train", "--config", str(cifar_yaml), "--teacher", str(WRN16_1), "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["eval_split"] == "test" and 0 <= metrics["summary"]["test_accuracy"] <= 1
    epochs = metrics["epochs"]
    # the teacher took part in both stages: relations in stage 1, its local classifier in stage 2
    assert epochs[0]["loss/relation"] > 0 and epochs[-1]["loss/local_kd"] > 0
    assert checkpoint.load(out / "student.pt")["arch"]["n_classes"] == 10


@pytest.mark.parametrize("overrides,message", [
    (["--teacher_depth", "40", "--teacher_width", "2"], "does not hold a wide_resnet depth 40 width 2"),
    (["--source_classes", "0-49"], "fc.weight is (100, 64) in the file, (50, 64) here"),
    (["--teacher_network_name", "resnet", "--teacher_depth", "20"], "does not hold a resnet depth 20"),
])
def test_another_architecture_or_class_count_is_refused(cifar_yaml, tmp_path, capsys, overrides, message):
    out = tmp_path / "refused"
    code = tune_refilled.main(["train", "--config", str(cifar_yaml), "--teacher", str(WRN16_1), *overrides,
                               "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert str(WRN16_1) in err and not out.exists()


def test_search_keeps_the_authors_teacher_in_our_format(cifar_yaml, tmp_path):
    """`search --teacher FILE` stores the file in the experiment as a teacher checkpoint
    of ours (architecture, source classes, where it came from), loaded like any other."""
    from refilled.runs.inputs import load_teacher, student_data
    from refilled.schema.config import load_experiment
    from refilled.store.storage import Place
    from refilled.tune.trial_inputs import prepare_teacher

    cfg, _ = load_experiment(cifar_yaml)
    path = prepare_teacher(cfg, Place(tmp_path), str(WRN16_1))
    stored = checkpoint.load(path)
    assert stored["kind"] == "teacher" and stored["classes"] == list(range(100))
    assert stored["arch"] == {"name": "wide_resnet", "depth": 16, "width": 1, "dropout_rate": 0.3}
    assert "authors' checkpoint" in stored["origin"] and stored["metrics"]["authors_validating_accuracy"] == 0.663
    teacher = load_teacher(path, cfg, student_data(cfg))
    assert teacher.arch["n_classes"] == 100 and not teacher.training
