"""CIFAR-100 from the official python pickles in ROOT/cifar-100-python/."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np

from refilled.data.sources._base import ImageSet, Source, one_line
from refilled.errors import UserError

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


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
            f"cannot read CIFAR-100 file {path} ({type(err).__name__}: {one_line(err)}): "
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
            f"downloading CIFAR-100 into {root} failed ({one_line(err)}): check the network, or "
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
