"""refilled.data.splits: class positions, task construction, shots and tuning splits."""

from __future__ import annotations

import numpy as np
import pytest

from refilled.data.sources import ImageSet, Source, load_digits
from refilled.data.splits import (
    cifar_fs_order,
    class_order,
    parse_positions,
    student_task,
    teacher_task,
)
from refilled.errors import UserError
from support.configs import make_tiny_config

# ----------------------------------------------------------------------------- a synthetic source

TRAIN_COUNTS = [30, 12, 25, 40, 9, 20]  # images a class; deliberately unequal
TEST_COUNTS = [5, 6, 7, 8, 9, 10]


def _imageset(counts, offset, seed):
    """Images whose pixels encode (unique id, original label), shuffled order."""
    labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(counts)])
    perm = np.random.default_rng(seed).permutation(len(labels))
    labels = labels[perm]
    ids = np.arange(len(labels)) + offset
    images = np.zeros((len(labels), 1, 2, 2), dtype=np.uint8)
    images[:, 0, 0, 0] = ids % 256
    images[:, 0, 0, 1] = ids // 256
    images[:, 0, 1, 0] = labels
    images[:, 0, 1, 1] = 7
    return ImageSet(np.ascontiguousarray(images), labels)


@pytest.fixture
def source() -> Source:
    return Source(name="digits", train=_imageset(TRAIN_COUNTS, 0, 1), test=_imageset(TEST_COUNTS, 1000, 2),
                  class_names=[f"c{i}" for i in range(len(TRAIN_COUNTS))], mean=(0.5,), std=(0.25,))


def cfg(**kw):
    base = dict(source_classes="all", target_classes="all", shots=None, flag_tuning=False, val_fraction=0.25)
    base.update(kw)
    return make_tiny_config(**base)


def original_labels(s: ImageSet) -> np.ndarray:
    return s.images[:, 0, 1, 0].astype(np.int64)


def image_keys(s: ImageSet) -> list[bytes]:
    return [img.tobytes() for img in s.images]


def check_remap(task, full: ImageSet | None = None) -> None:
    """Labels are 0..K-1 and map back to the original class of every image."""
    for part in (task.train, task.eval):
        assert part.labels.dtype == np.int64
        assert part.labels.min() >= 0 and part.labels.max() < task.n_classes
        np.testing.assert_array_equal(np.asarray(task.classes)[part.labels], original_labels(part))


# ----------------------------------------------------------------------------- positions

@pytest.mark.parametrize("spec,n,expected", [
    ("all", 5, [0, 1, 2, 3, 4]),
    ("0-49", 100, list(range(50))),
    ("0,3,7-9", 10, [0, 3, 7, 8, 9]),
    (" 3 , 1 ", 10, [1, 3]),
    ("2-4,3-5", 10, [2, 3, 4, 5]),
    ("9", 10, [9]),
    (7, 10, [7]),
])
def test_parse_positions(spec, n, expected):
    assert parse_positions(spec, n, "target_classes") == expected


@pytest.mark.parametrize("spec", ["abc", "5-3", "", "1-2-3", "-1", "0,,1", "1.5", "a-b", "all-3"])
def test_parse_positions_bad_strings(spec):
    with pytest.raises(UserError) as e:
        parse_positions(spec, 10, "source_classes")
    msg = str(e.value)
    assert "'source_classes'" in msg and "\n" not in msg


@pytest.mark.parametrize("spec", ["0-10", "10", "3,200-210"])
def test_parse_positions_out_of_range(spec):
    with pytest.raises(UserError) as e:
        parse_positions(spec, 10, "target_classes")
    msg = str(e.value)
    assert "'target_classes'" in msg and "out of range" in msg and "0-9" in msg


# ----------------------------------------------------------------------------- CIFAR-FS order

def test_cifar_fs_order():
    order = list(cifar_fs_order())
    assert sorted(order) == list(range(100))
    groups = order[:64], order[64:80], order[80:]
    assert [len(g) for g in groups] == [64, 16, 20]
    for g in groups:
        assert list(g) == sorted(g)
    # the group boundaries are real: each group restarts low
    assert order[64] < order[63] and order[80] < order[79]
    assert order[:5] == [0, 1, 3, 6, 9]


def test_class_order(source):
    assert class_order(source, "natural") == list(range(6))
    assert class_order(source, "cifar_fs") == list(cifar_fs_order())


