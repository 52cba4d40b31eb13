"""Readers that turn each data set into in-memory uint8 arrays.

Training keeps a whole data set on the device and augments whole batches
there, so every reader returns plain arrays: images uint8 (N, C, H, W),
contiguous, and labels int64 (N,) holding the data set's original class
indices. Nothing here normalises or augments; `Source.mean` / `Source.std`
give the per-channel statistics (in [0, 1] pixel units) for the device code.

Data sets:
  * CIFAR-100: the official python pickles in ROOT/cifar-100-python/.
  * CUB-200-2011: the official folder ROOT/CUB_200_2011/ (or ROOT itself),
    decoded once to fixed squares and cached next to the data.
  * digits: scikit-learn's bundled 8x8 digits, with a fixed held-out part.

Every problem the user can fix raises `UserError` with a one-line message.
"""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from refilled import config
from refilled.config import DATA_NAMES
from refilled.errors import UserError

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pixel mean/std of the digits train part (1258 images, uint8 / 255), computed
# once with `digits_split()` below and hard-coded so they never drift.
DIGITS_MEAN = (0.3052,)
DIGITS_STD = (0.3758,)

DIGITS_SPLIT_SEED = 20200617
DIGITS_TEST_FRACTION = 0.3

CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"


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


def _one_line(text: object) -> str:
    """Collapse an exception text so a UserError message stays one line."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- #
# Dispatch
# --------------------------------------------------------------------------- #

def canonical_data_name(data_name: str) -> str:
    """Map a user-given data set name (e.g. "cifar100", "cub-200-2011") to its canonical name."""
    name = config.canonical_data_name(data_name)
    if name is None:
        raise UserError(f"unknown data set {data_name!r}: use one of {', '.join(DATA_NAMES)}")
    return name


def load_source(data_name: str, root: str | Path = "data", download: bool = False,
                image_size: int | None = None) -> Source:
    """Load a data set by name; `root` is the folder that holds the data sets.

    `download` only applies to CIFAR-100 (CUB-200 has no automatic download,
    digits ships with scikit-learn). `image_size` only to digits (8, their own
    size, by default); CIFAR-100 is 32 px and CUB-200 cropped to 224.
    """
    name = canonical_data_name(data_name)
    if name == "CIFAR-100":
        return load_cifar100(root, download=download)
    if name == "CUB-200":
        return load_cub200(root)
    return load_digits(image_size or 8)


# --------------------------------------------------------------------------- #
# CIFAR-100: official python pickles
# --------------------------------------------------------------------------- #

# The official files are Python 2 pickles holding lists, byte strings and one
# numpy array. Unpickling can run arbitrary code, so only the few globals that
# such a file (or a Python 3 re-pickle of it) needs are allowed.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        with warnings.catch_warnings():  # numpy 2 warns on the old numpy.core path
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    """Unpickle one official CIFAR file into a dict with bytes keys."""
    if not path.is_file():
        raise UserError(
            f"CIFAR-100 file {path} is missing: put the complete extracted 'cifar-100-python' "
            f"folder (train, test, meta) there, or pass --download"
        )
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as err:  # truncated or garbage files raise many different types
        raise UserError(
            f"cannot read CIFAR-100 file {path} ({type(err).__name__}: {_one_line(err)}): "
            f"it is not an official CIFAR-100 python pickle; re-extract cifar-100-python.tar.gz "
            f"or pass --download"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(
            f"CIFAR-100 file {path} holds a {type(obj).__name__}, not a dict: "
            f"re-extract cifar-100-python.tar.gz"
        )
    # Accept str keys too (a Python 3 re-pickle); the official files have bytes keys.
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _cifar_names(path: Path) -> list[str]:
    meta = _read_cifar_pickle(path)
    names = meta.get(b"fine_label_names")
    if not isinstance(names, (list, tuple)) or len(names) != 100:
        raise UserError(
            f"CIFAR-100 file {path} has no list of 100 b'fine_label_names': "
            f"re-extract cifar-100-python.tar.gz"
        )
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _cifar_split(path: Path) -> ImageSet:
    part = _read_cifar_pickle(path)
    data, labels = part.get(b"data"), part.get(b"fine_labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(
            f"CIFAR-100 file {path}: b'data' must be a uint8 array of shape (N, 3072), got {got}; "
            f"re-extract cifar-100-python.tar.gz"
        )
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if labels is None or labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 99)):
        raise UserError(
            f"CIFAR-100 file {path}: b'fine_labels' must be {len(data)} integers in 0..99; "
            f"re-extract cifar-100-python.tar.gz"
        )
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each row-major: CHW.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32))
    return ImageSet(images=images, labels=labels)


def _download_cifar100(root: Path) -> None:
    """Fetch and extract the official archive into root/cifar-100-python via torchvision."""
    import torchvision  # only needed here

    try:
        torchvision.datasets.CIFAR100(str(root), train=True, download=True)
    except Exception as err:
        raise UserError(
            f"downloading CIFAR-100 into {root} failed ({_one_line(err)}): check the network, or "
            f"extract cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html there"
        ) from None


def load_cifar100(root: str | Path, download: bool = False) -> Source:
    """CIFAR-100 from ROOT/cifar-100-python/{train,test,meta} (the official python version).

    50000 train and 10000 test images of 3x32x32; labels are the fine labels 0..99.
    Only those three paths are ever unpickled.
    """
    root = Path(root)
    folder = root / "cifar-100-python"
    files = [folder / "train", folder / "test", folder / "meta"]
    if download:  # torchvision checks the files' md5 and fetches only when missing or damaged
        _download_cifar100(root)
    if not folder.is_dir():
        raise UserError(
            f"CIFAR-100 not found under {folder}: put the extracted 'cifar-100-python' folder "
            f"(train, test, meta pickles from https://www.cs.toronto.edu/~kriz/cifar.html) there, "
            f"or pass --download"
        )
    return Source(
        name="CIFAR-100",
        train=_cifar_split(files[0]),
        test=_cifar_split(files[1]),
        class_names=_cifar_names(files[2]),
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    )


# --------------------------------------------------------------------------- #
# CUB-200-2011: official folder of JPEGs plus index text files
# --------------------------------------------------------------------------- #


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


def _square_rgb(path: Path, size: int) -> np.ndarray:
    """Decode one image to RGB, shorter side -> size, centre crop size x size; CHW uint8.

    Mirrors torchvision's Resize(size) + CenterCrop(size) on PIL images.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            # The shorter side becomes exactly `size`; the longer one is truncated like torchvision.
            if w <= h:
                new_w, new_h = size, int(size * h / w)
            else:
                new_w, new_h = int(size * w / h), size
            img = img.resize((new_w, new_h), Image.BILINEAR)
            left = int(round((new_w - size) / 2.0))
            top = int(round((new_h - size) / 2.0))
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError) as err:  # missing, unreadable or corrupt file
        raise UserError(
            f"cannot read CUB-200-2011 image {path} ({_one_line(err)}): re-extract CUB_200_2011.tgz"
        ) from None


