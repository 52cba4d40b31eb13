#!/usr/bin/env python
"""Plots of one or more tune-refilled experiments (matplotlib, PNG).

  curves.png      validation accuracy of every trial over steps (stage-1 NCM, then
                  stage-2 classifier), stage boundary and the steps where ASHA
                  stopped trials (its rungs, from the trials' records) marked,
                  stopped trials grey and dashed with an x where ASHA stopped them;
                  one panel per experiment
  params.png      each searched parameter against the final metric (best stage-2
                  validation accuracy); log x axis where the space is log,
                  categorical parameters as strip plots
  importance.png  fANOVA parameter importance (Optuna's; sums to 1) over the trials
                  at the deepest step at least 8 reached (finished, or an ASHA
                  rung with the stopped ones), error bars over 5 fANOVA seeds;
                  with too few trials, a notice instead of bars
  efficiency.png  best-so-far stage-2 validation accuracy against the epochs the
                  search had spent (trials in completion order)
  rungs.png       Spearman rank correlation of each ASHA rung with the next rung, the
                  end and the re-evaluated means, over the trials that reached both
                  (their number on each bar); below 0.5 a rung ranks little but noise

examples:
  python analysis/plot_trials.py experiments/digits --out reports/digits
  python analysis/plot_trials.py experiments/digits experiments/digits-wide --out reports/both
"""

from __future__ import annotations

import argparse
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from analysis.common import (
    METRIC,
    Experiment,
    all_trials,
    as_experiments,
    best,
    curves,
    experiments_parser,
    open_experiments,
    output_folder,
    run_cli,
    save_figure,
    trials,
)
from refilled.errors import UserError
from refilled.store.experiments import plain_value

STATUS_STYLE = {  # how each status is drawn in curves.png
    "finished": dict(linestyle="-", alpha=0.9, linewidth=1.4),
    "stopped": dict(linestyle="--", color="0.6", alpha=0.8, linewidth=1.0),
    "diverged": dict(linestyle=":", color="tab:red", alpha=0.9, linewidth=1.2),
    "errored": dict(linestyle=":", color="tab:orange", alpha=0.9, linewidth=1.2),
    "running": dict(linestyle="-.", color="tab:purple", alpha=0.8, linewidth=1.0),
}
MARKER = {"finished": "o", "stopped": "x", "diverged": "v", "errored": "s", "running": "^"}

# Each figure is computed apart from its drawing: `<figure>_info(experiments)` returns what
# it shows (its `.table` is what `plot_<figure>` returns), `draw_<figure>(info)` draws that
# into a matplotlib figure, `plot_<figure>(experiments, path)` does both and saves it.
# Optuna's plots (optuna.visualization.matplotlib) are not used: each draws one study in a
# figure of its own (these draw every experiment in one PNG), restyles matplotlib for the
# whole process (plt.style.use("ggplot")), and shows less than these: importance from one
# fANOVA forest, no spread; history by trial number, not epochs spent; slice without the
# trials ASHA stopped or the best one.


def _grid(n: int, max_cols: int = 3, size: tuple[float, float] = (5.0, 3.8)):
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


# ----------------------------------------------------------------------------- (1) curves

@dataclass
class CurvePanel:
    """What one experiment's panel of curves.png shows."""

    label: str
    trials: pd.DataFrame  # trial_id, status, best (the best trial by the search's ranking), in load_trials' order
    points: pd.DataFrame  # its rows of the long table (curves())
    rungs: list[int]  # the steps where ASHA stopped trials (Experiment.asha_rungs)
    stage1_epochs: int
    total_epochs: int
    # a staged search's phase 1 (None otherwise): trial_id, status, chosen (phase 2 started from it),
    # step, val_accuracy of each stage-1-only trial that reported; and how many trials it ran
    phase1: pd.DataFrame | None = None
    phase1_trials: int = 0


@dataclass
class CurvesInfo:
    table: pd.DataFrame  # curves(): experiment, trial_id, status, step, stage, val_accuracy, time_total_s
    panels: list[CurvePanel]


