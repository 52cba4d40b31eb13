"""Evaluation: classifier accuracy and nearest-class-mean (NCM) accuracy."""

from __future__ import annotations

import torch

from refilled.data.device import DeviceTask
from refilled.losses import ncm_accuracy
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