# ----------------------------------------------------------------------------- tasks

@pytest.mark.parametrize("teacher_spec,student_spec,relation", [
    ("0-2", "3-5", "disjoint"),
    ("0-3", "2-5", "overlapping"),
    ("all", "all", "identical"),
])
def test_teacher_and_student_class_sets(source, teacher_spec, student_spec, relation):
    c = cfg(source_classes=teacher_spec, target_classes=student_spec)
    t, s = teacher_task(source, c), student_task(source, c)
    common = set(t.classes) & set(s.classes)
    if relation == "disjoint":
        assert t.classes == [0, 1, 2] and s.classes == [3, 4, 5] and not common
    elif relation == "overlapping":
        assert t.classes == [0, 1, 2, 3] and s.classes == [2, 3, 4, 5] and common == {2, 3}
    else:
        assert t.classes == s.classes == list(range(6))
    for task in (t, s):
        check_remap(task)
        assert (task.mean, task.std) == (source.mean, source.std)
    assert s.eval_split == "test"
    # teacher: the official training images of its classes, split into train and a validation part
    # that chooses its epoch (teacher_val_fraction); its test part is every test image of its classes
    assert t.eval_split == "validation"
    assert len(t.train.labels) + len(t.eval.labels) == sum(TRAIN_COUNTS[c] for c in t.classes)
    assert not set(image_keys(t.train)) & set(image_keys(t.eval))
    assert set(image_keys(t.train)) | set(image_keys(t.eval)) == {
        k for k, lab in zip(image_keys(source.train), source.train.labels) if lab in t.classes}
    assert len(t.test.labels) == sum(TEST_COUNTS[c] for c in t.classes)
    assert set(image_keys(t.test)) == {k for k, lab in zip(image_keys(source.test), source.test.labels)
                                        if lab in t.classes}


def test_task_order_follows_the_positions(source):
    c = cfg(target_classes="4,1")
    s = student_task(source, c)
    assert s.classes == [1, 4]  # positions sorted
    check_remap(s)
    assert np.bincount(s.train.labels).tolist() == [TRAIN_COUNTS[1], TRAIN_COUNTS[4]]


def test_task_on_real_digits():
    digits = load_digits()
    c = make_tiny_config(shots=None)
    t, s = teacher_task(digits, c), student_task(digits, c)
    assert t.classes == [0, 1, 2, 3, 4] and s.classes == [5, 6, 7, 8, 9]
    check_remap_digits(t, digits)
    check_remap_digits(s, digits)
    assert len(s.train.labels) == int(np.isin(digits.train.labels, [5, 6, 7, 8, 9]).sum())
    assert t.train.images.shape[1:] == (1, 8, 8) and t.train.images.dtype == np.uint8


def check_remap_digits(task, digits):
    """Every task image, with its label mapped back, is an image of that class in the source."""
    by_key = {}
    for part in (digits.train, digits.test):
        for img, lab in zip(part.images, part.labels):
            by_key.setdefault(img.tobytes(), set()).add(int(lab))
    for part in (task.train, task.eval):
        assert set(np.unique(part.labels)) == set(range(task.n_classes))
        for img, lab in zip(part.images, part.labels):
            assert task.classes[lab] in by_key[img.tobytes()]


# ----------------------------------------------------------------------------- shots

@pytest.mark.parametrize("shots", [1, 5, 9])
def test_shots_per_class(source, shots):
    s = student_task(source, cfg(shots=shots))
    assert np.bincount(s.train.labels, minlength=6).tolist() == [shots] * 6
    check_remap(s)
    assert len(set(image_keys(s.train))) == 6 * shots  # no image twice
    # the evaluation split (test) is not limited
    assert len(s.eval.labels) == sum(TEST_COUNTS)


def test_shots_on_digits_and_deterministic():
    digits = load_digits()
    a = student_task(digits, make_tiny_config(shots=10))
    b = student_task(digits, make_tiny_config(shots=10, seed=123))
    assert np.bincount(a.train.labels).tolist() == [10] * 5
    assert image_keys(a.train) == image_keys(b.train)


