"""What a search cost: wall seconds and device seconds, per trial and stage.

Every epoch a trial reports says what computing it took (`cost_wall_s`: the
wall time since its previous report, the trial's start-up included in its
first; `device`: cpu or cuda; `cost_device_s`: wall seconds times the CPUs or
GPUs Ray gave the trial, so a quarter GPU for an hour is 0.25 GPU hours). The
driver adds what it computed itself (teacher pre-training, the teacher bank:
`driver_cost.json`), and the re-evaluation of the top trials adds its runs
(refilled.tune.selection). `ledger` puts them together: `cost.csv`, one row per
trial and stage:

    trial_id, stage, epochs, wall_s, device, device_s

An epoch run twice (a trial retried after a crash, the last epochs of a trial a
resumed search runs again) costs twice: both were computed. Epochs replayed
from the stage-1 cache cost what the replay took (next to nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from refilled.store.layout import DRIVER_FILE
from refilled.store.storage import Place

COLUMNS = ["trial_id", "stage", "epochs", "wall_s", "device", "device_s"]


class Clock:
    """Wall time between reports, and what it is worth in device seconds."""

    def __init__(self, device: str, units: float, now=None):
        import time

        self._now = now or time.perf_counter  # `now`: another clock (the tests' fake one)
        self.device, self.units, self.mark = device, units, self._now()

    def lap(self) -> dict[str, Any]:
        now = self._now()
        wall, self.mark = now - self.mark, now
        return {"cost_wall_s": wall, "device": self.device, "cost_device_s": wall * self.units}


def device_units(device: str, cpus: float, gpus: float) -> float:
    """What one second of a run is worth: its GPUs on CUDA, its CPUs otherwise."""
    return gpus if device == "cuda" else cpus


def add_driver_cost(place: Place, item: str, stage: str, wall_s: float, device: str, units: float) -> None:
    """Append one row of the driver's own work (teacher, bank) to driver_cost.json, atomically
    (kept at the experiment's URI too)."""
    rows = read_driver_cost(place.folder)
    rows.append({"trial_id": item, "stage": stage, "epochs": 0, "wall_s": wall_s, "device": device,
                 "device_s": wall_s * units})
    place.write(DRIVER_FILE, json.dumps(rows, indent=1))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# a row of driver_cost.json (add_driver_cost) and what each field holds
DRIVER_FITS = {"trial_id": lambda v: isinstance(v, str), "stage": lambda v: isinstance(v, str),
               "epochs": lambda v: isinstance(v, int) and not isinstance(v, bool), "wall_s": _number,
               "device": lambda v: isinstance(v, str), "device_s": _number}


def read_driver_cost(folder: str | Path) -> list[dict[str, Any]]:
    """driver_cost.json's rows; [] where there is none; a damaged one is a UserError."""
    from refilled.store.experiments import fits, read_json

    path = Path(folder) / DRIVER_FILE
    if not path.exists():
        return []
    try:
        rows = read_json(path)
    except ValueError:
        rows = None
    if not isinstance(rows, list) or not all(fits(row, DRIVER_FITS) for row in rows):
        from refilled.errors import UserError

        raise UserError(f"{path} is damaged: delete it (the cost ledger then misses the teacher and bank rows) "
                        "or restore it")
    return rows


def trial_rows(trial_id: str, results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """A trial's rows from its reported epochs: one per stage it reported."""
    by_stage: dict[str, dict[str, Any]] = {}
    for r in results:
        if "cost_wall_s" not in r:
            continue
        row = by_stage.setdefault(r.get("stage", "?"), {"trial_id": trial_id, "stage": r.get("stage", "?"),
                                                         "epochs": 0, "wall_s": 0.0, "device": r.get("device"),
                                                         "device_s": 0.0})
        row["epochs"] += 0 if r.get("diverged") else 1
        row["wall_s"] += float(r["cost_wall_s"])
        row["device_s"] += float(r.get("cost_device_s", 0.0))
    return list(by_stage.values())


def ledger(folder: str | Path, read: Callable[[Path], list[dict[str, Any]]] | None = None) -> pd.DataFrame:
    """Every cost of an experiment: the driver's rows, each trial's (phase 1 of a staged
    search included), and the re-evaluation's runs. `read`: a trial folder's rows
    (refilled.store.experiments.read_results, or a reader that keeps what it read)."""
    from refilled.store.experiments import DamagedTrial, read_results, reeval_results, say_once, trial_folders
    from refilled.store.layout import STAGE1_SEARCH

    read = read or read_results  # imported here: experiments imports this module
    folder = Path(folder)
    rows = list(read_driver_cost(folder))
    for part in (folder / STAGE1_SEARCH, folder):
        for trial in trial_folders(part):
            try:
                results = read(trial)
            except DamagedTrial as e:  # said once in a process: a script makes the ledger more than once
                say_once(f"note: the cost of {trial.name} is left out of the ledger: its {e}",
                         key=(str(trial.resolve()), "cost"))
                continue
            trial_id = results[-1].get("trial_id") if results else trial.name
            rows += trial_rows(str(trial_id), results)
    rows += [{"trial_id": r["trial_id"], "stage": f"reeval seed {r['seed']}", "epochs": r.get("epochs", 0),
              "wall_s": r["wall_s"], "device": r["device"], "device_s": r["device_s"]} for r in reeval_results(folder)]
    return pd.DataFrame(rows, columns=COLUMNS)


def device_seconds(folder: str | Path) -> float:
    """All the device seconds an experiment's ledger holds (what search.budget_hours is set against)."""
    return float(ledger(folder)["device_s"].sum())


def totals(table: pd.DataFrame) -> dict[str, float]:
    """Device hours by device, and wall hours, of a ledger."""
    out = {f"{device}_hours": float(part["device_s"].sum()) / 3600 for device, part in table.groupby("device")}
    out["wall_hours"] = float(table["wall_s"].sum()) / 3600
    out["device_hours"] = float(table["device_s"].sum()) / 3600
    return out
