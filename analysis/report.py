#!/usr/bin/env python
"""One report of one or more tune-refilled experiments: tables, plots, final retrain.

Writes into --out: trials.csv/.md (leaderboard), experiments.csv/.md (with
several experiments), curves.png, params.png, importance.png, efficiency.png,
selection.png (the optimism gap), cost.png (accuracy against device hours),
importance.csv, selection.csv, cost.csv, each experiment's best_config.yaml and final retrain summary
(<exp>/retrain/results.json + summary.md, when `retrain` has run), and
index.md that links and embeds them all (relative links: the folder can be
moved or published as is).

examples:
  python analysis/report.py experiments/digits --out reports/digits
  python analysis/report.py experiments/digits experiments/digits-wide --out reports/both
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.common import (
    experiments_parser,
    markdown_table,
    note_left_out,
    open_experiments,
    output_folder,
    run_cli,
    save_figure,
)
from analysis.compare_trials import experiment_summary, leaderboard, write_tables
from analysis.plot_trials import PLOTS
from analysis.selection_cost import draw_selection, plot_cost, selection_info
from refilled.errors import UserError
from refilled.store import cost
from refilled.store import study as study_store
from refilled.store.experiments import STATUSES, read_best_config, read_retrain, say_once, trial_folders
from refilled.store.layout import BEST_CONFIG, EXPERIMENT_FILE, RETRAIN_DIR, RETRAIN_RESULTS, RETRAIN_SUMMARY, STAGE1_SEARCH

SHOWN = ["experiment", "rank", "trial_id", "status", "stopped_at", "epochs"]  # + searched params + metrics
TOP = 10
PLOT_TEXT = {
    "curves": ("Validation accuracy of every trial",
               "Stage 1 (NCM accuracy of the embedding) then stage 2 (the classifier), over steps; the blue line "
               "is the stage boundary, dotted lines the steps where ASHA stopped trials (its rungs); grey dashed "
               "trials were stopped by ASHA "
               "(x where they stopped); black is the best trial."),
    "params": ("Searched parameters against the final metric",
               "Each trial's best stage-2 validation accuracy against its value of each searched parameter "
               "(log axes where the space is log); hollow: stopped by ASHA; star: the best trial."),
    "importance": ("Parameter importance",
                   "Optuna's fANOVA importance of each parameter for the stage-2 validation accuracy (it sums to "
                   "1), fitted on every trial that reached the deepest step at least 8 trials reached: the "
                   "finished ones, or an ASHA rung with the trials stopped there; error bars: the spread over 5 "
                   "fANOVA seeds."),
    "rungs": ("What ASHA's rungs can tell apart",
              "Spearman rank correlation of each trial's validation accuracy at an ASHA rung with its accuracy at "
              "the next rung, at the end, and with the re-evaluated means, over the trials that reached both "
              "(n on each bar). A rung is only worth what it ranks: below 0.5 (red line) it stops trials on "
              "noise; move it later (search.asha.rungs) or evaluate with bn_stats: precise, and measure it with "
              "benchmarks/rung_fidelity.py."),
    "efficiency": ("Search efficiency",
                   "Best stage-2 validation accuracy found so far against the epochs the search had spent, "
                   "trials in the order they ended."),
}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _command(*args: Any) -> str:
    """A command of tune_refilled.py as a shell takes it (every argument quoted as it needs)."""
    return shlex.join(["python", "tune_refilled.py", *map(str, args)])


def _retrain_section(exp, folder: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Copy the retrain summary into the report; the markdown lines that show it."""
    try:
        results = read_retrain(exp.folder, exp.location or None)
    except UserError as e:
        note_left_out(e, "the final retrain is left out")
        return [f"The final retrain of {exp.label} is left out: its {RETRAIN_DIR}/{RETRAIN_RESULTS} is damaged "
                f"(run `{_command('retrain', '--experiment', exp.location or exp.folder, '--force')}` "
                f"again).", ""], None
    if results is None:
        return [f"No final retrain yet for {exp.label}: `{_command('retrain', '--experiment', exp.folder)}`, "
                "then run this report again.", ""], None
    target = folder / RETRAIN_DIR / _slug(exp.label)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(exp.folder / RETRAIN_DIR / RETRAIN_RESULTS, target / RETRAIN_RESULTS)
    lines = []
    summary = exp.folder / RETRAIN_DIR / RETRAIN_SUMMARY
    try:
        body = summary.read_bytes().decode("utf-8").splitlines() if summary.is_file() else None
    except (OSError, UnicodeDecodeError):
        note_left_out(UserError(f"{exp.location or exp.folder}/{RETRAIN_DIR}/{RETRAIN_SUMMARY} is damaged"),
                      f"the report links {RETRAIN_RESULTS} alone")
        lines += [f"The summary of the final retrain of {exp.label} is damaged ({RETRAIN_SUMMARY}); its results "
                  f"are whole in {RETRAIN_RESULTS}."]
        body = None
    if body is not None:
        shutil.copyfile(summary, target / RETRAIN_SUMMARY)
        lines += [line for line in body if not line.startswith("# ")]
    rel = target.relative_to(folder).as_posix()
    lines += ["", f"Files: [results.json]({rel}/results.json)" +
              (f", [summary.md]({rel}/summary.md)" if body is not None else ""), ""]
    return lines, results