def _phase1_points(exp: Experiment) -> pd.DataFrame:
    """A staged search's phase 1: every stage-1-only trial's NCM accuracy by step, and
    whether phase 2 started from it (phase 2's trials report stage 2 only)."""
    chosen = (exp.data.get("stage1_choice") or {}).get("trial_id")
    records = []
    for _, trial in exp.stage1_trials().iterrows():
        for r in exp.results(trial["folder"]):
            if "val_accuracy" in r and not r.get("diverged"):
                records.append({"trial_id": str(trial["trial_id"]), "status": trial["status"],
                                "chosen": str(trial["trial_id"]) == str(chosen), "step": r["step"],
                                "val_accuracy": r["val_accuracy"]})
    return pd.DataFrame.from_records(records, columns=["trial_id", "status", "chosen", "step", "val_accuracy"])


def curves_info(experiments) -> CurvesInfo:
    """Every trial's validation accuracy per step, and per experiment what its panel marks."""
    experiments = as_experiments(experiments)
    data = curves(experiments)
    panels = []
    for exp in experiments:
        table = all_trials([exp])
        if table.empty:
            shown = pd.DataFrame(columns=["trial_id", "status", "best"])
        else:
            top = best(table)
            shown = pd.DataFrame({"trial_id": table["trial_id"], "status": table["status"],
                                  "best": table["trial_id"] == (top["trial_id"] if top is not None else None)})
        panels.append(CurvePanel(exp.label, shown, data[data["experiment"] == exp.label], exp.asha_rungs(),
                                 exp.config.n_training_epochs1, exp.total_epochs,
                                 _phase1_points(exp) if exp.staged else None,
                                 len(exp.stage1_trials()) if exp.staged else 0))
    return CurvesInfo(data, panels)


def _draw_phase1(ax, phase1: pd.DataFrame) -> None:
    """Phase 1 in the stage-1 part of the plot: the trial phase 2 started from in black."""
    for _, trial in phase1.groupby("trial_id", sort=False):
        steps, accs = trial["step"].to_list(), trial["val_accuracy"].to_list()
        status = trial["status"].iloc[0]
        if trial["chosen"].iloc[0]:
            ax.plot(steps, accs, color="black", linewidth=2.4, zorder=5)
        else:
            style = dict(STATUS_STYLE.get(status, STATUS_STYLE["running"]))
            style.update(color="0.55")
            ax.plot(steps, accs, **style)
            if status != "finished":
                ax.plot(steps[-1], accs[-1], marker="x", color="0.55", markersize=6, linestyle="none")


def draw_curves(info: CurvesInfo):
    """curves.png's figure: one panel per experiment."""
    fig, axes = _grid(len(info.panels), max_cols=2, size=(7.0, 4.5))
    for ax, panel in zip(axes, info.panels):
        e1 = panel.stage1_epochs
        colours = plt.get_cmap("tab10")
        finished_n = 0
        by_trial = {t: p.sort_values("step") for t, p in panel.points.groupby("trial_id", sort=False)}
        ends: dict[str, list[tuple]] = {}  # status -> where its trials ended, drawn at once
        for trial_id, status, is_best in zip(panel.trials["trial_id"], panel.trials["status"], panel.trials["best"]):
            style = dict(STATUS_STYLE.get(status, STATUS_STYLE["running"]))
            if status == "finished":
                style["color"] = colours(finished_n % 10)
                finished_n += 1
            if is_best:
                style.update(color="black", linewidth=2.4, alpha=1.0, linestyle="-", zorder=5)
            points = by_trial.get(trial_id)
            if points is None or points.empty:
                continue
            ax.plot(points["step"].to_numpy(), points["val_accuracy"].to_numpy(), **style)
            end = (points["step"].iloc[-1], points["val_accuracy"].iloc[-1])
            if status != "finished":
                ends.setdefault(status, []).append((*end, style.get("color", "0.4")))
            if is_best:
                ax.annotate(f"best {trial_id}", end, textcoords="offset points", xytext=(-8, 6), ha="right",
                            fontsize=8)
        for status, points in ends.items():  # where each trial that did not finish ended
            xs, ys, colors = zip(*points)
            ax.scatter(xs, ys, marker=MARKER.get(status, "o"), c=list(colors), s=49, linewidths=1.8, zorder=6)
        for rung in panel.rungs:
            ax.axvline(rung, color="0.75", linestyle=":", linewidth=1)
        if panel.phase1 is not None:
            _draw_phase1(ax, panel.phase1)
        if 0 < e1 < panel.total_epochs:
            ax.axvline(e1 + 0.5, color="tab:blue", linestyle="-", linewidth=1.2, alpha=0.7)
            ax.text(e1 + 0.5, 1.01, " stage 2 ", transform=ax.get_xaxis_transform(), ha="left", va="bottom",
                    fontsize=8, color="tab:blue")
            ax.text(e1 + 0.5, 1.01, " stage 1 ", transform=ax.get_xaxis_transform(), ha="right", va="bottom",
                    fontsize=8, color="tab:blue")
        counts = panel.trials["status"].value_counts() if not panel.trials.empty else {}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items())
        phase1 = f"; phase 1: {panel.phase1_trials} stage-1 trials" if panel.phase1 is not None else ""
        ax.set_title(f"{panel.label}: {len(panel.trials)} trials ({summary}){phase1}", fontsize=10, pad=14)
        ax.set_xlim(0.5, panel.total_epochs + 0.5)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step (epochs over both stages)")
        ax.set_ylabel("validation accuracy\n(stage 1: NCM, stage 2: classifier)")
        ax.grid(alpha=0.25)
    handles = [Line2D([], [], color="tab:blue", **{k: v for k, v in STATUS_STYLE["finished"].items()}, label="finished"),
               Line2D([], [], marker="x", **STATUS_STYLE["stopped"], label="stopped by ASHA (x: stop)"),
               Line2D([], [], color="black", linewidth=2.4, label="best trial"),
               Line2D([], [], color="tab:blue", linewidth=1.2, alpha=0.7, label="stage boundary"),
               Line2D([], [], color="0.75", linestyle=":", label="ASHA rung (a stop)")]
    if (info.table["status"] == "diverged").any():
        handles.append(Line2D([], [], marker="v", **STATUS_STYLE["diverged"], label="diverged"))
    if (info.table["status"] == "errored").any():
        handles.append(Line2D([], [], marker="s", **STATUS_STYLE["errored"], label="errored"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.04))
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def plot_curves(experiments, path: str | Path) -> pd.DataFrame:
    """curves.png: every trial's validation accuracy per step; returns the long table plotted."""
    info = curves_info(experiments)
    save_figure(draw_curves(info), Path(path))
    return info.table


