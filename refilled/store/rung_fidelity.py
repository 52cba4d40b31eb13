"""How well a search's ASHA rungs ranked its trials: each rung's rank correlation with
the next rung, the end and the re-evaluated means, from the trials' own reports
(a rung is only worth what it ranks; where rungs sit: refilled.schema.rungs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from refilled.schema.rungs import counted_epochs
from refilled.schema.search import parse_search
from refilled.store.experiment_file import read
from refilled.store.experiments import DamagedTrial, read_results, read_selection, trial_folders

WEAK = 0.5  # a rank correlation below this is called weak
MIN_JUDGED = 5  # over fewer trials a rank correlation is shown but not judged (3 trials: only +-0.5 or +-1)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); nan below 3 pairs or with no spread."""
    import pandas as pd

    if len(a) < 3:
        return math.nan
    value = pd.Series(a).rank().corr(pd.Series(b).rank())
    return float(value) if value == value else math.nan


def values_at(curves: dict[str, dict[int, float]], epoch: int) -> dict[str, float]:
    """Each trial's value at `epoch`, for the trials that reported it."""
    return {t: c[epoch] for t, c in curves.items() if epoch in c}


def correlations(curves: dict[str, dict[int, float]], rungs: list[int], end: int,
                 reeval: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Rank correlations of a search's rungs: each rung with the next (over the trials
    that reached both), with the end (trials that ran to `end`), with the
    re-evaluated means (`reeval`: trial -> mean). One row per (rung, against)."""
    rows = []
    marks = list(rungs) + [end]
    for i, rung in enumerate(rungs):
        here = values_at(curves, rung)
        targets = [(f"epoch {marks[i + 1]}" if marks[i + 1] != end else "end", values_at(curves, marks[i + 1]))]
        if marks[i + 1] != end:
            targets.append(("end", values_at(curves, end)))
        if reeval:
            targets.append(("re-evaluated mean", reeval))
        for name, there in targets:
            common = sorted(set(here) & set(there))
            rho = spearman([here[t] for t in common], [there[t] for t in common])
            rows.append({"rung": rung, "against": name, "trials": len(common), "spearman": rho})
    return rows


def correlation_lines(rows: list[dict[str, Any]], bn_stats: str = "precise") -> list[str]:
    """The rows as lines, with a warning and what to change for each weak one."""
    out = []
    for r in rows:
        rho = "n/a" if math.isnan(r["spearman"]) else f"{r['spearman']:+.2f}"
        line = f"  rung at epoch {r['rung']} vs {r['against']}: Spearman {rho} over {r['trials']} trials"
        if math.isnan(r["spearman"]) or r["trials"] < MIN_JUDGED:
            line += f" (too few to judge: fewer than {MIN_JUDGED})"
        elif r["spearman"] < WEAK:
            fix = "set bn_stats: precise or move it later" if bn_stats == "running" else "move it later"
            line += (f"  <- weak (< {WEAK}): this rung stops trials on noise; {fix} (search.asha.rungs), "
                     "measured with benchmarks/rung_fidelity.py")
        out.append(line)
    return out


def experiment_curves(folder, rows_of=read_results) -> tuple[dict[str, dict[int, float]], list[int], int]:
    """(each trial's validation accuracy by the epoch ASHA counts, the rung epochs, the
    last epoch) of a search's experiment folder, from the trials' reports (`rows_of`: a trial
    folder's rows)."""
    folder = Path(folder)
    cfg, data = read(folder)
    settings = parse_search(data.get("search"), cfg)
    phase2 = settings.staged is not None  # its trials start at stage 2 and count stage-2 epochs
    end = counted_epochs(cfg, stage1_only=bool(data.get("stage1_only")), from_stage1=phase2)
    key = "stage_epoch" if phase2 else "step"
    curves: dict[str, dict[int, float]] = {}
    for trial in trial_folders(folder):
        try:
            rows = [r for r in rows_of(trial) if "val_accuracy" in r and not r.get("diverged")]
        except DamagedTrial:
            continue  # left out, as the trials' table says (refilled.store.experiments.load_trials)
        curve = {int(r[key]): float(r["val_accuracy"]) for r in rows if key in r}
        if curve:
            curves[str(rows[-1].get("trial_id") or trial.name)] = curve
    return curves, settings.rung_epochs(end), end


def experiment_correlations(folder, rows_of=read_results) -> list[dict[str, Any]]:
    """`correlations` of an experiment's own trials, with its re-evaluated means when it has them."""
    curves, rungs, end = experiment_curves(folder, rows_of)
    selection = read_selection(folder)
    reeval = None
    if selection is not None and not selection.empty:
        reeval = {str(t): float(m) for t, m in zip(selection["trial_id"], selection["val_accuracy_reeval_mean"])}
    return correlations(curves, rungs, end, reeval)
