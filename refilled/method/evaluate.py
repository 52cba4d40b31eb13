"""Evaluation: classifier accuracy and nearest-class-mean (NCM) accuracy, and the
batch-norm statistics they are read with (`bn_stats`, docs/search.md)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from refilled.data import augment
from refilled.data.device import DeviceTask
from refilled.method.losses import ncm_accuracy
from refilled.runtime import autocast


@torch.no_grad()
def embed_all(model: torch.nn.Module, data: DeviceTask, split: str, batch_size: int = 512
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (float) and labels of all unaugmented images of a split."""
    was_training = model.training
    model.eval()
    embs, labels = [], []
    for x, y in data.views(split, batch_size):
        with autocast(data.device):
            embs.append(model.embed(x).float())
        labels.append(y)
    model.train(was_training)
    return torch.cat(embs), torch.cat(labels)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: DeviceTask, split: str = "eval", batch_size: int = 512) -> float:
    """Top-1 accuracy of the model's classifier, a fraction in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=data.device)
    total = 0
    for x, y in data.views(split, batch_size):
        with autocast(data.device):
            _, logits = model(x)
        correct += (logits.argmax(1) == y).sum()
        total += len(y)
    model.train(was_training)
    return correct.item() / max(total, 1)


def ncm(model: torch.nn.Module, data: DeviceTask) -> float:
    """Stage 1's measure: class means of the training embeddings, cosine NCM on the eval split."""
    train_emb, train_y = embed_all(model, data, "train")
    eval_emb, eval_y = embed_all(model, data, "eval")
    return ncm_accuracy(train_emb, train_y, eval_emb, eval_y, data.n_classes)


PRECISE_BN_IMAGES = 2048  # at most this many training images (pycls uses 8192 on ImageNet)
PRECISE_BN_BATCH = 256


def _precise_bn_images(data: DeviceTask) -> Iterator[torch.Tensor]:
    """Unaugmented training images, the same fixed draw every time: the view the
    evaluated images are seen in, and no randomness taken from training."""
    n = data.n_train
    if n > PRECISE_BN_IMAGES:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:PRECISE_BN_IMAGES].sort().values
        x = data.train_x[pick.to(data.device)]
    else:
        x = data.train_x
    for start in range(0, len(x), PRECISE_BN_BATCH):
        yield augment.eval_view(x[start:start + PRECISE_BN_BATCH], data.aug, data.mean, data.std)


@torch.no_grad()
def recompute_bn_stats(model: torch.nn.Module, data: DeviceTask) -> None:
    """Replace the batch-norm running statistics by those of the current weights on
    training images ("precise BN"), as a cumulative average over the batches.

    As torch's swa_utils.update_bn, except that only the batch-norm layers are in
    training mode: dropout stays off, so the statistics are those of the network that is
    evaluated (no variance shift from dropout, Li et al. 2019) and no random number is drawn."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = {m: m.momentum for m in layers}
    was_training = model.training
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average of every batch
        m.train()
    with autocast(data.device):
        for x in _precise_bn_images(data):
            model(x)
    for m, momentum in momenta.items():
        m.momentum = momentum
    model.train(was_training)


def _bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, module in model.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            for name, buf in module.named_buffers(prefix=name)}


@contextmanager
def statistics(model: torch.nn.Module, data: DeviceTask, bn_stats: str) -> Iterator[None]:
    """Evaluate inside this: with bn_stats "precise", the batch-norm statistics are
    recomputed from the current weights first and the training ones put back after,
    so that training goes on exactly as without it. "running": as trained."""
    if bn_stats == "running":
        yield
        return
    saved = _bn_buffers(model)
    recompute_bn_stats(model, data)
    try:
        yield
    finally:
        with torch.no_grad():
            buffers = dict(model.named_buffers())
            for name, value in saved.items():
                buffers[name].copy_(value)
