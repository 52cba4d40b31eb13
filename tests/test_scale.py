"""The search layer at scale, simulated: benchmarks/search_scale.py's search of 128 simulated
trials, 32 at once on a logical 16-GPU Ray head (simulated_trials: the real driver,
searcher, callbacks, storage, selection and report; no torch in the trials). Every trial
must end once: in the Optuna study, in its folder, in trials.csv and in the report.
"""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from refilled.store import study as study_store
from support.searches import REPO, RayRun, explain, results, trial_folders

TRIALS, AT_ONCE = 128, 32


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_128_simulated_trials_each_end_once_in_the_study_the_folders_the_table_and_the_report(tmp_path):
    run = RayRun()
    # niced (its Ray processes inherit it): its trials' start-up burst must not starve the Ray
    # that a test on the other xdist worker starts (Ray gives a raylet 30 s to register)
    done = run.run(["nice", "-n", "15", sys.executable, str(REPO / "benchmarks" / "search_scale.py"), "--trials", str(TRIALS),
                    "--concurrent", str(AT_ONCE), "--gpus", "16", "--epochs", "8", "--rate", "64",
                    "--checkpoint-bytes", "1000", "--profile-from", "70", "--profile-s", "10",
                    "--out", str(tmp_path), "--keep"], timeout=840)
    assert done.returncode == 0, explain(done)
    folder = tmp_path / "scale"
    figures = json.loads((tmp_path / "figures.json").read_text())

    folders = {tf.name.removeprefix("trial_") for tf in trial_folders(folder)}
    assert len(folders) == TRIALS and not (folder / "interrupted_trials").exists()
    table = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
    for tf in trial_folders(folder):  # every epoch from its first to where it ended, once, in its own files
        steps = [r["step"] for r in results(tf)]
        assert steps == list(range(1, len(steps) + 1)) and steps, tf.name
        row = table.loc[tf.name.removeprefix("trial_")]
        assert steps[-1] == (8 if row["status"] == "finished" else row["stopped_at"]), tf.name
        assert not any(r["torch_loaded"] for r in results(tf)), tf.name  # the trials stay small

    study = study_store.load(folder, "scale")
    assert study_store.study_file(folder).name == "optuna.journal"
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(TRIALS))
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    table = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    assert sorted(table["trial_id"]) == sorted(folders)
    # each study trial is a trial of the table, with the same values (Tune's config is Optuna's params)
    by_values = {tuple((k, round(v, 9)) for k, v in sorted(t.params.items())): t for t in study.trials}
    for _, row in table.iterrows():
        key = tuple((k, round(v, 9)) for k, v in sorted((k.removeprefix("config/"), row[k]) for k in row.index
                                                        if k.startswith("config/")))
        trial = by_values.pop(key)
        assert trial.state.name == ("COMPLETE" if row["status"] == "finished" else "PRUNED"), row["trial_id"]
    assert not by_values
    assert (table["status"] == "stopped").sum() > TRIALS / 4  # ASHA stopped many at its rungs (57 of 128 once)

    report = pd.read_csv(tmp_path / "report" / "trials.csv", dtype={"trial_id": str})
    assert sorted(report["trial_id"]) == sorted(folders)
    assert figures["report_ok"] and figures["study_trials"] == TRIALS and figures["trials_csv_rows"] == TRIALS
    # Tune was told what it decides on, not every epoch (the files have them all)
    assert figures["tune_results"] < figures["epoch_results"] == sum(len(results(tf)) for tf in trial_folders(folder))
    # many at once (niced, it waits for the CPU while the other worker's tests run)
    assert figures["workers_with_torch"] == 0 and figures["memory"]["ray_processes_max"] >= AT_ONCE // 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_telling_tune_only_what_it_decides_on_decides_as_telling_it_every_epoch(tmp_path):
    """The same seeded search (simulated trials, one at a time), its trials telling Tune every
    epoch or only at rungs, checkpoints and their end: the same trials, stopped at the same
    rungs on the same values, the same Optuna study; every epoch in the trials' files."""
    script = str(REPO / "tests" / "support" / "report_points_search.py")
    searches = {}
    for every in ("0", "30"):
        done = RayRun(PYTHONPATH=str(REPO / "benchmarks")).run([sys.executable, script, str(tmp_path / f"every{every}"),
                                                               every], timeout=420)
        assert done.returncode == 0, explain(done)
        searches[every] = json.loads(next(line for line in done.stdout.splitlines()
                                          if line.startswith("SEARCH "))[len("SEARCH "):])
        for tf in trial_folders(tmp_path / f"every{every}" / "points"):
            steps = [r["step"] for r in results(tf)]
            assert steps == list(range(1, len(steps) + 1)) and steps, tf.name
    assert searches["0"] == searches["30"]
    trials = searches["30"]["trials"]
    assert {t["status"] for t in trials} == {"finished", "stopped"}  # ASHA decided something
    assert {t["epochs"] for t in trials if t["status"] == "stopped"} <= {6, 12}
