"""Stage-1 results shared by the trials of an experiment.

Stage 1 depends only on the teacher, the student's data split, the student
network and the stage-1 optimisation settings (`STAGE1_KEYS`); a search that
tunes stage-2 settings (tau2, lambd, lr2, ...) would otherwise repeat the same
stage 1 in every trial. `Stage1Cache` keeps one result per key in a folder
(e.g. `<experiment>/stage1_cache`) that every trial process can read: the
snapshot of the last stage-1 epoch (`Epoch.snapshot()`, which
`refilled_epochs(..., resume=snapshot)` continues into stage 2) and the
per-epoch stage-1 metrics, so a trial that reuses the result can still report
them. A file lock (`fcntl.flock` on `<key>.lock`) makes sure one trial computes
a key while the others wait; the kernel releases it if the holder dies.

Typical use in a trial::

    key = stage1_key(cfg, teacher_id)
    entry = cache.lookup(key)
    if entry is None:
        with cache.computing(key):
            entry = cache.lookup(key)  # another trial may have finished it meanwhile
            if entry is None:
                history = []
                for epoch in refilled_epochs(cfg, data, student, teacher, centers):
                    history.append(epoch.metrics)  # (and report it)
                    if epoch.epoch == cfg.n_training_epochs1:
                        cache.store(key, epoch.snapshot(), history)
                        break
                entry = cache.lookup(key)
    # replay entry["history"] if it was not computed here, then:
    for epoch in refilled_epochs(cfg, data, student, teacher, centers, resume=entry["snapshot"]):
        ...  # stage 2

`get_or_compute` is that pattern in one call. No Ray import here: trials call it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from refilled.errors import UserError
from refilled.files import checkpoint

# The config keys that decide the result of stage 1 (the teacher is named by
# `teacher_id`). Stage-2 keys (tau2, lambd, lr2, point, gamma, centers,
# n_training_epochs2) are deliberately absent.
# the keys that decide stage 1 (and those that act on it alone): groups of the schema's fields
from refilled.schema.config import STAGE1_KEYS, STAGE1_ONLY, Config, from_dict  # noqa: E402,F401

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def stage1_key(cfg: Config | Mapping[str, Any], teacher_id: str) -> str:
    """A file-name-safe key for the stage-1 result of `cfg` with this teacher.

    `cfg` is a Config or a mapping of config keys (a Ray trial's config); a
    mapping is completed with the defaults and type-coerced first, so 4 and
    4.0 give the same key. `teacher_id` names the teacher, e.g. a digest of
    its checkpoint file.
    """
    if not isinstance(cfg, Config):
        cfg = from_dict(dict(cfg))
    values = cfg.to_dict()
    payload = json.dumps({"teacher": str(teacher_id), **{k: values[k] for k in STAGE1_KEYS}}, sort_keys=True)
    return "stage1-" + hashlib.sha1(payload.encode()).hexdigest()[:20]


class Stage1Cache:
    """One stored stage-1 result per key, in a folder shared by the trials."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, key: str, suffix: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"bad stage-1 cache key {key!r}: use stage1_key()")
        return self.folder / f"{key}{suffix}"

    def lookup(self, key: str) -> dict[str, Any] | None:
        """{"snapshot": ..., "history": [...]} for a stored key, else None.

        An unreadable entry (it cannot be half-written: store() renames a
        complete file into place) is reported with a warning and treated as
        missing, so the caller recomputes and overwrites it.
        """
        path = self._path(key, ".pt")
        if not path.is_file():
            return None
        try:
            entry = checkpoint.load(path, "stage-1 cache entry")
        except UserError as e:
            warnings.warn(f"ignoring stage-1 cache entry: {e}", stacklevel=2)
            return None
        if entry.get("kind") != "stage1" or entry.get("key") != key:
            warnings.warn(f"ignoring {path}: not the stage-1 cache entry for {key}", stacklevel=2)
            return None
        return {"snapshot": entry["snapshot"], "history": entry["history"]}

    @contextmanager
    def computing(self, key: str) -> Iterator[None]:
        """Hold the key's exclusive lock (blocking until it is free).

        Inside it, re-check lookup(): another process may have stored the key
        while this one waited. The lock is an flock on `<key>.lock`, so it works
        between processes (and between open files of one process), and the
        kernel drops it when its holder exits or dies. Lock files are left in
        place (removing them would race with a waiting process).
        """
        path = self._path(key, ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def store(self, key: str, snapshot: dict[str, Any], history: list[dict[str, Any]]) -> Path:
        """Write the entry atomically (temp file + rename); tensors go to the CPU."""
        entry = {"kind": "stage1", "key": key, "snapshot": _to_cpu(snapshot),
                 "history": [dict(h) for h in history]}
        return checkpoint.save(entry, self._path(key, ".pt"))

    def get_or_compute(self, key: str, compute: Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]]
                       ) -> tuple[dict[str, Any], bool]:
        """(entry, computed_here): the stored entry, computing and storing it
        under the lock first if nobody has. `compute()` returns (snapshot, history)."""
        entry = self.lookup(key)
        if entry is not None:
            return entry, False
        with self.computing(key):
            entry = self.lookup(key)
            if entry is not None:
                return entry, False
            snapshot, history = compute()
            self.store(key, snapshot, history)
        entry = self.lookup(key)
        if entry is None:  # only if the file vanished or is unreadable right after the write
            raise RuntimeError(f"stage-1 cache entry {key} could not be read back from {self.folder}")
        return entry, True


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
