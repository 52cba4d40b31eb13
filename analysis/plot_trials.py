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
from pathlib import Path


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from analysis.common import (METRIC, Experiment, all_trials, as_experiments, best, curves, experiments_parser,
                             open_experiments, output_folder, run_cli, save_figure, trials)
from refilled.errors import UserError
from refilled.store.experiments import plain_value, read_results

STATUS_STYLE = {  # how each status is drawn in curves.png
    "finished": dict(linestyle="-", alpha=0.9, linewidth=1.4),
    "stopped": dict(linestyle="--", color="0.6", alpha=0.8, linewidth=1.0),
    "diverged": dict(linestyle=":", color="tab:red", alpha=0.9, linewidth=1.2),
    "errored": dict(linestyle=":", color="tab:orange", alpha=0.9, linewidth=1.2),
    "running": dict(linestyle="-.", color="tab:purple", alpha=0.8, linewidth=1.0),
}
MARKER = {"finished": "o", "stopped": "x", "diverged": "v", "errored": "s", "running": "^"}
def _grid(n: int, max_cols: int = 3, size: tuple[float, float] = (5.0, 3.8)):
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


# ----------------------------------------------------------------------------- (1) curves

def _plot_phase1(ax, exp) -> None:
    """A staged search's phase 1 in the stage-1 part of the plot: every stage-1-only
    trial's NCM accuracy, the one phase 2 started from in black (phase 2's trials
    report stage 2 only)."""
    chosen = (exp.data.get("stage1_choice") or {}).get("trial_id")
    for _, trial in exp.stage1_trials().iterrows():
        rows = [r for r in read_results(Path(trial["folder"])) if "val_accuracy" in r and not r.get("diverged")]
        if not rows:
            continue
        steps, accs = [r["step"] for r in rows], [r["val_accuracy"] for r in rows]
        if str(trial["trial_id"]) == str(chosen):
            ax.plot(steps, accs, color="black", linewidth=2.4, zorder=5)
        else:
            style = dict(STATUS_STYLE.get(trial["status"], STATUS_STYLE["running"]))
            style.update(color="0.55")
            ax.plot(steps, accs, **style)
            if trial["status"] != "finished":
                ax.plot(steps[-1], accs[-1], marker="x", color="0.55", markersize=6, linestyle="none")


def plot_curves(experiments, path: str | Path) -> pd.DataFrame:
    """curves.png: every trial's validation accuracy per step; returns the long table plotted."""
    experiments = as_experiments(experiments)
    data = curves(experiments)
    fig, axes = _grid(len(experiments), max_cols=2, size=(7.0, 4.5))
    for ax, exp in zip(axes, experiments):
        table = all_trials([exp])
        top = best(table) if not table.empty else None
        e1 = exp.config.n_training_epochs1
        rows = data[data["experiment"] == exp.label]
        colours = plt.get_cmap("tab10")
        finished_n = 0
        for _, trial in table.iterrows():
            points = rows[rows["trial_id"] == trial["trial_id"]].sort_values("step")
            status = trial["status"]
            style = dict(STATUS_STYLE.get(status, STATUS_STYLE["running"]))
            if status == "finished":
                style["color"] = colours(finished_n % 10)
                finished_n += 1
            is_best = top is not None and trial["trial_id"] == top["trial_id"]
            if is_best:
                style.update(color="black", linewidth=2.4, alpha=1.0, linestyle="-", zorder=5)
            if points.empty:
                continue
            ax.plot(points["step"], points["val_accuracy"], **style)
            if status != "finished":  # where the trial ended
                ax.plot(points["step"].iloc[-1], points["val_accuracy"].iloc[-1], marker=MARKER.get(status, "o"),
                        color=style.get("color", "0.4"), markersize=7, markeredgewidth=1.8, linestyle="none", zorder=6)
            if is_best:
                ax.annotate(f"best {trial['trial_id']}", (points["step"].iloc[-1], points["val_accuracy"].iloc[-1]),
                            textcoords="offset points", xytext=(-8, 6), ha="right", fontsize=8)
        for rung in exp.asha_rungs():
            ax.axvline(rung, color="0.75", linestyle=":", linewidth=1)
        if exp.staged:
            _plot_phase1(ax, exp)
        if 0 < e1 < exp.total_epochs:
            ax.axvline(e1 + 0.5, color="tab:blue", linestyle="-", linewidth=1.2, alpha=0.7)
            ax.text(e1 + 0.5, 1.01, " stage 2 ", transform=ax.get_xaxis_transform(), ha="left", va="bottom",
                    fontsize=8, color="tab:blue")
            ax.text(e1 + 0.5, 1.01, " stage 1 ", transform=ax.get_xaxis_transform(), ha="right", va="bottom",
                    fontsize=8, color="tab:blue")
        counts = table["status"].value_counts() if not table.empty else {}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items())
        phase1 = f"; phase 1: {len(exp.stage1_trials())} stage-1 trials" if exp.staged else ""
        ax.set_title(f"{exp.label}: {len(table)} trials ({summary}){phase1}", fontsize=10, pad=14)
        ax.set_xlim(0.5, exp.total_epochs + 0.5)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step (epochs over both stages)")
        ax.set_ylabel("validation accuracy\n(stage 1: NCM, stage 2: classifier)")
        ax.grid(alpha=0.25)
    handles = [Line2D([], [], color="tab:blue", **{k: v for k, v in STATUS_STYLE["finished"].items()}, label="finished"),
               Line2D([], [], marker="x", **STATUS_STYLE["stopped"], label="stopped by ASHA (x: stop)"),
               Line2D([], [], color="black", linewidth=2.4, label="best trial"),
               Line2D([], [], color="tab:blue", linewidth=1.2, alpha=0.7, label="stage boundary"),
               Line2D([], [], color="0.75", linestyle=":", label="ASHA rung (a stop)")]
    if (data["status"] == "diverged").any():
        handles.append(Line2D([], [], marker="v", **STATUS_STYLE["diverged"], label="diverged"))
    if (data["status"] == "errored").any():
        handles.append(Line2D([], [], marker="s", **STATUS_STYLE["errored"], label="errored"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.04))
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, Path(path))
    return data


