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


# Ray Tune's state files as a search leaves them (Ray 2.60's names: the product reads them only through
# Ray's readers, refilled.tune.saved_state), and what the refusal says could not be read
RAY_STATE = {"experiment_state-*.json": "its trials", "search_gen_state-*.json": "its search's state",
             "searcher-state-*.pkl": "its search's state", "callback-states-*.pkl": "its callbacks' state"}
LEASE = {f"{NAME}/driver.lease", f"{NAME}/driver.lease.lock"}


def cut_newest(folder: Path, pattern: str) -> Path:
    state = sorted(folder.glob(pattern))[-1]  # the one a restore reads
    state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])
    return state


def ended(folder: Path) -> int:
    # a trial the kill caught starting has its own files and no record yet (the driver's, written at its start)
    return sum(trial_records.read(tf).get("status") == "finished" for tf in trial_folders(folder))


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
@pytest.mark.parametrize("pattern", list(RAY_STATE))
def test_a_ray_state_cut_short_is_refused_and_nothing_is_moved(killed, tmp_path, pattern):
    """Tune would start the search over from a state file it cannot read, and every trial
    it then did not know would go aside: refused in one line before Ray starts, and `retrain`
    still reads the trials that ended."""
    copy = cp_a(killed, tmp_path / "damaged" / NAME)
    cut_newest(copy, pattern)
    before = snapshot(copy.parent)
    refused = RayRun().run(resume(copy), timeout=120)
    assert_one_line_error(refused, f"Ray's state of {copy} is damaged ({RAY_STATE[pattern]} in {copy} cannot be read",
                          "restore it from a backup", f"still work on the {ended(copy)} trials that ended")
    # the one change: the dead driver's lock file, which the look at its lease took and removed
    # (refilled.store.lease: a look takes the lock for an instant), as any command's look does
    lock = f"{NAME}/driver.lease.lock"
    assert lock in before and {k: v for k, v in before.items() if k != lock} == snapshot(copy.parent)
    assert not (copy / "interrupted_trials").exists()
    if pattern.startswith("experiment_state"):
        retrained = RayRun().run(cli("retrain", "--experiment", str(copy), "--seeds", "1", "--no-baseline"))
        assert retrained.returncode == 0, explain(retrained)


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_a_staged_search_s_phase_1_has_its_ray_state_read_too(killed, tmp_path):
    """A staged search resumed in phase 1 goes on with stage1_search/'s Tune state: read before Ray starts."""
    from refilled.store import experiment_file
    from refilled.store.storage import Place

    copy = cp_a(killed, tmp_path / "staged" / NAME)
    cfg, data = experiment_file.read(copy, str(copy))
    space = {"tau1": {"loguniform": [0.5, 16]}, "lambd": {"loguniform": [0.1, 100]}}
    experiment_file.write(Place(copy), cfg, {**data["search"], "space": space, "staged": {"num_samples": 2}})
    phase1 = cp_a(killed, copy / "stage1_search")
    cut_newest(phase1, "experiment_state-*.json")
    refused = RayRun().run(resume(copy), timeout=120)
    assert_one_line_error(refused, f"Ray's state of {copy} is damaged (its trials in {phase1} cannot be read")


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_a_tuner_cut_short_is_refused_once_ray_reads_it_and_nothing_is_moved(killed, tmp_path):
    """Tune's tuner is read by Tuner.restore, once the driver holds the lease and Ray has started:
    refused then, with nothing of the experiment changed (the lease's files are the drivers')."""
    copy = cp_a(killed, tmp_path / "tuner" / NAME)
    cut_newest(copy, "tuner.pkl")
    before = snapshot(copy.parent)
    refused = RayRun().run(resume(copy), timeout=180)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr + refused.stdout, explain(refused)
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: Ray's state of {copy} is damaged (its tuner in {copy} cannot be read"), last
    assert f"still work on the {ended(copy)} trials that ended" in last, last
    after = snapshot(copy.parent)
    assert {k: v for k, v in before.items() if k not in LEASE} == {k: v for k, v in after.items() if k not in LEASE}


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_a_state_that_tune_reads_but_cannot_restore_is_refused_not_started_over(killed, tmp_path):
    """A state every reader takes that Tune still fails to restore (here: its trials' list emptied,
    which Tune's controller cannot restore from): Tune logs why and would start the search over;
    the search refuses to, before a trial runs, as the trials' records say Tune had saved them."""
    copy = cp_a(killed, tmp_path / "restart" / NAME)
    state = sorted(copy.glob("experiment_state-*.json"))[-1]
    saved = json.loads(state.read_text())
    state.write_text(json.dumps({**saved, "trial_data": []}))
    trials = names(copy)
    refused = RayRun().run(resume(copy), timeout=180)
    assert refused.returncode == 2, explain(refused)
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: Ray Tune could not restore its saved state of {copy} (its log above says why) "
                           "and would start the search over"), last
    assert f"still work on the {ended(copy)} trials that ended; no trial ran" in last, last
    assert names(copy) == trials and not (copy / "interrupted_trials").exists()