def make_report(experiments, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write the report into `out`. Returns {"index": path of index.md, "trials": the
    leaderboard, "experiments": the per-experiment summary, "importance": importances,
    and one DataFrame per plot under its name}."""
    experiments = open_experiments(experiments if not isinstance(experiments, (str, Path)) else [experiments])
    with output_folder(out, force, experiments) as folder:
        made = _write_report(experiments, folder)
    made["index"] = Path(out).expanduser() / "index.md"
    return made


def _no_trials(experiments) -> UserError:
    """What a report of experiments without a trial it can read says."""
    unread = [e.label for e in experiments if trial_folders(e.folder)]
    if unread:
        return UserError(f"no trial of {', '.join(unread)} can be read (the notes above say why): restore them "
                         "from a backup, then run this report again")
    return UserError(f"{', '.join(e.label for e in experiments)} has no trials yet: run or resume its search "
                     "(`python tune_refilled.py search ...`), then run this report again")


def _phase1_missing(experiments) -> list[str]:
    """Lines that say which staged searches lack their phase 1 (stage1_search/), said once on stderr too:
    their phase-1 trials and what they cost are left out of the report."""
    lines = []
    for exp in experiments:
        if exp.staged and not (exp.folder / STAGE1_SEARCH / EXPERIMENT_FILE).is_file():
            line = (f"phase 1 of {exp.label} ({STAGE1_SEARCH}/) is missing: its trials and what they cost are left "
                    "out of this report (restore it from a backup)")
            say_once(f"note: {line}")
            lines.append(f"- **{line[0].upper()}{line[1:]}.**")
    return lines + [""] if lines else []


def _write_report(experiments, folder: Path) -> dict[str, Any]:
    board = leaderboard(experiments)
    if board.empty:
        raise _no_trials(experiments)
    missing = _phase1_missing(experiments)
    selected = selection_info(experiments)  # before any figure: a damaged selection.csv is refused at once
    summary = experiment_summary(experiments)
    write_tables(board, folder, summary if len(experiments) > 1 else None)
    made: dict[str, Any] = {"trials": board, "experiments": summary}
    for name, plot in PLOTS.items():
        made[name] = plot(experiments, folder / f"{name}.png")
    importance = made["importance"]
    if not importance.empty:
        importance.to_csv(folder / "importance.csv", index=False)
    save_figure(draw_selection(selected), folder / "selection.png")
    made["selection"] = selected.table
    made["cost"] = plot_cost(experiments, folder / "cost.png")
    if not made["selection"].empty:
        made["selection"].to_csv(folder / "selection.csv", index=False)
    ledgers = pd.concat([e.ledger().assign(experiment=e.label) for e in experiments], ignore_index=True)
    ledgers.to_csv(folder / "cost.csv", index=False)

    labels = ", ".join(e.label for e in experiments)
    lines = [f"# tune-refilled report: {labels}", "",
             f"Made {time.strftime('%Y-%m-%d %H:%M')} by `python analysis/report.py` from:", ""]
    for exp, row in zip(experiments, summary.to_dict("records")):
        statuses = ", ".join(f"{row[s]} {s}" for s in STATUSES if row.get(s))
        lines.append(f"- **{exp.label}** (`{exp.folder}`): {row['trials']} trials ({statuses}), "
                     f"{row['total_epochs']} epochs run of {row['epochs_without_asha']} without ASHA; "
                     f"best stage-2 validation accuracy {_pct(row['best_val_accuracy_stage2'])} "
                     f"(trial {row['best_trial'] or '-'})")
    lines.append("")
    lines += missing

    lines += _selection_section(experiments, made["selection"])
    lines += _cost_section(experiments, ledgers)

    lines += ["## Final retrain: tuned REFILLED against the untuned one and the student alone", "",
              "The best configuration retrained with the full epoch budget (on train + validation, or on "
              "the shots the search tuned, as each summary says), tested once on the test split with the "
              "model training ended with; beside it, with the same seeds, REFILLED at the experiment's own "
              "config values (what the search bought) and the student alone (what REFILLED bought).", ""]
    for exp in experiments:
        if len(experiments) > 1:
            lines += [f"### {exp.label}", ""]
        retrain_lines, _ = _retrain_section(exp, folder)
        lines += retrain_lines
        try:
            best_cfg = read_best_config(exp.folder, exp.location or None)
        except UserError as e:
            note_left_out(e, "the report leaves it out")
            lines += [f"The best configuration of {exp.label} is left out: its {BEST_CONFIG} is damaged.", ""]
            best_cfg = None
        if best_cfg is not None:
            target = folder / "best_config" / f"{_slug(exp.label)}.yaml"
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(exp.folder / BEST_CONFIG, target)
            lines += [f"Best configuration of the search: [{target.name}]({target.relative_to(folder).as_posix()})",
                      ""]

    if len(experiments) > 1:
        lines += ["## Experiments side by side", "", markdown_table(summary),
                  "Files: [experiments.md](experiments.md), [experiments.csv](experiments.csv)", ""]

    params = [c for c in board.columns if any(c in e.space for e in experiments)]
    metrics = ["best_val_accuracy_stage2", "last_val_accuracy_stage2", "best_val_ncm_stage1", "wall_time_s"]
    top = board[[c for c in SHOWN + params + metrics if c in board.columns]].head(TOP)
    lines += ["## Leaderboard", "", f"The {min(TOP, len(board))} best of {len(board)} trials by stage-2 "
              "validation accuracy (all of them: [trials.md](trials.md), [trials.csv](trials.csv)).", "",
              markdown_table(top)]

    for name, (title, text) in PLOT_TEXT.items():
        lines += [f"## {title}", "", text, "", f"![{title}]({name}.png)", ""]
        if name == "importance":
            if importance.empty:
                lines += ["No importance: too few trials reached the same step (fANOVA needs 8); the plot "
                          "says how many did.", ""]
            else:
                lines += [markdown_table(importance, digits=3), "File: [importance.csv](importance.csv)", ""]
        if name == "rungs" and not made["rungs"].empty:
            from refilled.store.rung_fidelity import correlation_lines

            lines += [markdown_table(made["rungs"], digits=2)]
            weak = [f"{e.label}: {line.strip()}" for e in experiments
                    for line in correlation_lines(made["rungs"][made["rungs"]["experiment"] == e.label]
                                                  .to_dict("records"), e.config.bn_stats) if "<- weak" in line]
            lines += [f"- **warning**: {w}" for w in weak] + [""]

    lines += ["## Browse further", ""]
    for exp in experiments:
        lines += [f"- {exp.label}: `{shlex.join(['tensorboard', '--logdir', str(exp.folder)])}` (every trial's "
                  "scalars; the HParams tab "
                  f"lists the searched parameters with each trial's last reported metrics), "
                  f"`{study_store.dashboard(exp.folder)}`"]
    index = folder / "index.md"
    index.write_text("\n".join(lines) + "\n")
    made["index"] = index
    return made


def _selection_section(experiments, selection: pd.DataFrame) -> list[str]:
    """The optimism gap: each candidate's search score beside its re-evaluated one, and
    for the retrained winner the search, re-evaluated and final test scores."""
    lines = ["## Choosing the winner: the optimism gap", "",
             "The search keeps the best of many noisy validation scores, so the winner's score is optimistic. "
             "The top trials ran again on the tuning splits with more seeds; the best mean won "
             "(`search.select`). Search score: the best epoch's validation accuracy, which the search ranked on; "
             "re-evaluated: the validation accuracy each run ended with, mean ± std over the seeds.", ""]
    if selection.empty:
        return lines + ["No re-evaluation in these experiments (search.select.top_k 0, or the search has not "
                        "ended).", ""]
    shown = selection[["experiment", "trial_id", "chosen", "val_accuracy_search", "val_accuracy_reeval_mean",
                       "val_accuracy_reeval_std", "seeds"]]
    lines += [markdown_table(shown), "![the optimism gap](selection.png)", ""]
    for _, row in selection[selection["chosen"]].iterrows():
        test = row["test_accuracy_mean"]
        lines.append(f"- **{row['experiment']}**, winner {row['trial_id']}: {_pct(row['val_accuracy_search'])} in "
                     f"the search, {_pct(row['val_accuracy_reeval_mean'])} re-evaluated (gap "
                     f"{(row['val_accuracy_search'] - row['val_accuracy_reeval_mean']) * 100:+.2f} points), "
                     + (f"{_pct(test)} on test after the final retrain." if pd.notna(test) else
                        "no final retrain of it yet."))
    return lines + ["", "Files: [selection.csv](selection.csv)", ""]


def _cost_section(experiments, ledgers: pd.DataFrame) -> list[str]:
    lines = ["## What the search cost", "",
             "Device hours: wall hours times the CPUs or GPUs Ray gave each run (a quarter GPU for an hour is "
             "0.25); teacher pre-training, the teacher bank, every trial by stage, and the re-evaluation "
             "([cost.csv](cost.csv)).", ""]
    rows = []
    for exp in experiments:
        mine = ledgers[ledgers["experiment"] == exp.label]
        spent = cost.totals(mine)
        rows.append({"experiment": exp.label, "device_hours": spent["device_hours"],
                     **{k: v for k, v in spent.items() if k not in ("device_hours", "wall_hours")},
                     "reeval_device_hours": float(mine[mine["stage"].str.startswith("reeval")]["device_s"].sum())
                     / 3600, "wall_hours": spent["wall_hours"]})
    return lines + [markdown_table(pd.DataFrame(rows), digits=3), "![accuracy against device hours](cost.png)", ""]


def _pct(v) -> str:
    return "-" if v is None or pd.isna(v) else f"{v:.2%}"


def build_parser() -> argparse.ArgumentParser:
    p = experiments_parser("report.py", __doc__)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    made = make_report(args.experiments, args.out, args.force)
    print(f"wrote {made['index']} (open it in a markdown viewer; plots and tables beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