# ----------------------------------------------------------------------------- (2) parameters

@dataclass
class ParamAxis:
    """One panel of params.png: a searched parameter's x axis."""

    param: str
    kind: str  # its distribution in the first experiment that searched it (loguniform, choice, ...)
    scale: str  # "log", "linear" or "categorical"
    categories: list[str]  # a categorical parameter's values (as text, sorted): their x positions
    limits: tuple[float, float] | None  # the x range: the space's bounds, padded (None: categorical)
    owners: list[str]  # the experiments that searched it


@dataclass
class ParamsInfo:
    table: pd.DataFrame  # experiment, trial_id, status, the parameters, METRIC; attrs["xscale"]: {param: scale}
    axes: list[ParamAxis]
    labels: list[str]  # every experiment, in order
    best: dict[str, str]  # the best trial of each experiment that has one (by the search's ranking)


def _axis(param: str, owners: list[Experiment], values: pd.Series) -> ParamAxis:
    log = any(e.settings.is_log(param) for e in owners)
    categorical = any(e.kind(param) == "choice" for e in owners)
    limits = None
    if not categorical:
        bounds = [e.space[param].args for e in owners]
        low, high = min(b[0] for b in bounds), max(b[1] for b in bounds)
        pad = (high / low) ** 0.04 if log else 0.04 * (high - low)
        limits = (low / pad, high * pad) if log else (low - pad, high + pad)
    return ParamAxis(param, owners[0].kind(param), "categorical" if categorical else "log" if log else "linear",
                     sorted({str(v) for v in values.dropna()}) if categorical else [], limits,
                     [e.label for e in owners])


def params_info(experiments) -> ParamsInfo:
    """Each searched parameter against the final metric (best stage-2 validation accuracy)."""
    experiments = as_experiments(experiments)
    table = all_trials(experiments)
    params: list[str] = []
    for e in experiments:
        params += [p for p in e.searched if p not in params and p in table.columns]
    if not params:
        raise UserError("the experiments have no searched parameters (search.space in experiment.yaml)")
    axes = []
    for param in params:
        owners = [e for e in experiments if param in e.space]
        axes.append(_axis(param, owners, table[table["experiment"].isin([e.label for e in owners])][param]))
    tops = {e.label: best(table[table["experiment"] == e.label]) for e in experiments}
    shown = table[["experiment", "trial_id", "status", *params, METRIC]].reset_index(drop=True)
    shown.attrs["xscale"] = {a.param: a.scale for a in axes}  # the x axis each panel gets
    return ParamsInfo(shown, axes, [e.label for e in experiments],
                      {label: top["trial_id"] for label, top in tops.items() if top is not None})


