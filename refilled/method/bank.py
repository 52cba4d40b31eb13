"""Teacher embeddings of training images: looked up from a bank, or computed.

The teacher is frozen, and CIFAR-style augmentation has a finite set of
variants per image, so the teacher's embedding of every (image, variant) can be
computed once and stored (half precision). Stages 1 and 2 then look up the
embedding of each augmented sample instead of running the teacher: the
teacher's forward pass, over half of an epoch's time, is paid once per
experiment instead of once per batch of every trial.

The bank is a plain .npy file (N, V, D) float16, memory-mapped by every trial
that reads it (one copy in the page cache of a node, or on shared storage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from refilled.data import augment
from refilled.data.device import Batch, DeviceTask
from refilled.files.arrays import read_array
from refilled.runtime import autocast


class TeacherBank:
    """Teacher embeddings of every (training image, augmentation variant)."""

    def __init__(self, embeddings: np.ndarray | torch.Tensor):
        self.embeddings = embeddings  # (N, V, D) float16; numpy (host) or tensor (device)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.embeddings.shape)

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: torch.nn.Module, data: DeviceTask, batch_size: int = 512,
              progress: bool = True) -> "TeacherBank":
        n_variants = data.aug.n_variants
        if n_variants is None:
            raise ValueError(f"{data.aug.kind} augmentation has no finite set of variants")
        teacher.eval()
        out = torch.empty(data.n_train, n_variants, teacher.embedding_dim, dtype=torch.float16, device=data.device)
        bar = tqdm(total=data.n_train * n_variants, desc="teacher bank", unit="img", disable=not progress,
                   leave=False)
        for v in range(n_variants):
            for start in range(0, data.n_train, batch_size):
                images = data.train_x[start:start + batch_size]
                variants = torch.full((len(images),), v, device=data.device)
                with autocast(data.device):
                    emb = teacher.embed(augment.train_view(images, data.aug, variants, data.mean, data.std))
                out[start:start + batch_size, v] = emb.half()
                bar.update(len(images))
        bar.close()
        return cls(out)

    def save(self, path: str | Path) -> Path:
        """Atomic write (temp file + rename) of the .npy file."""
        from refilled.files.atomic import write_atomic

        array = self.embeddings.cpu().numpy() if torch.is_tensor(self.embeddings) else self.embeddings
        return write_atomic(path, lambda f: np.save(f, array))

    @classmethod
    def load(cls, path: str | Path, shown: str | None = None) -> "TeacherBank":
        return cls(read_array(path, "teacher bank", shown=shown, mmap=True))

    def to(self, device: torch.device) -> "TeacherBank":
        """On CUDA the bank moves to the GPU; on CPU it stays memory-mapped."""
        if device.type == "cpu":
            return self
        return TeacherBank(torch.as_tensor(np.asarray(self.embeddings)).to(device))

    def lookup(self, idx: torch.Tensor, variants: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(self.embeddings):
            return self.embeddings[idx, variants].float()
        rows = self.embeddings[idx.numpy(), variants.numpy()]  # CPU tensors: no sync
        return torch.from_numpy(np.asarray(rows, dtype=np.float32))

    def unaugmented(self, identity_variant: int) -> torch.Tensor:
        """(N, D) float embeddings of the unaugmented training images."""
        if torch.is_tensor(self.embeddings):
            return self.embeddings[:, identity_variant].float()
        return torch.from_numpy(np.array(self.embeddings[:, identity_variant], dtype=np.float32))




TeacherEmbeddings = Callable[[Batch], torch.Tensor]


def teacher_embeddings(teacher: torch.nn.Module, bank: TeacherBank | None, counter: dict | None = None
                       ) -> TeacherEmbeddings:
    """A function batch -> teacher embedding: a bank lookup when there is a bank,
    else a no-grad teacher forward (counted in counter['teacher_forward_images'])."""
    if bank is not None:
        return lambda b: bank.lookup(b.idx, b.params)
    teacher.eval()

    @torch.no_grad()
    def run(b: Batch) -> torch.Tensor:
        if counter is not None:
            counter["teacher_forward_images"] = counter.get("teacher_forward_images", 0) + len(b.x)
        return teacher.embed(b.x).float()

    return run

