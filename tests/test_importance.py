"""Parameter importance (analysis/plot_trials.py) on experiment folders written here in
the format a search leaves: fANOVA over the trials at the deepest step enough of them
reached, the spread over fANOVA seeds, and a notice when too few trials did; and the
figures' data computed without drawing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analysis.common import open_experiments
from analysis.plot_trials import FANOVA_SEEDS, MIN_TRIALS, importances, plot_importance
from refilled.errors import UserError
from refilled.store import experiment_file, trial_records
from refilled.store.storage import Place
from support.configs import make_tiny_config

SPACE = {"tau1": {"loguniform": [0.5, 16.0]}, "lambd": {"loguniform": [0.1, 100.0]}}
E1, E2 = 2, 6  # stage-1 and stage-2 epochs: steps 1-2 are stage 1, 3-8 stage 2


def write_experiment(folder: Path, trials: list[tuple[dict, list[float], str]]) -> Path:
    """trials: (params, stage-2 validation accuracies by epoch, status)."""
    cfg = make_tiny_config(n_training_epochs1=E1, n_training_epochs2=E2)
    folder.mkdir(parents=True)
    experiment_file.write(Place(folder), cfg, {"space": SPACE})
    for i, (params, accs, status) in enumerate(trials):
        trial = folder / trial_records.folder_name(f"t{i:02d}")
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps(params))
        rows = [{"trial_id": f"t{i:02d}", "stage": "stage1", "step": s, "total_steps": E1 + E2, "val_accuracy": 0.5}
                for s in range(1, E1 + 1)]
        rows += [{"trial_id": f"t{i:02d}", "stage": "stage2", "step": E1 + e, "total_steps": E1 + E2,
                  "val_accuracy": a} for e, a in enumerate(accs, 1)]
        (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        trial_records.write(trial, {"trial_id": f"t{i:02d}", "number": i + 1, "status": status,
                                    "stopped_at": E1 + len(accs) if status == "stopped" else None})
    return folder


def trial(rng, stopped_at: int | None = None) -> tuple[dict, list[float], str]:
    """accuracy driven by lambd (tau1 does nothing): what fANOVA should find."""
    params = {"tau1": float(np.exp(rng.uniform(np.log(0.5), np.log(16)))),
              "lambd": float(np.exp(rng.uniform(np.log(0.1), np.log(100))))}
    final = 0.9 - 0.1 * abs(np.log10(params["lambd"]))
    epochs = E2 if stopped_at is None else stopped_at
    return params, [final * e / E2 for e in range(1, epochs + 1)], "finished" if stopped_at is None else "stopped"


def test_fitted_on_finished_trials_when_enough_finished(tmp_path):
    rng = np.random.default_rng(0)
    exp = open_experiments([write_experiment(tmp_path / "e", [trial(rng) for _ in range(10)])])[0]
    imp = importances(exp)
    assert imp.iloc[0]["param"] == "lambd" and imp.iloc[0]["importance"] > 0.8
    assert imp["importance"].sum() == pytest.approx(1.0)
    assert (imp["trials"] == 10).all() and imp.iloc[0]["sample"] == "10 trials finished"
    assert (imp["importance_std"] >= 0).all()  # the spread over FANOVA_SEEDS forests
    assert FANOVA_SEEDS >= 3


def test_pruned_trials_count_at_the_deepest_rung_enough_reached(tmp_path):
    """3 finished and 9 stopped at stage-2 epoch 2 (step 4): fANOVA uses all 12 at step 4."""
    rng = np.random.default_rng(1)
    rows = [trial(rng) for _ in range(3)] + [trial(rng, stopped_at=2) for _ in range(9)]
    exp = open_experiments([write_experiment(tmp_path / "e", rows)])[0]
    imp = importances(exp)
    assert (imp["trials"] == 12).all()
    assert imp.iloc[0]["sample"] == "12 trials at the ASHA rung of step 4, stopped ones included"


def test_too_few_trials_get_a_notice_instead_of_bars(tmp_path):
    rng = np.random.default_rng(2)
    exp = open_experiments([write_experiment(tmp_path / "e", [trial(rng) for _ in range(MIN_TRIALS - 1)])])[0]
    with pytest.raises(UserError, match=f"too few trials .*at most {MIN_TRIALS - 1} reached the same step"):
        importances(exp)
    shown = plot_importance([exp], tmp_path / "importance.png")
    assert shown.empty and (tmp_path / "importance.png").stat().st_size > 0


def test_the_figures_are_computed_apart_from_drawing_with_the_stores_best(tmp_path):
    """Each figure's data comes without drawing (`<figure>_info`); its best trial is the store's
    (refilled.store.experiments.choosable): not a diverged one, however high it got."""
    import matplotlib.pyplot as plt

    from analysis.compare_trials import experiment_summary
    from analysis.plot_trials import curves_info, efficiency_info, importance_info, params_info
    from refilled.store.experiments import choosable, load_trials

    rng = np.random.default_rng(3)
    rows = [trial(rng) for _ in range(MIN_TRIALS)] + [trial(rng, stopped_at=2)]
    rows.append((rows[0][0], [0.99, 0.99], "diverged"))  # the highest stage-2 accuracy, then a non-finite loss
    exp = open_experiments([write_experiment(tmp_path / "e", rows)])[0]
    figures = plt.get_fignums()
    best = choosable(load_trials(exp.folder)).iloc[0]["trial_id"]
    assert best != "t09"
    curves = curves_info([exp])
    (panel,) = curves.panels
    assert panel.trials.loc[panel.trials["best"], "trial_id"].to_list() == [best]
    assert len(curves.table) == sum(2 + len(accs) for _, accs, _ in rows)
    params = params_info([exp])
    assert params.best == {exp.label: best} and params.table.attrs["xscale"] == {"tau1": "log", "lambd": "log"}
    assert [(a.param, a.scale) for a in params.axes] == [("tau1", "log"), ("lambd", "log")]
    assert experiment_summary([exp]).iloc[0]["best_trial"] == best
    importance = importance_info([exp])
    assert importance.notices == {} and set(importance.table["param"]) == {"tau1", "lambd"}
    efficiency = efficiency_info([exp])
    assert efficiency.without_asha == {exp.label: len(rows) * (E1 + E2)} and efficiency.phase1_epochs == {}
    assert plt.get_fignums() == figures  # nothing drawn
