"""Training augmentation on whole batches, on the device where the images live.

Images stay uint8 (N, C, H, W) on the device; a batch is gathered, cropped,
flipped and normalised in a few tensor operations, with no per-image Python.

CIFAR-style augmentation (random crop with zero padding, horizontal flip) is a
finite set of variants per image: (2*pad+1)**2 crop offsets times 2 flips. A
variant id names one, so the teacher's embedding of every variant can be
computed once and looked up (refilled.method.bank). CUB's random resized crop is not
finite; its batches carry continuous crop boxes instead and the teacher runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    kind: str  # "crop_flip" (finite variants) or "resized_crop" (CUB)
    pad: int = 0  # crop_flip: zero padding before the random crop
    flip: bool = False  # random horizontal flip
    out_size: int = 0  # resized_crop: output side (224)
    scale: tuple[float, float] = (0.08, 1.0)  # resized_crop: area fraction range

    @property
    def n_variants(self) -> int | None:
        """Number of distinct augmented views of an image, None if infinite."""
        if self.kind != "crop_flip":
            return None
        return (2 * self.pad + 1) ** 2 * (2 if self.flip else 1)

    @property
    def identity_variant(self) -> int | None:
        """Variant id of the unaugmented image (centre crop, no flip)."""
        if self.kind != "crop_flip":
            return None
        return (self.pad * (2 * self.pad + 1) + self.pad) * (2 if self.flip else 1)


def for_data(data_name: str, image_size: int | None = None, kind: str = "auto") -> Augmentation:
    """The authors' training augmentation for each data set (CUB: see docs/method.md); digits get
    CIFAR's crops, padded by an eighth of their side (4 px at 32, 1 px at 8), no flip. A folder of
    one's own images: CIFAR's crops and flips up to 64 px, CUB's resized crops above (`kind`
    chooses either: crop_flip, resized_crop)."""
    if data_name == "digits":
        return Augmentation("crop_flip", pad=max(1, (image_size or 8) // 8), flip=False)  # a flipped 2 is no 2
    size = {"CIFAR-100": 32, "CUB-200": 224}.get(data_name, image_size or 32)
    if kind == "auto":
        kind = {"CIFAR-100": "crop_flip", "CUB-200": "resized_crop"}.get(data_name) or \
            ("crop_flip" if size <= 64 else "resized_crop")
    if kind == "crop_flip":
        return Augmentation("crop_flip", pad=max(1, size // 8), flip=True)
    return Augmentation("resized_crop", flip=True, out_size=size)


def sample(aug: Augmentation, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Random augmentation parameters for n images: variant ids (int64, shape n)
    for crop_flip, crop boxes (n, 5: x0, y0, w, h, flip as fractions) otherwise."""
    if aug.kind == "crop_flip":
        return torch.randint(aug.n_variants, (n,), generator=generator, device=device)
    u = torch.rand(n, 5, generator=generator, device=device)
    area = aug.scale[0] + (aug.scale[1] - aug.scale[0]) * u[:, 0]
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)
    h = (area / ratio).sqrt().clamp(max=1.0)
    x0 = (1 - w) * u[:, 2]
    y0 = (1 - h) * u[:, 3]
    flip = (u[:, 4] < 0.5).float() if aug.flip else torch.zeros_like(w)
    return torch.stack([x0, y0, w, h, flip], 1)


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = (x.float() / 255 - mean) / std
    return x.contiguous(memory_format=torch.channels_last)  # as the networks' weights (runtime.prepare_model)


def crop_flip(images: torch.Tensor, variants: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """uint8 batch -> uint8 batch, each image cropped/flipped as its variant says."""
    b, c, h, w = images.shape
    n_flip = 2 if flip else 1
    flips, offset = variants % n_flip, variants // n_flip
    dy, dx = offset // (2 * pad + 1), offset % (2 * pad + 1)
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flips[:, None].bool(), cols.flip(1), cols)
    return padded[torch.arange(b, device=images.device)[:, None, None, None],
                  torch.arange(c, device=images.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, out_size: int) -> torch.Tensor:
    """float batch -> float batch (out_size square) of the given boxes, bilinear."""
    x0, y0, w, h, flips = boxes.unbind(1)
    sign = 1 - 2 * flips  # -1 mirrors the x axis
    theta = torch.zeros(len(boxes), 2, 3, device=images.device)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = 2 * x0 + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta, [len(boxes), images.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def train_view(images: torch.Tensor, aug: Augmentation, params: torch.Tensor,
               mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Augmented, normalised float batch from uint8 images and sampled params."""
    if aug.kind == "crop_flip":
        return _normalise(crop_flip(images, params, aug.pad, aug.flip), mean, std)
    return _normalise(resized_crop(images.float(), params, aug.out_size), mean, std)


def eval_view(images: torch.Tensor, aug: Augmentation, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised float batch as seen at evaluation (CUB: centre crop)."""
    if aug.kind == "resized_crop":
        top = (images.shape[-1] - aug.out_size) // 2
        images = images[..., top:top + aug.out_size, top:top + aug.out_size]
    return _normalise(images, mean, std)