def _jitter(trial_id) -> float:
    return (zlib.crc32(str(trial_id).encode()) % 1000 / 1000 - 0.5) * 0.3


def draw_params(info: ParamsInfo):
    """params.png's figure: a panel per parameter, a colour per experiment, a marker per status."""
    table, several = info.table, len(info.labels) > 1
    fig, axes = _grid(len(info.axes))
    colours = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(info.labels)}
    for ax, axis in zip(axes, info.axes):
        param, categorical = axis.param, axis.scale == "categorical"

        def x_of(values, trial_ids):  # a strip plot: category position plus a small jitter fixed per trial
            if categorical:
                return np.array([axis.categories.index(str(v)) + _jitter(t) for v, t in zip(values, trial_ids)])
            return pd.Series(values).astype(float).to_numpy()

        with_metric = table[table[METRIC].notna()]
        for label in axis.owners:
            mine = with_metric[with_metric["experiment"] == label]
            for status, marker_face in (("finished", None), ("stopped", "none"), ("diverged", None), ("errored", None)):
                part = mine[mine["status"] == status]
                if part.empty:
                    continue
                colour = colours[label]
                ax.scatter(x_of(part[param], part["trial_id"]), part[METRIC],
                           marker=MARKER.get(status, "o") if status != "stopped" else "o",
                           s=36, facecolors=colour if marker_face is None else "none", edgecolors=colour,
                           alpha=0.85, linewidths=1.2, label=f"{label}: {status}" if several else status)
            top = table[(table["experiment"] == label) & (table["trial_id"] == info.best.get(label))]
            if not top.empty and not pd.isna(top[param].iloc[0]):
                ax.scatter(x_of(top[param].iloc[:1], top["trial_id"].iloc[:1]), [top[METRIC].iloc[0]], marker="*",
                           s=240, color="gold", zorder=5, linewidths=1.5,
                           edgecolors="black" if not several else colours[label],
                           label="best" if label == axis.owners[0] else None)
        if categorical:
            ax.set_xticks(range(len(axis.categories)), axis.categories)
            ax.set_xlim(-0.5, len(axis.categories) - 0.5)
        elif axis.scale == "log":
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if axis.limits is not None:
            ax.set_xlim(*axis.limits)
        ax.set_title(f"{param} ({axis.kind})", fontsize=10)
        ax.set_xlabel(param + (" (log scale)" if axis.scale == "log" else ""))
        ax.set_ylabel("best stage-2 val accuracy")
        ax.grid(alpha=0.25, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    seen = {}
    for h, lab in zip(handles, labels):
        seen.setdefault(lab, h)
    if seen:  # none while no trial has a stage-2 accuracy yet
        fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=min(len(seen), 6), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, -0.03))
    missing = int(table[METRIC].isna().sum())
    fig.suptitle("searched parameters against the final metric (hollow: stopped by ASHA)" +
                 (f"\n{missing} trial(s) stopped before stage 2 have no stage-2 accuracy and are not shown"
                  if missing else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def plot_params(experiments, path: str | Path) -> pd.DataFrame:
    """params.png: each searched parameter against the best stage-2 validation accuracy.
    Returns one row per trial: experiment, trial_id, status, the parameters, the metric
    (attrs["xscale"]: each parameter's x axis, "log", "linear" or "categorical")."""
    info = params_info(experiments)
    save_figure(draw_params(info), Path(path))
    return info.table


# ----------------------------------------------------------------------------- (3) importance

MIN_TRIALS = 8  # fANOVA's forest on fewer trials says more about the forest than about the parameters
FANOVA_SEEDS = 5  # importances over several forests: their spread is the error bar
# each forest smaller than Optuna's default (64 trees of depth 64): one value per trial, noisy, and
# deeper trees fit the noise; on 1,024 made-up trials the default took 85 s, this 2 s a forest,
# with importances within 0.03 of the default's (benchmarks/README.md, "Scale")
FANOVA_FOREST = {"n_trees": 16, "max_depth": 8}


def importance_sample(exp: Experiment) -> tuple[pd.DataFrame, str]:
    """The trials fANOVA is fitted on, and at what: every trial that reached the deepest
    step enough of them (MIN_TRIALS) reached, with its stage-2 validation accuracy at that
    step. The deepest is where finished trials end (when enough finished); else an ASHA
    rung, with the trials stopped there included. Columns: trial_id, the searched
    parameters, value. A UserError says when too few trials reached any step."""
    table, curve = trials(exp), curves([exp])
    curve = curve[curve["stage"] == "stage2"] if not curve.empty else curve
    if table.empty or curve.empty:
        raise UserError(f"{exp.label}: no trial reached stage 2, so there is nothing to fit importances on")
    steps = sorted({int(v) for v in table["stopped_at"].dropna()} | {int(curve["step"].max())}, reverse=True)
    params = [p for p in exp.searched if p in table.columns]
    reached = 0
    for step in steps:
        at = curve[curve["step"] == step].drop_duplicates("trial_id", keep="last")
        reached = max(reached, len(at))
        if len(at) >= MIN_TRIALS:
            sample = at[["trial_id", "val_accuracy"]].rename(columns={"val_accuracy": "value"})
            sample = sample.merge(table[["trial_id", *params]], on="trial_id")
            where = "finished" if step == steps[0] else f"at the ASHA rung of step {step}, stopped ones included"
            return sample, f"{len(sample)} trials {where}"
    raise UserError(f"{exp.label}: too few trials for parameter importance (at most {reached} reached the same "
                    f"step; fANOVA needs {MIN_TRIALS}): run more trials (search.num_samples) to see it")


def importances(exp: Experiment) -> pd.DataFrame:
    """fANOVA importances (Optuna's, normalised: they sum to 1) of the searched parameters
    for the stage-2 validation accuracy, on `importance_sample`, mean and standard
    deviation over FANOVA_SEEDS forests. Columns: experiment, param, importance,
    importance_std, trials, sample (in words); largest first."""
    import optuna

    from refilled.schema.search import distributions

    sample, described = importance_sample(exp)
    params = [p for p in exp.searched if p in sample.columns]
    dists = distributions({p: exp.space[p] for p in params})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")  # in memory: the sample as finished trials
    for _, row in sample.iterrows():
        values = {p: plain_value(row[p]) for p in params}
        study.add_trial(optuna.trial.create_trial(params=values, distributions=dists, value=float(row["value"])))
    runs = pd.DataFrame([optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed, **FANOVA_FOREST), normalize=True)
        for seed in range(FANOVA_SEEDS)])
    out = pd.DataFrame({"experiment": exp.label, "param": runs.columns, "importance": runs.mean().values,
                        "importance_std": runs.std(ddof=1).values, "trials": len(sample), "sample": described})
    return out.sort_values("importance", ascending=False, kind="stable").reset_index(drop=True)


