"""Drivers killed and resumed, and a second driver refused, for real: local Ray,
Optuna, files on disk or at a file:// URI (tests/test_search.py's helpers and tiny
experiment). A killed driver's lease is taken over by its resume: at once in a folder on
the same machine (the kernel dropped the driver's lock), after LEASE_TIMEOUT seconds at a
URI; a live one refuses a second driver."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import time

import pandas as pd
import pytest

from refilled.store.layout import LEASE_FILE, LOCK_FILE
from refilled.store.lease import DEFAULT_TIMEOUT_S
from support.searches import (
    LEASE_ENV,
    SEARCH_TIMEOUT,
    TOTAL_STEPS,
    RayRun,
    assert_one_line_error,
    check_run_again_from_saved_state,
    check_staged,
    cli,
    ended_unsaved,
    explain,
    finished,
    kill_when,
    optuna_trial_for,
    params,
    record,
    results,
    saved_state,
    study,
    tiny_experiment,
    tree,
    trial_folders,
)

# ----------------------------------------------------------------------------- resume after a kill

@pytest.mark.slow
@pytest.mark.timeout(4 * SEARCH_TIMEOUT)
def test_a_killed_driver_is_resumed_at_once_with_nothing_lost(search_teacher, tmp_path):
    """SIGKILL (the out-of-memory killer, a closed terminal) mid-search, with the lease timeout
    at its default (120 s): the kernel dropped the driver's lock, so `search --resume` started
    within 5 s of the kill takes the lease over at once, long before the timeout; each trial
    goes on from the checkpoint Tune's saved state names, and the search ends with every trial
    once, in its folder and in the study."""
    n = 6
    # grace_period = all epochs: ASHA stops nobody, so "finished" means every epoch ran
    # a fresh worker per trial (reuse_actors off) keeps the search slow enough to be killed mid-way:
    # results reach the storage folder the test watches only every ~10 s
    config = tiny_experiment(tmp_path, "resume", search={"num_samples": n, "max_concurrent": 1, "reuse_actors": False,
                                                          "asha": {"grace_period": TOTAL_STEPS}})
    storage = tmp_path / "storage"
    folder = storage / "resume"
    args = cli("search", "--config", str(config), "--storage", str(storage), "--teacher", str(search_teacher))
    default = {LEASE_ENV: f"{DEFAULT_TIMEOUT_S:g}"}
    killed = kill_when(RayRun(**default), args, lambda: sum(finished(tf) for tf in trial_folders(folder)) >= 3,
                       "3 finished trials", wait_stale=False)
    assert killed.returncode == -signal.SIGKILL
    # SIGKILL: the driver could not release its lease, which names it; its lock is left, held by nobody
    left = json.loads((folder / LEASE_FILE).read_text())
    assert left["pid"] == killed.pid and left["host"] == socket.gethostname()
    assert left["timeout_s"] == DEFAULT_TIMEOUT_S and left["lock"] is True and (folder / LOCK_FILE).is_file()

    before = {tf.name: results(tf) for tf in trial_folders(folder) if results(tf)}
    finished_before = [tf.name for tf in trial_folders(folder) if finished(tf)]
    assert 3 <= len(finished_before) < n
    saved, resumable = saved_state(folder)
    kept = ended_unsaved(folder, saved)  # ended after Tune's last save (rare): the resume keeps them, counted
    # the checkpoint Ray's saved state would resume each trial from survived the kill (saved_state read it)
    assert resumable
    # ASHA stops nobody here: what the kill cut short reads as running (to resume), not as stopped
    from refilled.store.experiments import load_trials

    interrupted = load_trials(folder)
    assert set(interrupted["status"]) <= {"finished", "running"}, interrupted[["trial_id", "status", "epochs"]]
    assert (interrupted["status"] == "finished").sum() == len(finished_before)

    resume = RayRun(**default)
    since_kill = time.monotonic() - killed.killed_at
    assert since_kill < 5, f"the resume starts {since_kill:.1f} s after the kill"
    resumed = resume.run(cli("search", "--resume", "--name", "resume", "--storage", str(storage)))
    assert resumed.returncode == 0, explain(resumed)
    # the lock, not the timeout, let it through: the resume takes the lease over, says so, and releases it
    took = [line for line in resumed.stderr.splitlines() if "took over the lease" in line]
    assert len(took) == 1 and f"pid {killed.pid} on {socket.gethostname()}" in took[0], explain(resumed)
    assert "the system released its lock" in took[0], took[0]
    assert int(re.search(r"last heartbeat (\d+) s ago", took[0]).group(1)) < DEFAULT_TIMEOUT_S, took[0]
    assert not (folder / LEASE_FILE).exists() and not (folder / LOCK_FILE).exists()

    folders = trial_folders(folder)
    table = pd.read_csv(folder / "trials.csv")
    assert len(table) == n + len(kept) and len(folders) == n + len(kept)
    assert (table["status"] == "finished").all(), table[["trial_id", "status", "epochs"]]
    check_run_again_from_saved_state(folder, before, saved, resumable)
    assert {rows[-1]["trial_id"] for name, rows in before.items() if name in saved} <= set(table["trial_id"])
    for tf in folders:  # every trial ran every epoch
        steps = [r["step"] for r in results(tf)]
        assert set(steps) == set(range(1, TOTAL_STEPS + 1)), (tf.name, steps)

    # the same study, continued: one Optuna trial per Tune trial, all complete
    import optuna

    ot_trials = study(folder).trials
    assert len(ot_trials) == n + len(kept), ([(t.number, t.state.name, sorted(t.params), t.datetime_start)
                                              for t in ot_trials], resumed.stdout[-6000:], resumed.stderr[-4000:])
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in ot_trials), [t.state for t in ot_trials]
    for tf in folders:
        optuna_trial_for(ot_trials, params(tf))
    assert "chosen config (" in resumed.stdout

    # resuming a finished search runs nothing again, and a trial folder that Tune's saved state
    # does not know and that never ended (what a driver killed just after starting a trial
    # leaves behind) is set aside
    stray = folder / "trial_0badc0de"
    shutil.copytree(folders[0], stray)
    (stray / "trial_record.json").write_text(json.dumps({**record(folders[0]), "status": "running"}))
    lines = {tf.name: len(results(tf)) for tf in folders}
    again = RayRun().run(cli("search", "--resume", "--name", "resume", "--storage", str(storage)))
    assert again.returncode == 0, explain(again)
    assert not stray.exists() and (folder / "interrupted_trials" / stray.name / "params.json").is_file()
    assert {tf.name: len(results(tf)) for tf in trial_folders(folder)} == lines
    assert len(pd.read_csv(folder / "trials.csv")) == n + len(kept) and len(study(folder).trials) == n + len(kept)


# ----------------------------------------------------------------------------- one driver per experiment

@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_a_second_driver_is_refused_while_the_first_runs(search_teacher, tmp_path):
    """What a user does with a driver forgotten in a tmux: `search --resume` (or a new
    search) of the same experiment from a second terminal. It is refused in one line
    that names the first driver, before it starts Ray or writes anything; the first goes
    on, and Ctrl-C ends it with its lease released."""
    import optuna

    n = 2  # one at a time, each in a fresh worker process: the first driver runs long enough
    config = tiny_experiment(tmp_path, "busy", search={"num_samples": n, "max_concurrent": 1, "reuse_actors": False,
                                                        "asha": {"grace_period": TOTAL_STEPS}})
    storage = tmp_path / "storage"
    folder = storage / "busy"
    first_run = RayRun(**{LEASE_ENV: "120"})  # the default: a live driver is never stale here
    first = first_run.popen(cli("search", "--config", str(config), "--storage", str(storage),
                                "--teacher", str(search_teacher)))
    def wait_for(what, ready):
        deadline = time.monotonic() + SEARCH_TIMEOUT
        while not ready():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"{what} did not happen in time"
            time.sleep(0.2)

    try:
        wait_for("the experiment file", lambda: (folder / "experiment.yaml").is_file())
        lease = json.loads((folder / "driver.lease").read_text())
        assert lease["pid"] == first.pid and lease["host"] == socket.gethostname()
        for args in (cli("search", "--resume", "--name", "busy", "--storage", str(storage)),
                     cli("search", "--config", str(config), "--storage", str(storage), "--name", "busy")):
            second = RayRun().run(args, timeout=120)
            # one line on stderr: Ray was not even started (it says so on stderr when it starts)
            assert_one_line_error(second, f"{folder} is in use by another search driver",
                                  f"pid {first.pid} on {socket.gethostname()}", "running since",
                                  f"kill -INT {first.pid}")
            assert first.poll() is None
        assert json.loads((folder / "driver.lease").read_text())["token"] == lease["token"]
        wait_for("a trial's checkpoint", lambda: list(folder.glob("trial_*/checkpoint_*")))  # Tune runs trials
        first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state, the driver ends
        _, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
        first_run.cleanup()
    assert first.returncode == 130 and "--resume" in err, err[-3000:]
    assert not (folder / "driver.lease").exists()  # released on Ctrl-C
    assert not (folder / "trials.csv").exists()  # an interrupted search is not summarised as if it had ended
    # the refused drivers left nothing behind: one Ray experiment state (each driver that runs writes its own)
    assert len(list(folder.glob("experiment_state*.json"))) == 1, sorted(p.name for p in folder.iterdir())

    # resumed (no takeover: the lease was released), the search ends with each of its n trials
    # once, in its folder and in the study
    resumed = RayRun().run(cli("search", "--resume", "--name", "busy", "--storage", str(storage)))
    assert resumed.returncode == 0 and "took over" not in resumed.stderr, explain(resumed)
    folders = trial_folders(folder)
    ot_trials = study(folder).trials
    assert len(folders) == len(ot_trials) == n, (len(folders), [(t.number, t.state) for t in ot_trials])
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in ot_trials)
    for tf in folders:
        optuna_trial_for(ot_trials, params(tf))
    assert not (folder / "driver.lease").exists()


# ----------------------------------------------------------------------------- storage at a URI

@pytest.mark.slow
@pytest.mark.timeout(5 * SEARCH_TIMEOUT)
def test_search_resume_retrain_and_report_with_storage_at_a_uri(search_teacher, tmp_path):
    """--storage file://...: pyarrow's view of storage, as for s3:// or gs://. Everything
    lands at the URI; our files are made in local mirrors, and a resume from another
    machine's mirror (an empty cache) continues the same study."""
    import optuna

    n = 5
    config = tiny_experiment(tmp_path, "remote", search={"num_samples": n, "max_concurrent": 1, "reuse_actors": False,
                                                          "asha": {"grace_period": TOTAL_STEPS}})
    bucket = tmp_path / "bucket"
    uri = f"file://{bucket}"
    folder = bucket / "remote"
    # killed once 2 trials finished (as Ray's sync shows them at the URI)
    killed = kill_when(RayRun(TUNE_REFILLED_CACHE=str(tmp_path / "cache-first")),
                       cli("search", "--config", str(config), "--storage", uri, "--teacher", str(search_teacher)),
                       lambda: sum(finished(tf) for tf in trial_folders(folder)) >= 2, "2 finished trials",
                       settle=1.0)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((folder / "driver.lease").read_text())["pid"] == killed.pid  # the lease is at the URI
    for name in ("experiment.yaml", "teacher.pt", "bank-tuning.npy", "tuner.pkl"):
        assert (folder / name).is_file(), name
    assert not (folder / "trials.csv").exists()

    resumed = RayRun(TUNE_REFILLED_CACHE=str(tmp_path / "cache-second")).run(
        cli("search", "--resume", "--storage", uri, "--name", "remote"))
    assert resumed.returncode == 0, explain(resumed)
    assert "took over the lease" in resumed.stderr and not (folder / "driver.lease").exists()
    assert f"written to {uri}/remote/best_config.yaml" in resumed.stdout
    table = pd.read_csv(folder / "trials.csv")
    assert len(table) == n and (table["status"] == "finished").all(), table[["trial_id", "status", "epochs"]]
    assert (folder / "best_config.yaml").is_file()
    assert not (folder / "stage1_cache").exists()  # trials cannot lock files at a URI: the cache is off
    assert "stage-1 cache: off" in resumed.stdout
    for tf in trial_folders(folder):  # Ray wrote the trials to the URI, every epoch of each
        assert set(r["step"] for r in results(tf)) == set(range(1, TOTAL_STEPS + 1)), tf.name
    ot_trials = study(folder).trials  # exported from the study Ray saved with the searcher
    assert len(ot_trials) == n and all(t.state == optuna.trial.TrialState.COMPLETE for t in ot_trials)
    assert len({tuple(sorted(t.params.items())) for t in ot_trials}) == n
    mirror = next((tmp_path / "cache-second").rglob("remote/experiment.yaml")).parent
    assert mirror != folder and (mirror / "trials.csv").read_text() == (folder / "trials.csv").read_text()

    # the retrain of a URI experiment goes next to it
    cache = {"TUNE_REFILLED_CACHE": str(tmp_path / "cache-third")}
    retrained = RayRun(**cache).run(cli("retrain", "--experiment", f"{uri}/remote", "--seeds", "1", "--no-baseline"))
    assert retrained.returncode == 0, explain(retrained)
    assert f"wrote {uri}/remote/retrain/results.json" in retrained.stdout
    assert json.loads((folder / "retrain" / "results.json").read_text())["refilled"]["seeds"] == [0]
    assert any((folder / "retrain" / "refilled" / "seed0").iterdir())

    report = RayRun(**cache).run([sys.executable, "analysis/report.py", f"{uri}/remote",
                                  "--out", str(tmp_path / "report")])
    assert report.returncode == 0, explain(report)
    board = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert len(board) == n and set(board["experiment"]) == {"remote"}

    again = RayRun(**cache).run(cli("search", "--config", str(config), "--storage", uri), timeout=120)
    assert_one_line_error(again, f"{uri}/remote already exists")


