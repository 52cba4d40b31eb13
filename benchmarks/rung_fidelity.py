#!/usr/bin/env python
"""Rung fidelity: does validation at an early epoch rank trials as the end does?

Runs a search of an experiment file on this machine with real Ray, with N trials
(phase 2's, for a staged search) and no early stopping (every trial runs to its
last epoch; phase 1 of a staged search as the file says), then prints, for each
candidate rung epoch, Spearman's rank correlation between the trials' validation
accuracy there and at the end, over the trials. The file's own rungs are marked;
the first of them (its grace period) is the one ASHA stops most trials at.
ASHA is only worth what its rungs can tell apart (docs/search.md): a rung whose
correlation with the end is low stops the trials that would have won.

Writes rung_fidelity.csv and rung_fidelity.png next to the search's experiment.

examples:
  python benchmarks/rung_fidelity.py --config search_spaces/digits.yaml --trials 12
  python benchmarks/rung_fidelity.py --config search_spaces/digits.yaml --trials 12 --set bn_stats=running
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import tempfile
import time
from pathlib import Path

from refilled.errors import UserError
from refilled.schema.config import from_dict, load_experiment, parse_overrides
from refilled.schema.rungs import counted_epochs
from refilled.schema.search import parse_search
from refilled.store.rung_fidelity import correlations, experiment_curves


def fidelity(curves: dict[str, dict[int, float]], end: int, epochs: list[int]) -> list[dict]:
    """Spearman of each epoch in `epochs` with the end, over the trials that reached both: each
    epoch taken as the one rung of refilled.store.rung_fidelity.correlations."""
    rows = [correlations(curves, [epoch], end)[0] for epoch in epochs]
    return [{"epoch": r["rung"], "trials": r["trials"], "spearman": r["spearman"]} for r in rows]


def plot(rows: list[dict], rungs: list[int], decay: int | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["epoch"] for r in rows], [r["spearman"] for r in rows], "o-", color="tab:blue")
    for i, rung in enumerate(rungs):
        ax.axvline(rung, color="tab:red", ls=":", label="the file's rungs" if i == 0 else None)
    if decay is not None:
        ax.axvline(decay, color="grey", ls="--", label="first learning-rate decay")
    ax.axhline(0.8, color="tab:green", lw=0.8, label="0.8")
    ax.set(xlabel="epoch ASHA counts", ylabel="Spearman with the end", ylim=(-1, 1.05), title=title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment file (config: and search: sections)")
    p.add_argument("--trials", type=int, default=12, help="trials run to the end (phase 2's, when staged)")
    p.add_argument("--every", type=int, default=5, help="candidate rungs every this many epochs (default 5)")
    p.add_argument("--storage", help="folder for the search's experiment (default: a temporary one)")
    p.add_argument("--name", default="rung-fidelity", help="the experiment's name in --storage")
    p.add_argument("--teacher", help="a teacher checkpoint to reuse instead of pretraining one")
    p.add_argument("--seed", type=int, help="the search's seed (default: the file's)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. bn_stats=running")
    p.add_argument("--quiet", action="store_true", help="hide the search's own output")
    args = p.parse_args(argv)
    try:
        if args.trials < 3:
            raise UserError(f"--trials must be >= 3 (a rank correlation needs three), got {args.trials}")
        cfg, experiment = load_experiment(args.config)
        cfg = from_dict(parse_overrides(args.set), cfg)
        section = dict(experiment.get("search") or {})
        settings = parse_search(section, cfg)
        staged = settings.staged is not None
        end = counted_epochs(cfg, from_stage1=staged)
        rungs = settings.rung_epochs(end)
        section.update(num_samples=args.trials, asha={"grace_period": end, "reduction_factor": 3},
                       select={"top_k": 0}, budget_hours=None)
        if args.seed is not None:
            section["seed"] = args.seed
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray

    from refilled.tune.search import Outcome, open_search

    storage = args.storage or tempfile.mkdtemp(prefix="rung-fidelity-")
    start = time.time()
    out = io.StringIO()
    with contextlib.redirect_stdout(out) if args.quiet else contextlib.nullcontext():
        search = open_search(storage, args.name, cfg, section)
        if search.run(None, args.teacher) is not Outcome.FINISHED:
            sys.exit(f"rung_fidelity: the search in {search.place.location} did not finish")
        folder = search.place.folder
    ray.shutdown()
    curves, _, end = experiment_curves(folder)
    candidates = sorted(set(range(args.every, end, args.every)) | set(rungs))
    rows = fidelity(curves, end, candidates)
    decay = (0 if staged else cfg.n_training_epochs1) + cfg.point[0] if cfg.point else None
    print(f"\nrung fidelity of {args.config}: {len(curves)} trials run to epoch {end} "
          f"({'stage-2 epochs, phase 2' if staged else 'epochs of both stages'}; bn_stats {cfg.bn_stats}; "
          f"{time.time() - start:.0f} s)")
    print("  epoch  Spearman with the end  trials")
    for r in rows:
        mark = "  <- the file's rung" + (" (grace period)" if r["epoch"] == (rungs or [None])[0] else "") \
            if r["epoch"] in rungs else ""
        rho = "   n/a" if math.isnan(r["spearman"]) else f"{r['spearman']:+.2f}"
        print(f"  {r['epoch']:5d}  {rho:>21}  {r['trials']:6d}{mark}")
    import pandas as pd

    pd.DataFrame(rows).to_csv(folder / "rung_fidelity.csv", index=False)
    plot(rows, rungs, decay, folder / "rung_fidelity.png",
         f"{Path(args.config).name}: {len(curves)} trials, bn_stats {cfg.bn_stats}")
    print(f"written: {folder / 'rung_fidelity.csv'}, {folder / 'rung_fidelity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
