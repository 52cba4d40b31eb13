"""analysis/: leaderboard, plots, importance, report and TensorBoard files of real searches.

Two real tiny digits searches (tests/analysis_tiny.yaml: 6 trials; a variant
with 4 trials and another search seed) are run once per session through the
CLI, as a user would; the tests that read their experiment folders are marked
slow. Refusals of bad input run the scripts' main() in this process.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from refilled.errors import UserError
from refilled.store import study as study_store
from support.processes import run_python
from support.processes import tiny_search as shared_tiny_search

REPO = Path(__file__).resolve().parent.parent

TINY = REPO / "tests" / "analysis_tiny.yaml"
SEARCHED = {"tau1", "tau2", "lambd", "lr1", "lr2"}
TOTAL = 2 + 4  # n_training_epochs1 + n_training_epochs2 of analysis_tiny.yaml
RUNGS = {2, 4}  # ASHA grace_period 2, reduction_factor 2, max_t 6


def run(*args: str, cwd: Path = REPO, timeout: int = 900) -> subprocess.CompletedProcess:
    return run_python(*args, cwd=cwd, timeout=timeout)


def tiny_search(base: Path, name: str, config: Path = TINY, extra: tuple[str, ...] = ()) -> Path:
    return shared_tiny_search(base, name, config, extra)


@pytest.fixture(scope="module")
def exp1(tmp_path_factory) -> Path:
    return tiny_search(tmp_path_factory.getbasetemp(), "analysis_tiny")


@pytest.fixture(scope="module")
def exp2(tmp_path_factory, exp1) -> Path:
    """A second experiment: 4 trials, search seed 1, the first one's teacher, no re-evaluation."""
    data = yaml.safe_load(TINY.read_text())
    data["search"].update(num_samples=4, seed=1, select={"top_k": 0})
    config = tmp_path_factory.mktemp("config2") / "analysis_tiny_b.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return tiny_search(tmp_path_factory.getbasetemp(), "analysis_tiny_b", config,
                       ("--teacher", str(exp1 / "teacher.pt")))


def trial_folders(exp: Path) -> list[Path]:
    return sorted(p.parent for p in exp.glob("*/params.json"))


def result_rows(trial: Path) -> list[dict]:
    return [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]


def read_board(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"trial_id": str})  # an all-digit (or 1e5-like) hex id stays a string