@pytest.mark.slow
@pytest.mark.timeout(4 * SEARCH_TIMEOUT)
def test_staged_search_at_a_uri_resumes_in_either_phase(search_teacher, tmp_path):
    """Killed in phase 1, resumed from another mirror (phase 1 goes on from Ray's saved
    state), killed again in phase 2, resumed from a third mirror: phase 1 is not
    touched, and phase 2 goes on from the same choice (read back from the URI)."""
    n = 4
    config = tiny_experiment(tmp_path, "staged", search={
        "num_samples": n, "max_concurrent": 1, "reuse_actors": False,
        "asha": {"grace_period": TOTAL_STEPS - 2},  # phase 2 counts its 4 stage-2 epochs: no trial stopped
        "staged": {"num_samples": 4, "asha": {"grace_period": 2}}})  # phase 1: no trial stopped
    bucket = tmp_path / "bucket"
    uri = f"file://{bucket}"
    folder = bucket / "staged"
    resume = cli("search", "--resume", "--storage", uri, "--name", "staged")

    kill_when(RayRun(TUNE_REFILLED_CACHE=str(tmp_path / "cache-first")),
              cli("search", "--config", str(config), "--storage", uri, "--teacher", str(search_teacher)),
              lambda: sum(finished(tf) for tf in trial_folders(folder / "stage1_search")) >= 2, "2 phase-1 trials",
              settle=1.0)
    assert not (folder / "stage1_choice.pt").exists()
    before = {tf.name: results(tf) for tf in trial_folders(folder / "stage1_search") if results(tf)}
    saved, resumable = saved_state(folder / "stage1_search")

    kill_when(RayRun(TUNE_REFILLED_CACHE=str(tmp_path / "cache-second")), resume,
              lambda: sum(finished(tf) for tf in trial_folders(folder)) >= 2, "2 phase-2 trials", settle=1.0)
    check_run_again_from_saved_state(folder / "stage1_search", before, saved, resumable)
    phase1 = tree(folder / "stage1_search")
    choice = (folder / "stage1_choice.pt").read_bytes()
    before = {tf.name: results(tf) for tf in trial_folders(folder) if results(tf)}
    saved, resumable = saved_state(folder)

    resumed = RayRun(TUNE_REFILLED_CACHE=str(tmp_path / "cache-third")).run(resume)
    assert resumed.returncode == 0, explain(resumed)
    assert "phase 1 of 2" not in resumed.stdout
    assert tree(folder / "stage1_search") == phase1 and (folder / "stage1_choice.pt").read_bytes() == choice
    check_run_again_from_saved_state(folder, before, saved, resumable)  # a phase-2 trial cut mid-way
    check_staged(folder, n, n1=4, killed_in_phase2=True)
    assert (pd.read_csv(folder / "trials.csv")["status"] == "finished").all()
