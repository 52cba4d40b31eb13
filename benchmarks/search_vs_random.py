#!/usr/bin/env python
"""What the search buys, against random search at the same budget (issue 32).

On an experiment file (default: the embedded default, search_spaces/digits.yaml), for
each search seed, three searches through the real driver (Ray, Optuna, the re-evaluation):

  shipped  the file's search as it is: staged, TPE, ASHA, re-evaluation of the best
  noasha   the same with ASHA off in both phases: every trial to its end (the sampler's
           share of the gain, told apart from early stopping's)
  random   a joint search over the same space, Optuna's RandomSampler, as many trials as
           the file's num_samples, every trial to its end, the same re-evaluation

and the untuned config (the file's `config:` values) run as the re-evaluation runs a trial
(its seeds, the tuning splits). It writes, in --out: runs.json (every search's curve: the
best stage-2 validation accuracy found against the device hours spent (the teacher's
pre-training left out: the teacher is given), trials in the order Optuna asked them, the
bank and phase 1 first; and its end: the chosen trial's
re-evaluated mean), table.md (median and spread over seeds) and curves.png (median curve
and its interquartile band per method, the untuned config's validation accuracy as a line),
and prints the fraction of random search's device hours at which the shipped search's
median curve first reaches random search's final median best.

    python benchmarks/search_vs_random.py --seeds 5 --out benchmarks/results/search_vs_random
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from refilled.schema.config import load_experiment
from refilled.store import cost
from refilled.store.experiments import load_trials, read_selection
from refilled.store.layout import STAGE1_SEARCH

METHODS = ("shipped", "noasha", "random")


def sections(search: dict, cfg) -> dict[str, dict]:
    """Each method's `search:` section, from the file's."""
    end1, end2 = cfg.n_training_epochs1, cfg.n_training_epochs2
    staged = search.get("staged")
    no_asha = {"grace_period": end2 if staged else end1 + end2, "reduction_factor": 3}
    out = {"shipped": dict(search),
           "noasha": {**search, "asha": no_asha}, "random": {**search, "asha": {"grace_period": end1 + end2,
                                                                                  "reduction_factor": 3},
                                                             "sampler": "random", "staged": None}}
    if staged:
        out["noasha"]["staged"] = {**staged, "asha": {"grace_period": end1, "reduction_factor": 3}}
    out["random"] = {k: v for k, v in out["random"].items() if v is not None}
    return out


def curve(folder: Path) -> dict:
    """(device hours, best stage-2 validation accuracy so far) after each trial, and the end."""
    ledger = cost.ledger(folder)
    ledger = ledger[ledger["stage"] != "pretrain"]  # the teacher is given: REFILLED reuses one, no method pays it
    trials = load_trials(folder).sort_values("number")
    spent = ledger[ledger["stage"] == "bank"]["device_s"].sum()
    if (folder / STAGE1_SEARCH).is_dir():  # phase 1 of a staged search comes first
        phase1 = set(load_trials(folder / STAGE1_SEARCH)["trial_id"].astype(str))
        spent += ledger[ledger["trial_id"].astype(str).isin(phase1)]["device_s"].sum()
    hours, best, points = spent / 3600, 0.0, []
    by_trial = ledger.groupby(ledger["trial_id"].astype(str))["device_s"].sum()
    for _, trial in trials.iterrows():
        hours += by_trial.get(str(trial["trial_id"]), 0.0) / 3600
        value = trial["best_val_accuracy_stage2"]
        best = max(best, float(value)) if value == value else best
        points.append((hours, best))
    total = cost.totals(ledger)["device_hours"]
    chosen = read_selection(folder)
    reeval = float(chosen.iloc[0]["val_accuracy_reeval_mean"]) if chosen is not None and len(chosen) else best
    return {"points": points, "device_hours": total, "best_search": best, "best_reevaluated": reeval}


def search_once(config: str, storage: str, name: str, section: dict, teacher: Path | None) -> Path:
    import ray

    from refilled.tune.search import Outcome, open_search

    cfg, _ = load_experiment(config)
    with contextlib.redirect_stdout(io.StringIO()):
        search = open_search(storage, name, cfg, section)
        if search.run(teacher=str(teacher) if teacher else None) is not Outcome.FINISHED:  # one teacher for all
            sys.exit(f"search_vs_random: {name} did not finish")
    ray.shutdown()
    return search.place.folder


def untuned(config: str, teacher: Path, seeds: list[int], out: Path) -> float:
    """The file's config values as the re-evaluation runs a trial: on the tuning splits, these seeds."""
    from refilled.runs.final_retrain import run_one

    cfg, _ = load_experiment(config)
    accs = [run_one(cfg.to_dict(), "refilled", s, str(teacher), str(out / f"seed{s}"), tuning=True)["val_accuracy"]
            for s in seeds]
    return statistics.fmean(accs)


