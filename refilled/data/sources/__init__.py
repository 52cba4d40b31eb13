"""Data sources: each data set read whole into in-memory uint8 arrays (one module a source).

  * CIFAR-100 (`cifar100`): the official python pickles in ROOT/cifar-100-python/.
  * CUB-200-2011 (`cub200`): the official folder, decoded once and cached next to the data.
  * digits (`digits`): scikit-learn's bundled 8x8 digits, with a fixed held-out part.
  * a folder of one's own images (`folder`): torchvision's ImageFolder layout, decoded once into a cache.

Every problem the user can fix raises `UserError` with a one-line message.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from refilled.data.sources._base import IMAGENET_MEAN, IMAGENET_STD, ImageSet, Source
from refilled.data.sources.cifar100 import CIFAR100_MEAN, CIFAR100_STD, load_cifar100
from refilled.data.sources.cub200 import load_cub200
from refilled.data.sources.digits import digits_split, load_digits
from refilled.data.sources.folder import FolderOptions, class_folders, load_folder
from refilled.errors import UserError
from refilled.schema.config import DATA_NAMES, canonical_data_name

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD", "FolderOptions", "ImageSet", "Source",
           "class_folders", "digits_split", "load_cifar100", "load_cub200", "load_digits", "load_folder", "load_source"]


def load_source(data_name: str, root: str | Path = "data", download: bool = False,
                image_size: int | None = None, folder: FolderOptions | None = None) -> Source:
    """Load a data set by name (any alias refilled.schema.config knows); `root` is the folder that
    holds the data sets (for `folder`, the image folder itself).

    `download` only applies to CIFAR-100 (CUB-200 has no automatic download,
    digits ships with scikit-learn). `image_size` only to digits (8, their own
    size, by default) and folders (32); CIFAR-100 is 32 px and CUB-200 cropped to 224.
    `folder`: how a folder is read (its cache, a test split, files that are no images).
    """
    name = canonical_data_name(data_name)
    if name is None:
        raise UserError(f"unknown data set {data_name!r}: use one of {', '.join(DATA_NAMES)}")
    if name == "CIFAR-100":
        return load_cifar100(root, download=download)
    if name == "CUB-200":
        return load_cub200(root)
    if name == "folder":
        return load_folder(root, replace(folder or FolderOptions(), image_size=image_size or 32))
    return load_digits(image_size or 8)
