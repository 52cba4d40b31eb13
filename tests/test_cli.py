"""tune_refilled.py as a user runs it: exit codes, files written, one-line errors.

The end-to-end commands (pretrain, train) run as subprocesses, as users run
them, two at a time (`runs`, marked slow); help and bad input run the CLI's
main() in this process (`results`: refused before anything trains). Each test
then checks one of them.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest

import tune_refilled
from refilled.files import checkpoint

REPO = Path(__file__).resolve().parent.parent
END_TO_END = ("pretrain", "train", "train_tuning")  # subprocesses that train


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    # One thread a process: several run at once on two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "tune_refilled.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_yaml, teacher_path):
    """Input files for the commands below."""
    d = tmp_path_factory.mktemp("cli")
    (d / "malformed.yaml").write_text("config:\n  tau1: 2\n  lambd: [1, 2\n  tau2: 3\n")
    (d / "corrupt.pt").write_bytes(b"this is not a checkpoint at all\n" * 10)
    (d / "existing.pt").write_bytes(b"precious bytes that must stay")
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("keep me")
    (d / "random.yaml").write_bytes(bytes(range(256)) * 8)
    (d / "empty.yaml").write_text("")
    (d / "only_search.yaml").write_text("search:\n  num_samples: 4\n")
    return {"dir": d, "cfg": tiny_yaml, "teacher": teacher_path}


def commands(ws) -> dict[str, list]:
    d, cfg, teacher = ws["dir"], ws["cfg"], ws["teacher"]
    train = ["train", "--config", cfg, "--teacher", teacher]
    return {
        # end to end
        "pretrain": ["pretrain", "--config", cfg, "--teacher_epochs", "1", "--out", d / "new_teacher.pt"],
        "train": [*train, "--out", d / "run"],
        "train_tuning": [*train, "--tuning", "--n_training_epochs1", "1", "--set", "n_training_epochs2=2",
                         "--out", d / "run_tuning"],
        "help_pretrain": ["pretrain", "--help"],
        "help_train": ["train", "--help"],
        "help_top": ["--help"],
        # bad input: exit 2, one line
        "malformed_yaml": ["train", "--config", d / "malformed.yaml", "--teacher", teacher, "--out", d / "x1"],
        "config_missing": ["train", "--config", d / "nothing.yaml", "--teacher", teacher, "--out", d / "x2"],
        "unknown_key": [*train, "--set", "foo=1", "--out", d / "x3"],
        "unknown_option": [*train, "--bogus", "1", "--out", d / "x4"],
        "wrong_type": [*train, "--tau1", "abc", "--out", d / "x5"],
        "wrong_type_bool": [*train, "--set", "flag_merge=maybe", "--out", d / "x5b"],
        "tau1_zero": [*train, "--tau1", "0", "--out", d / "x6"],
        "lambd_negative": [*train, "--lambd=-1", "--out", d / "x7"],
        "lr1_zero": [*train, "--lr1", "0", "--out", d / "x8"],
        "wrn_depth_15": [*train, "--depth", "15", "--out", d / "x9"],
        "cifar_root_missing": [*train, "--data_name", "CIFAR-100", "--data_root", d / "nothing", "--out", d / "x10"],
        "teacher_missing": ["train", "--config", cfg, "--teacher", d / "no_teacher.pt", "--out", d / "x11"],
        "teacher_corrupt": ["train", "--config", cfg, "--teacher", d / "corrupt.pt", "--out", d / "x12"],
        "teacher_other_arch": [*train, "--teacher_depth", "16", "--out", d / "x13"],
        "target_empty": [*train, "--target_classes", "", "--out", d / "x14"],
        "target_out_of_range": [*train, "--target_classes", "200-210", "--out", d / "x15"],
        "too_many_shots": [*train, "--shots", "1000", "--out", d / "x16"],
        "pretrain_bad_depth": ["pretrain", "--config", cfg, "--teacher_depth", "15", "--out", d / "x17.pt"],
        "pretrain_existing": ["pretrain", "--config", cfg, "--teacher_epochs", "1", "--out", d / "existing.pt"],
        "train_nonempty_out": [*train, "--out", d / "full"],
        "train_out_is_a_file": [*train, "--out", d / "existing.pt"],
        "tuning_contradicted": [*train, "--tuning", "--flag_tuning", "false", "--out", d / "x18"],
        "pretrain_out_is_a_folder": ["pretrain", "--config", cfg, "--out", d / "full", "--force"],
        "config_is_a_folder": ["train", "--config", d, "--teacher", teacher, "--out", d / "x19"],
        "config_not_text": ["train", "--config", d / "random.yaml", "--teacher", teacher, "--out", d / "x20"],
        "config_empty": ["train", "--config", d / "empty.yaml", "--teacher", teacher, "--out", d / "x21"],
        "config_only_search": ["train", "--config", d / "only_search.yaml", "--teacher", teacher, "--out", d / "x22"],
    }


def run_main(args: list) -> SimpleNamespace:
    """The CLI's main() in this process, its exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = tune_refilled.main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def results(ws):
    """Help and bad input, in this process."""
    return {name: run_main(args) for name, args in commands(ws).items() if name not in END_TO_END}