def check_image(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 5000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, (path, img.shape)
    rgb = img[..., :3].reshape(-1, 3)
    assert float(np.ptp(rgb)) > 0.5, f"{path} is (nearly) one colour"
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 20, f"{path} has too few colours to be a plot"


def check_leaderboard(board: pd.DataFrame, exp: Path, both_kinds: bool = True) -> None:
    """Rows and statuses of one experiment against its trial folders' own files."""
    rows = board[board["experiment"] == exp.name]
    folders = trial_folders(exp)
    assert len(rows) == len(folders) == len(read_board(exp / "trials.csv"))
    by_id = {str(r["trial_id"]): r for _, r in rows.iterrows()}
    assert len(by_id) == len(rows)
    for trial in folders:
        results = result_rows(trial)
        row = by_id[str(results[-1]["trial_id"])]
        assert row["epochs"] == len(results) == results[-1]["step"]  # no diverged trial in these searches
        params = json.loads((trial / "params.json").read_text())
        for key, value in params.items():
            assert row[key] == pytest.approx(value)
        stage2 = [r["val_accuracy"] for r in results if r["stage"] == "stage2"]
        stage1 = [r["val_accuracy"] for r in results if r["stage"] == "stage1"]
        assert row["best_val_ncm_stage1"] == pytest.approx(max(stage1))
        assert row["last_val_ncm_stage1"] == pytest.approx(stage1[-1])
        if stage2:
            assert row["best_val_accuracy_stage2"] == pytest.approx(max(stage2))
            assert row["last_val_accuracy_stage2"] == pytest.approx(stage2[-1])
        else:
            assert pd.isna(row["best_val_accuracy_stage2"])
        assert row["wall_time_s"] == pytest.approx(results[-1]["time_total_s"])
        if row["status"] == "finished":
            assert row["epochs"] == TOTAL and pd.isna(row["stopped_at"])
        else:
            assert row["status"] == "stopped", row["status"]
            assert row["stopped_at"] == row["epochs"] < TOTAL
            assert row["stopped_at"] in RUNGS  # ASHA stops a trial at a rung
    statuses = set(rows["status"])
    assert "finished" in statuses, statuses
    if both_kinds:  # 6 trials with ASHA (rf 2): some stop early (the 4 of the second search may all finish)
        assert "stopped" in statuses, statuses


# ----------------------------------------------------------------------------- leaderboard

@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_leaderboard_of_one_experiment(exp1, tmp_path):
    out = tmp_path / "one"
    result = run("analysis/compare_trials.py", str(exp1), "--out", str(out))
    assert result.returncode == 0, result.stderr
    board = read_board(out / "trials.csv")
    check_leaderboard(board, exp1)
    assert SEARCHED <= set(board.columns)
    assert not (out / "experiments.csv").exists()  # a summary only with several experiments
    md = (out / "trials.md").read_text()
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(board)  # header, rule, one line per trial
    for trial_id in board["trial_id"].astype(str):
        assert trial_id in md
    # best first: the stage-2 metric never increases down the table
    metric = board["best_val_accuracy_stage2"].dropna().to_list()
    assert metric == sorted(metric, reverse=True)
    assert board["rank"].to_list() == list(range(1, len(board) + 1))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_leaderboard_sort_filter_top(exp1, tmp_path):
    from analysis.compare_trials import leaderboard

    everything = leaderboard(exp1)
    finished = leaderboard(exp1, filter="status == 'finished'")
    assert len(finished) == (everything["status"] == "finished").sum() and set(finished["status"]) == {"finished"}
    by_lambd = leaderboard(exp1, sort="lambd", ascending=True)
    assert by_lambd["lambd"].is_monotonic_increasing and len(by_lambd) == len(everything)
    top = leaderboard(exp1, sort="epochs", top=2)
    assert len(top) == 2 and top["epochs"].to_list() == sorted(everything["epochs"], reverse=True)[:2]
    with pytest.raises(UserError, match="--filter"):
        leaderboard(exp1, filter="no_such_column > 1")
    with pytest.raises(UserError, match="--sort"):
        leaderboard(exp1, sort="no_such_column")
    # the command line: same options, files written
    out = tmp_path / "cli"
    result = run("analysis/compare_trials.py", str(exp1), "--out", str(out), "--filter", "status == 'stopped'",
                 "--sort", "stopped_at", "--ascending", "--top", "2")
    assert result.returncode == 0, result.stderr
    cli = read_board(out / "trials.csv")
    assert 1 <= len(cli) <= 2 and set(cli["status"]) == {"stopped"} and cli["stopped_at"].is_monotonic_increasing


def test_scripts_refuse_a_folder_that_is_not_an_experiment(tmp_path, capsys):
    from analysis import compare_trials, plot_trials, report
    from analysis.common import run_cli

    for script in (compare_trials, plot_trials, report):
        code = run_cli(script.main, [str(tmp_path), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2, (script.__name__, err)
        assert "not a tune-refilled experiment" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    for script in (compare_trials, plot_trials, report):
        with pytest.raises(SystemExit) as exit_:
            run_cli(script.main, ["--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and "--out" in out and "EXPERIMENT" in out


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_experiments_side_by_side(exp1, exp2, tmp_path):
    out = tmp_path / "two"
    result = run("analysis/compare_trials.py", str(exp1), str(exp2), "--out", str(out))
    assert result.returncode == 0, result.stderr
    board = read_board(out / "trials.csv")
    assert len(board) == len(trial_folders(exp1)) + len(trial_folders(exp2)) == 6 + 4
    check_leaderboard(board, exp1)
    check_leaderboard(board, exp2, both_kinds=False)
    summary = pd.read_csv(out / "experiments.csv").set_index("experiment")
    assert list(summary.index) == [exp1.name, exp2.name]
    for exp in (exp1, exp2):
        mine, s = board[board["experiment"] == exp.name], summary.loc[exp.name]
        assert s["trials"] == len(mine)
        assert s["finished"] + s["stopped"] + s["diverged"] + s["errored"] == s["trials"]
        assert s["finished"] == (mine["status"] == "finished").sum()
        assert s["stopped"] == (mine["status"] == "stopped").sum()
        reached = mine["best_val_accuracy_stage2"].dropna()
        assert s["best_val_accuracy_stage2"] == pytest.approx(reached.max())
        assert s["median_val_accuracy_stage2"] == pytest.approx(statistics.median(reached))
        assert s["total_epochs"] == mine["epochs"].sum() <= s["epochs_without_asha"] == len(mine) * TOTAL
        assert s["trial_time_s"] == pytest.approx(mine["wall_time_s"].sum())
        assert 0 < s["wall_time_s"]
    md = (out / "experiments.md").read_text()
    assert exp1.name in md and exp2.name in md


# ----------------------------------------------------------------------------- plots and importance

@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_plots_are_real_images(exp1, exp2, tmp_path):
    out = tmp_path / "plots"
    result = run("analysis/plot_trials.py", str(exp1), str(exp2), "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in ("curves", "params", "importance", "efficiency", "rungs"):
        check_image(out / f"{name}.png")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_plot_data_of_one_experiment(exp1, tmp_path):
    from analysis.plot_trials import plot_all

    made = plot_all(exp1, tmp_path)
    for name, (path, _) in made.items():
        check_image(path)
    curves = made["curves"][1]
    rows = sum(len(result_rows(t)) for t in trial_folders(exp1))
    assert len(curves) == rows and set(curves["trial_id"]) == {str(result_rows(t)[-1]["trial_id"])
                                                                 for t in trial_folders(exp1)}
    params = made["params"][1]
    assert params.attrs["xscale"] == {p: "log" for p in ["tau1", "tau2", "lambd", "lr1", "lr2"]}  # loguniform
    eff = made["efficiency"][1]
    assert len(eff) == len(trial_folders(exp1))
    assert eff["cumulative_epochs"].is_monotonic_increasing
    assert eff["cumulative_epochs"].iloc[-1] == sum(len(result_rows(t)) for t in trial_folders(exp1))
    best = eff["best_so_far"].dropna()
    assert best.is_monotonic_increasing and best.iloc[-1] == pytest.approx(params["best_val_accuracy_stage2"].max())
    # rungs: each rung of the search (2 and 4) against the next and the end, and the re-evaluated means
    rungs = made["rungs"][1]
    assert set(rungs["rung"]) == RUNGS and set(rungs["against"]) == {"epoch 4", "end", "re-evaluated mean"}
    reached = {r: sum(1 for t in trial_folders(exp1) if len(result_rows(t)) >= r) for r in (4, TOTAL)}
    by = rungs.set_index(["rung", "against"])["trials"]
    assert by[(2, "epoch 4")] == reached[4] and by[(4, "end")] == reached[TOTAL]
    ends = [result_rows(t)[-1]["timestamp"] for t in trial_folders(exp1)]
    order = {str(result_rows(t)[-1]["trial_id"]): e for t, e in zip(trial_folders(exp1), ends)}
    assert [order[t] for t in eff["trial_id"]] == sorted(ends)  # completion order


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_importance_from_the_optuna_study(exp1, exp2, tmp_path):
    """On a real search of 6 trials fANOVA has too few trials at any step (tests/test_importance.py
    fits it on larger experiments): the report says so in the panel instead of drawing bars."""
    import optuna

    from analysis.common import open_experiments
    from analysis.plot_trials import MIN_TRIALS, importances, plot_importance

    (exp,) = open_experiments([exp1])
    with pytest.raises(UserError, match=f"too few trials for parameter importance .*fANOVA needs {MIN_TRIALS}"):
        importances(exp)
    # the study the search wrote: finished trials are COMPLETE, trials ASHA stopped are PRUNED
    study = study_store.load(exp1, exp1.name)
    states = [t.state for t in study.trials]
    board = read_board(exp1 / "trials.csv")
    assert len(states) == len(board) == 6
    assert states.count(optuna.trial.TrialState.COMPLETE) == (board["status"] == "finished").sum()
    assert states.count(optuna.trial.TrialState.PRUNED) == (board["status"] == "stopped").sum()
    both = plot_importance([exp1, exp2], tmp_path / "importance.png")
    check_image(tmp_path / "importance.png")
    assert both.empty  # a notice in each panel, no bars


# ----------------------------------------------------------------------------- report

@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_report_links_resolve(exp1, exp2, tmp_path):
    # exp2 gets a real final retrain (one seed, no baseline), exp1 none: both cases in one report
    retrain = run(str(REPO / "tune_refilled.py"), "retrain", "--experiment", str(exp2), "--seeds", "1",
                  "--no-baseline", "--force", cwd=tmp_path)
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    results = json.loads((exp2 / "retrain" / "results.json").read_text())
    out = tmp_path / "report"
    result = run("analysis/report.py", str(exp1), str(exp2), "--out", str(out))
    assert result.returncode == 0, result.stderr
    index = (out / "index.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", index)
    assert links
    for link in links:
        assert not link.startswith("/") and "://" not in link, link  # relative links only
        assert (out / link).is_file(), f"index.md links {link}, which is not there"
    for name in ("curves", "params", "importance", "efficiency", "rungs"):
        assert re.search(rf"!\[[^\]]*\]\({name}\.png\)", index), f"{name}.png not embedded"
        check_image(out / f"{name}.png")
    for name in ("trials.csv", "trials.md", "experiments.csv", "experiments.md"):
        assert f"({name})" in index and (out / name).is_file()
    # the retrain summary of exp2 is in the report, and exp1 is said to have none
    assert f"{results['refilled']['mean']:.2%}" in index
    assert json.loads((out / "retrain" / exp2.name / "results.json").read_text()) == results
    assert f"No final retrain yet for {exp1.name}" in index
    summary = pd.read_csv(out / "experiments.csv").set_index("experiment")
    assert summary.loc[exp2.name, "test_refilled_mean"] == pytest.approx(results["refilled"]["mean"])
    assert pd.isna(summary.loc[exp1.name, "test_refilled_mean"])
    assert len(read_board(out / "trials.csv")) == 10
    shutil.rmtree(exp2 / "retrain")  # leave the shared experiment as the search made it


# ----------------------------------------------------------------------------- TensorBoard

@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tensorboard_event_files(exp1):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    folders = trial_folders(exp1)
    for trial in folders:
        assert list(trial.glob("events.out.tfevents.*")), f"{trial.name} has no event file"
        acc = EventAccumulator(str(trial), size_guidance={"scalars": 0})
        acc.Reload()
        scalars = acc.Tags()["scalars"]
        results = result_rows(trial)
        for tag in ("ray/tune/val_accuracy", "ray/tune/loss", "ray/tune/step"):
            assert tag in scalars, (trial.name, scalars)
        events = acc.Scalars("ray/tune/val_accuracy")
        assert [e.step for e in events] == [r["step"] for r in results]  # at the epoch's step
        assert [e.value for e in events] == pytest.approx([r["val_accuracy"] for r in results], abs=1e-6)
        # HParams (refilled.store.epoch_files, from the trial's start): the searched values and the metrics
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = {k: v.number_value for k, v in start.session_start_info.hparams.items()}
        params = json.loads((trial / "params.json").read_text())
        assert set(hparams) == SEARCHED and hparams == pytest.approx(params)
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert {h.name for h in experiment.hparam_infos} == SEARCHED
        assert "ray/tune/val_accuracy" in {m.name.tag for m in experiment.metric_infos}
    # `tensorboard --logdir <experiment>`: one run per trial
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(exp1))
    mux.Reload()
    runs = mux.Runs()
    trial_runs = {name: tags for name, tags in runs.items() if name.startswith("trial_")}
    assert len(trial_runs) == len(folders)
    assert all("ray/tune/val_accuracy" in t["tensors"] for t in trial_runs.values())
    # the HParams tab lists every trial
    assert {name for name in mux.PluginRunToTagToContent("hparams") if name.startswith("trial_")} == set(trial_runs)
    # and the re-evaluation's runs (selection/<trial>/seed<S>) are there too, under their own names
    reeval = {name for name in runs if name.startswith("selection/")}
    assert reeval and reeval | set(trial_runs) == set(runs)
