#!/usr/bin/env python
"""How the winner was chosen, and what the search cost (matplotlib, PNG).

  selection.png  per experiment, each re-evaluated candidate: its score in the
                 search (the best of its epochs, the number it was ranked by)
                 beside the mean and spread of its validation accuracy over
                 more seeds, and for the retrained winner its test accuracy:
                 the optimism gap, candidate by candidate
  cost.png       best stage-2 validation accuracy so far against the device
                 hours spent (teacher, bank and a staged search's phase 1
                 first, then trials in the order they ended)

examples:
  python analysis/selection_cost.py experiments/digits --out reports/digits
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from analysis.common import (
    METRIC,
    Experiment,
    as_experiments,
    experiments_parser,
    open_experiments,
    output_folder,
    retrain_results,
    run_cli,
    save_figure,
    trials,
)
from refilled.store import cost
from refilled.store.experiments import read_selection


def selection(exp: Experiment) -> pd.DataFrame:
    """selection.csv with: experiment, chosen (the winner), and for the winner the mean
    test accuracy of its final retrain (when the retrain ran on it). Empty without one."""
    table = read_selection(exp.folder)
    if table is None or table.empty:
        return pd.DataFrame()
    table = table.assign(experiment=exp.label, chosen=False, test_accuracy_mean=float("nan"))
    table.loc[0, "chosen"] = True
    results = retrain_results(exp) or {}
    source = results.get("source") or {}
    if "refilled" in results and str(source.get("trial_id")) == str(table.loc[0, "trial_id"]):
        table.loc[0, "test_accuracy_mean"] = results["refilled"]["mean"]
    return table


@dataclass
class SelectionInfo:
    tables: dict[str, pd.DataFrame]  # selection() of every experiment, in order (empty: no re-evaluation)

    @property
    def table(self) -> pd.DataFrame:
        frames = [t for t in self.tables.values() if not t.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def selection_info(experiments) -> SelectionInfo:
    return SelectionInfo({e.label: selection(e) for e in as_experiments(experiments)})


def draw_selection(info: SelectionInfo):
    """selection.png's figure: a panel per experiment, each candidate's search score beside its re-evaluation."""
    n = max(len(info.tables), 1)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    for ax, (label, table) in zip(axes[0], info.tables.items()):
        if table.empty:
            ax.text(0.5, 0.5, f"{label}: no re-evaluation\n(search.select.top_k 0, or the search has not "
                    "ended)", ha="center", va="center", fontsize=9, transform=ax.transAxes)
            ax.set_axis_off()
            continue
        x = range(len(table))
        ax.scatter(x, table["val_accuracy_search"], marker="^", s=60, color="tab:orange",
                   label="in the search (best epoch, ranked on)")
        ax.errorbar(x, table["val_accuracy_reeval_mean"], yerr=table["val_accuracy_reeval_std"], fmt="o",
                    color="tab:blue", capsize=4, label="re-evaluated: mean ± std over seeds (last epoch)")
        if table["test_accuracy_mean"].notna().any():
            ax.scatter([0], table["test_accuracy_mean"].iloc[:1], marker="*", s=140, color="black",
                       label="final retrain: mean test accuracy")
        ax.set_xticks(list(x), [f"{t}{' (chosen)' if c else ''}" for t, c in zip(table["trial_id"], table["chosen"])],
                      fontsize=8, rotation=15)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{label}: the optimism gap of the top {len(table)} trials", fontsize=10)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_selection(experiments, path: str | Path) -> pd.DataFrame:
    """selection.png; returns the experiments' selection() tables in one."""
    info = selection_info(experiments)
    save_figure(draw_selection(info), Path(path))
    return info.table


def cost_curve(exp: Experiment) -> pd.DataFrame:
    """Trials in the order they ended, with the device hours spent when each ended and
    the best stage-2 validation accuracy so far. The first row (trial_id '-') is what
    was spent before any trial of the search proper: teacher, bank, phase 1."""
    ledger = exp.ledger()
    ledger = ledger[~ledger["stage"].str.startswith("reeval")]  # after the search: not on this curve
    table = trials(exp)
    by_trial = ledger.groupby("trial_id")["device_s"].sum()
    own = set(table["trial_id"]) if not table.empty else set()
    before = float(ledger[~ledger["trial_id"].isin(own)]["device_s"].sum())
    rows = [{"experiment": exp.label, "trial_id": "-", "device_hours": before / 3600, "metric": float("nan")}]
    if not table.empty:
        table = table.assign(_end=table["end_time"].fillna(float("inf"))).sort_values("_end", kind="stable")
        spent = before
        for _, t in table.iterrows():
            spent += float(by_trial.get(t["trial_id"], 0.0))
            rows.append({"experiment": exp.label, "trial_id": t["trial_id"], "device_hours": spent / 3600,
                         "metric": float(t[METRIC]) if pd.notna(t[METRIC]) else float("nan")})
    out = pd.DataFrame(rows)
    out["best_so_far"] = out["metric"].cummax()
    return out


@dataclass
class CostInfo:
    curves: dict[str, pd.DataFrame]  # cost_curve() of every experiment, in order
    device_hours: dict[str, float]  # what each spent in all, re-evaluation included

    @property
    def table(self) -> pd.DataFrame:
        return pd.concat(self.curves.values(), ignore_index=True) if self.curves else pd.DataFrame()


def cost_info(experiments) -> CostInfo:
    experiments = as_experiments(experiments)
    return CostInfo({e.label: cost_curve(e) for e in experiments},
                    {e.label: cost.totals(e.ledger())["device_hours"] for e in experiments})


def draw_cost(info: CostInfo):
    """cost.png's figure: best-so-far accuracy against device hours, one line per experiment."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (label, data) in enumerate(info.curves.items()):
        colour = plt.get_cmap("tab10")(i % 10)
        ax.step(data["device_hours"], data["best_so_far"], where="post", color=colour, linewidth=2,
                label=f"{label}: best so far ({info.device_hours[label]:.3g} device hours in all, "
                      f"re-evaluation included)")
        ax.scatter(data["device_hours"], data["metric"], s=18, color=colour, alpha=0.5)
        ax.axvline(data["device_hours"].iloc[0], color=colour, linestyle=":", linewidth=1)
    ax.set_xlabel("device hours spent (CPU or GPU hours Ray gave; dotted: teacher, bank and phase 1)")
    ax.set_ylabel("stage-2 validation accuracy")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.25)
    ax.set_title("what the search cost: best validation accuracy so far against device hours", fontsize=11)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_cost(experiments, path: str | Path) -> pd.DataFrame:
    """cost.png; returns the experiments' cost_curve() tables in one."""
    info = cost_info(experiments)
    save_figure(draw_cost(info), Path(path))
    return info.table


def main(argv: list[str] | None = None) -> int:
    args = experiments_parser("selection_cost.py", __doc__).parse_args(argv)
    experiments = open_experiments(args.experiments)
    with output_folder(args.out, args.force, experiments) as folder:
        for name, plot in (("selection", plot_selection), ("cost", plot_cost)):
            plot(experiments, folder / f"{name}.png")
    for name in ("selection", "cost"):
        print(f"wrote {Path(args.out) / f'{name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