def test_more_shots_than_images(source):
    with pytest.raises(UserError) as e:
        student_task(source, cfg(shots=10))  # class 4 has 9 training images
    msg = str(e.value)
    assert "'shots'" in msg and "\n" not in msg and "9" in msg and "of class c4" in msg
    with pytest.raises(UserError) as e:  # named by the data set's class, not the student's label 0
        student_task(load_digits(), make_tiny_config(target_classes="5-9", shots=1000))
    assert "training images of class 5:" in str(e.value)


def test_shots_only_limit_the_student(source):
    c = cfg(shots=3, source_classes="0-2", target_classes="3-5")
    t = teacher_task(source, c)
    assert len(t.train.labels) + len(t.eval.labels) == sum(TRAIN_COUNTS[:3])


# ----------------------------------------------------------------------------- tuning split

@pytest.mark.parametrize("shots", [None, 8])
def test_tuning_split_is_disjoint_stratified_deterministic(source, shots):
    c = cfg(flag_tuning=True, shots=shots, val_fraction=0.25)
    s = student_task(source, c)
    assert s.eval_split == "validation"
    check_remap(s)
    train, val = set(image_keys(s.train)), set(image_keys(s.eval))
    assert not train & val
    assert len(train) == len(s.train.labels) and len(val) == len(s.eval.labels)
    # validation images come from the training part, never the test part
    source_train = set(image_keys(source.train))
    assert val <= source_train and train <= source_train
    counts = TRAIN_COUNTS if shots is None else [shots] * 6
    val_counts = np.bincount(s.eval.labels, minlength=6)
    train_counts = np.bincount(s.train.labels, minlength=6)
    for cls, n in enumerate(counts):
        assert val_counts[cls] + train_counts[cls] == n
        assert val_counts[cls] >= 1
        assert abs(val_counts[cls] - 0.25 * n) <= 1, (cls, val_counts[cls], n)
    # the same on every call and for every run seed
    for other in (student_task(source, c), student_task(source, cfg(flag_tuning=True, shots=shots,
                                                                     val_fraction=0.25, seed=99))):
        assert image_keys(other.train) == image_keys(s.train)
        assert image_keys(other.eval) == image_keys(s.eval)
        np.testing.assert_array_equal(other.eval.labels, s.eval.labels)


def test_validation_outside_the_shots_keeps_the_regime(source):
    """val_per_class: validation images from outside the shots; tuning and final runs
    train on the same shots, and neither part holds a test image."""
    c = cfg(shots=3, val_per_class=4)
    tuning, final = student_task(source, c.replace(flag_tuning=True)), student_task(source, c)
    assert tuning.eval_split == "validation" and final.eval_split == "test"
    assert image_keys(tuning.train) == image_keys(final.train) and len(tuning.train.labels) == 3 * 6
    assert np.bincount(tuning.eval.labels).tolist() == [4] * 6
    assert not set(image_keys(tuning.eval)) & set(image_keys(tuning.train))
    assert set(image_keys(tuning.eval)) <= set(image_keys(source.train))
    # the shots are those without validation part: the same split_seed draws the same shots
    assert image_keys(final.train) == image_keys(student_task(source, cfg(shots=3)).train)
    other = student_task(source, c.replace(flag_tuning=True, split_seed=5))
    assert image_keys(other.eval) != image_keys(tuning.eval)
    # a transfer set never holds a validation image
    with_transfer = student_task(source, c.replace(flag_tuning=True, transfer_set=True))
    assert not set(image_keys(with_transfer.unlabelled)) & set(image_keys(tuning.eval))
    assert not set(image_keys(with_transfer.unlabelled)) & set(image_keys(tuning.train))
    with pytest.raises(UserError, match="val_per_class.*outside its 3 shots"):
        student_task(source, cfg(shots=3, val_per_class=max(TRAIN_COUNTS)))


def test_val_fraction_changes_the_split(source):
    small = student_task(source, cfg(flag_tuning=True, val_fraction=0.1))
    large = student_task(source, cfg(flag_tuning=True, val_fraction=0.5))
    assert len(small.eval.labels) < len(large.eval.labels)
    assert abs(len(large.eval.labels) - 0.5 * sum(TRAIN_COUNTS)) <= 6