IMPORTANCE_COLUMNS = ["experiment", "param", "importance", "importance_std", "trials", "sample"]


@dataclass
class ImportanceInfo:
    table: pd.DataFrame  # importances() of every experiment that has them
    labels: list[str]  # every experiment, in order
    notices: dict[str, str]  # why an experiment has none (too few trials)


def importance_info(experiments) -> ImportanceInfo:
    """importances() of each experiment; an experiment with too few trials gets a notice instead."""
    experiments = as_experiments(experiments)
    frames, notices = [], {}
    for exp in experiments:
        try:
            frames.append(importances(exp))
        except UserError as e:
            notices[exp.label] = str(e)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=IMPORTANCE_COLUMNS)
    return ImportanceInfo(table, [e.label for e in experiments], notices)


def draw_importance(info: ImportanceInfo):
    """importance.png's figure: a bar chart per experiment, error bars the spread over fANOVA seeds."""
    fig, axes = _grid(len(info.labels), max_cols=2, size=(5.5, 3.6))
    for ax, label in zip(axes, info.labels):
        if label in info.notices:
            ax.text(0.5, 0.5, info.notices[label], ha="center", va="center", wrap=True, fontsize=9,
                    transform=ax.transAxes)
            ax.set_axis_off()
            ax.set_title(label, fontsize=10)
            continue
        imp = info.table[info.table["experiment"] == label]
        order = imp.sort_values("importance")
        ax.barh(order["param"], order["importance"], xerr=order["importance_std"], color="tab:blue",
                ecolor="0.2", capsize=3)
        for y, (v, e) in enumerate(zip(order["importance"], order["importance_std"])):
            ax.text(v + e, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, max(1.0, float((order["importance"] + order["importance_std"]).max()) * 1.2))
        ax.set_xlabel(f"importance (fANOVA, sums to 1; bars: ±1 std over {FANOVA_SEEDS} seeds)")
        ax.set_title(f"{label}: importance for stage-2 val accuracy\n({imp['sample'].iloc[0]})", fontsize=10)
        ax.grid(alpha=0.25, axis="x")
    fig.tight_layout()
    return fig


