"""Damaged files met by `search --resume`, `retrain` and the analysis scripts.

Each file is cut to half its length (what a full disk or an interrupted copy
leaves) in an experiment that is otherwise whole, and each command must end
with one line on stderr naming that file and what to do, exit code 2, and
nothing written (every file's size and modification time as before). The
experiment is made here file by file as a search leaves it, so these run in
the fast tier: every refusal comes before Ray starts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from refilled.errors import UserError
from refilled.files import checkpoint
from refilled.store import experiment_file
from refilled.store import study as study_store
from refilled.store.layout import LEASE_FILE, LOCK_FILE
from refilled.store.lease import lease_at
from refilled.store.storage import Place
from support.configs import make_tiny_config
from support.reports import unrendered

CHECKPOINT = "trial_abc/checkpoint_000001/state.pt"


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def garble(path: Path) -> None:
    """A journal's line damaged before its last (a last line cut short is what a crash
    leaves, and Optuna skips it): its first line's middle overwritten."""
    data = bytearray(path.read_bytes())
    data[5:25] = b"\x00garbled-by-a-test\x00"
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def made(tmp_path_factory, teacher_path) -> Path:
    """An interrupted search's experiment: its file, teacher, bank, study, and one trial
    whose newest checkpoint Tune's saved state would resume it from."""
    import optuna

    folder = tmp_path_factory.mktemp("made") / "exp"
    folder.mkdir()
    experiment_file.write(Place(folder), make_tiny_config(), {"num_samples": 2, "space": {"tau1": {"loguniform": [0.5, 16]}}})
    shutil.copyfile(teacher_path, folder / "teacher.pt")
    np.save(folder / "bank-tuning.npy", np.ones((50, 18, 16), np.float16))
    np.save(folder / "centers-tuning.npy", np.ones((5, 16), np.float32))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="exp", storage=study_store.storage(folder), direction="maximize")
    for value in (0.5, 0.7):
        trial = study.ask({"tau1": optuna.distributions.FloatDistribution(0.5, 16, log=True)})
        study.tell(trial, value)
    study.ask()  # the running trial
    trial = folder / "trial_abc"
    trial.mkdir()
    (trial / "params.json").write_text(json.dumps({"tau1": 2.0}))
    (trial / "result.json").write_text(json.dumps({"step": 1, "total_steps": 5, "stage": "stage1",
                                                   "val_accuracy": 0.5, "trial_id": "abc"}) + "\n")
    saved = {"status": "running", "checkpoint": "checkpoint_000001"}
    (trial / "trial_record.json").write_text(json.dumps({"trial_id": "abc", "number": 1, **saved,
                                                         "at_last_save": saved}))
    checkpoint.save({"stage": 1, "epoch": 1, "student": {"w": torch.ones(2000)}}, folder / CHECKPOINT)
    return folder


def copy(made: Path, base: Path, damaged: str | None, keep: float = 0.5) -> Path:
    target = base / "storage" / made.name
    shutil.copytree(made, target)
    if damaged == "optuna.journal":
        garble(target / damaged)
    elif damaged:
        cut(target / damaged, keep)
    return target


def refused(capsys, args: list[str], *needles: str) -> str:
    import tune_refilled

    code = tune_refilled.main(args)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    assert "Traceback" not in err + out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- search --resume

WHAT_TO_DO = {"experiment.yaml": "restore it from a backup", "optuna.journal": "restore it from a backup",
              "teacher.pt": "restore it from a backup", "bank-tuning.npy": "delete bank-tuning.npy and",
              "centers-tuning.npy": "delete bank-tuning.npy and", CHECKPOINT: "restore it from a backup"}


