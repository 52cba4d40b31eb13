#!/usr/bin/env python
"""Teacher forward passes per search, with and without the teacher-embedding bank.

For searches of 1, 4 and 16 trials (--trials), each trial a real REFILLED run
of --epochs stage-1 and --epochs stage-2 epochs on the digits student task
(search_spaces/digits.yaml with tiny networks), this counts the images the
frozen teacher is run on:

  without the bank  every trial runs the teacher on every training batch
                    (counted by refilled.method.bank.teacher_embeddings'
                    counter['teacher_forward_images']) and once over the
                    training split for its global class centres;
  with the bank     the experiment builds one bank, N training images x V
                    augmentation variants, and every trial looks embeddings
                    (and its centres) up in it.

Every trial is actually run, nothing is extrapolated. Besides the loop's own
counter, a forward hook on the teacher's feature extractor counts every image
that goes through the teacher (bank build and centres included), as a check.
The trials of one search differ in their searched settings (tau1, tau2,
lambd, lr1, lr2, drawn at random), like a search's trials do. The teacher's
weights are random: the counts do not depend on them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import REPO, check_idle, machine

from refilled.method.bank import TeacherBank
from refilled.method.train import build_student, build_teacher, refilled_epochs
from refilled.runs.inputs import student_data, teacher_inputs
from refilled.schema.config import load_experiment


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", default="1,4,16", help="trials per search, comma list (default 1,4,16)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each stage in every trial (default 2)")
    p.add_argument("--config", default=str(REPO / "search_spaces" / "digits.yaml"),
                   help="experiment file of the student task (default search_spaces/digits.yaml)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.trials = [int(v) for v in args.trials.split(",") if v]
    return args


class Counted:
    """Counts images through a module (a forward hook)."""

    def __init__(self, module: torch.nn.Module):
        self.images = 0
        module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.images += inputs[0].shape[0]


def trial_configs(base, n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield base.replace(tau1=float(rng.choice([1, 2, 4, 8])), tau2=float(rng.choice([1, 2, 4])),
                           lambd=float(rng.choice([0.5, 1, 5, 10])), lr1=float(rng.choice([0.01, 0.05, 0.1])),
                           lr2=float(rng.choice([0.01, 0.05, 0.1])), seed=i)


def search(base, n_trials: int, use_bank: bool, seed: int) -> dict:
    """Run a search of n_trials trials; return its teacher-forward counts."""
    data = student_data(base, torch.device("cpu"))
    teacher = build_teacher(base, data).eval()
    hook = Counted(teacher.conv1)  # the stem: every image of every forward
    counter: dict = {}
    bank, bank_images = None, 0
    if use_bank:
        bank = TeacherBank.build(teacher, data, progress=False)
        bank_images = hook.images
    for cfg in trial_configs(base, n_trials, seed):
        fn, centers = teacher_inputs(cfg, data, teacher, bank, counter)
        for _ in refilled_epochs(cfg, data, build_student(cfg, data), fn, centers):
            pass
    n, v = data.n_train, data.aug.n_variants
    return {"loop": counter.get("teacher_forward_images", 0), "bank_build": bank_images,
            "bank_size": n * v if use_bank else 0, "all": hook.images, "n": n, "v": v}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(machine(torch.device("cpu")))
    busy = check_idle("before")
    base, _ = load_experiment(args.config)
    base = base.replace(teacher_depth=10, teacher_width=1, depth=10, width=1, n_training_epochs1=args.epochs,
                        n_training_epochs2=args.epochs, point=(max(args.epochs, 1),), flag_tuning=True,
                        teacher_bank="auto", device="cpu")
    print(f"\nstudent task: {args.config} ({base.data_name}, classes {base.target_classes}, {base.shots} shots, "
          f"validation fraction {base.val_fraction}), WRN-10-1 teacher and student, "
          f"{args.epochs} + {args.epochs} epochs a trial\n")

    rows = []
    start = time.perf_counter()
    for n_trials in args.trials:
        off = search(base, n_trials, use_bank=False, seed=args.seed)
        on = search(base, n_trials, use_bank=True, seed=args.seed)
        rows.append((n_trials, off, on))
        print(f"  searched {n_trials:3d} trials twice ({time.perf_counter() - start:.0f} s so far)", flush=True)

    n, v = rows[0][1]["n"], rows[0][1]["v"]
    per_epoch = n  # one teacher forward per training image and epoch, both stages
    print(f"\nN = {n} training images, V = {v} augmentation variants (bank N x V = {n * v})")
    print(f"{'trials':>6s} | {'no bank: loop counter':>21s} {'all (hook)':>11s} | "
          f"{'bank: N x V':>11s} {'loop counter':>12s} {'all (hook)':>11s} | {'ratio no-bank/bank':>18s}")
    for n_trials, off, on in rows:
        print(f"{n_trials:6d} | {off['loop']:21d} {off['all']:11d} | {on['bank_size']:11d} {on['loop']:12d} "
              f"{on['all']:11d} | {off['all'] / on['all']:17.2f}x")
    print(f"\nwithout the bank a trial costs {2 * args.epochs} epochs x {per_epoch} images in the loop "
          f"+ {n} for its global centres = {2 * args.epochs * per_epoch + n} teacher forwards, so a search costs "
          f"that times the number of trials;")
    bank_totals = {on["all"] for _, _, on in rows}
    independent = len(bank_totals) == 1 and all(on["loop"] == 0 for _, _, on in rows)
    print(f"with the bank every search costs {sorted(bank_totals)} teacher forwards, the bank build alone: "
          f"{'independent of the number of trials' if independent else 'NOT independent of the number of trials'}.")
    if max(busy, check_idle("after")) > 0.10:
        print("(other processes were using the CPU; the counts are unaffected, only the run time)")


if __name__ == "__main__":
    main()
