"""Class selection, middle-shot limits and tuning splits.

From a data set (`Source`) to the two tasks a REFILLED run needs:
- the teacher's (source) task: its classes, the official training part;
- the student's (target) task: its classes, at most `shots` labelled images a
  class, and an evaluation split. With `flag_tuning` on, a stratified
  validation part is carved from the student's training images and is the
  evaluation split; off, the student trains on all of them (train +
  validation) and is evaluated on the official test part.

Every split is deterministic: it depends on the config's `split_seed`, never
on the run's `seed`, so all trials and retrain seeds of an experiment see the
same images. Another `split_seed` draws other shots and another validation
part, which shows how much a result owes to the particular images.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from refilled.data.sources import ImageSet, Source
from refilled.errors import UserError


@dataclass
class Task:
    """One classification task, labels remapped to 0..n_classes-1."""

    name: str  # "teacher" or "student"
    classes: list[int]  # the data set's class ids, in task-label order
    train: ImageSet
    eval: ImageSet
    eval_split: str  # "validation" or "test"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    unlabelled: ImageSet | None = None  # transfer set: images of the classes outside the shots
    test: ImageSet | None = None  # the teacher's: its test part, read once for the report

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@lru_cache(maxsize=None)
def cifar_fs_order() -> tuple[int, ...]:
    """CIFAR-100 fine labels in the CIFAR-FS order of the authors' cross-task code."""
    text = resources.files("refilled.data").joinpath("cifar100_crosstask_order.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return tuple(int(r[1]) for r in rows)


def class_order(source: Source, order: str) -> list[int]:
    n = len(source.class_names)
    if order == "cifar_fs":
        return list(cifar_fs_order())
    return list(range(n))


def parse_positions(spec: str, n: int, key: str) -> list[int]:
    """'all', '0-49', '0,3,7-9' -> sorted unique positions in [0, n)."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(n))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, dash, hi = part.strip().partition("-")
            a, b = int(lo), int(hi) if dash else int(lo)  # "1-" is an error, not "1"
            if b < a:
                raise ValueError
            out.update(range(a, b + 1))
    except ValueError:
        raise UserError(f"config key '{key}' must look like 'all', '0-49' or '0,3,7-9', got {spec!r}") from None
    if not out:
        raise UserError(f"config key '{key}' selects no class")
    if max(out) >= n:
        raise UserError(f"config key '{key}' = {spec!r} is out of range: this data set has classes 0-{n - 1}")
    return sorted(out)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): `fraction` of each class held out, at least one
    image a class when the class has two or more."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1), len(idx) - 1) if len(idx) > 1 else 0
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def limit_shots(labels: np.ndarray, shots: int, seed, names: list[str] | None = None) -> np.ndarray:
    """Indices of `shots` images of each class, chosen at random once. `names`
    (the data set's class names, by task label) make the error name the class."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            name = names[c] if names is not None else c
            raise UserError(f"config key 'shots' = {shots} is more than the {len(idx)} training images "
                            f"of class {name}: lower shots")
        chosen.append(rng.permutation(idx)[:shots])
    return np.sort(np.concatenate(chosen))


def _subset(s: ImageSet, classes: list[int], idx: np.ndarray | None = None) -> ImageSet:
    """Images of `classes` (optionally a subset `idx` of s), labels remapped."""
    remap = np.full(max(int(s.labels.max()) + 1, max(classes) + 1), -1, dtype=np.int64)
    remap[classes] = np.arange(len(classes))
    if idx is None:
        idx = np.flatnonzero(remap[s.labels] >= 0)
    return ImageSet(np.ascontiguousarray(s.images[idx]), remap[s.labels[idx]])


def task_classes(source: Source, cfg, key: str) -> list[int]:
    """The data set's class ids that `key` ('source_classes' or 'target_classes') selects:
    positions in the class order, or a list of class names (in the order given)."""
    order = class_order(source, cfg.class_order)
    spec = getattr(cfg, key)
    if isinstance(spec, list):
        return class_ids(source.class_names, spec, key)
    return [order[p] for p in parse_positions(spec, len(order), key)]


def class_ids(names: list[str], wanted: list[str], key: str) -> list[int]:
    """The ids of the classes named `wanted`; a name the data set lacks is refused with the closest ones."""
    index = {name: i for i, name in enumerate(names)}
    for name in wanted:
        if name not in index:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"its classes are {', '.join(names[:8])}" + (
                ", ..." if len(names) > 8 else "")
            raise UserError(f"config key '{key}' names class {name!r}, which this data set does not have: {hint}")
    if len(set(wanted)) != len(wanted):
        raise UserError(f"config key '{key}' names a class twice: {wanted}")
    return [index[name] for name in wanted]


def teacher_task(source: Source, cfg) -> Task:
    """The teacher's task: the source classes' official training part less a stratified
    validation part (`teacher_val_fraction`, drawn by `split_seed`) that chooses the
    epoch kept, and their test part, read once to report the kept epoch's accuracy.
    (The authors' pretrain.py trains on the whole training part and keeps the epoch
    best on the test part.)"""
    classes = task_classes(source, cfg, "source_classes")
    pool = _subset(source.train, classes)
    keep, held = stratified_split(pool.labels, cfg.teacher_val_fraction, cfg.split_seed)
    everything = list(range(len(classes)))
    return Task("teacher", classes, _subset(pool, everything, keep), _subset(pool, everything, held),
                "validation", source.mean, source.std, test=_subset(source.test, classes))


def student_task(source: Source, cfg) -> Task:
    """The student's task, with shots and the flag_tuning split applied.

    With `val_per_class` (and shots) the validation part is that many other
    training images a class, outside the shots, and both the tuning run and the
    final run train on the same shots: the regime that is tuned is the one that
    is tested. Without it the validation part is carved from the shots
    (`val_fraction`), and the final run trains on all of them."""
    classes = task_classes(source, cfg, "target_classes")
    pool = _subset(source.train, classes)
    if len(pool.labels) == 0:
        raise UserError("config key 'target_classes' selects classes with no training images")
    everything = list(range(len(classes)))
    unlabelled = validation = None
    if cfg.shots is not None:
        names = [source.class_names[c] for c in classes]
        shots = limit_shots(pool.labels, cfg.shots, cfg.split_seed, names)
        rest = np.setdiff1d(np.arange(len(pool.labels)), shots)
        if cfg.val_per_class is not None:
            try:  # another stream than the shots': the same split_seed draws both
                held = rest[limit_shots(pool.labels[rest], cfg.val_per_class, (cfg.split_seed, 1), names)]
            except UserError:
                raise UserError(f"config key 'val_per_class' = {cfg.val_per_class} is more than the training "
                                f"images some class has outside its {cfg.shots} shots: lower val_per_class or "
                                "shots") from None
            validation = _subset(pool, everything, held)
            rest = np.setdiff1d(rest, held)
        if cfg.transfer_set:  # never a validation image
            if len(rest) == 0:
                raise UserError(f"config key 'transfer_set': shots = {cfg.shots} leaves no training images "
                                "outside the shots; lower shots or set transfer_set false")
            unlabelled = _subset(pool, everything, rest)
        pool = _subset(pool, everything, shots)
    if not cfg.flag_tuning:
        return Task("student", classes, pool, _subset(source.test, classes), "test", source.mean, source.std,
                    unlabelled)
    if validation is not None:
        return Task("student", classes, pool, validation, "validation", source.mean, source.std, unlabelled)
    keep, held = stratified_split(pool.labels, cfg.val_fraction, cfg.split_seed)
    return Task("student", classes, _subset(pool, everything, keep), _subset(pool, everything, held),
                "validation", source.mean, source.std, unlabelled)
