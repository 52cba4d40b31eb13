"""A task's images resident on the training device, served in whole batches.

The uint8 images are moved to the device once; each epoch is one random
permutation, and each batch is gathered, augmented and normalised there
(refilled.data.augment). Nothing here syncs with the host per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from refilled.data import augment
from refilled.data.augment import Augmentation
from refilled.data.splits import Task


@dataclass
class Batch:
    idx: torch.Tensor  # positions in the training set (teacher-bank lookups)
    params: torch.Tensor  # augmentation: variant ids or crop boxes
    x: torch.Tensor  # augmented, normalised images
    y: torch.Tensor | None  # task labels (None: a transfer-set batch)
    unlabelled: "Batch | None" = None  # transfer-set images to go with it (idx: in the transfer set)


@dataclass
class DeviceTask:
    task: Task
    aug: Augmentation
    device: torch.device
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    unlabelled_x: torch.Tensor | None = None  # the transfer set's images; their labels never leave the host
    test_x: torch.Tensor | None = None  # a teacher task's test part (Task.test)
    test_y: torch.Tensor | None = None

    @property
    def n_classes(self) -> int:
        return self.task.n_classes

    @property
    def task_norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) its images are normalised with, in [0, 1] pixel units."""
        return tuple(self.task.mean), tuple(self.task.std)

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    def train_batches(self, generator: torch.Generator, batch_size: int, unlabelled: bool = False
                      ) -> Iterator[Batch]:
        """One epoch of shuffled, augmented batches (the last may be smaller). With
        `unlabelled`, each carries `batch_size` random transfer-set images too."""
        order = torch.randperm(self.n_train, generator=generator, device=self.device)
        params = augment.sample(self.aug, self.n_train, generator, self.device)
        if unlabelled:  # drawn after the labelled batches' randomness, which stays as it was
            n = math.ceil(self.n_train / batch_size) * batch_size
            u_order = torch.randint(len(self.unlabelled_x), (n,), generator=generator, device=self.device)
            u_params = augment.sample(self.aug, n, generator, self.device)
        for start in range(0, self.n_train, batch_size):
            idx = order[start:start + batch_size]
            p = params[start:start + batch_size]
            x = augment.train_view(self.train_x[idx], self.aug, p, self.mean, self.std)
            u = None
            if unlabelled:
                u_idx, u_p = u_order[start:start + batch_size], u_params[start:start + batch_size]
                u = Batch(u_idx, u_p, augment.train_view(self.unlabelled_x[u_idx], self.aug, u_p, self.mean, self.std),
                          None)
            yield Batch(idx, p, x, self.train_y[idx], u)

    def views(self, split: str, batch_size: int = 512) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Unaugmented (evaluation-view) batches of 'train', 'eval' or 'test' images, in order."""
        xs, ys = {"train": (self.train_x, self.train_y), "eval": (self.eval_x, self.eval_y),
                  "test": (self.test_x, self.test_y)}[split]
        for start in range(0, len(ys), batch_size):
            yield augment.eval_view(xs[start:start + batch_size], self.aug, self.mean, self.std), ys[start:start + batch_size]


def to_device(task: Task, aug: Augmentation, device: torch.device) -> DeviceTask:
    def put(a):
        return torch.from_numpy(a).to(device)

    shape = (1, -1, 1, 1)
    return DeviceTask(task, aug, device, put(task.train.images), put(task.train.labels),
                      put(task.eval.images), put(task.eval.labels),
                      torch.tensor(task.mean, device=device).view(shape),
                      torch.tensor(task.std, device=device).view(shape),
                      None if task.unlabelled is None else put(task.unlabelled.images),
                      *((None, None) if task.test is None else (put(task.test.images), put(task.test.labels))))