def median_curve(curves: list[list[tuple[float, float]]], grid: np.ndarray) -> tuple[np.ndarray, ...]:
    """The best-so-far of each search at each budget of `grid` (nan before its first trial ends),
    and the median and quartiles over searches."""
    values = np.full((len(curves), len(grid)), np.nan)
    for i, points in enumerate(curves):
        hours = np.array([h for h, _ in points])
        best = np.array([b for _, b in points])
        index = np.searchsorted(hours, grid, side="right") - 1
        values[i] = np.where(index >= 0, best[np.clip(index, 0, None)], np.nan)
    with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", RuntimeWarning)
        return (np.nanmedian(values, axis=0), np.nanpercentile(values, 25, axis=0),
                np.nanpercentile(values, 75, axis=0))


def draw(runs: dict, line: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(r["device_hours"] for method in runs.values() for r in method)
    grid = np.linspace(0, top, 200)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, color in zip(METHODS, ("C0", "C1", "C2")):
        mid, low, high = median_curve([r["points"] for r in runs[method]], grid)
        ax.plot(grid, mid, color=color, label=f"{method} (median of {len(runs[method])} seeds)")
        ax.fill_between(grid, low, high, color=color, alpha=0.2)
        ends = [(r["device_hours"], r["best_reevaluated"]) for r in runs[method]]
        ax.scatter(*zip(*ends), color=color, marker="x", s=20)
    ax.axhline(line, color="k", linestyle=":", label="untuned config (re-evaluated)")
    ax.set_xlabel("device hours spent")
    ax.set_ylabel("best stage-2 validation accuracy so far")
    ax.set_title("crosses: the chosen trial's re-evaluated mean, at the search's total cost", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(runs: dict, line: float) -> tuple[str, float | None]:
    rows = ["| method | searches | device hours: median (min-max) | best search accuracy: median | "
            "re-evaluated: median (min-max) |", "|---|---|---|---|---|"]
    for method in METHODS:
        rs = runs[method]
        hours = [r["device_hours"] for r in rs]
        reeval = [r["best_reevaluated"] for r in rs]
        rows.append(f"| {method} | {len(rs)} | {statistics.median(hours):.3f} ({min(hours):.3f}-{max(hours):.3f}) | "
                    f"{statistics.median(r['best_search'] for r in rs):.4f} | {statistics.median(reeval):.4f} "
                    f"({min(reeval):.4f}-{max(reeval):.4f}) |")
    rows.append(f"| untuned config | - | - | - | {line:.4f} |")
    top = max(r["device_hours"] for method in runs.values() for r in method)
    grid = np.linspace(0, top, 2000)
    random_end = statistics.median(r["best_search"] for r in runs["random"])
    random_hours = statistics.median(r["device_hours"] for r in runs["random"])
    shipped, _, _ = median_curve([r["points"] for r in runs["shipped"]], grid)
    reached = np.flatnonzero(shipped >= random_end)
    fraction = float(grid[reached[0]] / random_hours) if len(reached) else None
    return "\n".join(rows), fraction


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="search_spaces/digits.yaml")
    p.add_argument("--seeds", type=int, default=5, help="search seeds per method (search.seed 0..N-1)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="benchmarks/results/search_vs_random")
    p.add_argument("--teacher", type=Path, help="the file's teacher, pretrained before (e.g. an earlier call's); "
                                                 "default: the first search pretrains it")
    args = p.parse_args()
    cfg, experiment = load_experiment(args.config)
    plans = sections(experiment["search"], cfg)
    methods = [m for m in args.methods.split(",") if m in plans]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "runs.json"
    runs: dict[str, list] = json.loads(saved.read_text()) if saved.is_file() else {}  # resumable, run by run
    storage = tempfile.mkdtemp(prefix="search-vs-random-")
    teacher = args.teacher
    for seed in range(args.seeds):
        for method in methods:
            done = runs.setdefault(method, [])
            if any(r["seed"] == seed for r in done):
                continue
            folder = search_once(args.config, storage, f"{method}-{seed}", {**plans[method], "seed": seed}, teacher)
            teacher = teacher or folder / "teacher.pt"
            done.append({"seed": seed, **curve(folder)})
            saved.write_text(json.dumps(runs, indent=1))
            print(f"{method} seed {seed}: {done[-1]['device_hours']:.3f} device hours, best "
                  f"{done[-1]['best_search']:.4f}, re-evaluated {done[-1]['best_reevaluated']:.4f}", flush=True)
    if "untuned" not in runs:
        if teacher is None:
            sys.exit("search_vs_random: no search ran in this call to take the teacher from; delete runs.json")
        seeds = [cfg.seed + 1 + i for i in range(experiment["search"].get("select", {}).get("seeds", 3))]
        runs["untuned"] = untuned(args.config, teacher, seeds, Path(storage) / "untuned")
        saved.write_text(json.dumps(runs, indent=1))
    line = runs["untuned"]
    table, fraction = summary({m: runs[m] for m in METHODS}, line)
    said = ("never reaches it" if fraction is None else
            f"reaches it at {fraction:.0%} of random search's median device hours")
    text = (f"{args.config}, search seeds 0-{args.seeds - 1} (the searches column: how many ran)\n\n{table}\n\n"
            f"The shipped search's median curve {said} (random search's final median best stage-2 validation accuracy).\n")
    (out / "table.md").write_text(text)
    draw({m: runs[m] for m in METHODS}, line, out / "curves.png")
    print(text)


if __name__ == "__main__":
    main()
