"""`tune_refilled.py search` for real: local Ray, Optuna, ASHA, files on disk.

Every search runs the CLI as a subprocess, as users run it, on the tiny
experiment in tests/search_tiny.yaml (digits, WRN-10-1, 2 + 4 epochs): those
tests are marked `slow`. Bad input that is refused before Ray starts runs the
CLI's main() in this process (the fast tier). Each
run gets its own Ray temp dir (RAY_TMPDIR) and a marker in its environment
that every Ray process it starts inherits, so a test can end exactly the Ray
processes of its own run (by pid) without `ray stop`, which would end every
Ray on the machine.

One finished search (`experiment`, module scope) is shared by the end-to-end
checks; the other searches take search_tiny.yaml's teacher, pretrained once per
session (conftest.search_teacher), with `--teacher`. The tests that kill a driver
and resume are in tests/test_resume.py.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from support.searches import (
    REPO,
    SEARCH_TIMEOUT,
    SEARCHED,
    STAGED,
    TINY,
    TOTAL_STEPS,
    RayRun,
    check_staged,
    cli,
    explain,
    finished,
    free_port,
    main_error,
    optuna_trial_for,
    params,
    record,
    results,
    same_params,
    study,
    tiny_experiment,
    tree,
    trial_folders,
    trial_number,
)

# ----------------------------------------------------------------------------- the shared search

# search_tiny.yaml's sections, read once: what the end-to-end checks compare the search with
TINY_CONFIG = yaml.safe_load(TINY.read_text())["config"]
TINY_SEARCH = yaml.safe_load(TINY.read_text())["search"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> SimpleNamespace:
    """search_tiny.yaml searched to the end: 8 trials, 2 at a time, ASHA and Optuna."""
    storage = tmp_path_factory.mktemp("storage")
    run = RayRun()
    result = run.run(cli("search", "--config", str(TINY), "--storage", str(storage), "--name", "tiny"))
    assert result.returncode == 0, explain(result)
    folder = storage / "tiny"
    return SimpleNamespace(folder=folder, storage=storage, result=result, teacher=folder / "teacher.pt")


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT + 120)
def test_search_writes_one_row_per_trial_stopped_at_rungs_or_finished(experiment):
    folder = experiment.folder
    n = TINY_SEARCH["num_samples"]

    # trials.csv: one row per trial; ASHA stopped some at a rung, others ran every epoch
    table = pd.read_csv(folder / "trials.csv")
    assert len(table) == n
    assert set(table["status"]) <= {"finished", "stopped"}, table["status"].tolist()
    statuses = table["status"].value_counts().to_dict()
    assert statuses.get("stopped", 0) >= 1 and statuses.get("finished", 0) >= 1, statuses
    assert set(table.loc[table["status"] == "stopped", "epochs"]) <= {2, 4}  # ASHA's rungs (grace 2, factor 2)
    assert (table.loc[table["status"] == "finished", "epochs"] == TOTAL_STEPS).all()


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT + 120)
def test_trial_folders_agree_with_the_table_and_hold_their_records(experiment):
    folder = experiment.folder
    n = TINY_SEARCH["num_samples"]
    table = pd.read_csv(folder / "trials.csv")

    # the trial folders agree with the table, and each holds its record
    folders = trial_folders(folder)
    assert len(folders) == n
    assert sorted(trial_number(tf) for tf in folders) == list(range(1, n + 1))
    for tf in folders:
        rows = results(tf)
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        row = table[table["trial_id"] == rows[-1]["trial_id"]].iloc[0]
        assert row["status"] == ("finished" if rows[-1]["step"] == TOTAL_STEPS else "stopped")
        rec = record(tf)
        assert rec["trial_id"] == rows[-1]["trial_id"] and rec["status"] == row["status"], rec
        assert rec["step"] == rows[-1]["step"] and rec["total_steps"] == TOTAL_STEPS
        assert rec["stopped_at"] == (rows[-1]["step"] if row["status"] == "stopped" else None)
        assert rows[-1].get("checkpointed") and (tf / rec["checkpoint"]).is_dir()
        assert rec["at_last_save"] == {"status": row["status"], "checkpoint": rec["checkpoint"]}
        # the last keep_checkpoints (2) checkpoints are kept, the newest (last epoch) among them
        kept = sorted(p.name for p in tf.glob("checkpoint_*"))
        assert len(kept) == min(2, len(rows)) and kept[-1] == f"checkpoint_{len(rows) - 1:06d}", (tf.name, kept)


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT + 120)
def test_the_optuna_study_has_pruned_and_complete_trials(experiment):
    folder = experiment.folder
    n = TINY_SEARCH["num_samples"]
    table = pd.read_csv(folder / "trials.csv")
    statuses = table["status"].value_counts().to_dict()
    folders = trial_folders(folder)

    # the Optuna study: pruned for the stopped trials, complete for the finished ones
    import optuna

    ot_trials = study(folder).trials
    assert len(ot_trials) == n
    states = [t.state for t in ot_trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == statuses["stopped"]
    assert states.count(optuna.trial.TrialState.COMPLETE) == statuses["finished"]
    for tf in folders:
        ot = optuna_trial_for(ot_trials, params(tf))
        want = optuna.trial.TrialState.COMPLETE if finished(tf) else optuna.trial.TrialState.PRUNED
        assert ot.state == want, (tf.name, ot.state)
        if want == optuna.trial.TrialState.COMPLETE:  # told the last stage-2 validation accuracy
            assert ot.value == pytest.approx(results(tf)[-1]["val_accuracy"])


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT + 120)
def test_start_with_config_makes_the_first_trial_the_configs_values(experiment):
    folder = experiment.folder
    cfg = TINY_CONFIG
    folders = trial_folders(folder)
    ot_trials = study(folder).trials

    # start_with: config: the first trial is the config's own values
    first = min(folders, key=trial_number)
    assert trial_number(first) == 1
    assert same_params(params(first), {k: cfg[k] for k in SEARCHED})
    assert ot_trials[0].number == 0 and same_params(ot_trials[0].params, {k: cfg[k] for k in SEARCHED})


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT + 120)
def test_best_config_is_the_best_stage2_trial(experiment):
    folder = experiment.folder
    cfg = TINY_CONFIG
    n = TINY_SEARCH["num_samples"]
    folders = trial_folders(folder)

    # the best config: best stage-2 validation accuracy among trials that reached stage 2
    def rank(tf):
        rows = results(tf)
        s1 = [r["val_accuracy"] for r in rows if r.get("stage") == "stage1"]
        s2 = [r["val_accuracy"] for r in rows if r.get("stage") == "stage2"]
        return (max(s2), s2[-1], max(s1)) if s2 else None

    ranked = {tf: rank(tf) for tf in folders if rank(tf) is not None}
    assert ranked and len(ranked) < n  # some trials were stopped in stage 1 and cannot be chosen
    top = max(ranked.values())
    best_folders = [tf for tf, r in ranked.items() if r == top]
    from refilled.schema.config import load_experiment

    best_cfg, _ = load_experiment(folder / "best_config.yaml")
    chosen = {k: getattr(best_cfg, k) for k in SEARCHED}
    assert any(same_params(chosen, params(tf)) for tf in best_folders), (chosen, [params(t) for t in best_folders])
    assert best_cfg.n_training_epochs2 == cfg["n_training_epochs2"] and best_cfg.target_classes == cfg["target_classes"]
    header = (folder / "best_config.yaml").read_text().splitlines()[0]
    assert f"{top[0]:.4f}" in header


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT + 120)
def test_tensorboard_has_a_scalar_per_reported_epoch(experiment):
    folder = experiment.folder
    folders = trial_folders(folder)

    # TensorBoard: an event file per trial with a scalar per reported epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for tf in folders:
        events = list(tf.glob("events.out.tfevents.*"))
        assert events, f"no TensorBoard events in {tf.name}"
        acc = EventAccumulator(str(tf))
        acc.Reload()
        scalars = acc.Tags()["scalars"]
        assert "ray/tune/val_accuracy" in scalars and "ray/tune/loss" in scalars, scalars
        steps = [e.step for e in acc.Scalars("ray/tune/val_accuracy")]
        assert steps == [r["step"] for r in results(tf)] == list(range(1, len(results(tf)) + 1))


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT + 120)
def test_what_the_user_sees_at_the_end(experiment):
    folder, out = experiment.folder, experiment.result.stdout
    n = TINY_SEARCH["num_samples"]

    # what the user sees at the end
    assert "trials, best stage-2 validation accuracy first" in out
    assert "chosen config (" in out and str(folder / "best_config.yaml") in out
    lines = out[out.index("best stage-2 validation accuracy first"):out.index("chosen config (")].splitlines()
    header = next(i for i, line in enumerate(lines) if "best_val_accuracy_stage2" in line)
    rows = [line.split() for line in lines[header + 1:] if line.strip()]
    assert len(rows) == n and all(r[-1] in ("finished", "stopped") for r in rows), rows
    shown = [r[-3] for r in rows]  # best_val_accuracy_stage2, then epochs and status
    numbers = [float(v) for v in shown if v != "-"]
    assert numbers and numbers == sorted(numbers, reverse=True), shown
    assert shown[len(numbers):] == ["-"] * (len(shown) - len(numbers)), shown


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT + 120)
def test_search_says_where_its_rungs_are_and_how_well_they_ranked(experiment):
    folder, out = experiment.folder, experiment.result.stdout
    assert "ASHA rungs at 2, 4 (epochs of both stages, of 6; keeps 1 in 2 at each)" in out
    # the rung is in stage 1 (NCM), which the start-up warning says, with a later rung to use
    assert "warning: the first ASHA rung (epoch 2) is in stage 1" in experiment.result.stderr
    # every report carries the clock that places ASHA's decisions at the rungs
    from refilled.schema.rungs import clock
    from refilled.store.rung_fidelity import correlations, experiment_curves

    for tf in trial_folders(folder):
        assert [r["rung_clock"] for r in results(tf)] == [clock(r["step"], [2, 4], 2, 6) for r in results(tf)]
    # the summary's correlations are those of the trials' own reports
    shown = out[out.index("ASHA's rungs, rank-correlated"):].splitlines()[1:]
    curves, rungs, end = experiment_curves(folder)
    assert rungs == [2, 4] and end == 6 and len(curves) == 8
    rows = correlations(curves, rungs, end)
    assert len(rows) == 3 and [r["trials"] for r in rows][0] == len(values_reaching(curves, 4))
    for row, line in zip(rows, shown):
        assert f"rung at epoch {row['rung']} vs {row['against']}:" in line and f"over {row['trials']} trials" in line


def values_reaching(curves, epoch):
    return [t for t, c in curves.items() if epoch in c]


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_reused_worker_processes_give_the_same_trials(experiment, tmp_path):
    """search.reuse_actors (on by default, as in the shared search) starts each trial in the
    worker process of one that ended; the same search with a fresh process per trial
    gives the same trials, losses and accuracies (its first 4 trials, to save time)."""
    config = tiny_experiment(tmp_path, "fresh", search={"reuse_actors": False, "num_samples": 4})
    storage = tmp_path / "storage"
    result = RayRun().run(cli("search", "--config", str(config), "--storage", str(storage),
                              "--teacher", str(experiment.teacher)))
    assert result.returncode == 0, explain(result)
    # ASHA's stops depend on which trial reaches a rung first, so compare each trial's
    # epochs: the same configuration reports the same losses and accuracies
    def curves(folder: Path) -> dict[tuple, list]:
        return {tuple(sorted(params(tf).items())): [(r["step"], r["val_accuracy"], r["loss"]) for r in results(tf)]
                for tf in trial_folders(folder)}

    reused, fresh = curves(experiment.folder), curves(storage / "fresh")
    # the same TPE proposals (its first ones are seeded draws): the first 4 of the shared 8
    assert len(fresh) == 4 and fresh.keys() <= reused.keys()
    for config, rows in fresh.items():
        common = min(len(rows), len(reused[config]))
        assert common >= 2 and rows[:common] == reused[config][:common], config
    pids = {tf.name: {r["pid"] for r in results(tf)} for tf in trial_folders(experiment.folder)}
    assert len(set().union(*pids.values())) < len(pids), pids  # the shared search did reuse processes


# ----------------------------------------------------------------------------- faults: a crash, a NaN

@pytest.fixture(scope="module")
def faults(search_teacher, tmp_path_factory) -> SimpleNamespace:
    """3 trials, each crashing once while at step 4 (max_failures 1), with a checkpoint
    every 2 steps. The first (start_with: config) has lr2 = 1e6: its stage-2 loss becomes NaN."""
    tmp = tmp_path_factory.mktemp("faults")
    config = tiny_experiment(
        tmp, "faults", config={"lr2": 1.0e6},
        search={"num_samples": 3, "max_concurrent": 2, "max_failures": 1, "asha": {"grace_period": TOTAL_STEPS},
                "checkpoint_every": 2,
                # seed 1 draws lr2 = 0.05 for trials 2 and 3 (the sampler is random for its first trials)
                "seed": 1, "space": {"tau1": {"loguniform": [0.5, 16]}, "lr2": {"choice": [0.05, 1.0e6]}}})
    storage = tmp / "storage"
    markers = tmp / "crash_markers"
    markers.mkdir()
    result = RayRun().run([sys.executable, str(REPO / "tests" / "support" / "crashing_search.py"), "4", str(markers),
                           str(config), str(storage), str(search_teacher)])
    assert result.returncode == 0, explain(result)
    folder = storage / "faults"
    folders = trial_folders(folder)
    first = min(folders, key=trial_number)
    assert params(first)["lr2"] == 1.0e6
    return SimpleNamespace(folder=folder, result=result, first=first, others=[f for f in folders if f != first],
                           table=pd.read_csv(folder / "trials.csv"), markers=markers)


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_crashed_trial_resumes_from_its_checkpoint(faults):
    assert len(faults.others) == 2
    sane = [tf for tf in faults.others if params(tf)["lr2"] != 1.0e6]
    assert sane, "the seeded sampler gave every trial the absurd lr2; change the seed"
    for tf in sane:
        assert (faults.markers / results(tf)[-1]["trial_id"]).exists(), tf.name
        rows = results(tf)
        steps = [r["step"] for r in rows]
        # crashed after computing step 4, as it reported it; retried from the step-2 checkpoint
        # (step 3 saved none): the trial's files went back to step 2, and hold each step once
        assert steps == [1, 2, 3, 4, 5, 6], steps
        assert [r["training_iteration"] for r in rows] == steps
        # the epochs computed twice cost twice (the first run's steps 3 and 4 go into the retried step 3)
        assert rows[2]["cost_wall_s"] > max(r["cost_wall_s"] for r in rows[3:]), [r["cost_wall_s"] for r in rows]
        assert finished(tf)
        row = faults.table[faults.table["trial_id"] == rows[-1]["trial_id"]].iloc[0]
        assert row["status"] == "finished" and row["epochs"] == TOTAL_STEPS
        assert record(tf)["retries"] == 1 and record(tf)["status"] == "finished", record(tf)
        # the injected crash happened there: Ray Tune recorded it (error.txt), then retried the trial
        assert any("injected crash at step 4" in p.read_text(errors="replace") for p in tf.glob("error*.txt")), \
            sorted(p.name for p in tf.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_nan_trial_ends_as_diverged_and_the_search_goes_on(faults):
    import optuna

    table = faults.table
    first_row = table[table["trial_id"] == results(faults.first)[-1]["trial_id"]].iloc[0]
    assert first_row["status"] == "diverged"
    reason = str(first_row["diverged_reason"])
    assert "diverged" in reason and re.search(r"\b(nan|inf)\b", reason), reason
    last = results(faults.first)[-1]
    assert last["diverged"] == 1 and last["step"] < TOTAL_STEPS
    assert record(faults.first)["status"] == "diverged" and record(faults.first)["reason"] == reason

    ot_trials = study(faults.folder).trials
    assert len(ot_trials) == len(table) == 3
    assert optuna_trial_for(ot_trials, params(faults.first)).state == optuna.trial.TrialState.FAIL
    others = [tf for tf in faults.others if params(tf)["lr2"] != 1.0e6]
    for tf in others:  # the search went on: the other trials finished and count for Optuna
        assert finished(tf)
        assert optuna_trial_for(ot_trials, params(tf)).state == optuna.trial.TrialState.COMPLETE
    # the diverged trial is never the best config
    assert "diverged" not in (faults.folder / "best_config.yaml").read_text().splitlines()[0]
    assert "chosen config (" in faults.result.stdout


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name, space, needles", [
    ("unknown_key", {"tau3": {"loguniform": [0.5, 16]}}, ["search.space.tau3", "unknown config key"]),
    ("low_above_high", {"tau1": {"loguniform": [16, 0.5]}}, ["search.space.tau1", "low must be below high"]),
    ("low_equals_high", {"tau2": {"uniform": [2, 2]}}, ["search.space.tau2", "low must be below high"]),
    ("log_of_zero", {"lr1": {"loguniform": [0, 0.1]}}, ["search.space.lr1", "> 0"]),
    ("negative_lambd", {"lambd": {"uniform": [-1, 1]}}, ["search.space.lambd", "-1"]),
])
def test_bad_search_space(tmp_path, capsys, name, space, needles):
    config = tiny_experiment(tmp_path, name, search={"space": space})
    storage = tmp_path / "storage"
    line = main_error(capsys, "search", "--config", str(config), "--storage", str(storage))
    assert all(needle in line for needle in needles), line
    assert not storage.exists()


def test_existing_experiment_needs_resume(tmp_path, capsys):
    storage = tmp_path / "storage"
    (storage / "tiny").mkdir(parents=True)
    shutil.copy(TINY, storage / "tiny" / "experiment.yaml")
    before = tree(storage)
    line = main_error(capsys, "search", "--config", str(TINY), "--storage", str(storage), "--name", "tiny")
    assert "already exists" in line and "--resume" in line, line
    assert tree(storage) == before


def test_a_warm_start_from_a_missing_experiment_is_refused_before_anything_is_written(tmp_path, capsys):
    config = tiny_experiment(tmp_path, "warm", search={"start_with": str(tmp_path / "no_such_experiment")})
    storage = tmp_path / "storage"
    line = main_error(capsys, "search", "--config", str(config), "--storage", str(storage))
    assert "no_such_experiment" in line, line
    assert not (storage / "warm").exists()


def test_resume_of_a_folder_that_is_no_experiment(tmp_path, capsys):
    storage = tmp_path / "storage"
    (storage / "notes").mkdir(parents=True)
    (storage / "notes" / "readme.txt").write_text("not an experiment")
    before = tree(storage)
    for name in ("notes", "missing"):
        line = main_error(capsys, "search", "--resume", "--name", name, "--storage", str(storage))
        assert "is not a tune-refilled experiment" in line and name in line, line
    assert tree(storage) == before and not (storage / "missing").exists()


def test_settings_are_checked_by_their_meaning_before_ray_starts(tmp_path, capsys):
    """Refused in one line before Ray's start-up, and nothing written."""
    storage = tmp_path / "storage"
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for args, needles in [(["--cpus-per-trial", "99"], ["99 CPUs", "this machine has"]),
                          (["--max-concurrent", "-1"], ["search.max_concurrent must be >= 0, got -1"])]:
        line = main_error(capsys, "search", "--config", str(TINY), "--storage", str(storage), *args)
        assert all(n in line for n in needles), line
    line = main_error(capsys, "search", "--config", str(TINY), "--storage", str(a_file))
    assert "is a file, not a folder" in line and a_file.read_text() == "mine"
    assert not storage.exists()
    for resume in ([], ["--resume"]):  # the experiment's own folder a file of the user's
        line = main_error(capsys, "search", "--config", str(TINY), "--storage", str(tmp_path), "--name", "a_file",
                          *resume)
        assert "is a file, not an experiment folder" in line and "--name" in line, line
        assert a_file.read_text() == "mine"


