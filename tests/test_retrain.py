"""`tune_refilled.py retrain` on a real, finished tiny digits search.

The search (tests/analysis_tiny.yaml, 6 trials) runs once per session through
the CLI (tests/test_analysis.py makes the same one and it is reused); retrain
works on a copy of it, so the experiment itself stays as the search left it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from support.processes import run_python
from support.processes import tiny_search as shared_tiny_search

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "analysis_tiny.yaml"
SEARCHED = {"tau1", "tau2", "lambd", "lr1", "lr2"}
E1, E2 = 2, 4  # n_training_epochs1 and n_training_epochs2 of analysis_tiny.yaml


def retrain(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return run_python(str(REPO / "tune_refilled.py"), "retrain", *args, cwd=cwd)


def tiny_search(base: Path, name: str = "analysis_tiny") -> Path:
    return shared_tiny_search(base, name, TINY)


def copy_experiment(source: Path, target: Path, *, teacher: bool = True) -> Path:
    ignore = ["retrain"] + ([] if teacher else ["teacher.pt"])
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*ignore))
    return target


def read_board(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"trial_id": str})


def config_of(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["config"]


def one_line_refusal(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert words in lines[0], lines[0]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """A copy of the finished tiny search, ours to retrain in."""
    source = tiny_search(tmp_path_factory.getbasetemp())
    return copy_experiment(source, tmp_path_factory.mktemp("retrain") / "analysis_tiny")


@pytest.fixture(scope="module")
def retrained(experiment) -> tuple[Path, subprocess.CompletedProcess]:
    result = retrain("--experiment", str(experiment), "--seeds", "2", cwd=experiment.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return experiment / "retrain", result


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_one_folder_per_seed_and_kind(retrained):
    out, result = retrained
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/seed*")) == [
        "refilled/seed0", "refilled/seed1", "refilled_untuned/seed0", "refilled_untuned/seed1",
        "student_alone/seed0", "student_alone/seed1"]
    for folder in out.glob("*/seed*"):
        for name in ("student.pt", "config.yaml", "metrics.json"):
            assert (folder / name).is_file() and (folder / name).stat().st_size > 0, folder / name
        cfg = config_of(folder / "config.yaml")
        assert cfg["flag_tuning"] is False and cfg["n_training_epochs1"] + cfg["n_training_epochs2"] == E1 + E2
        assert cfg["seed"] == int(folder.name.removeprefix("seed"))
    assert (out / "summary.md").is_file() and "REFILLED" in (out / "summary.md").read_text()
    assert "REFILLED (tuned)" in result.stdout and "student alone" in result.stdout  # the summary is printed
    assert "REFILLED (untuned" in result.stdout and "what the search bought" in result.stdout
    # the untuned arm is the experiment's own config values, trained as the tuned one
    experiment_cfg = yaml.safe_load((out.parent / "experiment.yaml").read_text())["config"]
    untuned = config_of(out / "refilled_untuned" / "seed0" / "config.yaml")
    assert all(untuned[k] == experiment_cfg[k] for k in ("tau1", "tau2", "lambd", "lr1", "lr2"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_results_json_interface_and_arithmetic(retrained):
    out, _ = retrained
    results = json.loads((out / "results.json").read_text())
    for kind in ("refilled", "refilled_untuned", "student_alone"):
        r = results[kind]
        assert r["seeds"] == [0, 1]  # every arm ran the same seeds: the gains are paired by seed
        accs = r["test_accuracy"]
        assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
        assert r["mean"] == pytest.approx(sum(accs) / 2)
        assert r["std"] == pytest.approx(statistics.stdev(accs))
        for seed, acc in enumerate(accs):  # the accuracy of the model each run ended with
            metrics = json.loads((out / kind / f"seed{seed}" / "metrics.json").read_text())
            assert metrics["summary"]["test_accuracy"] == pytest.approx(acc)
            assert metrics["epochs"][-1]["test_accuracy"] == pytest.approx(acc)
    assert results["gain"] == pytest.approx(results["refilled"]["mean"] - results["student_alone"]["mean"])
    diffs = [a - b for a, b in zip(results["refilled"]["test_accuracy"], results["student_alone"]["test_accuracy"])]
    assert results["gain_paired_seeds"] == 2
    assert results["gain_se"] == pytest.approx(statistics.stdev(diffs) / 2 ** 0.5)
    assert results["gain_seeds_won"] == sum(d > 0 for d in diffs)
    assert results["gain_seeds_lost"] == sum(d < 0 for d in diffs)
    assert "of 2 seeds" in (out / "summary.md").read_text()
    untuned = [a - b for a, b in zip(results["refilled"]["test_accuracy"], results["refilled_untuned"]["test_accuracy"])]
    assert results["search_gain"] == pytest.approx(statistics.fmean(untuned))
    assert results["search_gain_se"] == pytest.approx(statistics.stdev(untuned) / 2 ** 0.5)
    assert results["search_gain_paired_seeds"] == 2


def _runs(refilled: list[float], alone: list[float]) -> list[dict]:
    return ([{"kind": "refilled", "seed": s, "test_accuracy": a} for s, a in enumerate(refilled)]
            + [{"kind": "student_alone", "seed": s, "test_accuracy": a} for s, a in enumerate(alone)])


def test_gain_is_paired_by_seed_with_its_standard_error():
    from refilled.runs.final_retrain import markdown, results_of_runs

    # seed by seed: +0.00, +0.02, -0.01 -> mean 0.00333, stdev 0.01528, standard error 0.00882
    results = results_of_runs(_runs([0.90, 0.95, 0.97], [0.90, 0.93, 0.98]), {})
    assert results["gain"] == pytest.approx(0.01 / 3)
    assert results["gain_se"] == pytest.approx(0.0152753 / 3 ** 0.5, rel=1e-4)
    assert (results["gain_seeds_won"], results["gain_seeds_lost"], results["gain_paired_seeds"]) == (1, 1, 3)
    text = markdown(results)
    assert "+0.33 points" in text and "ahead on 1 of 3 seeds, behind on 1" in text
    assert "standard error of the paired difference 0.88 points" in text
    assert "within two standard errors of zero" in text  # 0.33 < 2 * 0.88

    clear = results_of_runs(_runs([0.95, 0.96, 0.97], [0.90, 0.92, 0.93]), {})  # +5, +4, +4
    assert clear["gain_seeds_won"] == 3 and "within two standard errors" not in markdown(clear)
    one = results_of_runs(_runs([0.95], [0.90]), {})
    assert one["gain_se"] is None and "one seed: no standard error" in markdown(one)


def test_three_arms_give_two_gains_each_paired_by_seed():
    from refilled.runs.final_retrain import markdown, results_of_runs

    runs = _runs([0.95, 0.96, 0.97], [0.90, 0.92, 0.93])
    runs += [{"kind": "refilled_untuned", "seed": s, "test_accuracy": a} for s, a in enumerate([0.94, 0.97, 0.95])]
    runs.append({"kind": "refilled_untuned", "seed": 7, "test_accuracy": 0.5})  # no tuned run of seed 7: unpaired
    results = results_of_runs(runs, {})
    assert results["search_gain_paired_seeds"] == 3 and (results["search_gain_seeds_won"],
                                                          results["search_gain_seeds_lost"]) == (2, 1)
    assert results["search_gain_se"] == pytest.approx(statistics.stdev([0.01, -0.01, 0.02]) / 3 ** 0.5)
    assert results["gain_paired_seeds"] == 3 and results["gain_seeds_won"] == 3
    text = markdown(results)
    assert "REFILLED (untuned: the experiment's config values)" in text
    assert "what the search bought" in text and "what REFILLED bought" in text
    assert "the tuned one ahead on 2 of 3 seeds, behind on 1" in text


def test_a_config_file_is_not_called_tuned():
    from refilled.runs.final_retrain import markdown, results_of_runs

    runs = _runs([0.95], [0.90])
    assert "| REFILLED (tuned) |" in markdown(results_of_runs(runs, {"source": {"experiment": "e", "trial_id": "abc"}}))
    assert "| REFILLED |" in markdown(results_of_runs(runs, {"source": {"config_file": "digits.yaml"}}))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_test_split_read_only_at_the_end(retrained):
    out, _ = retrained
    for kind in ("refilled", "student_alone"):
        for seed in (0, 1):
            metrics = json.loads((out / kind / f"seed{seed}" / "metrics.json").read_text())
            epochs = metrics["epochs"]
            stage1 = [e for e in epochs if e["stage"] == "stage1"]
            stage2 = [e for e in epochs if e["stage"] == "stage2"]
            assert len(stage1) == (E1 if kind == "refilled" else 0) and len(stage1) + len(stage2) == E1 + E2
            assert metrics["summary"]["eval_split"] == "test"
            for e in epochs:
                evaluated = {k for k in e if k.startswith(("val_", "test_"))}
                if kind == "refilled" and e is stage1[-1]:
                    assert evaluated == {"test_ncm_accuracy"}, e
                elif e is stage2[-1]:
                    assert evaluated == {"test_accuracy"}, e
                else:
                    assert evaluated == set(), e


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_retrains_the_best_trial(retrained, experiment):
    out, _ = retrained
    best = config_of(experiment / "best_config.yaml")
    board = read_board(experiment / "trials.csv")
    # the trial the search chose: the re-evaluation's best mean (analysis_tiny.yaml re-evaluates the 2 best)
    selection = pd.read_csv(experiment / "selection.csv", dtype={"trial_id": str})
    chosen = selection.sort_values("val_accuracy_reeval_mean", ascending=False, kind="stable").iloc[0]["trial_id"]
    top = board[board["trial_id"].astype(str) == chosen].iloc[0]
    results = json.loads((out / "results.json").read_text())
    assert results["source"]["trial_id"] == top["trial_id"]
    params = json.loads((experiment / f"trial_{top['trial_id']}" / "params.json").read_text())
    for seed in (0, 1):
        cfg = config_of(out / "refilled" / f"seed{seed}" / "config.yaml")
        assert cfg == {**best, "seed": seed, "flag_tuning": False}
        assert {k: cfg[k] for k in SEARCHED} == pytest.approx(params)
        assert (cfg["n_training_epochs1"], cfg["n_training_epochs2"]) == (E1, E2)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_baseline_is_the_student_alone_with_the_same_budget(retrained):
    out, _ = retrained
    for seed in (0, 1):
        refilled = config_of(out / "refilled" / f"seed{seed}" / "config.yaml")
        alone = config_of(out / "student_alone" / f"seed{seed}" / "config.yaml")
        assert alone["lambd"] == 0 and alone["n_training_epochs1"] == 0
        assert alone["n_training_epochs2"] == refilled["n_training_epochs1"] + refilled["n_training_epochs2"]
        assert alone["point"] == [p + E1 for p in refilled["point"]]  # the same decay epochs of the stage-2 lr
        same = {k: v for k, v in refilled.items() if k not in ("lambd", "n_training_epochs1", "n_training_epochs2",
                                                                 "point")}
        assert {k: alone[k] for k in same} == same


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_trial_choice_without_baseline(experiment, tmp_path):
    board = read_board(experiment / "trials.csv")
    reached = board[board["best_val_accuracy_stage2"].notna()]
    assert len(reached) >= 2
    other = reached.iloc[-1]  # not the best one
    out = tmp_path / "other"
    result = retrain("--experiment", str(experiment), "--trial", other["trial_id"], "--no-baseline", "--seeds", "1",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/seed*")) == ["refilled/seed0"]
    assert not (out / "student_alone").exists()
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"refilled", "source"} and "student_alone" not in results and "gain" not in results
    assert results["source"]["trial_id"] == other["trial_id"]
    params = json.loads((experiment / f"trial_{other['trial_id']}" / "params.json").read_text())
    cfg = config_of(out / "refilled" / "seed0" / "config.yaml")
    assert {k: cfg[k] for k in SEARCHED} == pytest.approx(params)


# ----------------------------------------------------------------------------- refusals

@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_refuses_an_experiment_without_stage_2(experiment, tmp_path):
    """A copy of the real experiment whose trials' results are cut after stage 1."""
    copy = tmp_path / "stage1_only"
    copy.mkdir()
    for name in ("experiment.yaml", "teacher.pt"):
        shutil.copyfile(experiment / name, copy / name)
    for trial in experiment.glob("*/params.json"):
        folder = copy / trial.parent.name
        folder.mkdir()
        shutil.copyfile(trial, folder / "params.json")
        lines = (trial.parent / "result.json").read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["stage"] == "stage1"]
        assert 0 < len(kept) < len(lines) or len(lines) == len(kept) == E1
        (folder / "result.json").write_text("\n".join(kept) + "\n")
    one_line_refusal(retrain("--experiment", str(copy), "--seeds", "1"), "stage 2")
    assert not (copy / "retrain" / "results.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_refuses_a_missing_teacher(experiment, tmp_path):
    copy = copy_experiment(experiment, tmp_path / "no_teacher", teacher=False)
    one_line_refusal(retrain("--experiment", str(copy), "--seeds", "1"), "teacher")
    assert not (copy / "retrain").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_refuses_to_overwrite_results_without_force(retrained, experiment):
    out, _ = retrained
    before = (out / "results.json").read_bytes()
    mtime = (out / "results.json").stat().st_mtime_ns
    one_line_refusal(retrain("--experiment", str(experiment), "--seeds", "1"), "already holds results")
    assert (out / "results.json").read_bytes() == before and (out / "results.json").stat().st_mtime_ns == mtime


def test_refuses_a_folder_that_is_not_an_experiment(tmp_path, capsys):
    import tune_refilled

    for args in (["--experiment", str(tmp_path), "--seeds", "1"], ["--experiment", str(tmp_path / "missing")]):
        code = tune_refilled.main(["retrain", *args])
        out, err = capsys.readouterr()
        one_line_refusal(subprocess.CompletedProcess(args, code, out, err), "not a tune-refilled experiment")


def test_refuses_an_experiment_whose_trials_were_of_another_kind(tmp_path, capsys):
    """A driver's trials that trained no REFILLED (trial_kind: benchmarks/simulated_trials.py) are not retrained."""
    import tune_refilled
    from refilled.schema.search import parse_search
    from refilled.store import experiment_file
    from refilled.store.storage import Place
    from support.configs import make_tiny_config

    cfg = make_tiny_config()
    experiment_file.write(Place(tmp_path), cfg, parse_search({}, cfg).to_section(),
                          {"trial_kind": {"name": "simulated", "epoch_s": 0.5}})
    code = tune_refilled.main(["retrain", "--experiment", str(tmp_path), "--seeds", "1"])
    out, err = capsys.readouterr()
    one_line_refusal(subprocess.CompletedProcess([], code, out, err),
                     "holds simulated trials (trial_kind in its experiment.yaml): they did not train REFILLED")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_refuses_bad_trial_and_seeds(experiment, tmp_path):
    one_line_refusal(retrain("--experiment", str(experiment), "--trial", "nosuchid", "--out", str(tmp_path / "x")),
                     "--trial nosuchid")
    one_line_refusal(retrain("--experiment", str(experiment), "--seeds", "0", "--out", str(tmp_path / "y")),
                     "--seeds")
    assert not (tmp_path / "x" / "results.json").exists()
