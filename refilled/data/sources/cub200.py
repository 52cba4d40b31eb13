"""CUB-200-2011 from the official folder ROOT/CUB_200_2011/ (or ROOT itself),
decoded once to fixed squares and cached next to the data."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from refilled.data.sources._base import IMAGENET_MEAN, IMAGENET_STD, ImageSet, Source, one_line
from refilled.data.sources._images import decode_all
from refilled.errors import UserError

CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"


def _cub_folder(root: Path) -> Path:
    """ROOT/CUB_200_2011, or ROOT itself when it already is that folder."""
    for folder in (root / "CUB_200_2011", root):
        if (folder / "images.txt").is_file() or (folder / "images").is_dir():
            return folder
    raise UserError(
        f"CUB-200-2011 not found under {root / 'CUB_200_2011'} (it cannot be downloaded "
        f"automatically): download CUB_200_2011.tgz from the Caltech site ({CUB_URL}) "
        f"and extract it under {root}"
    )


def _read_table(path: Path, what: str) -> dict[int, str]:
    """Parse '<integer id> <rest of line>' lines into {id: rest}."""
    if not path.is_file():
        raise UserError(
            f"CUB-200-2011 file {path} is missing: re-extract CUB_200_2011.tgz "
            f"from the Caltech site ({CUB_URL})"
        )
    table: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise UserError(f"CUB-200-2011 file {path}, line {lineno}: expected '<id> <{what}>', got {line!r}")
        key = int(parts[0])
        if key in table:
            raise UserError(f"CUB-200-2011 file {path}, line {lineno}: id {key} appears twice")
        table[key] = parts[1].strip()
    if not table:
        raise UserError(f"CUB-200-2011 file {path} is empty: re-extract CUB_200_2011.tgz")
    return table


def _int_values(table: dict[int, str], path: Path, allowed: range) -> dict[int, int]:
    out = {}
    for key, value in table.items():
        if not value.isdigit() or int(value) not in allowed:
            raise UserError(
                f"CUB-200-2011 file {path}: id {key} has value {value!r}, expected an integer "
                f"in {allowed.start}..{allowed.stop - 1}"
            )
        out[key] = int(value)
    return out


_CACHE_KEYS = ("train_ids", "test_ids", "train_images", "train_labels", "test_images", "test_labels")


def _load_cub_cache(path: Path, index_file: Path, train_ids: np.ndarray, test_ids: np.ndarray):
    """Return the cached arrays, or None when the cache is absent, stale or unusable."""
    if not path.is_file() or path.stat().st_mtime_ns < index_file.stat().st_mtime_ns:
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _CACHE_KEYS}
    except Exception as err:
        warnings.warn(f"ignoring unreadable CUB-200 cache {path}: {one_line(err)}")
        return None
    # The split files may have changed since the cache was written.
    if not (np.array_equal(arrays["train_ids"], train_ids) and np.array_equal(arrays["test_ids"], test_ids)):
        return None
    return arrays


def _save_cub_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically, so a crash never leaves half a file (write_atomic removes its
    temporary file when it fails)."""
    from refilled.files.atomic import write_atomic

    try:  # uncompressed: decoded photos barely compress, and loading is faster
        write_atomic(path, lambda f: np.savez(f, **arrays))
    except OSError as err:  # e.g. a read-only data folder: the cache is only an optimisation
        warnings.warn(f"could not write CUB-200 cache {path}: {one_line(err)}")


def load_cub200(root: str | Path, image_size: int = 256) -> Source:
    """CUB-200-2011 from ROOT/CUB_200_2011/ (or ROOT itself being that folder).

    Uses the official index files (images.txt, image_class_labels.txt,
    train_test_split.txt, classes.txt) and split (5994 train / 5794 test).
    Labels are 0-based (class id - 1). Each image is converted to RGB, resized
    so its shorter side is `image_size` and centre-cropped to a square; the
    training random-resized-crop 224 and the evaluation centre-crop 224 are
    then done on the device from these squares (256 -> 224 reproduces the
    usual resize-256 / centre-crop-224 evaluation).

    The decoded arrays are cached in <cub folder>/refilled_cache_<image_size>.npz
    and reused while that file is not older than images.txt and matches the split.
    There is no automatic download.
    """
    if image_size < 1:
        raise UserError(f"CUB-200 image_size must be a positive number of pixels, got {image_size}")
    folder = _cub_folder(Path(root))
    index_file = folder / "images.txt"
    images = _read_table(index_file, "relative path")
    labels_file = folder / "image_class_labels.txt"
    split_file = folder / "train_test_split.txt"
    classes_file = folder / "classes.txt"
    classes = _read_table(classes_file, "class name")
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise UserError(f"CUB-200-2011 file {classes_file}: class ids must be 1..{len(classes)} without gaps")
    labels = _int_values(_read_table(labels_file, "class id"), labels_file, range(1, len(classes) + 1))
    split = _int_values(_read_table(split_file, "split"), split_file, range(0, 2))
    for path, table in ((labels_file, labels), (split_file, split)):
        if table.keys() != images.keys():
            missing = sorted(images.keys() - table.keys())[:3] or sorted(table.keys() - images.keys())[:3]
            raise UserError(
                f"CUB-200-2011 file {path} does not list the same image ids as {index_file} "
                f"(e.g. id {missing[0]}): re-extract CUB_200_2011.tgz"
            )

    ids = sorted(images)
    train_ids = np.array([i for i in ids if split[i] == 1], dtype=np.int64)
    test_ids = np.array([i for i in ids if split[i] == 0], dtype=np.int64)
    cache = folder / f"refilled_cache_{image_size}.npz"
    arrays = _load_cub_cache(cache, index_file, train_ids, test_ids)
    if arrays is None:
        arrays = {"train_ids": train_ids, "test_ids": test_ids}
        for part, part_ids in (("train", train_ids), ("test", test_ids)):
            paths = [folder / "images" / images[i] for i in part_ids]
            arrays[f"{part}_images"] = decode_all(paths, image_size, f"CUB-200 {part} images", "re-extract CUB_200_2011.tgz")
            arrays[f"{part}_labels"] = np.array([labels[i] - 1 for i in part_ids], dtype=np.int64)
        _save_cub_cache(cache, arrays)

    return Source(
        name="CUB-200",
        train=ImageSet(images=arrays["train_images"], labels=arrays["train_labels"]),
        test=ImageSet(images=arrays["test_images"], labels=arrays["test_labels"]),
        class_names=[classes[c] for c in range(1, len(classes) + 1)],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
