"""What each training stage computes on a batch: an output and named losses.

Each stage is a small callable `batch -> (output, {name: loss})`; the training
loop (refilled.method.train) sums the losses, steps, and logs every term by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refilled.data.device import Batch
from refilled.method.bank import TeacherEmbeddings
from refilled.method.losses import class_centers, local_classifier_loss, relation_loss


class CrossEntropy:
    """Plain supervised training: the teacher's pre-training."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, b: Batch):
        _, logits = self.model(b.x)
        return logits, {"ce": F.cross_entropy(logits, b.y)}


class RelationMatching:
    """Stage 1: the student's embedding learns the teacher's triplet relations."""

    def __init__(self, student, teacher: TeacherEmbeddings, tau: float, scale: float,
                 tuples: bool = False, margin: float = 0.2, smallest: bool = False):
        self.student, self.teacher = student, teacher
        self.tau, self.scale, self.tuples, self.margin, self.smallest = tau, scale, tuples, margin, smallest

    def __call__(self, b: Batch):
        teacher = self.teacher(b)  # before the student's forward: less memory held while it runs
        emb = self.student.embed(b.x)
        loss = relation_loss(emb, teacher, b.y, self.tau, tuples=self.tuples, smallest=self.smallest,
                             margin=self.margin)
        return emb, {"relation": self.scale * loss}


class LocalClassifierDistillation:
    """Stage 2: cross-entropy plus lambd * KL to the teacher's local classifier.

    `centers` are the global class centres (n_classes, D); None means "local":
    centres from each batch's own teacher embeddings (the paper's first form).
    With lambd == 0 it is the student trained alone, and the teacher is not asked.
    `transfer` (teacher embeddings of transfer-set batches, `cfg.transfer_set`):
    the same KL, over all classes, on the unlabelled images a batch carries.
    """

    def __init__(self, student, teacher: TeacherEmbeddings, centers: torch.Tensor | None,
                 n_classes: int, tau: float, lambd: float, transfer: TeacherEmbeddings | None = None):
        self.student, self.teacher, self.centers = student, teacher, centers
        self.n_classes, self.tau, self.lambd, self.transfer = n_classes, tau, lambd, transfer

    def __call__(self, b: Batch):
        t = self.teacher(b) if self.lambd > 0 else None  # before the student's forward, as above
        _, logits = self.student(b.x)
        losses = {"ce": F.cross_entropy(logits, b.y)}
        if t is not None:
            t = t.to(logits.device)
            centers = self.centers if self.centers is not None else class_centers(t, b.y, self.n_classes)
            losses["local_kd"] = self.lambd * local_classifier_loss(logits, t, b.y, centers, self.tau)
        if b.unlabelled is not None:
            t = self.transfer(b.unlabelled)
            _, unlabelled_logits = self.student(b.unlabelled.x)
            losses["transfer_kd"] = self.lambd * local_classifier_loss(
                unlabelled_logits, t.to(unlabelled_logits.device), None, self.centers, self.tau)
        return logits, losses
