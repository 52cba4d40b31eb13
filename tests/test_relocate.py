"""An experiment folder is self-contained: copied (`cp -a`) under another name in another
folder, it is resumed, retrained and reported in its new place, and the original stays
byte for byte as it was (every file's size, modification time and content, and no new
file or folder). And a Ray state file cut short is refused by `--resume` with nothing
moved: the trials that ended stay where `retrain` reads them. One search, killed mid-way,
serves all three (local Ray, the tiny experiment of tests/search_tiny.yaml)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from refilled.store import study as study_store
from refilled.store import trial_records
from support.searches import (
    SEARCH_TIMEOUT,
    TOTAL_STEPS,
    RayRun,
    assert_one_line_error,
    cli,
    explain,
    finished,
    kill_when,
    record,
    results,
    tiny_experiment,
    trial_folders,
)

N = 4
NAME = "reloc"  # the original's name: its Optuna study keeps it wherever the experiment goes


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file under `folder` with its size, modification time and content hash, and every folder."""
    out: dict[str, tuple] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir():
            out[rel + "/"] = ()
        else:
            stat = path.stat()
            out[rel] = (stat.st_size, stat.st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest())
    return out


def cp_a(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    return target


def resume(folder: Path) -> list[str]:
    return cli("search", "--resume", "--name", folder.name, "--storage", str(folder.parent))


def names(folder: Path) -> set[str]:
    return {tf.name for tf in trial_folders(folder)}


@pytest.fixture(scope="module")
def killed(search_teacher, tmp_path_factory) -> Path:
    """A search of N trials, one at a time, killed (SIGKILL) once two have finished."""
    base = tmp_path_factory.mktemp("relocate")
    config = tiny_experiment(base, NAME, search={"num_samples": N, "max_concurrent": 1, "reuse_actors": False,
                                                  "asha": {"grace_period": TOTAL_STEPS}})
    folder = base / "storage" / NAME
    killed = kill_when(RayRun(), cli("search", "--config", str(config), "--storage", str(folder.parent),
                                     "--teacher", str(search_teacher)),
                       lambda: sum(finished(tf) for tf in trial_folders(folder)) >= 2, "2 finished trials")
    assert killed.returncode < 0 and not (folder / "trials.csv").exists()
    assert len(trial_folders(folder)) < N + 1
    return folder


@pytest.fixture(scope="module")
def moved(killed, tmp_path_factory) -> SimpleNamespace:
    """The killed search copied elsewhere under another name and resumed there."""
    copy = cp_a(killed, tmp_path_factory.mktemp("elsewhere") / "moved")
    original = snapshot(killed.parent)
    run = RayRun().run(resume(copy))
    return SimpleNamespace(copy=copy, original=original, run=run)


@pytest.mark.slow
@pytest.mark.timeout(4 * SEARCH_TIMEOUT)
def test_a_copy_of_an_interrupted_search_resumes_in_its_new_place_only(killed, moved):
    assert moved.run.returncode == 0, explain(moved.run)
    assert snapshot(killed.parent) == moved.original  # not a byte, not a file, not a folder more
    copy = moved.copy
    table = pd.read_csv(copy / "trials.csv")
    assert len(table) == N and (table["status"] == "finished").all(), table[["trial_id", "status", "epochs"]]
    assert set(table["folder"]) == names(copy)  # named inside the experiment, not by where it was
    new = names(copy) - names(killed)
    assert new, "the resume made no trial of its own"  # made in the copy, not in the original
    for tf in trial_folders(copy):
        assert [r["step"] for r in results(tf)][-TOTAL_STEPS:] == list(range(1, TOTAL_STEPS + 1)), tf.name
        assert record(tf)["status"] == "finished"
    # the copy's study was continued, the original's left as it was (the snapshot): each trial once
    import optuna

    trials = study_store.load(copy, NAME).trials
    assert len(trials) == N and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len(study_store.load(killed, NAME).trials) < N
    assert f"written to {copy}/best_config.yaml" in moved.run.stdout


@pytest.mark.slow
@pytest.mark.timeout(4 * SEARCH_TIMEOUT)
def test_a_copy_of_a_finished_experiment_is_resumed_retrained_and_reported_in_its_new_place(moved, tmp_path):
    assert moved.run.returncode == 0, explain(moved.run)
    finished_one = moved.copy
    again = cp_a(finished_one, tmp_path / "third" / "again")
    before = snapshot(finished_one.parent)
    lines = {tf.name: len(results(tf)) for tf in trial_folders(again)}

    resumed = RayRun().run(resume(again))
    assert resumed.returncode == 0, explain(resumed)
    assert {tf.name: len(results(tf)) for tf in trial_folders(again)} == lines  # nothing ran again
    assert f"written to {again}/best_config.yaml" in resumed.stdout

    retrained = RayRun().run(cli("retrain", "--experiment", str(again), "--seeds", "1", "--no-baseline"))
    assert retrained.returncode == 0, explain(retrained)
    assert f"wrote {again}/retrain/results.json" in retrained.stdout
    chosen = json.loads((again / "retrain" / "results.json").read_text())["source"]["trial_id"]
    assert f"trial_{chosen}" in names(again)

    report = RayRun().run([sys.executable, "analysis/report.py", str(again), "--out", str(tmp_path / "report")])
    assert report.returncode == 0, explain(report)
    board = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert len(board) == N and all(str(f).startswith(f"{again}/") for f in board["folder"])
    assert snapshot(finished_one.parent) == before


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_a_ray_state_cut_short_is_refused_and_nothing_is_moved(killed, tmp_path):
    """Tune would start the search over from a state file it cannot read, and every trial
    it then did not know would go aside: refused in one line, and `retrain` still reads the
    trials that ended."""
    copy = cp_a(killed, tmp_path / "damaged" / NAME)
    state = sorted(copy.glob("experiment_state-*.json"))[-1]
    state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])
    before = snapshot(copy.parent)
    # a trial the kill caught starting has its own files and no record yet (the driver's, written at its start)
    ended = sum(trial_records.read(tf).get("status") == "finished" for tf in trial_folders(copy))
    refused = RayRun().run(resume(copy), timeout=120)
    assert_one_line_error(refused, f"Ray's state of {copy} is damaged ({state} is not whole JSON)",
                          "restore it from a backup", f"still work on the {ended} trials that ended")
    # the one change: the dead driver's lock file, which the look at its lease took and removed
    # (refilled.store.lease: a look takes the lock for an instant), as any command's look does
    lock = f"{NAME}/driver.lease.lock"
    assert lock in before and {k: v for k, v in before.items() if k != lock} == snapshot(copy.parent)
    assert not (copy / "interrupted_trials").exists()

    retrained = RayRun().run(cli("retrain", "--experiment", str(copy), "--seeds", "1", "--no-baseline"))
    assert retrained.returncode == 0, explain(retrained)
