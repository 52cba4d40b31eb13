"""A folder of the user's own images, in torchvision's ImageFolder layout:

    DIR/train/<class>/*    DIR/test/<class>/*

Classes are the folder names, sorted; any file Pillow reads is an image (grey, RGB, RGBA,
palette, any size: converted to RGB, shorter side to `image_size`, centre-cropped square).
Without test/, `test_fraction` holds out that part of each class of train/ once, by a fixed
seed, and the split is recorded beside the cache. The images are decoded once into a cache
outside DIR (which may be read-only or shared: nothing is written there), keyed by the
folder's contents (every file's path, size and modification time): a change rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refilled.data.sources._base import ImageSet, Source
from refilled.data.sources._images import decode_all, is_image
from refilled.errors import UserError

SPLIT_SEED = 20200617  # the held-out test part of a folder without test/: never the run's seed
CACHE_ENV = "TUNE_REFILLED_CACHE"
LAYOUT = "DIR/train/<class>/ and DIR/test/<class>/, one folder of images a class (torchvision's ImageFolder layout)"


@dataclass(frozen=True)
class FolderOptions:
    """How a folder is read: the side images are decoded to, where the cache lives (None: the
    default), the part of train/ held out as test when there is no test/ (None: refuse), and
    whether a file that is no image is left out with a note (else refused)."""

    image_size: int = 32
    cache: str | None = None
    test_fraction: float | None = None
    skip_bad_images: bool = False


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tune-refilled") / "folders"


def class_folders(root: str | Path) -> list[str]:
    """The class names of the folder data set at `root` (sorted folder names of train/),
    checked as `load_folder` checks them: for the config, before any image is read."""
    return [name for name, _ in _listing(_train(Path(root).expanduser()))]


def load_folder(root: str | Path, options: FolderOptions = FolderOptions()) -> Source:
    """The folder data set at `root`, from its cache when the folder has not changed."""
    root = Path(root).expanduser().resolve()
    train = _listing(_train(root))
    classes = [name for name, _ in train]
    test_dir = root / "test"
    if test_dir.is_dir():
        test = _listing(test_dir, "test")
        if [name for name, _ in test] != classes:
            only_train = sorted(set(classes) - {n for n, _ in test})
            only_test = sorted({n for n, _ in test} - set(classes))
            where = (f"{', '.join(only_train[:5])} only in train/" if only_train else
                     f"{', '.join(only_test[:5])} only in test/")
            raise UserError(f"the classes of {root}/train and {root}/test differ ({where}): give both the same "
                            "class folders")
    elif options.test_fraction is None:
        raise UserError(f"{root} has no test/ folder: add one ({LAYOUT}), or set folder_test_fraction (e.g. 0.2) "
                        "to hold out that part of each class of train/ once, by a fixed seed")
    else:
        test = None
    cache = Path(options.cache).expanduser().resolve() if options.cache else default_cache()
    if cache == root or root in cache.parents:
        raise UserError(f"folder_cache {cache} is inside the image folder {root}, which is never written to: "
                        "name a folder outside it")
    files = [(f, label) for label, (_, fs) in enumerate(train) for f in fs]
    files += [(f, label) for label, (_, fs) in enumerate(test or []) for f in fs]
    digest = _digest(root, files, options)
    path = cache / f"{root.name}-{digest}.npz"
    arrays = _read_cache(path)
    if arrays is None:
        arrays = _decode(root, files, test is not None, options)
        _write_cache(path, arrays)
    return Source(name="folder", class_names=classes,
                  train=ImageSet(arrays["train_images"], arrays["train_labels"]),
                  test=ImageSet(arrays["test_images"], arrays["test_labels"]),
                  mean=tuple(float(m) for m in arrays["mean"]), std=tuple(float(s) for s in arrays["std"]))


def _train(root: Path) -> Path:
    if not root.is_dir():
        raise UserError(f"data_root {root} is not a folder: give the folder that holds {LAYOUT}")
    train = root / "train"
    if not train.is_dir():
        raise UserError(f"{root} has no train/ folder: put the images in {LAYOUT}")
    return train


def _listing(part: Path, name: str = "train") -> list[tuple[str, list[Path]]]:
    """(class, its files, sorted) for each class folder of `part`, sorted by class name."""
    out = []
    for folder in sorted(p for p in part.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"class folder {folder} is empty: put its images there, or remove the folder")
        out.append((folder.name, files))
    if not out:
        raise UserError(f"{part} holds no class folder: put the images in {LAYOUT}")
    return out


def _digest(root: Path, files: list[tuple[Path, int]], options: FolderOptions) -> str:
    h = hashlib.sha1(json.dumps([options.image_size, options.test_fraction, options.skip_bad_images, 1]).encode())
    for f, label in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _decode(root: Path, files: list[tuple[Path, int]], has_test: bool, options: FolderOptions) -> dict:
    bad = [f for f, _ in files if not is_image(f)]
    if bad and not options.skip_bad_images:
        raise UserError(f"{bad[0]} is not an image Pillow can read ({len(bad)} such file(s) in {root}): remove it, "
                        "or set skip_bad_images: true to leave such files out")
    if bad:
        print(f"note: left out {len(bad)} file(s) of {root} that are not images (skip_bad_images), e.g. {bad[0]}",
              file=sys.stderr)
    kept = [(f, label) for f, label in files if f not in set(bad)]
    is_test = np.array([f.relative_to(root).parts[0] == "test" for f, _ in kept])
    labels = np.array([label for _, label in kept], dtype=np.int64)
    if not has_test:
        is_test = _held_out(labels, options.test_fraction)
    for part, mask in (("train", ~is_test), ("test", is_test)):
        missing = sorted(set(labels.tolist()) - set(labels[mask].tolist()))
        if missing:
            raise UserError(f"{root}: a class has no {part} image left ({len(missing)} class(es)): add images, "
                            "or lower folder_test_fraction")
    images = decode_all([f for f, _ in kept], options.image_size, f"{root.name} images", "replace or remove it")
    train = images[~is_test].astype(np.float64) / 255
    return {"train_images": np.ascontiguousarray(images[~is_test]), "train_labels": labels[~is_test],
            "test_images": np.ascontiguousarray(images[is_test]), "test_labels": labels[is_test],
            "mean": train.mean(axis=(0, 2, 3)).round(4), "std": train.std(axis=(0, 2, 3)).round(4),
            "test_files": np.array([str(f.relative_to(root)) for (f, _), t in zip(kept, is_test) if t]),
            "held_out": np.array(not has_test)}


def _held_out(labels: np.ndarray, fraction: float) -> np.ndarray:
    """`fraction` of each class (at least one image of a class that has two), by SPLIT_SEED."""
    rng = np.random.default_rng(SPLIT_SEED)
    out = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = min(len(members) - 1, max(1, round(fraction * len(members))))
        out[rng.permutation(members)[:n]] = True
    return out


def _read_cache(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError):  # absent, or cut short by a crash: decoded again
        return None


def _write_cache(path: Path, arrays: dict) -> None:
    from refilled.files.atomic import write_atomic

    try:
        write_atomic(path, lambda f: np.savez(f, **arrays))
        if arrays["held_out"]:
            split = path.with_suffix(".test_split.json")  # the held-out part, recorded once
            write_atomic(split, json.dumps(arrays["test_files"].tolist(), indent=0))
            print(f"note: {len(arrays['test_files'])} images of train/ held out as the test split by seed "
                  f"{SPLIT_SEED} (the list: {split})", file=sys.stderr)
    except OSError as err:  # a cache that cannot be written is only slower: decoded again next time
        print(f"note: could not write the image cache {path} ({err.strerror or err}): set folder_cache to a "
              "writable folder to decode the images once", file=sys.stderr)