# ----------------------------------------------------------------------------- (2) parameters

def _jitter(trial_id) -> float:
    return (zlib.crc32(str(trial_id).encode()) % 1000 / 1000 - 0.5) * 0.3


def plot_params(experiments, path: str | Path) -> pd.DataFrame:
    """params.png: each searched parameter against the best stage-2 validation accuracy.
    Returns one row per trial: experiment, trial_id, status, the parameters, the metric
    (attrs["xscale"]: each parameter's x axis, "log", "linear" or "categorical")."""
    experiments = as_experiments(experiments)
    table = all_trials(experiments)
    params: list[str] = []
    for e in experiments:
        params += [p for p in e.searched if p not in params and p in table.columns]
    if not params:
        raise UserError("the experiments have no searched parameters (search.space in experiment.yaml)")
    fig, axes = _grid(len(params))
    colours = {e.label: plt.get_cmap("tab10")(i % 10) for i, e in enumerate(experiments)}
    scales: dict[str, str] = {}
    for ax, param in zip(axes, params):
        owners = [e for e in experiments if param in e.space]
        log = any(e.settings.is_log(param) for e in owners)
        categorical = any(e.kind(param) == "choice" for e in owners)
        rows = table[table["experiment"].isin([e.label for e in owners])]
        with_metric = rows[rows[METRIC].notna()]
        categories = sorted({str(v) for v in rows[param].dropna()}) if categorical else []
        for exp in owners:
            mine = with_metric[with_metric["experiment"] == exp.label]
            for status, marker_face in (("finished", None), ("stopped", "none"), ("diverged", None), ("errored", None)):
                part = mine[mine["status"] == status]
                if part.empty:
                    continue
                if categorical:  # a strip plot: category position plus a small jitter fixed per trial
                    x = np.array([categories.index(str(v)) + _jitter(t) for v, t in zip(part[param],
                                                                                       part["trial_id"])])
                else:
                    x = part[param].astype(float).to_numpy()
                colour = colours[exp.label]
                ax.scatter(x, part[METRIC], marker=MARKER.get(status, "o") if status != "stopped" else "o",
                           s=36, facecolors=colour if marker_face is None else "none", edgecolors=colour,
                           alpha=0.85, linewidths=1.2,
                           label=f"{exp.label}: {status}" if len(experiments) > 1 else status)
            top = best(rows[rows["experiment"] == exp.label])
            if top is not None and not pd.isna(top[param]):
                bx = (categories.index(str(top[param])) + _jitter(top["trial_id"]) if categorical
                      else float(top[param]))
                ax.scatter([bx], [top[METRIC]], marker="*", s=240, color="gold", zorder=5, linewidths=1.5,
                           edgecolors="black" if len(experiments) == 1 else colours[exp.label],
                           label="best" if exp is owners[0] else None)
        if categorical:
            ax.set_xticks(range(len(categories)), categories)
            ax.set_xlim(-0.5, len(categories) - 0.5)
        elif log:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        bounds = [next(iter(e.space[param].values())) for e in owners]
        if not categorical and bounds:
            low, high = min(b[0] for b in bounds), max(b[1] for b in bounds)
            pad = (high / low) ** 0.04 if log else None
            ax.set_xlim(low / pad, high * pad) if log else ax.set_xlim(low - 0.04 * (high - low),
                                                                        high + 0.04 * (high - low))
        scales[param] = "categorical" if categorical else ax.get_xscale()
        kind = next(iter(owners[0].space[param]))
        ax.set_title(f"{param} ({kind})", fontsize=10)
        ax.set_xlabel(param + (" (log scale)" if log and not categorical else ""))
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
    save_figure(fig, Path(path))
    shown = table[["experiment", "trial_id", "status", *params, METRIC]].reset_index(drop=True)
    shown.attrs["xscale"] = scales  # {param: "log" | "linear" | "categorical"}: the x axis each panel got
    return shown