@pytest.mark.parametrize("shots", [None, 8])
def test_without_tuning_train_is_train_plus_val(source, shots):
    tuning = student_task(source, cfg(flag_tuning=True, shots=shots))
    final = student_task(source, cfg(flag_tuning=False, shots=shots))
    assert final.eval_split == "test"
    assert sorted(image_keys(final.train)) == sorted(image_keys(tuning.train) + image_keys(tuning.eval))
    # the same labels for the same images
    label_of = dict(zip(image_keys(tuning.train) + image_keys(tuning.eval),
                        np.concatenate([tuning.train.labels, tuning.eval.labels]).tolist()))
    assert all(label_of[k] == lab for k, lab in zip(image_keys(final.train), final.train.labels.tolist()))
    # evaluated on the official test part
    assert set(image_keys(final.eval)) == set(image_keys(source.test))
    check_remap(final)


def test_tuning_split_on_digits():
    digits = load_digits()
    t = student_task(digits, make_tiny_config(flag_tuning=True))  # 10 shots, val_fraction 0.3
    assert np.bincount(t.eval.labels).tolist() == [3] * 5
    assert np.bincount(t.train.labels).tolist() == [7] * 5
    f = student_task(digits, make_tiny_config(flag_tuning=False))
    assert sorted(image_keys(f.train)) == sorted(image_keys(t.train) + image_keys(t.eval))
    assert not set(image_keys(f.eval)) & set(image_keys(f.train))
    assert len(f.eval.labels) == int(np.isin(digits.test.labels, [5, 6, 7, 8, 9]).sum())


def test_split_seed_draws_other_shots_and_another_validation_part():
    digits = load_digits()
    first = student_task(digits, make_tiny_config(flag_tuning=True))  # split_seed 0
    again = student_task(digits, make_tiny_config(flag_tuning=True, seed=7))
    other = student_task(digits, make_tiny_config(flag_tuning=True, split_seed=1))
    assert image_keys(again.train) == image_keys(first.train) and image_keys(again.eval) == image_keys(first.eval)
    assert set(image_keys(other.train)) != set(image_keys(first.train))
    assert set(image_keys(other.eval)) != set(image_keys(first.eval))
    # still 10 shots a class, 3 of them validation; the test split does not move
    assert np.bincount(other.eval.labels).tolist() == [3] * 5 and np.bincount(other.train.labels).tolist() == [7] * 5
    final, final_other = (student_task(digits, make_tiny_config(flag_tuning=False, split_seed=s)) for s in (0, 1))
    assert image_keys(final.eval) == image_keys(final_other.eval)
    assert sorted(image_keys(final_other.train)) == sorted(image_keys(other.train) + image_keys(other.eval))


def test_target_with_no_training_images():
    src = Source(name="digits", train=_imageset([5, 0, 5], 0, 3), test=_imageset([2, 2, 2], 100, 4),
                 class_names=["a", "b", "c"], mean=(0.5,), std=(0.25,))
    with pytest.raises(UserError) as e:
        student_task(src, cfg(target_classes="1"))
    assert "'target_classes'" in str(e.value)


# ----------------------------------------------------------------------------- transfer set

@pytest.mark.parametrize("tuning", [False, True])
def test_transfer_set_is_the_training_images_outside_the_shots(source, tuning):
    s = student_task(source, cfg(shots=8, flag_tuning=tuning, transfer_set=True, target_classes="0-3"))
    labelled = set(image_keys(s.train)) | (set(image_keys(s.eval)) if tuning else set())
    unlabelled = set(image_keys(s.unlabelled))
    pool = {k for k, c in zip(image_keys(source.train), source.train.labels) if c < 4}
    assert not unlabelled & labelled  # never a shot, never a validation image
    assert not unlabelled & set(image_keys(source.test))
    assert unlabelled | labelled == pool and len(s.unlabelled.labels) == len(unlabelled)
    assert np.bincount(s.unlabelled.labels).tolist() == [n - 8 for n in TRAIN_COUNTS[:4]]
    check_remap(s)
    # the shots are those without a transfer set
    plain = student_task(source, cfg(shots=8, flag_tuning=tuning, target_classes="0-3"))
    assert plain.unlabelled is None and image_keys(plain.train) == image_keys(s.train)


def test_a_transfer_set_needs_images_outside_the_shots(source):
    with pytest.raises(UserError, match="'transfer_set': shots = 9 leaves no training images") as e:
        student_task(source, cfg(shots=9, target_classes="4", transfer_set=True))
    assert "\n" not in str(e.value)
