#!/usr/bin/env python
"""Leaderboard of the trials of one or more tune-refilled experiments.

One row per trial: experiment, trial id, status (finished; stopped by ASHA,
with `stopped_at` the rung step it ended at; diverged; errored), epochs run,
the searched values, best and last validation accuracy of each stage (stage 1:
NCM, stage 2: classifier) and wall time. Written as trials.csv and trials.md;
with several experiments also a per-experiment summary, experiments.csv/.md.

examples:
  python analysis/compare_trials.py experiments/digits --out reports/digits
  python analysis/compare_trials.py experiments/digits experiments/digits-wide --out reports/both
  python analysis/compare_trials.py experiments/digits --filter "status == 'finished'" --sort lambd --top 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pandas as pd

from analysis.common import (
    METRIC,
    Experiment,
    all_trials,
    as_experiments,
    best,
    experiments_parser,
    markdown_table,
    open_experiments,
    output_folder,
    retrain_results,
    run_cli,
)
from refilled.errors import UserError
from refilled.runs.final_retrain import GAINS, RUN_KINDS
from refilled.store.experiments import STATUSES, in_rank_order
from refilled.store.layout import TRIALS_FILE

# Column order of the leaderboard: FIRST, the searched values, METRICS, LAST.
FIRST = ["experiment", "rank", "trial_id", "status", "stopped_at", "epochs", "total_epochs"]
METRICS = ["best_val_accuracy_stage2", "last_val_accuracy_stage2", "best_val_ncm_stage1", "last_val_ncm_stage1"]
LAST = ["wall_time_s", "diverged_reason", "trial", "folder"]


def _searched(experiments: list[Experiment]) -> list[str]:
    names: list[str] = []
    for e in experiments:
        names += [p for p in e.searched if p not in names]
    return names


def leaderboard(experiments, sort: str | list[str] | None = None, ascending: bool = False,
                filter: str | None = None, top: int | None = None) -> pd.DataFrame:
    """All trials of the experiments (folders or Experiment objects), best first.

    sort: column name(s) (default: the search's ranking, refilled.store.experiments.RANKING:
    best stage-2 validation accuracy, ties broken by the last stage-2 and the best stage-1
    accuracy); ascending: sort order;
    filter: a pandas query, e.g. "status == 'finished' and lambd > 1";
    top: keep the first N rows after sorting and filtering.
    """
    experiments = as_experiments(experiments)
    table = all_trials(experiments)
    if table.empty:
        return table
    table["rank"] = in_rank_order(table).groupby("experiment", sort=False).cumcount().add(1).reindex(table.index)
    params = _searched(experiments)
    columns = FIRST + [p for p in params if p in table.columns] + METRICS + LAST
    table = table[[c for c in columns if c in table.columns]]
    if filter:
        try:
            table = table.query(filter)
        except Exception as e:  # pandas raises many kinds: all are a bad --filter
            raise UserError(f"--filter {filter!r} failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                            f"columns: {', '.join(table.columns)}") from None
    keys = [sort] if isinstance(sort, str) else list(sort or [])
    keys = [k.strip() for key in keys for k in key.split(",") if k.strip()]
    unknown = [k for k in keys if k not in table.columns]
    if unknown:
        raise UserError(f"--sort {unknown[0]}: no such column; columns: {', '.join(table.columns)}")
    if keys:
        table = table.sort_values(keys, ascending=ascending, na_position="last", kind="stable")
    else:
        table = in_rank_order(table)
    if top is not None:
        if top < 1:
            raise UserError(f"--top must be >= 1, got {top}")
        table = table.head(top)
    return table.reset_index(drop=True)


def experiment_summary(experiments) -> pd.DataFrame:
    """One row per experiment: trials per status, best and median stage-2 validation
    accuracy (over trials that reached stage 2), the best trial (analysis.common.best: the
    search's ranking, which never chooses a diverged trial), epochs run in all,
    trial time (sum over trials) and wall time (first start to last end), the config
    keys that differ between the experiments, and the retrain's test accuracy if any."""
    experiments = as_experiments(experiments)
    configs = [e.config.to_dict() for e in experiments]
    differing = [k for k in configs[0] if len({repr(c.get(k)) for c in configs}) > 1] if len(configs) > 1 else []
    differing = [k for k in differing if k not in ("seed",)] + (["seed"] if "seed" in differing else [])
    rows = []
    for exp, cfg in zip(experiments, configs):
        table = all_trials([exp])
        counts = table["status"].value_counts() if not table.empty else pd.Series(dtype=int)
        reached = table[table[METRIC].notna()] if not table.empty else table
        top = best(table)
        starts = table["start_time"].dropna() if not table.empty else []
        ends = table["end_time"].dropna() if not table.empty else []
        row = {"experiment": exp.label, "trials": len(table),
               **{s: int(counts.get(s, 0)) for s in STATUSES if s != "running" or counts.get(s, 0)},
               "reached_stage2": len(reached),
               "best_val_accuracy_stage2": float(top[METRIC]) if top is not None else None,
               "median_val_accuracy_stage2": float(statistics.median(reached[METRIC])) if len(reached) else None,
               "best_trial": top["trial_id"] if top is not None else None,
               # what the search computed: phase 1 of a staged search included, cache replays not
               "total_epochs": exp.stage1_search_epochs
               + (int(table["epochs_run"].sum()) if not table.empty else 0),
               "epochs_without_asha": len(table) * exp.total_epochs,
               "trial_time_s": float(table["wall_time_s"].fillna(0).sum()) if not table.empty else 0.0,
               "wall_time_s": float(max(ends) - min(starts)) if len(starts) and len(ends) else None,
               **{k: cfg[k] if not isinstance(cfg[k], (list, tuple)) else str(list(cfg[k])) for k in differing}}
        final = retrain_results(exp)
        if final:
            for kind in RUN_KINDS:  # an earlier retrain ran two of them
                if kind in final:
                    row[f"test_{kind}_mean"] = final[kind]["mean"]
                    row[f"test_{kind}_std"] = final[kind]["std"]
            for name, _, _ in GAINS:  # over the student alone; over the untuned config (the search's)
                if name in final:
                    row[f"test_{name}"] = final[name]
                    row[f"test_{name}_se"] = final.get(f"{name}_se")
        rows.append(row)
    return pd.DataFrame.from_records(rows)


def write_tables(board: pd.DataFrame, folder: Path, summary: pd.DataFrame | None = None) -> list[Path]:
    """trials.csv and trials.md (and experiments.csv/.md with a summary) in `folder` (output_folder's)."""
    written = [folder / TRIALS_FILE, folder / "trials.md"]
    board.to_csv(written[0], index=False)
    shown = board.drop(columns=[c for c in ("folder", "trial", "diverged_reason") if c in board.columns])
    if "diverged_reason" in board.columns and board["diverged_reason"].notna().any():
        shown = shown.assign(diverged_reason=board["diverged_reason"])
    title = "# Trials\n\n" + _legend() + "\n"
    written[1].write_text(title + markdown_table(shown.rename(columns=_short)))
    if summary is not None:
        summary.to_csv(folder / "experiments.csv", index=False)
        (folder / "experiments.md").write_text("# Experiments\n\n" + markdown_table(summary))
        written += [folder / "experiments.csv", folder / "experiments.md"]
    return written


def _short(column: str) -> str:
    return {"best_val_accuracy_stage2": "best val acc (stage 2)", "last_val_accuracy_stage2": "last val acc (stage 2)",
            "best_val_ncm_stage1": "best val NCM (stage 1)", "last_val_ncm_stage1": "last val NCM (stage 1)",
            "wall_time_s": "time (s)", "stopped_at": "stopped at", "total_epochs": "of"}.get(column, column)


def _legend() -> str:
    return ("Status: *finished* ran every epoch; *stopped* was ended by ASHA at the step in "
            "*stopped at* (a rung); *diverged* hit a non-finite loss; *errored* raised. "
            "Accuracies are on the validation split (tuning), stage 1 by nearest class mean.\n")


def build_parser() -> argparse.ArgumentParser:
    p = experiments_parser("compare_trials.py", __doc__)
    p.add_argument("--sort", metavar="COLUMN[,COLUMN]", help="sort by these columns (default: best stage-2 "
                                                             "validation accuracy), descending unless --ascending")
    p.add_argument("--ascending", action="store_true", help="sort ascending")
    p.add_argument("--filter", metavar="QUERY", help="pandas query on the columns, e.g. \"status == 'finished'\" "
                                                     "(searched values are columns: \"lambd > 1\")")
    p.add_argument("--top", type=int, metavar="N", help="keep the first N rows (after --filter and --sort)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    experiments = open_experiments(args.experiments)
    board = leaderboard(experiments, sort=args.sort, ascending=args.ascending, filter=args.filter, top=args.top)
    summary = experiment_summary(experiments) if len(experiments) > 1 else None
    with output_folder(args.out, args.force, experiments) as folder:
        written = [Path(args.out) / path.relative_to(folder) for path in write_tables(board, folder, summary)]
    shown = board.drop(columns=["folder", "trial", "diverged_reason"], errors="ignore")
    with pd.option_context("display.max_rows", 200, "display.width", 200, "display.float_format", "{:.4g}".format):
        print(shown.to_string(index=False, na_rep="-") if not shown.empty else "no trial matches")
        if summary is not None:
            print()
            print(summary.to_string(index=False, na_rep="-"))
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
