"""scikit-learn's bundled 8x8 digits, with a fixed held-out part."""

from __future__ import annotations

import numpy as np

from refilled.data.sources._base import ImageSet, Source
from refilled.errors import UserError

# Pixel mean/std of the digits train part (1258 images, uint8 / 255), computed
# once with `digits_split()` below and hard-coded so they never drift.
DIGITS_MEAN = (0.3052,)
DIGITS_STD = (0.3758,)

DIGITS_SPLIT_SEED = 20200617
DIGITS_TEST_FRACTION = 0.3


def digits_split(labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train_indices, test_indices) into sklearn's 1797 digits, both sorted.

    Test part: round(30%) of each class, picked by one
    `numpy.random.default_rng(20200617)` that permutes each class's indices in
    turn (classes 0..9 in order). It never depends on a user seed, so every
    run evaluates on the same 539 images (train: 1258).
    """
    if labels is None:
        from sklearn.datasets import load_digits as sk_load_digits

        labels = sk_load_digits().target
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[: round(DIGITS_TEST_FRACTION * len(members))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def load_digits(image_size: int = 8) -> Source:
    """scikit-learn's bundled digits (never downloads): 1797 images of 1x8x8.

    Values 0..16 become uint8 round(v * 255 / 16). There is no official test
    split, so `test` is the fixed stratified 30% part of `digits_split()`
    (seed 20200617) and `train` the remaining 70%.

    With `image_size` above 8 the images are upsampled (bilinear) to that side
    and given three equal channels: the input the authors' networks are built
    for (3x32x32); the normalisation is then the upsampled train part's own.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    # Only v = 8 gives a tie (127.5); rint and Python's round() both make it 128.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = digits_split(labels)
    mean, std = DIGITS_MEAN, DIGITS_STD
    if image_size != 8:
        images = _upsample(images, image_size)
        train = images[train_idx].astype(np.float64) / 255
        mean, std = (round(float(train.mean()), 4),) * 3, (round(float(train.std()), 4),) * 3
    return Source(
        name="digits",
        train=ImageSet(images=np.ascontiguousarray(images[train_idx]), labels=labels[train_idx]),
        test=ImageSet(images=np.ascontiguousarray(images[test_idx]), labels=labels[test_idx]),
        class_names=[str(d) for d in range(10)],
        mean=mean,
        std=std,
    )


def _upsample(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, 1, 8, 8) -> uint8 (N, 3, size, size), bilinear, the grey channel three times."""
    import torch
    import torch.nn.functional as F

    if size < 8:
        raise UserError(f"config key 'image_size' for digits must be >= 8 (their own size), got {size}")
    x = F.interpolate(torch.from_numpy(images).float(), size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1).numpy()