def _decode_all(paths: list[Path], size: int, desc: str) -> np.ndarray:
    """Decode images into one preallocated (N, 3, size, size) array with a thread pool.

    PIL releases the GIL while decoding and resizing, so threads scale; filling a
    preallocated array avoids holding a second copy of the whole set.
    """
    from tqdm import tqdm

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = _square_rgb(paths[i], size)

    workers = min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(work, i) for i in range(len(paths))]
        try:
            with tqdm(total=len(paths), desc=desc, unit="img") as bar:
                for fut in concurrent.futures.as_completed(futures):
                    fut.result()  # re-raises the first UserError
                    bar.update(1)
        except BaseException:
            for fut in futures:  # don't decode thousands more images before reporting it
                fut.cancel()
            raise
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
        warnings.warn(f"ignoring unreadable CUB-200 cache {path}: {_one_line(err)}")
        return None
    # The split files may have changed since the cache was written.
    if not (np.array_equal(arrays["train_ids"], train_ids) and np.array_equal(arrays["test_ids"], test_ids)):
        return None
    return arrays


def _save_cub_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically, so a crash never leaves half a file (write_atomic removes its
    temporary file when it fails)."""
    from refilled.store.atomic import write_atomic

    try:  # uncompressed: decoded photos barely compress, and loading is faster
        write_atomic(path, lambda f: np.savez(f, **arrays))
    except OSError as err:  # e.g. a read-only data folder: the cache is only an optimisation
        warnings.warn(f"could not write CUB-200 cache {path}: {_one_line(err)}")


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
            arrays[f"{part}_images"] = _decode_all(paths, image_size, f"CUB-200 {part} images")
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


# --------------------------------------------------------------------------- #
# digits: scikit-learn's bundled 8x8 digits
# --------------------------------------------------------------------------- #


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
