#!/usr/bin/env python
"""Search efficiency on the embedded default: ASHA + TPE vs every trial at full budget.

Runs the same Optuna TPE search (same space, seed and number of trials) three
times on this machine with real Ray:
  full    ASHA off (grace period = all epochs): every trial runs to the end
  asha    the experiment file's ASHA settings
  asha10  an aggressive ASHA (grace period 10, reduction factor 3)
and prints, for each, the best stage-2 validation accuracy (the search's
choice), the total epochs the trials ran, and both as ratios to `full`.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refilled.config import load_experiment  # noqa: E402
from refilled.experiments import best_trial, load_trials  # noqa: E402


def run(config: str, storage: str, name: str, num_samples: int, asha: dict) -> tuple[float, int, float, int]:
    import ray

    from refilled.tune.search import run_search

    cfg, experiment = load_experiment(config)
    section = {**experiment["search"], "num_samples": num_samples, "asha": asha}
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        folder = run_search(cfg, section, name=name, storage_location=storage, address=None, resume=False, teacher=None)
    ray.shutdown()
    trials = load_trials(folder)
    return float(best_trial(trials)["best_val_accuracy_stage2"]), int(trials["epochs"].sum()), time.time() - start, len(trials)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="search_spaces/digits.yaml")
    p.add_argument("--num-samples", type=int, default=16)
    args = p.parse_args()
    cfg, experiment = load_experiment(args.config)
    total = cfg.n_training_epochs1 + cfg.n_training_epochs2
    variants = {"full": {"grace_period": total, "reduction_factor": 3},
                "asha": experiment["search"].get("asha", {}),
                "asha10": {"grace_period": 10, "reduction_factor": 3}}
    with tempfile.TemporaryDirectory() as storage:
        rows = {name: run(args.config, storage, name, args.num_samples, asha) for name, asha in variants.items()}
    best_full, epochs_full = rows["full"][0], rows["full"][1]
    print(f"{args.config}: {args.num_samples} TPE trials, {total} epochs each at full budget")
    print(f"{'variant':8} {'ASHA':>26} {'best val acc':>12} {'vs full':>8} {'epochs':>7} {'vs full':>8} {'wall s':>7}")
    for name, (best, epochs, wall, n) in rows.items():
        print(f"{name:8} {str(variants[name]):>26} {best:12.4f} {best / best_full:8.1%} {epochs:7d} "
              f"{epochs / epochs_full:8.1%} {wall:7.0f}")


if __name__ == "__main__":
    main()
