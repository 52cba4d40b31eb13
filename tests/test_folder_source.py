"""The image-folder data source (refilled.data.sources.folder) on folders the tests write."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refilled.data.sources.folder import FolderOptions, class_folders, load_folder
from refilled.errors import UserError
from support.image_folders import write_folder, write_image

CLASSES = ["cat", "dog", "fox", "owl"]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "pets", CLASSES)


def options(tmp_path: Path, **changes) -> FolderOptions:
    return FolderOptions(**{"image_size": 16, "cache": str(tmp_path / "cache"), **changes})


def test_classes_are_the_sorted_folder_names_and_every_image_is_rgb_at_the_size(folder, tmp_path):
    src = load_folder(folder, options(tmp_path))
    assert src.class_names == CLASSES == class_folders(folder)
    assert src.train.images.shape == (24, 3, 16, 16) and src.train.images.dtype == np.uint8
    assert src.test.images.shape == (12, 3, 16, 16)
    assert np.bincount(src.train.labels).tolist() == [6, 6, 6, 6]
    # the first class is red, the third blue: the colours survive grey-free decoding
    red, blue = src.train.images[src.train.labels == 0][0], src.train.images[src.train.labels == 2][0]
    assert red[0].mean() > red[2].mean() and blue[2].mean() > blue[0].mean()
    grey = src.train.images[src.train.labels == 0][2]  # every third image was saved grey
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()
    assert len(src.mean) == len(src.std) == 3 and all(0 < s for s in src.std)


def test_nothing_is_written_into_the_folder_and_the_cache_is_reused_until_a_file_changes(folder, tmp_path,
                                                                                         monkeypatch):
    before = snapshot(folder)
    os.chmod(folder, 0o555)  # the folder may be read-only or shared
    try:
        first = load_folder(folder, options(tmp_path))
    finally:
        os.chmod(folder, 0o755)
    assert snapshot(folder) == before
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def no_open(*args, **kwargs):
        raise AssertionError("a cached folder must not be decoded again")

    monkeypatch.setattr(Image, "open", no_open)
    again = load_folder(folder, options(tmp_path))
    assert (again.train.images == first.train.images).all() and again.class_names == first.class_names
    monkeypatch.undo()
    write_image(folder / "train" / "cat" / "new.png", (0, 0, 0), np.random.default_rng(1), (20, 20))
    changed = load_folder(folder, options(tmp_path))
    assert len(changed.train.labels) == 25 and len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_a_folder_without_test_is_split_once_by_a_fixed_seed_and_the_split_is_recorded(tmp_path, capsys):
    root = write_folder(tmp_path / "notest", CLASSES, per_class=10, test_per_class=None)
    with pytest.raises(UserError, match="no test/ folder.*folder_test_fraction"):
        load_folder(root, options(tmp_path))
    src = load_folder(root, options(tmp_path, test_fraction=0.2))
    assert np.bincount(src.test.labels).tolist() == [2, 2, 2, 2] and len(src.train.labels) == 32
    recorded = list((tmp_path / "cache").glob("*.test_split.json"))
    assert len(recorded) == 1 and "held out as the test split" in capsys.readouterr().err
    other = load_folder(root, options(tmp_path / "elsewhere", test_fraction=0.2))
    assert (other.test.images == src.test.images).all()  # the same images, whoever splits it


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "test").rename(r / "tests"), "no test/ folder"),
    (lambda r: (r / "train").rename(r / "training"), "no train/ folder"),
    (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()], "class folder .*dog is empty"),
    (lambda r: (r / "test" / "owl").rename(r / "test" / "owls"), "owl only in train/"),
    (lambda r: (r / "train" / "fox" / "notes.txt").write_text("not an image"), "notes.txt is not an image"),
])
def test_bad_folders_are_refused_in_one_line_and_nothing_is_written(folder, tmp_path, damage, message):
    damage(folder)
    before = snapshot(folder)
    with pytest.raises(UserError, match=message) as refused:
        load_folder(folder, options(tmp_path))
    assert "\n" not in str(refused.value)
    assert snapshot(folder) == before and not list((tmp_path / "cache").glob("*.npz"))


def test_a_file_that_is_no_image_is_left_out_with_one_note_when_asked(folder, tmp_path, capsys):
    (folder / "train" / "fox" / "notes.txt").write_text("not an image")
    src = load_folder(folder, options(tmp_path, skip_bad_images=True))
    assert len(src.train.labels) == 24
    assert capsys.readouterr().err.count("not images") == 1


def test_a_cache_inside_the_image_folder_is_refused(folder):
    with pytest.raises(UserError, match="inside the image folder"):
        load_folder(folder, FolderOptions(image_size=16, cache=str(folder / "cache")))
    assert not (folder / "cache").exists()


def test_data_root_that_is_no_folder_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        load_folder(tmp_path / "missing", options(tmp_path))