@pytest.mark.parametrize("damaged", list(WHAT_TO_DO))
@pytest.mark.parametrize("at", ["folder", "uri"])
def test_resume_refuses_a_damaged_file(made, tmp_path, capsys, monkeypatch, damaged, at):
    monkeypatch.setenv("TUNE_REFILLED_CACHE", str(tmp_path / "cache"))
    folder = copy(made, tmp_path, damaged)
    storage = str(folder.parent) if at == "folder" else f"file://{folder.parent}"
    before = tree(folder.parent)
    line = refused(capsys, ["search", "--resume", "--name", "exp", "--storage", storage],
                   f"{storage}/exp/{damaged}", WHAT_TO_DO[damaged])
    assert "damaged" in line or "cut short" in line or "corrupt" in line, line
    assert tree(folder.parent) == before  # no lease left behind either


def test_a_journal_cut_short_by_a_crash_is_read_and_a_study_of_an_earlier_version_opens(made, tmp_path, capsys):
    """A journal's last line cut off (a driver killed mid-write) is what Optuna skips: not
    damaged. An experiment made before the journal has its study in SQLite (optuna.db): it
    opens as such, and a damaged one is refused like the journal."""
    import optuna

    folder = copy(made, tmp_path, None)
    journal = folder / "optuna.journal"
    journal.write_bytes(journal.read_bytes() + b'{"op_code": 5, "worker_id": "x", "trial_id": 2, "st')
    refused(capsys, ["search", "--resume", "--name", "exp", "--storage", str(folder.parent)],
            "has no Ray Tune state to resume")  # past the checks
    assert len(study_store.load(folder, "exp").trials) == 3

    journal.unlink()
    legacy = optuna.create_study(study_name="exp", storage=f"sqlite:///{folder / 'optuna.db'}", direction="maximize")
    legacy.enqueue_trial({"tau1": 3.0})
    assert study_store.study_file(folder).name == "optuna.db"
    assert len(study_store.load(folder, "exp").trials) == 1
    assert study_store.dashboard(folder) == f"optuna-dashboard sqlite:///{folder / 'optuna.db'}"
    cut(folder / "optuna.db", 0.3)
    refused(capsys, ["search", "--resume", "--name", "exp", "--storage", str(folder.parent)],
            f"{folder}/optuna.db", "damaged", "restore it from a backup")


def test_resume_of_the_whole_experiment_gets_past_the_checks(made, tmp_path, capsys):
    """The control: nothing damaged, so the resume goes on to what this made-up
    experiment lacks, Ray Tune's own state."""
    folder = copy(made, tmp_path, None)
    refused(capsys, ["search", "--resume", "--name", "exp", "--storage", str(folder.parent)],
            "has no Ray Tune state to resume")


def test_a_trial_whose_record_says_it_ended_is_never_set_aside(tmp_path):
    """Trial folders Tune's restored state does not know go aside only when they never ended
    (started after Tune's last save, cut by the kill); an ended one stays, and counts."""
    from refilled.tune.search import set_aside_unknown_trials

    for name, status in [("a", "finished"), ("b", "stopped"), ("c", "diverged"), ("d", "errored"), ("e", "running"),
                         ("f", None), ("g", "running")]:
        trial = tmp_path / f"trial_{name}"
        trial.mkdir()
        (trial / "params.json").write_text("{}")
        if status:
            (trial / "trial_record.json").write_text(json.dumps({"trial_id": name, "status": status}))
    set_aside_unknown_trials(Place(tmp_path), {"trial_g"})
    assert sorted(p.name for p in tmp_path.glob("trial_*")) == ["trial_a", "trial_b", "trial_c", "trial_d", "trial_g"]
    assert sorted(p.name for p in (tmp_path / "interrupted_trials").iterdir()) == ["trial_e", "trial_f"]


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.6, 0.97])
def test_an_experiment_file_cut_anywhere_is_refused(made, tmp_path, capsys, keep):
    folder = copy(made, tmp_path, "experiment.yaml", keep)
    with pytest.raises(UserError, match="experiment.yaml is cut short"):
        experiment_file.read(folder)