# ----------------------------------------------------------------------------- (3) importance

MIN_TRIALS = 8  # fANOVA's forest on fewer trials says more about the forest than about the parameters
FANOVA_SEEDS = 5  # importances over several forests: their spread is the error bar


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
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed), normalize=True)
        for seed in range(FANOVA_SEEDS)])
    out = pd.DataFrame({"experiment": exp.label, "param": runs.columns, "importance": runs.mean().values,
                        "importance_std": runs.std(ddof=1).values, "trials": len(sample), "sample": described})
    return out.sort_values("importance", ascending=False, kind="stable").reset_index(drop=True)


def plot_importance(experiments, path: str | Path) -> pd.DataFrame:
    """importance.png: a bar chart per experiment, error bars the spread over fANOVA seeds;
    returns experiment, param, importance, importance_std, trials, sample (an experiment
    with too few trials gets the notice in its panel and no rows)."""
    experiments = as_experiments(experiments)
    fig, axes = _grid(len(experiments), max_cols=2, size=(5.5, 3.6))
    frames = []
    for ax, exp in zip(axes, experiments):
        try:
            imp = importances(exp)
        except UserError as e:
            ax.text(0.5, 0.5, str(e), ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
            ax.set_axis_off()
            ax.set_title(exp.label, fontsize=10)
            continue
        frames.append(imp)
        order = imp.sort_values("importance")
        ax.barh(order["param"], order["importance"], xerr=order["importance_std"], color="tab:blue",
                ecolor="0.2", capsize=3)
        for y, (v, e) in enumerate(zip(order["importance"], order["importance_std"])):
            ax.text(v + e, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, max(1.0, float((order["importance"] + order["importance_std"]).max()) * 1.2))
        ax.set_xlabel(f"importance (fANOVA, sums to 1; bars: ±1 std over {FANOVA_SEEDS} seeds)")
        ax.set_title(f"{exp.label}: importance for stage-2 val accuracy\n({imp['sample'].iloc[0]})", fontsize=10)
        ax.grid(alpha=0.25, axis="x")
    fig.tight_layout()
    save_figure(fig, Path(path))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["experiment", "param", "importance", "importance_std", "trials", "sample"])


# ----------------------------------------------------------------------------- (4) efficiency

