"""Tests of refilled.data.sources on small files written in the official formats."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from refilled.data import sources
from refilled.data.sources import (
    ImageSet,
    Source,
    digits_split,
    load_cifar100,
    load_cub200,
    load_digits,
    load_source,
)
from refilled.errors import UserError
from refilled.schema.config import CLASS_COUNT
from support.cifar_files import make_cifar as _make_cifar
from support.cifar_files import write_py2_pickle as _write_py2_pickle


def _assert_one_line_error(excinfo, *fragments: str) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def _check_imageset(part: ImageSet, shape_tail: tuple[int, ...]) -> None:
    assert part.images.dtype == np.uint8
    assert part.images.flags["C_CONTIGUOUS"]
    assert part.images.shape[1:] == shape_tail
    assert part.labels.dtype == np.int64
    assert part.labels.shape == (len(part.images),)


# --------------------------------------------------------------------------- #
# CIFAR-100
# --------------------------------------------------------------------------- #


def test_cifar100_round_trip(tmp_path):
    written, names = _make_cifar(tmp_path)
    # The helper really writes Python 2 style pickles with the old numpy path.
    raw = (tmp_path / "cifar-100-python" / "train").read_bytes()
    assert raw.startswith(b"\x80\x02") and b"cnumpy.core.multiarray\n_reconstruct" in raw

    src = load_cifar100(tmp_path)
    assert isinstance(src, Source) and src.name == "CIFAR-100"
    assert src.class_names == names
    assert src.mean == (0.5071, 0.4867, 0.4408) and src.std == (0.2675, 0.2565, 0.2761)
    for part, n in ((src.train, 200), (src.test, 100)):
        _check_imageset(part, (3, 32, 32))
        assert len(part.images) == n
    for part, (data, fine) in ((src.train, written["train"]), (src.test, written["test"])):
        np.testing.assert_array_equal(part.labels, fine)
        # Row layout: 1024 red, 1024 green, 1024 blue, each 32x32 row-major.
        img = 7
        np.testing.assert_array_equal(part.images[img, 0].ravel(), data[img, :1024])
        np.testing.assert_array_equal(part.images[img, 1, 5, 9], data[img, 1024 + 5 * 32 + 9])
        np.testing.assert_array_equal(part.images[img, 2, 31, 31], data[img, 3071])
        np.testing.assert_array_equal(part.images.reshape(len(data), -1), data)


def test_cifar100_accepts_python3_repickle(tmp_path):
    written, _ = _make_cifar(tmp_path)
    folder = tmp_path / "cifar-100-python"
    data, fine = written["test"]
    with open(folder / "test", "wb") as f:  # modern numpy + protocol 2 (bytes via _codecs.encode)
        pickle.dump({b"data": data, b"fine_labels": fine}, f, protocol=2)
    src = load_source("cifar100", tmp_path)
    np.testing.assert_array_equal(src.test.images.reshape(len(data), -1), data)


def test_cifar100_missing_root_mentions_download(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_source("CIFAR-100", tmp_path / "nowhere")
    _assert_one_line_error(excinfo, "cifar-100-python", "--download")


def test_cifar100_download_is_a_thin_torchvision_call(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    calls = []

    def fake_cifar100(root, train, download):  # stands in for the network fetch
        calls.append((root, train, download))
        _make_cifar(tmp_path)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_cifar100)
    src = load_source("CIFAR-100", tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True)] and len(src.train.images) == 200

    def offline(root, train, download):
        raise RuntimeError("Error downloading cifar-100-python.tar.gz:\nURLError")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(UserError) as excinfo:
        load_cifar100(tmp_path / "elsewhere", download=True)
    _assert_one_line_error(excinfo, "URLError", "cifar.html")


def test_cifar100_missing_file_names_it(tmp_path):
    _make_cifar(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(UserError) as excinfo:
        load_cifar100(tmp_path)
    _assert_one_line_error(excinfo, "meta", "--download")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_cifar100_broken_pickle(tmp_path, damage):
    _make_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": np.random.default_rng(3).bytes(5000), "empty": b""}[damage])
    with pytest.raises(UserError) as excinfo:
        load_cifar100(tmp_path)
    _assert_one_line_error(excinfo, str(path))


@pytest.mark.parametrize(
    "content",
    [
        [1, 2, 3],  # not a dict
        {b"fine_labels": [0] * 4},  # no data
        {b"data": np.zeros((4, 3072), np.float32), b"fine_labels": [0] * 4},  # wrong dtype
        {b"data": np.zeros((4, 1024), np.uint8), b"fine_labels": [0] * 4},  # wrong shape
        {b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0] * 3},  # label count
        {b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 1, 2, 100]},  # label range
        {b"data": np.zeros((4, 3072), np.uint8)},  # no labels
    ],
)
def test_cifar100_wrong_structure(tmp_path, content):
    _make_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / "test"
    _write_py2_pickle(path, content)
    with pytest.raises(UserError) as excinfo:
        load_cifar100(tmp_path)
    _assert_one_line_error(excinfo, str(path))


def test_cifar100_wrong_meta(tmp_path):
    _make_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / "meta"
    _write_py2_pickle(path, {b"fine_label_names": [b"a", b"b"]})
    with pytest.raises(UserError) as excinfo:
        load_cifar100(tmp_path)
    _assert_one_line_error(excinfo, str(path))


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def test_cifar100_refuses_code_in_pickle(tmp_path):
    _make_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    with open(path, "wb") as f:
        pickle.dump({b"data": _Boom()}, f, protocol=2)
    with pytest.raises(UserError) as excinfo:
        load_cifar100(tmp_path)
    _assert_one_line_error(excinfo, str(path), "refusing")


# --------------------------------------------------------------------------- #
# CUB-200-2011
# --------------------------------------------------------------------------- #

# (class folder, [(file name, (width, height), split, solid colour or None)]); ids are given in order.
_CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
_SOLID = (200, 30, 90)


def _make_cub(folder, nested=True):
    cub = folder / "CUB_200_2011" if nested else folder
    rng = np.random.default_rng(1)
    sizes = [(40, 30), (30, 50), (64, 20), (25, 25)]
    rows, labels, split, expected = [], [], [], {}
    image_id = 0
    for c, cls in enumerate(_CUB_CLASSES):
        (cub / "images" / cls).mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            image_id += 1
            ext = "png" if k % 2 else "jpg"
            rel = f"{cls}/{cls.split('.')[1]}_{k:04d}.{ext}"
            if image_id == 1:  # solid colour, different sides
                img = Image.new("RGB", (w, h), _SOLID)
            elif image_id == 2:  # greyscale must become RGB
                img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
            else:
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img.save(cub / "images" / rel)
            rows.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            is_train = int(k < 3 if c != 1 else k >= 2)  # not simply "first N"
            split.append(f"{image_id} {is_train}")
            expected[image_id] = (c, is_train)
    (cub / "images.txt").write_text("\n".join(rows) + "\n")
    (cub / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (cub / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (cub / "classes.txt").write_text("".join(f"{i + 1} {name}\n" for i, name in enumerate(_CUB_CLASSES)))
    return cub, expected


def test_cub200_decodes_split_and_caches(tmp_path, monkeypatch):
    cub, expected = _make_cub(tmp_path)
    src = load_source("cub-200-2011", tmp_path)
    assert src.name == "CUB-200" and src.class_names == _CUB_CLASSES
    assert src.mean == (0.485, 0.456, 0.406) and src.std == (0.229, 0.224, 0.225)
    _check_imageset(src.train, (3, 256, 256))
    _check_imageset(src.test, (3, 256, 256))
    train_ids = [i for i, (_, t) in sorted(expected.items()) if t]
    test_ids = [i for i, (_, t) in sorted(expected.items()) if not t]
    assert len(src.train.images) == len(train_ids) == 8 and len(src.test.images) == len(test_ids) == 4
    np.testing.assert_array_equal(src.train.labels, [expected[i][0] for i in train_ids])
    np.testing.assert_array_equal(src.test.labels, [expected[i][0] for i in test_ids])
    assert set(src.train.labels.tolist()) <= {0, 1, 2}
    # Image id 1 is the solid-colour JPEG and the first training image (JPEG allows tiny errors).
    assert np.abs(src.train.images[0].astype(int) - np.array(_SOLID)[:, None, None]).max() <= 3
    # Image id 2 is greyscale: all three channels equal.
    assert (src.train.images[1][0] == src.train.images[1][1]).all()

    cache = cub / "refilled_cache_256.npz"
    assert cache.is_file()
    assert not list(cub.glob("*.tmp"))

    def no_open(*args, **kwargs):
        raise AssertionError("cached load must not open images")

    monkeypatch.setattr(Image, "open", no_open)
    again = load_cub200(tmp_path)
    for a, b in ((src.train, again.train), (src.test, again.test)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    monkeypatch.undo()

    # A changed split invalidates the cache even if its mtime says otherwise.
    lines = (cub / "train_test_split.txt").read_text().splitlines()
    lines[0] = "1 0"
    (cub / "train_test_split.txt").write_text("\n".join(lines) + "\n")
    changed = load_cub200(tmp_path)
    assert len(changed.train.images) == 7 and len(changed.test.images) == 5


def test_cub200_root_is_the_folder_and_small_size(tmp_path):
    cub, expected = _make_cub(tmp_path, nested=False)
    src = load_cub200(cub, image_size=16)
    _check_imageset(src.train, (3, 16, 16))
    assert (cub / "refilled_cache_16.npz").is_file()
    assert np.abs(src.train.images[0].astype(int) - np.array(_SOLID)[:, None, None]).max() <= 3


def test_cub200_stale_cache_is_rebuilt(tmp_path):
    cub, _ = _make_cub(tmp_path)
    load_cub200(tmp_path, image_size=8)
    cache = cub / "refilled_cache_8.npz"
    old = cache.stat().st_mtime_ns
    os.utime(cache, ns=(old - 10**10, old - 10**10))  # now older than images.txt
    load_cub200(tmp_path, image_size=8)
    assert cache.stat().st_mtime_ns > old - 10**10


def test_cub200_cache_that_cannot_be_written_warns_and_loads(tmp_path):
    cub, expected = _make_cub(tmp_path)
    (cub / "refilled_cache_8.npz").mkdir()  # in the way of the cache (a read-only folder is not, for root)
    with pytest.warns(UserWarning, match="could not write CUB-200 cache"):
        src = load_cub200(tmp_path, image_size=8)
    _check_imageset(src.train, (3, 8, 8))
    assert (cub / "refilled_cache_8.npz").is_dir() and not list(cub.glob("*.tmp"))


def test_cub200_missing_folder(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_source("CUB-200", tmp_path, download=True)
    _assert_one_line_error(excinfo, "CUB_200_2011.tgz", str(tmp_path))


@pytest.mark.parametrize(
    "filename", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"]
)
def test_cub200_missing_index_file(tmp_path, filename):
    cub, _ = _make_cub(tmp_path)
    (cub / filename).unlink()
    with pytest.raises(UserError) as excinfo:
        load_cub200(tmp_path)
    _assert_one_line_error(excinfo, filename)


def test_cub200_inconsistent_ids(tmp_path):
    cub, _ = _make_cub(tmp_path)
    path = cub / "image_class_labels.txt"
    path.write_text(path.read_text().replace("\n12 3\n", "\n13 3\n"))
    with pytest.raises(UserError) as excinfo:
        load_cub200(tmp_path)
    _assert_one_line_error(excinfo, "image_class_labels.txt")


def test_cub200_bad_class_id(tmp_path):
    cub, _ = _make_cub(tmp_path)
    path = cub / "image_class_labels.txt"
    path.write_text(path.read_text().replace("\n12 3\n", "\n12 4\n"))
    with pytest.raises(UserError) as excinfo:
        load_cub200(tmp_path)
    _assert_one_line_error(excinfo, "image_class_labels.txt")


def test_cub200_missing_or_corrupt_image(tmp_path):
    cub, _ = _make_cub(tmp_path)
    victim = next((cub / "images" / _CUB_CLASSES[2]).glob("*.jpg"))
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(UserError) as excinfo:
        load_cub200(tmp_path, image_size=8)
    _assert_one_line_error(excinfo, victim.name)
    victim.unlink()
    with pytest.raises(UserError) as excinfo:
        load_cub200(tmp_path, image_size=8)
    _assert_one_line_error(excinfo, victim.name)
    assert not (cub / "refilled_cache_8.npz").exists()


# --------------------------------------------------------------------------- #
# digits
# --------------------------------------------------------------------------- #


def test_digits():
    src = load_source("Digits")
    assert src.name == "digits" and src.class_names == [str(d) for d in range(10)]
    assert len(src.class_names) == CLASS_COUNT["digits"]  # what the search assumes before reading a file
    _check_imageset(src.train, (1, 8, 8))
    _check_imageset(src.test, (1, 8, 8))
    assert len(src.train.images) + len(src.test.images) == 1797
    assert len(src.mean) == len(src.std) == 1
    for part in (src.train, src.test):
        assert part.images.min() == 0 and part.images.max() == 255

    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    train_idx, test_idx = digits_split()
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(1797))
    # The split indices are the ones the loader used, and pixels are round(v * 255 / 16).
    np.testing.assert_array_equal(src.test.labels, bunch.target[test_idx])
    np.testing.assert_array_equal(src.train.labels, bunch.target[train_idx])
    expected = np.array([[round(v * 255 / 16) for v in img.ravel()] for img in bunch.images[test_idx[:20]]])
    np.testing.assert_array_equal(src.test.images[:20].reshape(20, -1), expected)

    # About 30% of every class is held out.
    for c in range(10):
        n_c = int((bunch.target == c).sum())
        assert int((src.test.labels == c).sum()) == round(0.3 * n_c)

    # Deterministic, independent of global seeds.
    np.random.seed(123)
    again = load_digits()
    np.testing.assert_array_equal(again.test.images, src.test.images)
    np.testing.assert_array_equal(again.train.labels, src.train.labels)

    # The hard-coded normalisation matches the train part.
    pixels = src.train.images.astype(np.float64) / 255
    assert abs(pixels.mean() - src.mean[0]) < 1e-4 and abs(pixels.std() - src.std[0]) < 1e-4


def test_digits_upsampled_to_the_authors_input():
    small, big = load_digits(), load_source("digits", image_size=32)
    _check_imageset(big.train, (3, 32, 32))
    _check_imageset(big.test, (3, 32, 32))
    np.testing.assert_array_equal(big.train.labels, small.train.labels)  # the same images, the same split
    np.testing.assert_array_equal(big.train.images[:, 0], big.train.images[:, 2])  # three equal channels
    # bilinear upsampling (smooth): every 4x4 block averages back to close to its 8x8 pixel
    blocks = big.test.images[:, 0].astype(np.float64).reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))
    assert np.corrcoef(blocks.ravel(), small.test.images[:, 0].ravel())[0, 1] > 0.95
    pixels = big.train.images.astype(np.float64) / 255
    assert len(big.mean) == 3 and abs(pixels.mean() - big.mean[0]) < 1e-4 and abs(pixels.std() - big.std[0]) < 1e-4
    with pytest.raises(UserError, match="image_size"):
        load_digits(4)


# --------------------------------------------------------------------------- #
# names
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "name, canonical",
    [("CIFAR-100", "CIFAR-100"), ("cifar100", "CIFAR-100"), ("Cifar_100", "CIFAR-100"),
     ("CUB-200", "CUB-200"), ("cub200", "CUB-200"), ("CUB-200-2011", "CUB-200"), ("digits", "digits")],
)
def test_aliases(name, canonical):
    assert sources.canonical_data_name(name) == canonical


def test_unknown_name():
    with pytest.raises(UserError) as excinfo:
        load_source("imagenet", "data")
    _assert_one_line_error(excinfo, "imagenet", "CIFAR-100", "CUB-200", "digits")