def test_an_experiment_file_of_an_earlier_version_is_read(made, tmp_path):
    """Written before the end line existed: read as before, but it must hold both sections."""
    folder = copy(made, tmp_path, None)
    path = folder / "experiment.yaml"
    body = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    path.write_text("\n".join(body) + "\n")
    cfg, data = experiment_file.read(folder)
    assert cfg.tau1 == make_tiny_config().tau1 and data["search"]["num_samples"] == 2
    path.write_text("\n".join(body[:len(body) // 3]) + "\n")  # cut inside config: no search section
    with pytest.raises(UserError, match="cut short"):
        experiment_file.read(folder)


# ----------------------------------------------------------------------------- retrain, analysis

@pytest.mark.parametrize("damaged", ["experiment.yaml", "teacher.pt"])
def test_retrain_refuses_a_damaged_file(made, tmp_path, capsys, damaged):
    folder = copy(made, tmp_path, damaged)
    before = tree(folder.parent)
    refused(capsys, ["retrain", "--experiment", str(folder), "--seeds", "1"], f"{folder}/{damaged}",
            "restore it from a backup")
    assert tree(folder.parent) == before and not (folder / "retrain").exists()


@pytest.mark.parametrize("damaged", ["experiment.yaml", "optuna.journal"])
@pytest.mark.parametrize("script", ["report", "plot_trials", "compare_trials"])
def test_analysis_refuses_a_damaged_file(made, tmp_path, capsys, damaged, script):
    import importlib

    from analysis.common import run_cli

    folder = copy(made, tmp_path, damaged)
    before = tree(folder.parent)
    out = tmp_path / "out"
    code = run_cli(importlib.import_module(f"analysis.{script}").main, [str(folder), "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and f"{folder}/{damaged}" in lines[0], err
    assert "restore it from a backup" in lines[0]
    assert tree(folder.parent) == before and not out.exists()


# ----------------------------------------------------------------------------- inside a trial

def test_a_trial_names_the_damaged_checkpoint_it_resumes_from(made, tmp_path):
    """A checkpoint damaged after the resume's checks (or a retry's after a crash) is read
    inside the trial: its error, which Ray Tune records, names the file in storage."""
    from ray import tune

    from refilled.tune.trainable import restored_state

    folder = copy(made, tmp_path, CHECKPOINT)
    ckpt = tune.Checkpoint.from_directory(str(folder / Path(CHECKPOINT).parent))
    with pytest.raises(UserError, match="restore it from a backup") as error:
        restored_state(ckpt)
    assert f"{folder / CHECKPOINT}" in str(error.value)
    whole = tune.Checkpoint.from_directory(str(made / Path(CHECKPOINT).parent))
    assert restored_state(whole)["epoch"] == 1 and restored_state(None) is None


# ----------------------------------------------------------------------------- a running search

def test_retrain_of_a_running_search_says_so_and_reads_what_is_there(made, tmp_path, capsys):
    """With --out elsewhere: the trials as they are now, with a note on stderr, not an error.
    Into the experiment (its retrain/): refused while the search holds its lease (one writer)."""
    import tune_refilled

    folder = copy(made, tmp_path, None)
    rows = [{"step": s, "total_steps": 5, "stage": "stage1" if s <= 2 else "stage2", "val_accuracy": 0.2 * s,
             "trial_id": "abc"} for s in (1, 2, 3)]
    (folder / "trial_abc" / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "va')
    (folder / "trial_new").mkdir()
    (folder / "trial_new" / "params.json").write_text('{"tau1": 3.')  # being written: a trial starting now
    out = tmp_path / "elsewhere"
    lease = lease_at(str(folder), timeout=30)
    lease.acquire()
    try:
        before = tree(folder)
        line = refused(capsys, ["retrain", "--experiment", str(folder), "--seeds", "1", "--no-baseline"],
                       f"{folder} is in use by another search driver", "--out elsewhere")
        assert tree(folder) == before and not (folder / "retrain").exists(), line
        code = tune_refilled.main(["retrain", "--experiment", str(folder), "--seeds", "1", "--no-baseline",
                                   "--out", str(out)])
    finally:
        lease.release()
    captured, err = capsys.readouterr()
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "still running" in notes[0] and "error" not in err, err
    results = json.loads((out / "results.json").read_text())
    assert results["source"]["trial_id"] == "abc" and results["config"]["tau1"] == 2.0
    assert not (folder / LEASE_FILE).exists()


# ----------------------------------------------------------------------------- a trial's own files

def _another_trial(folder: Path, trial_id: str) -> None:
    """A copy of trial_abc under another id."""
    target = folder / f"trial_{trial_id}"
    shutil.copytree(folder / "trial_abc", target)
    for name in ("result.json", "trial_record.json"):
        path = target / name
        path.write_text(path.read_text().replace('"abc"', f'"{trial_id}"'))


def _damage(path: Path, how: str) -> None:
    import os

    if how == "cut":
        cut(path)
    elif how == "random bytes":
        path.write_bytes(bytes(range(128, 256)) * 4)
    else:  # a list, not a mapping
        path.write_text("[1, 2]")
    os.utime(path, (1, 1))  # not a file a running search is writing now


@pytest.mark.parametrize("how", ["cut", "random bytes", "not a mapping"])
def test_a_damaged_trial_is_left_out_said_so_and_never_replaced_when_chosen(made, tmp_path, capsys, how):
    from refilled.store.experiments import load_trials

    folder = copy(made, tmp_path, None)
    _another_trial(folder, "def")
    (folder / "selection.csv").write_text("trial_id,val_accuracy_reeval_mean\nabc,0.9\ndef,0.8\n")
    _damage(folder / "trial_abc" / "params.json", how)
    trials = load_trials(folder)
    err = capsys.readouterr().err
    assert len(trials) == 1 and "trial_abc" in err and "left out" in err and "\n" not in err.strip()
    before = tree(folder.parent)
    # the chosen trial cannot be read: retrain refuses, it does not retrain the runner-up
    refused(capsys, ["retrain", "--experiment", str(folder), "--seeds", "1"], "the chosen trial abc",
            "--trial")
    assert tree(folder.parent) == before


def test_a_damaged_result_file_is_left_out_not_a_traceback(made, tmp_path, capsys):
    from refilled.store.experiments import load_trials

    folder = copy(made, tmp_path, None)
    _another_trial(folder, "def")
    _damage(folder / "trial_def" / "result.json", "random bytes")
    assert list(load_trials(folder)["trial_id"]) == ["abc"]
    assert "trial_def" in capsys.readouterr().err


def test_a_damaged_trial_record_is_said_and_the_trial_kept_on_its_results(made, tmp_path, capsys):
    from refilled.store.experiments import load_trials

    folder = copy(made, tmp_path, None)
    _damage(folder / "trial_abc" / "trial_record.json", "random bytes")
    trials = load_trials(folder)
    assert list(trials["trial_id"]) == ["abc"]
    err = capsys.readouterr().err
    assert "trial_abc" in err and "trial_record.json is damaged" in err


def _ended(folder: Path, trial_id: str, steps: int = 5) -> None:
    """trial_<id> as a trial that ran all its steps, its record saying so."""
    trial = folder / f"trial_{trial_id}"
    rows = [{"step": s, "total_steps": steps, "stage": "stage1" if s <= 2 else "stage2", "val_accuracy": 0.1 * s,
             "trial_id": trial_id} for s in range(1, steps + 1)]
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (trial / "trial_record.json").write_text(json.dumps({"trial_id": trial_id, "number": 1, "status": "finished",
                                                         "step": steps, "total_steps": steps}))


@pytest.mark.parametrize("keep", [0.3, 0.55, 0.8])
def test_an_ended_trial_whose_results_lost_their_end_is_left_out_and_refused_when_chosen(made, tmp_path, capsys,
                                                                                          keep):
    """Cut anywhere, even at a line's end, the file no longer holds the steps the trial's record
    says it reported: the trial would rank on part of its curve, so it is left out, said once."""
    from refilled.store.experiments import load_trials

    folder = copy(made, tmp_path, None)
    _another_trial(folder, "def")
    for trial_id in ("abc", "def"):
        _ended(folder, trial_id)
    (folder / "selection.csv").write_text("trial_id,val_accuracy_reeval_mean\nabc,0.9\ndef,0.8\n")
    cut(folder / "trial_abc" / "result.json", keep)
    for _ in range(2):  # a script reads an experiment more than once: the note comes once
        assert list(load_trials(folder)["trial_id"]) == ["def"]
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and "trial_abc" in notes[0] and "reported step 5" in notes[0], notes
    before = tree(folder.parent)
    refused(capsys, ["retrain", "--experiment", str(folder), "--seeds", "1"], "the chosen trial abc",
            "result.json ends at step")
    refused(capsys, ["retrain", "--experiment", str(folder), "--seeds", "1", "--trial", "abc"],
            "--trial abc", "result.json ends at step")
    assert tree(folder.parent) == before


@pytest.mark.parametrize("content", [b"trial_id,val_accuracy_reeval_mean\nabc,0.9\nd", b"trial_id\nabc\n",
                                     b"trial_id,val_accuracy_reeval_mean\nabc,0.9\ndef,0.8", bytes(range(128, 256))])
def test_a_selection_cut_short_or_garbled_is_refused(made, tmp_path, capsys, content):
    folder = copy(made, tmp_path, None)
    _another_trial(folder, "def")
    (folder / "selection.csv").write_bytes(content)
    before = tree(folder.parent)
    refused(capsys, ["retrain", "--experiment", str(folder), "--seeds", "1"], f"{folder}/selection.csv is damaged",
            "search --resume")
    assert tree(folder.parent) == before
    # found after the output folder was checked: a script that fails writes nothing, there or above it
    from analysis.common import run_cli
    from analysis.report import main as report

    out = tmp_path / "new" / "deeper" / "report"
    assert run_cli(report, [str(folder), "--out", str(out)]) == 2
    assert "selection.csv is damaged" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and tree(folder.parent) == before
    mine = tmp_path / "mine"  # a folder the scripts wrote before keeps what it held
    mine.mkdir()
    (mine / ".tune-refilled-output").write_text("")
    (mine / "index.md").write_text("the last report")
    assert run_cli(report, [str(folder), "--out", str(mine)]) == 2
    assert sorted(p.name for p in mine.iterdir()) == [".tune-refilled-output", "index.md"]
    assert (mine / "index.md").read_text() == "the last report"


@pytest.mark.parametrize("how", ["random bytes", "cut"])
def test_the_report_leaves_out_a_damaged_retrain_or_best_config_and_says_so_once(made, tmp_path, capsys, how):
    from analysis.common import run_cli
    from analysis.report import main as report
    from refilled.store.experiments import read_best_config, read_retrain

    folder = copy(made, tmp_path, None)
    _ended(folder, "abc")
    (folder / "retrain").mkdir()
    results = {"refilled": {"test_accuracy": [0.9], "mean": 0.9, "std": 0.0}, "config": {"tau1": 2.0}}
    (folder / "retrain" / "results.json").write_text(json.dumps(results, indent=2))
    assert read_retrain(folder) == results
    (folder / "best_config.yaml").write_text(yaml.safe_dump({"config": make_tiny_config().to_dict()}))
    assert read_best_config(folder)["config"]["tau1"] == make_tiny_config().tau1
    for name in ("retrain/results.json", "best_config.yaml"):
        _damage(folder / name, how) if how == "random bytes" else cut(folder / name, 0.6)
    before = tree(folder.parent)
    out = tmp_path / "report"
    with unrendered():  # what the report says is tested here, not its pixels
        assert run_cli(report, [str(folder), "--out", str(out)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(notes) == 2 and all(line.startswith("note: ") and "is damaged" in line for line in notes), notes
    assert any("retrain/results.json" in line and "--force" in line for line in notes)
    assert any("best_config.yaml" in line and "search --resume" in line for line in notes)
    index = (out / "index.md").read_text()
    assert "The final retrain of exp is left out" in index and "best configuration of exp is left out" in index
    assert not (out / "best_config").exists() and not (out / "retrain").exists()  # nothing damaged copied
    assert tree(folder.parent) == before


def test_an_earlier_two_arm_retrain_still_reads_in_the_report_and_the_comparison(made, tmp_path):
    """results.json of a retrain before the untuned arm existed: REFILLED and the student alone."""
    from analysis.common import as_experiments, run_cli
    from analysis.compare_trials import experiment_summary
    from analysis.report import main as report

    folder = copy(made, tmp_path, None)
    _ended(folder, "abc")
    (folder / "retrain").mkdir()
    earlier = {"refilled": {"test_accuracy": [0.9, 0.92], "seeds": [0, 1], "mean": 0.91, "std": 0.014},
               "student_alone": {"test_accuracy": [0.88, 0.9], "seeds": [0, 1], "mean": 0.89, "std": 0.014},
               "gain": 0.02, "gain_paired_seeds": 2, "gain_se": 0.0, "gain_seeds_won": 2, "gain_seeds_lost": 0,
               "source": {"experiment": "exp", "trial_id": "abc"}, "config": {"tau1": 2.0}}
    (folder / "retrain" / "results.json").write_text(json.dumps(earlier, indent=2))
    (folder / "retrain" / "summary.md").write_text("# Final retrain\n\n| model | ... |\nGain of REFILLED over the "
                                                   "student alone: **+2.00 points**\n")
    with unrendered():
        assert run_cli(report, [str(folder), "--out", str(tmp_path / "report")]) == 0
    index = (tmp_path / "report" / "index.md").read_text()
    assert "+2.00 points" in index and "left out" not in index
    table = experiment_summary(as_experiments([str(folder)]))
    assert table["test_gain"].tolist() == [0.02] and "test_search_gain" not in table


def test_the_report_of_a_search_before_any_stage_2_is_written(made, tmp_path, capsys):
    """An interrupted search whose one trial is in stage 1: every plot is made, with nothing to show."""
    from analysis.common import run_cli
    from analysis.report import main as report

    folder = copy(made, tmp_path, None)
    out = tmp_path / "report"
    assert run_cli(report, [str(folder), "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "index.md").is_file() and (out / "params.png").is_file()
    assert not list(out.glob(".partial-*"))  # the folder it was assembled in is gone
    assert sorted(p.name for p in out.iterdir())[:2] == [".tune-refilled-output", "cost.csv"]


# ----------------------------------------------------------------------------- Ray Tune's pickled state

# Ray Tune's state files as a search leaves them (names as in a real experiment; contents not pickles:
# the ownership check never reads them, and none of these tests gets as far as Ray reading them)
OWNED_STATE = ["tuner.pkl", "searcher-state-2026-12-07_08-06-43.pkl", "callback-states-2026-12-07_08-06-43.pkl",
              "search_gen_state-2026-12-07_08-06-43.json", "experiment_state-2026-12-07_08-06-43.json"]


def _with_tune_state(made: Path, tmp_path: Path, monkeypatch) -> Path:
    from ray import tune

    folder = copy(made, tmp_path, None)
    for name in OWNED_STATE:
        (folder / name).write_bytes(b"never read here")
        (folder / name).chmod(0o644)
    folder.chmod(0o755)
    # past the checks, the resume would read Ray's state and start Ray: stop there instead
    monkeypatch.setattr(tune.Tuner, "can_restore", classmethod(lambda cls, path, **kw: False))
    return folder


def test_resume_goes_past_ray_tunes_state_that_only_its_owner_may_write(made, tmp_path, capsys, monkeypatch):
    folder = _with_tune_state(made, tmp_path, monkeypatch)
    refused(capsys, ["search", "--resume", "--name", "exp", "--storage", str(folder.parent)],
            "has no Ray Tune state to resume")


@pytest.mark.parametrize("name, bits", zip(OWNED_STATE + [".", "experiment.yaml"], [0o020, 0o002] * 4))  # group, others
def test_resume_refuses_ray_tunes_state_that_others_may_write(made, tmp_path, capsys, monkeypatch, name, bits):
    """`search --resume` unpickles these files: one that others may write (or the folder holding
    it) is refused in one line, before Ray starts and before anything is read or written."""
    folder = _with_tune_state(made, tmp_path, monkeypatch)
    target = folder / name
    target.chmod(target.stat().st_mode | bits)
    before = tree(folder.parent)
    line = refused(capsys, ["search", "--resume", "--name", "exp", "--storage", str(folder.parent)],
                   "may be written by others than its owner", "unpickles Ray Tune's state", "chmod -R go-w")
    assert (str(folder) if name == "." else f"{folder}/{name}") in line, line
    assert tree(folder.parent) == before


def test_the_lease_s_files_are_not_refused_when_others_may_write_them(made, tmp_path, capsys, monkeypatch):
    """The lease's lock is made by whichever driver held the experiment first (perhaps another
    user's, with its umask), a lease being written by a driver killed meanwhile is left aside,
    and a resume never unpickles either."""
    folder = _with_tune_state(made, tmp_path, monkeypatch)
    for name in (LOCK_FILE, f"{LEASE_FILE}.0a1b2c3d.tmp"):
        (folder / name).write_bytes(b"")
        (folder / name).chmod(0o666)
    refused(capsys, ["search", "--resume", "--name", "exp", "--storage", str(folder.parent)],
            "has no Ray Tune state to resume")


def test_resume_refuses_ray_tunes_state_of_a_staged_search_s_phase_1(made, tmp_path, capsys, monkeypatch):
    folder = _with_tune_state(made, tmp_path, monkeypatch)
    phase1 = folder / "stage1_search"
    phase1.mkdir(mode=0o755)
    (phase1 / "tuner.pkl").write_bytes(b"\x80\x05")
    (phase1 / "tuner.pkl").chmod(0o666)
    refused(capsys, ["search", "--resume", "--name", "exp", "--storage", str(folder.parent)],
            f"{phase1}/tuner.pkl may be written by others")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user takes root")
@pytest.mark.parametrize("name", ["tuner.pkl", "."])
def test_resume_refuses_ray_tunes_state_of_another_user(made, tmp_path, capsys, monkeypatch, name):
    folder = _with_tune_state(made, tmp_path, monkeypatch)
    os.chown(folder / name, 4242, -1)
    refused(capsys, ["search", "--resume", "--name", "exp", "--storage", str(folder.parent)],
            "belongs to another user (uid 4242)", "resume only experiments you trust")


# ----------------------------------------------------------------------------- Ray Tune's saved state, read by Ray

def test_ray_s_state_is_read_by_its_readers_only_where_it_holds_a_saved_trial(tmp_path):
    """refilled.tune.saved_state reads Tune's state with Ray's readers (here garbage, so any read
    refuses): not where Tune saved none (no tuner), nor where the trials' records say no state
    of Tune's held them (starting over loses nothing); refused in one line where one did."""
    from refilled.tune import saved_state

    folder = tmp_path / "exp"
    trial = folder / "trial_a"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text("{}")
    (folder / "experiment_state-2026-12-07_08-06-43.json").write_text('{"trial_data": [')
    place = Place(folder)
    saved_state.check(place, place)  # no tuner: nothing of Tune's to restore
    (folder / "tuner.pkl").write_bytes(b"\x80\x05")
    (trial / "trial_record.json").write_text(json.dumps({"trial_id": "a", "number": 1, "status": "running"}))
    saved_state.check(place, place)  # no trial in any state Tune saved
    (trial / "trial_record.json").write_text(json.dumps({"trial_id": "a", "number": 1, "status": "running",
                                                         "at_last_save": {"status": "running", "checkpoint": None}}))
    with pytest.raises(UserError, match=rf"Ray's state of {folder} is damaged \(its trials in {folder} cannot be "
                                        r"read: JSONDecodeError: .*the 0 trials that ended; nothing was changed$"):
        saved_state.check(place, place)
