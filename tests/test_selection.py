"""Choosing the winner honestly, and what the search cost, for real (local Ray, Optuna).

A search of the tiny experiment re-evaluates its 3 best trials with 2 more seeds
each; its driver is killed during the re-evaluation and resumed, which finishes
it without running again what had finished. Then: selection.csv, the winner in
best_config.yaml and in `retrain`, the cost ledger over every trial, the
report's optimism gap and cost plot; and a second search that starts from the
first one's top trials (search.start_with) and stops starting trials once its
device-hour budget is spent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from support.searches import RayRun, cli, explain, kill_when, params, record, tiny_experiment, trial_folders

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def reevaluated(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, int]]]:
    """The experiment, and the re-evaluation results that existed when its driver was killed
    ({file name: (content, mtime_ns)})."""
    tmp = tmp_path_factory.mktemp("selection")
    storage = tmp / "experiments"
    config = tiny_experiment(tmp, "sel", search={"num_samples": 6, "select": {"top_k": 2, "seeds": 2}})
    folder = storage / "sel"
    results = folder / "selection"
    kill_when(RayRun(), cli("search", "--config", str(config), "--storage", str(storage)),
              lambda: any(results.glob("*-seed*.json")), "a finished re-evaluation run")
    assert not (folder / "selection.csv").exists()  # killed during the re-evaluation
    before = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in results.glob("*-seed*.json")}
    resumed = RayRun().run(cli("search", "--resume", "--name", "sel", "--storage", str(storage)))
    assert resumed.returncode == 0, explain(resumed)
    return folder, before


def test_the_top_trials_are_reevaluated_and_the_best_mean_wins(reevaluated):
    from refilled.store.experiments import load_trials, ranked, trial_config

    folder, _ = reevaluated
    table = pd.read_csv(folder / "selection.csv", dtype={"trial_id": str})
    trials = load_trials(folder)
    assert list(table["trial_id"]) != [] and set(table["trial_id"]) == set(ranked(trials)["trial_id"].head(2))
    assert list(table.columns[:1]) == ["trial_id"] and {"tau1", "tau2", "lambd", "lr1", "lr2"} <= set(table.columns)
    assert (table["seeds"] == "1 2").all()  # never the search's own seed 0
    for _, row in table.iterrows():
        runs = [json.loads((folder / "selection" / f"{row['trial_id']}-seed{s}.json").read_text()) for s in (1, 2)]
        assert row["val_accuracy_reeval_mean"] == pytest.approx(sum(r["val_accuracy"] for r in runs) / 2)
        best = trials[trials["trial_id"].astype(str) == row["trial_id"]].iloc[0]
        assert row["val_accuracy_search"] == pytest.approx(best["best_val_accuracy_stage2"])
    assert list(table["val_accuracy_reeval_mean"]) == sorted(table["val_accuracy_reeval_mean"], reverse=True)
    winner = trials[trials["trial_id"].astype(str) == table.iloc[0]["trial_id"]].iloc[0]
    chosen = yaml.safe_load((folder / "best_config.yaml").read_text())["config"]
    assert chosen == trial_config(folder, winner).to_dict()
    assert f"chosen trial {winner['trial_id']}" in (folder / "best_config.yaml").read_text().splitlines()[0]
    from refilled.tune.retrain_runner import choose_config  # retrain takes the re-evaluated winner

    _, source = choose_config(folder, None, None)
    assert source["trial_id"] == winner["trial_id"] and source["reeval_seeds"] == "1 2"


def test_a_killed_reevaluation_resumes_without_running_again_what_had_finished(reevaluated):
    folder, before = reevaluated
    files = {p.name: p for p in (folder / "selection").glob("*-seed*.json")}
    assert len(files) == 4 and before and set(before) <= set(files)
    for name, (text, mtime) in before.items():
        assert files[name].read_text() == text and files[name].stat().st_mtime_ns == mtime


def test_the_cost_ledger_covers_every_trial_the_teacher_bank_and_reevaluation(reevaluated):
    folder, _ = reevaluated
    ledger = pd.read_csv(folder / "cost.csv", dtype={"trial_id": str})
    assert list(ledger.columns) == ["trial_id", "stage", "epochs", "wall_s", "device", "device_s"]
    trials = {record(t)["trial_id"] for t in trial_folders(folder)}
    assert len(trials) == 6 and trials <= set(ledger["trial_id"])
    assert {"teacher", "teacher_bank"} <= set(ledger["trial_id"])  # pretrained in the experiment
    assert (ledger["stage"].str.startswith("reeval")).sum() == 4
    assert (ledger["wall_s"] > 0).all() and (ledger["device"] == "cpu").all()
    trial_rows = ledger[ledger["trial_id"].isin(trials) & ~ledger["stage"].str.startswith("reeval")]
    assert trial_rows["device_s"].tolist() == pytest.approx(trial_rows["wall_s"].tolist())  # one CPU a trial
    for trial in trial_folders(folder):  # every epoch it computed, counted once a report
        reports = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        mine = trial_rows[trial_rows["trial_id"] == record(trial)["trial_id"]]
        assert mine["epochs"].sum() == sum(1 for r in reports if not r.get("diverged"))


def test_the_report_shows_the_optimism_gap_and_the_cost(reevaluated, tmp_path):
    from analysis.report import make_report

    folder, _ = reevaluated
    made = make_report([folder], tmp_path / "report")
    index = (tmp_path / "report" / "index.md").read_text()
    assert "## Choosing the winner: the optimism gap" in index and "## What the search cost" in index
    assert "re-evaluated (gap" in index and "no final retrain of it yet" in index
    assert len(made["selection"]) == 2 and made["selection"]["chosen"].sum() == 1
    assert made["cost"]["device_hours"].is_monotonic_increasing and made["cost"]["device_hours"].iloc[0] > 0
    for name in ("selection.png", "cost.png", "cost.csv", "selection.csv"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_a_warm_start_runs_the_earlier_top_trials_first_and_the_budget_stops_new_ones(reevaluated, tmp_path):
    from refilled.store.experiments import top_configs

    earlier, _ = reevaluated
    storage = tmp_path / "experiments"
    budget = 0.0015  # device hours (5.4 s): the bank and a few tiny trials; 8 took 10-16 s
    config = tiny_experiment(tmp_path, "warm", search={"start_with": str(earlier), "budget_hours": budget,
                                                       "select": {"top_k": 0}})
    result = RayRun().run(cli("search", "--config", str(config), "--storage", str(storage),
                              "--teacher", str(earlier / "teacher.pt")))
    assert result.returncode == 0, explain(result)
    folder = storage / "warm"
    by_number = sorted(trial_folders(folder), key=lambda t: record(t)["number"])
    space = list(yaml.safe_load(config.read_text())["search"]["space"])
    tops = [{k: c[k] for k in space} for c in top_configs(earlier, 3)]
    assert [params(t) for t in by_number[:2]] == tops[:2]  # the earlier experiment's winner first
    assert "search.budget_hours spent" in result.stdout and 2 <= len(by_number) < 8
    spent = pd.read_csv(folder / "cost.csv")["device_s"].sum() / 3600
    assert spent >= budget  # it stopped because the budget was spent, not before
