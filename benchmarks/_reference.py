"""The reference path: what the authors' public code does per batch, rewritten here.

Only for the benchmarks. Per batch the authors' training loops
- read PIL images through a torch DataLoader with torchvision transforms
  (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize),
- run the frozen teacher on the batch under no_grad,
- mine semi-hard triplets with pytorch-metric-learning on the student's
  normalised embedding, gather the triplets' embeddings and take the
  distances of the gathered rows,
- in the tuple ("merge") variant, group the triplets with a Python pass over
  them, one triplet at a time, comparing tensor elements, then one masked
  selection and one padding per group,
- read the loss back with .item() for the running average.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


def merge_loop(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor):
    """Group triplets by (anchor, positive) the authors' way (triplets sorted by
    (anchor, positive), as the miner returns them).

    Returns (anchors, positives, negatives padded with 0, mask) like
    refilled.method.losses.group_triplets (which pads with -1 instead).
    """
    pair_a: list[torch.Tensor] = []
    pair_p: list[torch.Tensor] = []
    last_a = last_p = None
    for i in range(anchors.shape[0]):  # one Python step per triplet, tensor element comparisons
        a_i, p_i = anchors[i], positives[i]
        if last_a is None or a_i != last_a or p_i != last_p:
            pair_a.append(a_i)
            pair_p.append(p_i)
            last_a, last_p = a_i, p_i
    groups = [negatives[(anchors == a_i) & (positives == p_i)] for a_i, p_i in zip(pair_a, pair_p)]
    kmax = max((len(g) for g in groups), default=0)
    padded, mask = [], []
    for g in groups:  # one padding per group
        missing = kmax - len(g)
        padded.append(torch.cat([g, torch.zeros(missing, dtype=g.dtype, device=g.device)]).unsqueeze(0))
        mask.append(torch.cat([torch.ones(len(g), dtype=torch.long, device=g.device),
                               torch.zeros(missing, dtype=torch.long, device=g.device)]).unsqueeze(0))
    return (torch.stack(pair_a).long(), torch.stack(pair_p).long(), torch.cat(padded, 0), torch.cat(mask, 0).bool())


class PILImages(Dataset):
    """uint8 (N, 3, H, W) arrays as PIL images, transformed one at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images = [Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))) for im in images]
        self.labels = [int(v) for v in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def cifar_loader(images: np.ndarray, labels: np.ndarray, mean, std, batch_size: int, seed: int) -> DataLoader:
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    return DataLoader(PILImages(images, labels, transform), batch_size=batch_size, shuffle=True, num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


def _kl_rows(log_t: torch.Tensor, log_s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    diff = log_t - log_s
    if mask is not None:
        diff = torch.where(mask, diff, torch.zeros_like(diff))
    return (log_t.exp() * diff).sum(1)


def reference_epoch(stage: str, loader: DataLoader, teacher, student, optimizer, sections, *, tau1: float,
                    scale: float, tau2: float, lambd: float, centers: torch.Tensor, n_classes: int,
                    device: torch.device, max_batches: int | None = None) -> tuple[int, float]:
    """One epoch (or max_batches) of the reference stage 'stage1', 'stage1_tuple' or 'stage2'.

    `sections` (benchmarks._common.Sections) collects the per-batch time split.
    Returns (images seen, mean loss).
    """
    from pytorch_metric_learning.miners import TripletMarginMiner

    miner = TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    teacher.eval()
    student.train()
    seen, loss_sum = 0, 0.0
    batches = iter(loader)
    for i in range(len(loader)):
        if max_batches is not None and i >= max_batches:
            break
        with sections("data (PIL DataLoader)"):
            x, y = next(batches)
            x, y = x.to(device), y.to(device)
        with sections("teacher forward"):
            with torch.no_grad():
                t_emb = teacher.embed(x)
        if stage == "stage2":
            with sections("student forward + loss"):
                _, logits = student(x)
                ce = F.cross_entropy(logits, y)
                present = (y == torch.arange(n_classes, device=device).unsqueeze(1)).any(dim=1)
                with torch.no_grad():
                    log_t = F.log_softmax(t_emb @ centers[present].t() / tau2, dim=1)
                log_s = F.log_softmax(logits[:, present] / tau2, dim=1)
                loss = ce + lambd * _kl_rows(log_t, log_s).mean()
        else:
            with sections("student forward"):
                s = F.normalize(student.embed(x), dim=1)
                t = F.normalize(t_emb, dim=1)
            with sections("triplet mining"):
                with torch.no_grad():
                    a, p, n = miner(s, y)
            if a.numel() == 0:  # no semi-hard triplet in this batch: nothing to match
                loss = s.sum() * 0.0
            elif stage == "stage1":
                with sections("loss"):
                    def prob(e):
                        return torch.sigmoid(((e[a] - e[n]).norm(dim=1) - (e[a] - e[p]).norm(dim=1)) / tau1)
                    ps, pt = prob(s), prob(t).detach()
                    log_s = torch.stack([ps, 1 - ps], 1).clamp_min(1e-12).log()
                    log_t = torch.stack([pt, 1 - pt], 1).clamp_min(1e-12).log()
                    loss = scale * _kl_rows(log_t, log_s).mean()
            else:
                with sections("tuple grouping (loop)"):
                    ga, gp, negs, mask = merge_loop(a, p, n)
                with sections("loss"):
                    full = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)

                    def log_probs(e):
                        d_ap = (e[ga] - e[gp]).norm(dim=1, keepdim=True)
                        d_an = (e[ga].unsqueeze(1) - e[negs]).norm(dim=2)
                        logits = torch.cat([-d_ap, -d_an], 1) / tau1
                        return F.log_softmax(logits.masked_fill(~full, float("-inf")), dim=1)
                    loss = scale * _kl_rows(log_probs(t).detach(), log_probs(s), full).mean()
        with sections("backward + step"):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with sections("loss.item()"):
            loss_sum += loss.item() * len(y)
        seen += len(y)
    return seen, loss_sum / max(seen, 1)