def test_unreachable_address(tmp_path, capsys):
    storage = tmp_path / "storage"
    start = time.monotonic()
    line = main_error(capsys, "search", "--config", str(TINY), "--storage", str(storage),
                      "--address", f"127.0.0.1:{free_port()}")
    assert "cannot connect to the Ray cluster" in line and "--address 127.0.0.1:" in line, line
    assert time.monotonic() - start < 60
    assert not storage.exists()


@pytest.mark.parametrize("ray_address", ["", "127.0.0.1:{port}"])
def test_address_auto_without_a_cluster(tmp_path, capsys, monkeypatch, ray_address):
    """--address auto joins the cluster `ray start` runs here (or RAY_ADDRESS names): with none,
    one line at once. Ray keeps what `ray start` left under RAY_TMPDIR: an empty one here."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray"))
    if ray_address:
        monkeypatch.setenv("RAY_ADDRESS", ray_address.format(port=free_port()))
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "storage"
    start = time.monotonic()
    line = main_error(capsys, "search", "--config", str(TINY), "--storage", str(storage), "--address", "auto")
    assert "cannot connect to the Ray cluster at --address auto" in line, line
    assert time.monotonic() - start < 60
    assert not storage.exists()


def test_more_gpus_per_trial_than_this_machine_has(tmp_path, capsys):
    import torch

    storage = tmp_path / "storage"
    line = main_error(capsys, "search", "--config", str(TINY), "--storage", str(storage),
                      "--gpus-per-trial", "4096")
    assert "4096.0 GPU" in line and f"this machine has {torch.cuda.device_count()}" in line, line
    assert not storage.exists()


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_stage1_cache_is_shared_by_trials_with_equal_stage1_settings(search_teacher, tmp_path):
    """Only stage-2 keys are searched, so every trial's stage 1 is the same: the first
    trial computes and stores it, the others replay it (same stage-1 reports), and
    their stage-2 results still differ with lambd."""
    config = tiny_experiment(tmp_path, "cached", search={
        "num_samples": 3, "max_concurrent": 1, "asha": {"grace_period": TOTAL_STEPS},
        "space": {"lambd": {"loguniform": [0.1, 100]}}})
    storage = tmp_path / "storage"
    result = RayRun().run(cli("search", "--config", str(config), "--storage", str(storage),
                              "--teacher", str(search_teacher)))
    assert result.returncode == 0, explain(result)
    folders = sorted(trial_folders(storage / "cached"), key=trial_number)
    marks = [{r.get("stage1_cache") for r in results(tf) if r.get("stage") == "stage1"} for tf in folders]
    assert marks == [{"miss"}, {"hit"}, {"hit"}]
    stage1 = [[r["val_accuracy"] for r in results(tf) if r.get("stage") == "stage1"] for tf in folders]
    assert stage1[0] == stage1[1] == stage1[2] and len(stage1[0]) == 2
    assert all(results(tf)[-1]["step"] == TOTAL_STEPS for tf in folders)
    assert len(list((storage / "cached" / "stage1_cache").glob("*.pt"))) == 1


# ----------------------------------------------------------------------------- staged search

@pytest.mark.slow
@pytest.mark.timeout(3 * SEARCH_TIMEOUT)
def test_staged_search(search_teacher, tmp_path):
    """Phase 1 chooses tau1/lr1/flag_merge by NCM with stage-1-only trials; phase 2
    searches tau2/lambd/lr2, every trial starting stage 2 from that choice."""
    config = tiny_experiment(tmp_path, "staged", search={"num_samples": 4, **STAGED})
    storage = tmp_path / "storage"
    result = RayRun().run(cli("search", "--config", str(config), "--storage", str(storage),
                              "--teacher", str(search_teacher)))
    assert result.returncode == 0, explain(result)
    assert "phase 1 of 2" in result.stdout and "phase 1 chose tau1=" in result.stdout
    folder = storage / "staged"
    check_staged(folder, 4)

    # the analysis counts what the search computed: phase 1, then phase 2's stage-2 epochs
    from analysis.common import open_experiments
    from analysis.plot_trials import efficiency

    exp, = open_experiments([folder])
    phase1 = sum(len(results(tf)) for tf in trial_folders(folder / "stage1_search"))
    phase2 = sum(len(results(tf)) for tf in trial_folders(folder))
    assert exp.stage1_search_epochs == phase1
    assert efficiency([exp])["cumulative_epochs"].iloc[-1] == phase1 + phase2
    assert sorted(exp.searched) == ["lambd", "lr2", "tau2"]  # the stage-1 keys are constants in phase 2
    # the rungs drawn are the steps where ASHA stopped phase-2 trials (their records): grace 2,
    # factor 2 over its 4 stage-2 epochs, after stage 1's 2, leaves one rung to stop at
    stops = {record(tf)["stopped_at"] for tf in trial_folders(folder) if record(tf)["status"] == "stopped"}
    assert exp.asha_rungs() == sorted(stops) and set(stops) <= {2 + 2}
    assert len(exp.stage1_trials()) == 3
    from analysis.plot_trials import plot_curves

    plotted = plot_curves([exp], tmp_path / "curves.png")  # phase 1 drawn in the stage-1 part
    assert set(plotted["stage"]) == {"stage2"} and (tmp_path / "curves.png").stat().st_size > 0

    # the retrain runs both stages from scratch with phase 1's values and the best phase-2 trial's
    retrained = RayRun().run(cli("retrain", "--experiment", str(folder), "--seeds", "1", "--no-baseline"))
    assert retrained.returncode == 0, explain(retrained)
    used = json.loads((folder / "retrain" / "results.json").read_text())["config"]
    best = yaml.safe_load((folder / "best_config.yaml").read_text())["config"]
    choice = yaml.safe_load((folder / "experiment.yaml").read_text())["stage1_choice"]["values"]
    assert same_params({k: used[k] for k in choice}, choice)
    assert same_params({k: used[k] for k in ("tau2", "lambd", "lr2")}, {k: best[k] for k in ("tau2", "lambd", "lr2")})