def efficiency(experiments) -> pd.DataFrame:
    """Trials in completion order with the epochs spent so far and the best stage-2
    validation accuracy so far. Columns: experiment, order, trial_id, status, epochs
    (what the trial computed), cumulative_epochs (from phase 1's epochs for a staged
    search), metric, best_so_far."""
    frames = []
    for exp in as_experiments(experiments):
        table = all_trials([exp])
        if table.empty:
            continue
        t = table.assign(_end=table["end_time"].fillna(np.inf), _n=table["trial"].fillna(1e9))
        t = t.sort_values(["_end", "_n"], kind="stable").reset_index(drop=True)
        frames.append(pd.DataFrame({
            "experiment": exp.label, "order": range(1, len(t) + 1), "trial_id": t["trial_id"], "status": t["status"],
            "epochs": t["epochs_run"].astype(int),
            "cumulative_epochs": exp.stage1_search_epochs + t["epochs_run"].astype(int).cumsum(),
            "metric": t[METRIC].astype(float), "best_so_far": t[METRIC].astype(float).cummax()}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_efficiency(experiments, path: str | Path) -> pd.DataFrame:
    """efficiency.png: best-so-far accuracy against cumulative epochs, one line per experiment."""
    experiments = as_experiments(experiments)
    data = efficiency(experiments)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, exp in enumerate(experiments):
        rows = data[data["experiment"] == exp.label] if not data.empty else data
        if rows.empty:
            continue
        colour = plt.get_cmap("tab10")(i % 10)
        full = len(rows) * exp.total_epochs
        spent = int(rows["cumulative_epochs"].iloc[-1])
        phase1 = f", {exp.stage1_search_epochs} in phase 1" if exp.staged else ""
        ax.step(rows["cumulative_epochs"], rows["best_so_far"], where="post", color=colour, linewidth=2,
                label=f"{exp.label}: best so far ({spent} epochs{phase1}; {full} without ASHA)")
        for status, part in rows.groupby("status"):
            ax.scatter(part["cumulative_epochs"], part["metric"], marker="o" if status == "stopped" else
                       MARKER.get(status, "o"), s=30, edgecolors=colour, alpha=0.7, linewidths=1.2,
                       facecolors="none" if status == "stopped" else colour,
                       label=f"{exp.label}: trial ({status})" if len(experiments) > 1 else f"trial ({status})")
    ax.set_xlabel("epochs spent by the search (trials in completion order)")
    ax.set_ylabel("stage-2 validation accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.25)
    ax.set_title("search efficiency: best stage-2 validation accuracy so far\n(markers: each trial's best; "
                 "hollow: stopped by ASHA)", fontsize=11)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, Path(path))
    return data


# ----------------------------------------------------------------------------- rungs

def rung_correlations(experiments) -> pd.DataFrame:
    """refilled.store.rung_fidelity.experiment_correlations of each experiment, one row per (rung, against)."""
    from refilled.store.rung_fidelity import experiment_correlations

    rows = [{"experiment": exp.label, **r} for exp in as_experiments(experiments)
            for r in experiment_correlations(exp.folder)]
    return pd.DataFrame(rows, columns=["experiment", "rung", "against", "trials", "spearman"])


def plot_rungs(experiments, path: str | Path) -> pd.DataFrame:
    """Bars of each rung's rank correlation with what followed it, one panel per experiment."""
    from refilled.store.rung_fidelity import WEAK

    experiments = as_experiments(experiments)
    data = rung_correlations(experiments)
    fig, axes = _grid(len(experiments))
    colors = {"end": "tab:blue", "re-evaluated mean": "tab:green"}
    for ax, exp in zip(axes, experiments):
        part = data[data["experiment"] == exp.label].reset_index(drop=True)
        if part.empty:
            ax.text(0.5, 0.5, "no ASHA rung before the end", ha="center", va="center", transform=ax.transAxes)
        for i, r in part.iterrows():
            value = 0.0 if math.isnan(r["spearman"]) else r["spearman"]
            ax.bar(i, value, color=colors.get(r["against"], "tab:orange"), alpha=0.85)
            label = "n/a" if math.isnan(r["spearman"]) else f"{r['spearman']:+.2f}"
            ax.text(i, value + (0.03 if value >= 0 else -0.1), f"{label}\nn={r['trials']}", ha="center",
                    fontsize=7)
        ax.set_xticks(range(len(part)), [f"{r}\nvs {a}" for r, a in zip(part["rung"], part["against"])],
                      fontsize=7)
        ax.axhline(WEAK, color="tab:red", ls=":", lw=1)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_ylim(-1.05, 1.2)
        ax.set_ylabel("Spearman")
        ax.set_title(f"{exp.label}: ASHA rungs (epoch) vs what followed", fontsize=10)
    fig.tight_layout()
    save_figure(fig, Path(path))
    return data


# ----------------------------------------------------------------------------- all

PLOTS = {"curves": plot_curves, "params": plot_params, "importance": plot_importance, "efficiency": plot_efficiency,
         "rungs": plot_rungs}


def plot_all(experiments, out: str | Path) -> dict[str, tuple[Path, pd.DataFrame]]:
    """All the plots into `out`: {name: (png path, the DataFrame it shows)}."""
    experiments = as_experiments(experiments)
    with output_folder(out) as folder:
        made = {name: fn(experiments, folder / f"{name}.png") for name, fn in PLOTS.items()}
    return {name: (Path(out).expanduser() / f"{name}.png", table) for name, table in made.items()}


def build_parser() -> argparse.ArgumentParser:
    p = experiments_parser("plot_trials.py", __doc__)
    p.add_argument("--only", choices=list(PLOTS), action="append", help="make only this plot (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    experiments = open_experiments(args.experiments)
    with output_folder(args.out, args.force) as folder:
        made = {name: PLOTS[name](experiments, folder / f"{name}.png") for name in args.only or list(PLOTS)}
    for name, df in made.items():
        print(f"wrote {Path(args.out) / f'{name}.png'}")
        if name == "importance" and not df.empty:
            for exp, part in df.groupby("experiment", sort=False):
                print(f"  {exp}: " + ", ".join(f"{p} {v:.3f}" for p, v in zip(part["param"], part["importance"])))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
