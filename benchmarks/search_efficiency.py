#!/usr/bin/env python
"""Search efficiency on the embedded default: ASHA + TPE vs every trial at full budget.

Runs the same Optuna TPE search (same space, seed and number of trials) on
this machine with real Ray:
  full    a joint search, ASHA off (grace period = all epochs): every trial runs to the end
  asha40  a joint search, ASHA grace period 40 (stage-2 epoch 10 on digits), factor 3
  asha10  a joint search, ASHA grace period 10, factor 3
  staged  a staged search (`search.staged`): phase 1 searches the stage-1 keys
          with stage-1-only trials ranked by validation NCM accuracy, phase 2
          the stage-2 keys from the chosen embedding; the experiment file's
          staged and asha settings when it has `staged:`, else --staged-*
and prints, for each, the best stage-2 validation accuracy (the search's
choice), the epochs its trials computed (phase 1's included; not stage-1
epochs replayed from the stage-1 cache), and both as ratios to `full`.
Target (issue 5): at least 99% of the full-budget best with at most a third
of its epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time

from refilled.schema.config import load_experiment
from refilled.store.experiments import best_trial, load_trials
from refilled.store.layout import STAGE1_SEARCH


def run(config: str, storage: str, name: str, num_samples: int, asha: dict, staged: dict | None = None,
        seed: int | None = None, start_with: str | None = None) -> tuple[float, int, float, int]:
    import ray

    from refilled.tune.search import Outcome, open_search

    cfg, experiment = load_experiment(config)
    section = {**experiment["search"], "num_samples": num_samples, "asha": asha, "staged": staged}
    if seed is not None:
        section["seed"] = seed
    if start_with is not None:
        section["start_with"] = start_with
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        search = open_search(storage, name, cfg, section)
        if search.run() is not Outcome.FINISHED:
            sys.exit(f"search_efficiency: the search {name} did not finish")
        folder = search.place.folder
    ray.shutdown()
    trials = load_trials(folder)
    epochs = int(trials["epochs_run"].sum())
    if staged:
        epochs += int(load_trials(folder / STAGE1_SEARCH)["epochs_run"].sum())
    return float(best_trial(trials)["best_val_accuracy_stage2"]), epochs, time.time() - start, len(trials)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="search_spaces/digits.yaml")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--staged-samples", type=int, default=8,
                   help="phase-1 trials of the staged variant when the file has no staged: (default 8)")
    p.add_argument("--staged-grace", type=int, default=5,
                   help="ASHA grace period of both phases of the staged variant when the file has no staged:, "
                        "in epochs of the phase's stage (default 5)")
    p.add_argument("--seed", type=int, help="Optuna's seed (search.seed; default: the experiment file's)")
    p.add_argument("--start-with", choices=["config", "authors", "none"],
                   help="search.start_with for every variant (default: the experiment file's); none: TPE "
                        "proposes every trial, the file's config is not queued first")
    p.add_argument("--variants", default="full,asha40,asha10,staged", help="comma-separated subset to run")
    args = p.parse_args()
    cfg, experiment = load_experiment(args.config)
    total = cfg.n_training_epochs1 + cfg.n_training_epochs2
    staged = experiment["search"].get("staged")
    if staged:
        phase2 = experiment["search"].get("asha", {})
    else:
        staged = {"num_samples": args.staged_samples, "asha": {"grace_period": args.staged_grace, "reduction_factor": 3}}
        phase2 = {"grace_period": args.staged_grace, "reduction_factor": 3}
    variants = {"full": {"grace_period": total, "reduction_factor": 3},
                "asha40": {"grace_period": 40, "reduction_factor": 3},
                "asha10": {"grace_period": 10, "reduction_factor": 3},
                "staged": phase2}
    chosen = args.variants.split(",")
    if "full" not in chosen:
        sys.exit("--variants must include full (the others are compared to it)")
    variants = {k: v for k, v in variants.items() if k in chosen}
    with tempfile.TemporaryDirectory() as storage:
        rows = {name: run(args.config, storage, name, args.num_samples, asha, staged if name == "staged" else None,
                          args.seed, args.start_with)
                for name, asha in variants.items()}
    best_full, epochs_full = rows["full"][0], rows["full"][1]
    print(f"{args.config}: {args.num_samples} TPE trials, {total} epochs each at full budget; staged: "
          f"{staged['num_samples']} stage-1 trials ({cfg.n_training_epochs1} epochs, ASHA {staged.get('asha')}) "
          f"then {args.num_samples} stage-2 trials ({cfg.n_training_epochs2} epochs)")
    print(f"search seed {args.seed if args.seed is not None else experiment['search'].get('seed', 0)}, "
          f"start_with {args.start_with or experiment['search'].get('start_with', 'authors')}")
    print(f"{'variant':8} {'ASHA':>36} {'best val acc':>12} {'vs full':>8} {'epochs':>7} {'vs full':>8} {'wall s':>7}")
    for name, (best, epochs, wall, n) in rows.items():
        asha = variants[name]
        label = f"grace {asha.get('grace_period')}, factor {asha.get('reduction_factor')}"
        label += " (phase 2)" if name == "staged" else ""
        print(f"{name:8} {label:>36} {best:12.4f} {best / best_full:8.1%} {epochs:7d} "
              f"{epochs / epochs_full:8.1%} {wall:7.0f}")


if __name__ == "__main__":
    main()