def plot_importance(experiments, path: str | Path) -> pd.DataFrame:
    """importance.png: a bar chart per experiment, error bars the spread over fANOVA seeds;
    returns experiment, param, importance, importance_std, trials, sample (an experiment
    with too few trials gets the notice in its panel and no rows)."""
    info = importance_info(experiments)
    save_figure(draw_importance(info), Path(path))
    return info.table


# ----------------------------------------------------------------------------- (4) efficiency

@dataclass
class EfficiencyInfo:
    table: pd.DataFrame  # efficiency()'s
    labels: list[str]  # every experiment, in order (its colour)
    without_asha: dict[str, int]  # the epochs its trials would have run had ASHA stopped none
    phase1_epochs: dict[str, int]  # a staged search's: the epochs its phase 1 ran


def efficiency_info(experiments) -> EfficiencyInfo:
    """Trials in completion order with the epochs spent so far and the best stage-2
    validation accuracy so far. Table columns: experiment, order, trial_id, status, epochs
    (what the trial computed), cumulative_epochs (from phase 1's epochs for a staged
    search), metric, best_so_far."""
    experiments = as_experiments(experiments)
    frames, without, phase1 = [], {}, {}
    for exp in experiments:
        table = all_trials([exp])
        if table.empty:
            continue
        t = table.assign(_end=table["end_time"].fillna(np.inf), _n=table["trial"].fillna(1e9))
        t = t.sort_values(["_end", "_n"], kind="stable").reset_index(drop=True)
        before = exp.stage1_search_epochs
        frames.append(pd.DataFrame({
            "experiment": exp.label, "order": range(1, len(t) + 1), "trial_id": t["trial_id"], "status": t["status"],
            "epochs": t["epochs_run"].astype(int), "cumulative_epochs": before + t["epochs_run"].astype(int).cumsum(),
            "metric": t[METRIC].astype(float), "best_so_far": t[METRIC].astype(float).cummax()}))
        without[exp.label] = len(t) * exp.total_epochs
        if exp.staged:
            phase1[exp.label] = before
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return EfficiencyInfo(table, [e.label for e in experiments], without, phase1)


def efficiency(experiments) -> pd.DataFrame:
    """efficiency_info's table."""
    return efficiency_info(experiments).table