@pytest.fixture(scope="module")
def runs(ws):
    """The end-to-end commands, as subprocesses, two at a time."""
    todo = {name: args for name, args in commands(ws).items() if name in END_TO_END}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, args) for name, args in todo.items()}
        return {name: f.result() for name, f in futures.items()}


def ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pretrain_end_to_end(runs, ws):
    r = runs["pretrain"]
    ok(r)
    assert "teacher saved to" in r.stdout and "test accuracy" in r.stdout
    acc = float(r.stdout.strip().rsplit(" ", 1)[-1])
    assert 0.0 <= acc <= 1.0
    ckpt = checkpoint.load(ws["dir"] / "new_teacher.pt")
    assert ckpt["kind"] == "teacher" and ckpt["classes"] == [0, 1, 2, 3, 4]
    assert ckpt["arch"]["depth"] == 10 and ckpt["config"]["teacher_epochs"] == 1
    assert ckpt["metrics"]["test_accuracy"] == pytest.approx(acc, abs=1e-4)
    assert [p.name for p in ws["dir"].glob(".new_teacher.pt*")] == []  # no temp file left


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_end_to_end(runs, ws):
    r = runs["train"]
    ok(r)
    out = ws["dir"] / "run"
    assert "test_accuracy=" in r.stdout and "metrics.json" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"config", "summary", "epochs"}
    epochs = metrics["epochs"]
    assert len(epochs) == 5
    assert [(e["stage"], e["epoch"], e["step"]) for e in epochs] == \
        [("stage1", 1, 1), ("stage1", 2, 2), ("stage2", 1, 3), ("stage2", 2, 4), ("stage2", 3, 5)]
    for e in epochs:
        assert {"loss", "lr"} <= set(e)
        assert ("loss/relation" in e) == (e["stage"] == "stage1")
        assert ("loss/ce" in e and "loss/local_kd" in e) == (e["stage"] == "stage2")
        assert not any(k.startswith("val_") for k in e)
    assert [e for e in epochs if "test_ncm_accuracy" in e] == [epochs[1]]
    assert [e for e in epochs if "test_accuracy" in e] == [epochs[4]]
    summary = metrics["summary"]
    assert summary["eval_split"] == "test"
    assert summary["test_accuracy"] == epochs[4]["test_accuracy"]
    assert summary["test_ncm_accuracy"] == epochs[1]["test_ncm_accuracy"]
    assert metrics["config"]["n_training_epochs1"] == 2 and metrics["config"]["target_classes"] == "5-9"
    assert metrics["config"]["flag_tuning"] is False
    # the student
    student = checkpoint.load(out / "student.pt")
    assert student["kind"] == "student" and student["stage"] == 2 and student["epoch"] == 3
    assert student["arch"]["n_classes"] == 5 and "fc.weight" in student["student"]
    # TensorBoard events
    assert list(out.glob("events.out.tfevents.*"))
    scalars = _scalars(out)
    assert [s for s, _ in scalars["stage2/loss/ce"]] == [3, 4, 5]
    assert [s for s, _ in scalars["stage2/loss/local_kd"]] == [3, 4, 5]
    assert [s for s, _ in scalars["stage1/loss/relation"]] == [1, 2]
    assert [s for s, _ in scalars["stage1/lr"]] == [1, 2]
    assert [s for s, _ in scalars["stage2/test_accuracy"]] == [5]
    assert [s for s, _ in scalars["stage1/test_ncm_accuracy"]] == [2]
    assert scalars["stage2/loss/ce"][0][1] == pytest.approx(epochs[2]["loss/ce"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_tuning_reports_validation(runs, ws):
    r = runs["train_tuning"]
    ok(r)
    assert "val_accuracy=" in r.stdout and "test_" not in r.stdout
    metrics = json.loads((ws["dir"] / "run_tuning" / "metrics.json").read_text())
    epochs = metrics["epochs"]
    assert [(e["stage"], e["epoch"]) for e in epochs] == [("stage1", 1), ("stage2", 1), ("stage2", 2)]
    assert all(0.0 <= e["val_accuracy"] <= 1.0 for e in epochs)
    assert not any(k.startswith("test_") for e in epochs for k in e)
    assert metrics["summary"]["eval_split"] == "validation"
    assert metrics["config"]["flag_tuning"] is True
    scalars = _scalars(ws["dir"] / "run_tuning")
    assert [s for s, _ in scalars["stage2/val_accuracy"]] == [2, 3]
    assert [s for s, _ in scalars["stage1/val_accuracy"]] == [1]


@pytest.mark.parametrize("name,words", [
    ("help_pretrain", ["--config", "--out", "--force", "--tau1", "--set", "teacher"]),
    ("help_train", ["--config", "--out", "--force", "--teacher", "--tuning", "--set", "--lambd", "--lr1"]),
    ("help_top", ["pretrain", "train"]),
])
def test_help(results, name, words):
    r = results[name]
    ok(r)
    for w in words:
        assert w in r.stdout, w


# ----------------------------------------------------------------------------- bad input

BAD = {
    "malformed_yaml": ["malformed YAML", "line "],
    "config_missing": ["nothing.yaml", "not found"],
    "unknown_key": ["'foo'"],
    "unknown_option": ["--bogus"],
    "wrong_type": ["'tau1'", "abc"],
    "wrong_type_bool": ["'flag_merge'"],
    "tau1_zero": ["'tau1'"],
    "lambd_negative": ["'lambd'"],
    "lr1_zero": ["'lr1'"],
    "wrn_depth_15": ["'depth'", "6n+4"],
    "cifar_root_missing": ["CIFAR-100", "--download"],
    "teacher_missing": ["no_teacher.pt", "not found"],
    "teacher_corrupt": ["corrupt.pt", "recreate it"],
    "teacher_other_arch": ["depth=10", "depth=16"],
    "target_empty": ["'target_classes'"],
    "target_out_of_range": ["'target_classes'", "out of range"],
    "too_many_shots": ["'shots'", "1000"],
    "pretrain_bad_depth": ["'teacher_depth'"],
    "pretrain_existing": ["existing.pt", "--force"],
    "train_nonempty_out": ["full", "--force"],
    "train_out_is_a_file": ["existing.pt", "not a folder"],
    "tuning_contradicted": ["--tuning and --flag_tuning false contradict"],
    "pretrain_out_is_a_folder": ["full", "is a folder"],
    "config_is_a_folder": ["is a folder"],
    "config_not_text": ["random.yaml", "not a text file"],
    "config_empty": ["empty.yaml", "is empty"],
    "config_only_search": ["only_search.yaml", "no config: section"],
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_exits_2_with_one_line(results, name):
    r = results[name]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    for fragment in BAD[name]:
        assert fragment in lines[0], (fragment, lines[0])
    assert r.stdout.strip() == ""


def test_bad_input_writes_nothing(results, ws):
    d = ws["dir"]
    for name in ("x1", "x3", "x5", "x6", "x9", "x13", "x15", "x16", "x18", "x19", "x20", "x21", "x22"):
        folder = d / name
        assert not folder.exists() or not any(folder.iterdir()), name
    assert not (d / "x17.pt").exists()


def test_pretrain_does_not_overwrite_without_force(results, ws):
    assert results["pretrain_existing"].returncode == 2
    assert (ws["dir"] / "existing.pt").read_bytes() == b"precious bytes that must stay"


def test_train_does_not_write_into_a_full_folder(results, ws):
    assert results["train_nonempty_out"].returncode == 2
    folder = ws["dir"] / "full"
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    assert (folder / "keep.txt").read_text() == "keep me"  # also after pretrain --out full --force


def test_an_interrupted_train_leaves_nothing_that_blocks_the_rerun(ws, monkeypatch, capsys):
    import tune_refilled
    from refilled.runs import single_run as runs

    def interrupted(cfg, out, **kw):
        out.mkdir(parents=True, exist_ok=True)
        (out / "events.out.tfevents.1").write_bytes(b"88 bytes")  # what TensorBoard writes first
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "train_once", interrupted)
    out = ws["dir"] / "interrupted"
    args = ["train", "--config", str(ws["cfg"]), "--teacher", str(ws["teacher"]), "--out", str(out)]
    assert tune_refilled.main(args) == 130 and not out.exists()
    # into a folder of the user's (--force), the user's files stay and nothing is deleted
    (ws["dir"] / "forced").mkdir()
    (ws["dir"] / "forced" / "mine.txt").write_text("mine")
    assert tune_refilled.main([*args[:-1], str(ws["dir"] / "forced"), "--force"]) == 130
    assert (ws["dir"] / "forced" / "mine.txt").read_text() == "mine"
    capsys.readouterr()
