#!/usr/bin/env python
"""Tuple grouping: refilled.method.losses.group_triplets against Python loops, at the authors' scale.

The tuple form of stage 1 (the authors' flag_merge) groups the mined
semi-hard triplets by (anchor, positive). With CIFAR-100 and batch 128 a batch
drawn from 100 classes has about 160 ordered (anchor, positive) pairs of the same class, each with
about 60 semi-hard negatives: about 9,700 triplets into about 160 groups.

Compared, on the same indices (sorted by anchor, positive, negative, as the
pytorch-metric-learning miner returns them):
  group_triplets   this project's vectorised grouping (torch.unique + one scatter)
  authors' loop    the authors' style (benchmarks/_reference.py:merge_loop): one
                   Python step per triplet comparing tensor elements, then one
                   masked selection and one padding per group
  dict loop        refilled.method.losses._group_triplets_loop: a Python dict over
                   .tolist() values, a stronger pure-Python baseline

Prints the median of --repeats timings of each and the speed-up of
group_triplets. Issue 5's target: at least 20x the authors' loop.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import OtherLoad, check_idle, machine, median_time, wait_until_idle
from _reference import merge_loop

from refilled.method.losses import _group_triplets_loop, group_triplets
from refilled.runtime import resolve_device


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128, help="samples in the batch (default 128)")
    p.add_argument("--classes", type=int, default=100, help="classes the batch is drawn from (default 100)")
    p.add_argument("--negatives", type=int, default=60, help="mean semi-hard negatives per pair (default 60)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats of each; the median counts (default 15)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto: CUDA if present")
    p.add_argument("--seed", type=int, default=1,
                   help="label draw (default 1: 164 pairs, about 9,800 triplets)")
    return p.parse_args()


def realistic_triplets(batch: int, n_classes: int, mean_negatives: int, seed: int):
    """Triplet indices shaped like one mined CIFAR-100 batch.

    Labels drawn uniformly from `n_classes` (a shuffled CIFAR-100 batch of 128
    holds about 128 * 127 / 100 = 163 ordered same-class (a, p) pairs); each
    pair gets a random number (around `mean_negatives`) of distinct negatives
    of other classes, as the semi-hard miner keeps about half of them.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=batch)
    rows = []
    for a in range(batch):
        for p in range(batch):
            if a == p or labels[a] != labels[p]:
                continue
            others = np.flatnonzero(labels != labels[a])
            k_neg = int(np.clip(round(rng.normal(mean_negatives, mean_negatives / 4)), 1, len(others)))
            for n in np.sort(rng.choice(others, size=k_neg, replace=False)):
                rows.append((a, p, n))
    t = torch.tensor(rows, dtype=torch.long)
    return t[:, 0].contiguous(), t[:, 1].contiguous(), t[:, 2].contiguous()


def same_groups(a, b) -> bool:
    """Two (anchors, positives, padded negatives, mask) results hold the same groups."""
    ga, gp, na, ma = (x.cpu() for x in a)
    ha, hp, nb, mb = (x.cpu() for x in b)
    if not (torch.equal(ga, ha) and torch.equal(gp, hp) and torch.equal(ma, mb)):
        return False
    return torch.equal(na[ma], nb[mb])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(machine(device))
    wait_until_idle(60)
    check_idle("before")

    a, p, n = (x.to(device) for x in realistic_triplets(args.batch_size, args.classes, args.negatives, args.seed))
    fast = group_triplets(a, p, n)
    g, kmax = fast[0].numel(), fast[2].shape[1]
    print(f"\n{a.numel()} triplets into {g} (anchor, positive) groups, "
          f"{fast[3].sum(1).float().mean():.1f} negatives a group on average (max {kmax}); device {device}")

    def timed(fn):
        def run():
            fn(a, p, n)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return median_time(run, args.repeats)[0]

    with OtherLoad() as load:
        results = {
            "group_triplets": timed(group_triplets),
            "authors' loop": timed(merge_loop),
            "dict loop": timed(_group_triplets_loop),
        }
    agree = same_groups(fast, merge_loop(a, p, n)) and same_groups(fast, _group_triplets_loop(a, p, n))
    print(f"outputs agree (same groups, same negatives in the same order): {agree}")
    print(f"\nmedian of {args.repeats} repeats:")
    base = results["group_triplets"]
    for name, seconds in results.items():
        ratio = "" if name == "group_triplets" else f"   group_triplets is {seconds / base:7.1f}x faster"
        print(f"  {name:<16s}{1000 * seconds:10.3f} ms{ratio}")
    speedup = results["authors' loop"] / base
    print(f"\ntarget >= 20x the authors' loop: {'met' if speedup >= 20 else 'NOT met'} ({speedup:.0f}x)")
    print(f"other processes took {100 * load.fraction:.0f}% of the CPU during the timings")
    if load.fraction > 0.05:
        print("WARNING: other processes were using the CPU; rerun on an idle machine for figures to record.")


if __name__ == "__main__":
    main()
