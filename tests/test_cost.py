"""The cost ledger (refilled.store.cost) from the files a search writes: what every trial
reported, the driver's own work, the re-evaluation's runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from refilled.errors import UserError
from refilled.store import cost
from refilled.store.layout import DRIVER_FILE
from refilled.store.storage import Place
from support.clocks import FakeClock


def _trial(folder: Path, trial_id: str, rows: list[dict]) -> None:
    """A trial folder as a search leaves it: params.json and one result.json line per report."""
    trial = folder / f"trial_{trial_id}"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps({"tau1": 1.0}))
    (trial / "result.json").write_text("".join(json.dumps({"trial_id": trial_id, **r}) + "\n" for r in rows))


def _epoch(stage: str, wall: float, units: float = 1.0, **more) -> dict:
    return {"stage": stage, "cost_wall_s": wall, "device": "cpu", "cost_device_s": wall * units, **more}


def test_ledger_of_trials_driver_and_reevaluation(tmp_path):
    _trial(tmp_path, "a", [_epoch("stage1", 2.0), _epoch("stage1", 1.0), _epoch("stage2", 3.0, units=2)])
    _trial(tmp_path, "b", [_epoch("stage1", 1.5), _epoch("stage2", 0.5, diverged=1)])  # its diverged report
    _trial(tmp_path / "stage1_search", "p1", [_epoch("stage1", 4.0)])  # a staged search's phase 1
    cost.add_driver_cost(Place(tmp_path), "teacher", "pretrain", 60.0, "cpu", 2.0)
    cost.add_driver_cost(Place(tmp_path), "teacher_bank", "bank", 5.0, "cuda", 0.25)
    (tmp_path / "selection").mkdir()
    (tmp_path / "selection" / "a-seed1.json").write_text(json.dumps(
        {"trial_id": "a", "seed": 1, "val_accuracy": 0.8, "epochs": 3, "wall_s": 7.0, "device": "cpu",
         "device_s": 7.0}))
    table = cost.ledger(tmp_path)
    assert list(table.columns) == cost.COLUMNS
    rows = {(r.trial_id, r.stage): r for r in table.itertuples()}
    assert set(rows) == {("teacher", "pretrain"), ("teacher_bank", "bank"), ("p1", "stage1"), ("a", "stage1"),
                         ("a", "stage2"), ("b", "stage1"), ("b", "stage2"), ("a", "reeval seed 1")}
    assert (rows["a", "stage1"].epochs, rows["a", "stage1"].wall_s, rows["a", "stage1"].device_s) == (2, 3.0, 3.0)
    assert (rows["a", "stage2"].wall_s, rows["a", "stage2"].device_s) == (3.0, 6.0)  # two CPUs
    assert rows["b", "stage2"].epochs == 0 and rows["b", "stage2"].wall_s == 0.5  # diverged: time spent, no epoch
    assert rows["teacher", "pretrain"].device_s == 120.0 and rows["teacher_bank", "bank"].device_s == 1.25
    spent = cost.totals(table)
    assert spent["cpu_hours"] == pytest.approx((120 + 4 + 3 + 6 + 1.5 + 0.5 + 7) / 3600)
    assert spent["cuda_hours"] == pytest.approx(1.25 / 3600)
    assert spent["device_hours"] == pytest.approx(spent["cpu_hours"] + spent["cuda_hours"])
    assert spent["wall_hours"] == pytest.approx((60 + 5 + 4 + 3 + 3 + 1.5 + 0.5 + 7) / 3600)


def test_reports_without_cost_and_an_empty_experiment(tmp_path):
    _trial(tmp_path, "old", [{"stage": "stage1", "val_accuracy": 0.5}])  # made before the ledger existed
    table = cost.ledger(tmp_path)
    assert table.empty and list(table.columns) == cost.COLUMNS
    assert cost.totals(table)["device_hours"] == 0


def test_damaged_driver_file_is_one_line(tmp_path):
    (tmp_path / DRIVER_FILE).write_text('[{"trial_id": "teacher", ')
    with pytest.raises(UserError) as e:
        cost.ledger(tmp_path)
    assert DRIVER_FILE in str(e.value) and "\n" not in str(e.value)


def test_clock_laps_and_device_units():
    now = FakeClock()
    clock = cost.Clock("cuda", cost.device_units("cuda", cpus=4, gpus=0.25), now=now)
    now.advance(2.0)
    lap = clock.lap()
    assert lap == {"device": "cuda", "cost_wall_s": 2.0, "cost_device_s": 0.5}
    now.advance(0.5)
    assert clock.lap()["cost_wall_s"] == 0.5  # from the previous lap, not from the start
    assert cost.Clock("cpu", 1).lap()["cost_wall_s"] >= 0  # the real clock by default
    assert cost.device_units("cpu", cpus=2, gpus=0) == 2


def test_selection_table_orders_by_the_reevaluated_mean():
    from refilled.schema.search import SearchSettings
    from refilled.tune.selection import selection_table

    top = pd.DataFrame({"trial_id": ["x", "y"], "config/tau1": [1.0, 2.0], "config/lr2": [0.1, 0.2],
                        "best_val_accuracy_stage2": [0.95, 0.90]})
    results = [{"trial_id": "x", "seed": s, "val_accuracy": v} for s, v in ((2, 0.80), (1, 0.84))] + \
              [{"trial_id": "y", "seed": s, "val_accuracy": v} for s, v in ((1, 0.88), (2, 0.86))]
    table = selection_table(top, results, SearchSettings(space={"tau1": {"loguniform": [0.5, 16]}}))
    assert list(table["trial_id"]) == ["y", "x"]  # the search's best (x) is not the best mean
    assert list(table.columns) == ["trial_id", "tau1", "val_accuracy_search", "val_accuracy_reeval_mean",
                                   "val_accuracy_reeval_std", "seeds"]
    assert table.loc[0, "val_accuracy_reeval_mean"] == pytest.approx(0.87)
    assert table.loc[1, "seeds"] == "1 2" and table.loc[1, "val_accuracy_reeval_std"] == pytest.approx(0.0283, abs=1e-4)
