#!/usr/bin/env python
"""What bn_stats: precise costs per evaluation: the batch-norm statistics recomputed
from the current weights (refilled.method.evaluate.statistics) beside the evaluation itself.

Two students: the digits default's (WRN-10-1 at 32 px, its 25 training images,
200 validation images) and a CIFAR-shaped one (WRN-16-1 at 32 px, 50,000
synthetic training images of which PRECISE_BN_IMAGES are used, 5,000
validation images). Prints the median milliseconds of each part and the ratio.

  python benchmarks/precise_bn.py [--device cpu|cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import machine, median_time

from refilled.data.augment import for_data
from refilled.data.device import DeviceTask
from refilled.data.sources import ImageSet
from refilled.data.splits import Task
from refilled.method import evaluate
from refilled.method.train import build_student
from refilled.runs.inputs import student_data
from refilled.schema.config import Config, load_experiment


def cifar_shaped(device: torch.device, n_train: int = 50_000, n_eval: int = 5_000) -> DeviceTask:
    rng = np.random.default_rng(0)

    def images(n):
        return ImageSet(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 100, n))

    train, val = images(n_train), images(n_eval)
    task = Task(name="student", classes=list(range(100)), train=train, eval=val, eval_split="validation",
                mean=(0.5,) * 3, std=(0.25,) * 3)
    put = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    shape = (1, -1, 1, 1)
    return DeviceTask(task, for_data("CIFAR-100", 32), device, put(train.images), put(train.labels),
                      put(val.images), put(val.labels), torch.tensor(task.mean, device=device).view(shape),
                      torch.tensor(task.std, device=device).view(shape))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    print(machine(device))
    digits_cfg, _ = load_experiment("search_spaces/digits.yaml")
    digits_cfg = digits_cfg.replace(flag_tuning=True, device=args.device)
    cases = [("digits default (WRN-10-1, 25 train / 200 val images)", digits_cfg, student_data(digits_cfg, device)),
             ("CIFAR-shaped (WRN-16-1, 2,048 of 50,000 train / 5,000 val images)",
              Config(depth=16, width=1, device=args.device), cifar_shaped(device))]
    print(f"\n{'case':70s} {'recompute':>10s} {'evaluate':>10s} {'ratio':>6s}")
    for label, cfg, data in cases:
        student = build_student(cfg, data)
        recompute, _ = median_time(lambda: evaluate.recompute_bn_stats(student, data), args.repeats)
        evaluation, _ = median_time(lambda: evaluate.accuracy(student, data), args.repeats)
        print(f"{label:70s} {recompute * 1e3:8.1f}ms {evaluation * 1e3:8.1f}ms {recompute / evaluation:6.2f}")


if __name__ == "__main__":
    main()
