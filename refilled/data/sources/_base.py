"""What every data source returns: whole data sets as in-memory uint8 arrays.

Training keeps a whole data set on the device and augments whole batches
there, so every reader returns plain arrays: images uint8 (N, C, H, W),
contiguous, and labels int64 (N,) holding the data set's original class
indices. Nothing here normalises or augments; `Source.mean` / `Source.std`
give the per-channel statistics (in [0, 1] pixel units) for the device code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageSet:
    images: np.ndarray  # uint8, shape (N, C, H, W), contiguous
    labels: np.ndarray  # int64, shape (N,), original class indices of the data set


@dataclass
class Source:
    name: str  # "CIFAR-100" | "CUB-200" | "digits"
    train: ImageSet  # the data set's official training part
    test: ImageSet  # the official test part (digits: a fixed held-out part)
    class_names: list[str]  # index -> name
    mean: tuple[float, ...]  # per-channel normalisation, in [0,1] pixel units
    std: tuple[float, ...]


def one_line(text: object) -> str:
    """Collapse an exception text so a UserError message stays one line."""
    return " ".join(str(text).split())
