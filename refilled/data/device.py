"""A task's images resident on the training device, served in whole batches.

The uint8 images are moved to the device once; each epoch is one random
permutation, and each batch is gathered, augmented and normalised there
(refilled.data.augment). Nothing here syncs with the host per batch.
"""

from __future__ import annotations

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
    y: torch.Tensor  # task labels


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

    @property
    def n_classes(self) -> int:
        return self.task.n_classes

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    def train_batches(self, generator: torch.Generator, batch_size: int) -> Iterator[Batch]:
        """One epoch of shuffled, augmented batches (the last may be smaller)."""
        order = torch.randperm(self.n_train, generator=generator, device=self.device)
        params = augment.sample(self.aug, self.n_train, generator, self.device)
        for start in range(0, self.n_train, batch_size):
            idx = order[start:start + batch_size]
            p = params[start:start + batch_size]
            x = augment.train_view(self.train_x[idx], self.aug, p, self.mean, self.std)
            yield Batch(idx, p, x, self.train_y[idx])

    def views(self, split: str, batch_size: int = 512) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Unaugmented (evaluation-view) batches of 'train' or 'eval' images, in order."""
        xs, ys = (self.train_x, self.train_y) if split == "train" else (self.eval_x, self.eval_y)
        for start in range(0, len(ys), batch_size):
            yield augment.eval_view(xs[start:start + batch_size], self.aug, self.mean, self.std), ys[start:start + batch_size]


def to_device(task: Task, aug: Augmentation, device: torch.device) -> DeviceTask:
    def put(a):
        return torch.from_numpy(a).to(device)

    shape = (1, -1, 1, 1)
    return DeviceTask(task, aug, device, put(task.train.images), put(task.train.labels),
                      put(task.eval.images), put(task.eval.labels),
                      torch.tensor(task.mean, device=device).view(shape),
                      torch.tensor(task.std, device=device).view(shape))