def draw_efficiency(info: EfficiencyInfo):
    """efficiency.png's figure: best-so-far accuracy against cumulative epochs, one line per experiment."""
    data, several = info.table, len(info.labels) > 1
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, label in enumerate(info.labels):
        rows = data[data["experiment"] == label] if not data.empty else data
        if rows.empty:
            continue
        colour = plt.get_cmap("tab10")(i % 10)
        spent = int(rows["cumulative_epochs"].iloc[-1])
        phase1 = f", {info.phase1_epochs[label]} in phase 1" if label in info.phase1_epochs else ""
        ax.step(rows["cumulative_epochs"], rows["best_so_far"], where="post", color=colour, linewidth=2,
                label=f"{label}: best so far ({spent} epochs{phase1}; {info.without_asha[label]} without ASHA)")
        for status, part in rows.groupby("status"):
            ax.scatter(part["cumulative_epochs"], part["metric"], marker="o" if status == "stopped" else
                       MARKER.get(status, "o"), s=30, edgecolors=colour, alpha=0.7, linewidths=1.2,
                       facecolors="none" if status == "stopped" else colour,
                       label=f"{label}: trial ({status})" if several else f"trial ({status})")
    ax.set_xlabel("epochs spent by the search (trials in completion order)")
    ax.set_ylabel("stage-2 validation accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.25)
    ax.set_title("search efficiency: best stage-2 validation accuracy so far\n(markers: each trial's best; "
                 "hollow: stopped by ASHA)", fontsize=11)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_efficiency(experiments, path: str | Path) -> pd.DataFrame:
    """efficiency.png: best-so-far accuracy against cumulative epochs, one line per experiment."""
    info = efficiency_info(experiments)
    save_figure(draw_efficiency(info), Path(path))
    return info.table


# ----------------------------------------------------------------------------- rungs

@dataclass
class RungsInfo:
    table: pd.DataFrame  # rung_correlations()
    labels: list[str]  # every experiment, in order


def rung_correlations(experiments) -> pd.DataFrame:
    """refilled.store.rung_fidelity.experiment_correlations of each experiment, one row per (rung, against)."""
    from refilled.store.rung_fidelity import experiment_correlations

    rows = [{"experiment": exp.label, **r} for exp in as_experiments(experiments)
            for r in experiment_correlations(exp.folder, exp.results)]
    return pd.DataFrame(rows, columns=["experiment", "rung", "against", "trials", "spearman"])


def rungs_info(experiments) -> RungsInfo:
    experiments = as_experiments(experiments)
    return RungsInfo(rung_correlations(experiments), [e.label for e in experiments])


def draw_rungs(info: RungsInfo):
    """rungs.png's figure: bars of each rung's rank correlation with what followed it, one panel per experiment."""
    from refilled.store.rung_fidelity import WEAK

    fig, axes = _grid(len(info.labels))
    colors = {"end": "tab:blue", "re-evaluated mean": "tab:green"}
    for ax, label in zip(axes, info.labels):
        part = info.table[info.table["experiment"] == label].reset_index(drop=True)
        if part.empty:
            ax.text(0.5, 0.5, "no ASHA rung before the end", ha="center", va="center", transform=ax.transAxes)
        for i, r in part.iterrows():
            value = 0.0 if math.isnan(r["spearman"]) else r["spearman"]
            ax.bar(i, value, color=colors.get(r["against"], "tab:orange"), alpha=0.85)
            shown = "n/a" if math.isnan(r["spearman"]) else f"{r['spearman']:+.2f}"
            ax.text(i, value + (0.03 if value >= 0 else -0.1), f"{shown}\nn={r['trials']}", ha="center",
                    fontsize=7)
        ax.set_xticks(range(len(part)), [f"{r}\nvs {a}" for r, a in zip(part["rung"], part["against"])],
                      fontsize=7)
        ax.axhline(WEAK, color="tab:red", ls=":", lw=1)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_ylim(-1.05, 1.2)
        ax.set_ylabel("Spearman")
        ax.set_title(f"{label}: ASHA rungs (epoch) vs what followed", fontsize=10)
    fig.tight_layout()
    return fig


def plot_rungs(experiments, path: str | Path) -> pd.DataFrame:
    """rungs.png: each ASHA rung's rank correlation with what followed it; returns rung_correlations()."""
    info = rungs_info(experiments)
    save_figure(draw_rungs(info), Path(path))
    return info.table


# ----------------------------------------------------------------------------- all

PLOTS = {"curves": plot_curves, "params": plot_params, "importance": plot_importance, "efficiency": plot_efficiency,
         "rungs": plot_rungs}


def plot_all(experiments, out: str | Path) -> dict[str, tuple[Path, pd.DataFrame]]:
    """All the plots into `out` (analysis.common.output_folder): {name: (png path, the DataFrame it shows)}."""
    experiments = as_experiments(experiments)
    with output_folder(out, experiments=experiments) as folder:
        made = {name: fn(experiments, folder / f"{name}.png") for name, fn in PLOTS.items()}
    return {name: (Path(out).expanduser() / f"{name}.png", table) for name, table in made.items()}


def build_parser() -> argparse.ArgumentParser:
    p = experiments_parser("plot_trials.py", __doc__)
    p.add_argument("--only", choices=list(PLOTS), action="append", help="make only this plot (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    experiments = open_experiments(args.experiments)
    with output_folder(args.out, args.force, experiments) as folder:
        made = {name: PLOTS[name](experiments, folder / f"{name}.png") for name in args.only or list(PLOTS)}
    for name, df in made.items():
        print(f"wrote {Path(args.out) / f'{name}.png'}")
        if name == "importance" and not df.empty:
            for exp, part in df.groupby("experiment", sort=False):
                print(f"  {exp}: " + ", ".join(f"{p} {v:.3f}" for p, v in zip(part["param"], part["importance"])))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
