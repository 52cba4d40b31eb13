"""Driver-side Tune callbacks: trial records, checkpoint pruning, the lease, the progress line.

They learn what they need from Tune's public callback hooks and keep their own
state through `get_state`/`set_state`, which Tune calls when it saves its
experiment state (every 10 s or more) and when `--resume` restores it. Ray's
own state files are never read. Tune pickles them into the experiment's state:
they keep no location of the experiment, which they learn from
refilled.tune.current (a copied or moved experiment is resumed in its new place).
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from pathlib import Path

import pyarrow.fs
from ray.tune import Callback
from ray.tune.experiment import Trial

from refilled.store import storage, trial_records
from refilled.store.layout import STAGE1_SEARCH
from refilled.tune import current

log = logging.getLogger(__name__)


def checkpoints_to_delete(known: list[str], keep: int, spared: set[str]) -> list[str]:
    """Of a trial's checkpoints (oldest first), all but the newest `keep` and the spared ones."""
    kept = set(known[-keep:]) | spared
    return [c for c in known if c not in kept]


class TrialRecords(Callback):
    """Write each trial's record (refilled.store.trial_records) into its folder as it changes.

    The record goes into the trial's folder on the driver (`trial.local_path`),
    which Tune copies to the experiment's storage with its logs and its state.
    At each state save the record also notes what Tune saved (`at_last_save`):
    where a resume would continue the trial from."""

    def __init__(self):
        self._records: dict[str, dict] = {}  # trial id -> record
        self._folders: dict[str, str] = {}  # trial id -> its folder on this driver (not saved: a new driver has others)

    def __getstate__(self):  # pickled into Tune's tuner.pkl: a resumed driver starts without folders
        return {**self.__dict__, "_folders": {}}

    def _write(self, trial: Trial) -> None:
        if trial.local_path:
            self._folders[trial.trial_id] = trial.local_path
            trial_records.write(trial.local_path, self._records[trial.trial_id])

    def _record(self, trial: Trial, trials: list[Trial]) -> dict:
        if trial.trial_id not in self._records:
            # Tune's trial list is in creation order: number the trials it holds that have no number yet
            for t in [*trials, trial]:
                if t.trial_id not in self._records:
                    self._records[t.trial_id] = {"trial_id": t.trial_id, "number": len(self._records) + 1,
                                                 "status": "pending", "retries": 0}
        return self._records[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._record(trial, trials).update(status="running", reason=None, stopped_at=None)
        self._write(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # written when the node changes (a start, a retry elsewhere); the step goes out with the
        # next write (a checkpoint, the end): an fsync'd write every epoch was a
        # large part of the driver's time per result at cluster scale (benchmarks/README.md, "Scale")
        record = self._record(trial, trials)
        moved = (record.get("node"), record.get("node_id")) != (result.get("node_ip"), result.get("node_id"))
        record.update(step=result.get("step"), total_steps=result.get("total_steps"),
                      node=result.get("node_ip"), node_id=result.get("node_id"))
        if moved:
            self._write(trial)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        # written with Tune's next state save (get_state) or the trial's end, not at each checkpoint:
        # a resume reads at_last_save, which is what that save holds
        self._record(trial, trials)["checkpoint"] = Path(checkpoint.path).name

    def on_trial_recover(self, iteration, trials, trial, **info):
        record = self._record(trial, trials)
        record.update(retries=record.get("retries", 0) + 1, status="running",
                      reason="crashed, retried from its last checkpoint")
        self._write(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        record = self._record(trial, trials)
        last = trial.last_result or {}
        if "step" in last:
            record.update(step=last.get("step"), total_steps=last.get("total_steps"))
        status = trial_records.ending(last)
        reasons = {"finished": "ran every step",
                   "diverged": last.get("diverged_reason") or "diverged",
                   "stopped": f"stopped by ASHA at step {last.get('step')}"}
        record.update(status=status, reason=reasons[status],
                      stopped_at=last.get("step") if status == "stopped" else None)
        self._write(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        record = self._record(trial, trials)
        record.update(status="errored", reason="raised an error after its retries (error.txt in its folder)")
        self._write(trial)

    def get_state(self) -> dict:
        # Tune has just written its experiment state, and uploads it with these records
        for trial_id, record in self._records.items():
            saved = {"status": record.get("status"), "checkpoint": record.get("checkpoint")}
            if record.get("at_last_save") != saved:
                record["at_last_save"] = saved
                if trial_id in self._folders:
                    trial_records.write(self._folders[trial_id], record)
        return {"records": copy.deepcopy(self._records)}

    def set_state(self, state: dict) -> None:
        self._records = copy.deepcopy(state.get("records", {}))


class KeepLastCheckpoints(Callback):
    """Delete each trial's checkpoints but the newest `keep` and the ones a --resume needs.

    Ray's CheckpointConfig(num_to_keep) deletes an old checkpoint as soon as a newer
    one arrives, while the experiment state Tune uploads a moment later may still
    name it: a driver killed in between leaves a state `--resume` cannot restore.
    Here Ray keeps every checkpoint, and this callback deletes the old ones itself,
    sparing the newest checkpoint of each trial at each of the last two state saves
    (Tune uploads a state after saving it; the one before covers an upload still in
    flight when the driver dies). At the end, after Tune's last state save has been
    uploaded, only the newest `keep` of each trial stay. Checkpoints are known by their
    paths inside the experiment (or its part `sub`), wherever it is now."""

    SAVES = 2  # state saves whose checkpoints are spared

    def __init__(self, keep: int, sub: str = ""):
        self.keep, self.sub = keep, sub
        self._checkpoints: dict[str, list[str]] = {}  # trial id -> checkpoint paths in the experiment, oldest first
        self._saved: list[dict[str, str]] = []  # trial id -> its newest checkpoint, at the last SAVES saves
        self._ended_since_save = False
        self._prune_all = False

    def __getstate__(self):  # pickled into Tune's tuner.pkl: the storage connection is opened anew
        return {k: v for k, v in self.__dict__.items() if k != "_fs"}

    def __setstate__(self, state):
        location = state.pop("location", None)  # an earlier version's: where the experiment was then
        if "sub" not in state:
            state["sub"] = STAGE1_SEARCH if location and location.rstrip("/").endswith("/" + STAGE1_SEARCH) else ""
        self.__dict__.update(state)

    def _filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        if getattr(self, "_fs", None) is None:
            self._fs = storage.filesystem_of(current.place(self.sub).location)
        return self._fs

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        _, root = self._filesystem()
        path = Path(checkpoint.path).as_posix()
        if not path.startswith(root.rstrip("/") + "/"):
            return  # not under this experiment (moved?): never ours to delete
        known = self._checkpoints.setdefault(trial.trial_id, [])
        relative = path[len(root.rstrip("/")) + 1:]
        if relative in known:  # a resumed trial writes a folder name again: it is the newest now
            known.remove(relative)
        known.append(relative)
        self._prune([trial.trial_id], self._saved)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended_since_save = True

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended_since_save = True

    def get_state(self) -> dict:
        self._saved = (self._saved + [{t: c[-1] for t, c in self._checkpoints.items() if c}])[-self.SAVES:]
        self._ended_since_save = False
        self._prune_all = True  # what the save before last spared may go now
        return {"checkpoints": copy.deepcopy(self._checkpoints), "saved": copy.deepcopy(self._saved)}

    def set_state(self, state: dict) -> None:
        self._checkpoints = copy.deepcopy(state.get("checkpoints", {}))
        self._saved = copy.deepcopy(state.get("saved", []))

    def on_step_end(self, iteration, trials, **info):
        if self._prune_all:
            self._prune_all = False
            self._prune(list(self._checkpoints), self._saved)

    def on_experiment_end(self, trials, **info):
        # Tune saves and uploads its state one last time (waiting for the upload) before this
        # hook; if every trial had ended by then, that state resumes nothing from an older checkpoint
        ended = all(t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials)
        spared = self._saved[-1:] if ended and not self._ended_since_save else self._saved
        self._prune(list(self._checkpoints), spared)

    def _prune(self, trial_ids: list[str], spared: list[dict[str, str]]) -> None:
        fs, root = self._filesystem()
        for trial_id in trial_ids:
            known = self._checkpoints.get(trial_id, [])
            for relative in checkpoints_to_delete(known, self.keep, {s[trial_id] for s in spared if trial_id in s}):
                try:
                    fs.delete_dir(f"{root.rstrip('/')}/{relative}")
                except FileNotFoundError:
                    pass
                except OSError as error:  # disk space is not worth a failed search
                    log.warning("deleting the old checkpoint %s failed: %s", relative, error)
                    continue
                known.remove(relative)


class LeaseGuard(Callback):
    """Ends Tune's loop at its next step once this driver's lease of the experiment is lost
    (refilled.store.lease sets `lost` from its heartbeat thread): `fit()` raises, the driver
    returns Outcome.LEASE_LOST and writes nothing more.

    The lease is this process's (`watch`), not the callback's: Tune pickles its callbacks
    into the experiment's state and a resumed search runs the unpickled ones, which must
    watch the lease the resuming driver holds. One driver process runs one search at a time."""

    _lease = None

    @classmethod
    def watch(cls, lease) -> None:
        cls._lease = lease

    def on_step_begin(self, iteration, trials, **info):
        lease = LeaseGuard._lease
        if lease is not None and lease.lost.is_set():
            from refilled.tune.search import LeaseLost

            raise LeaseLost(lease.location)


class Progress(Callback):
    """A line every `every_s` seconds while trials run: how many ended of `total`, how many
    run and wait, and the best `metric` a trial has reported. It stands for Tune's own status
    table, which Tune rebuilds (with a string of the cluster's resources) at every step of its
    loop, printed or not."""

    def __init__(self, total: int, metric: str, every_s: float = 30.0):
        self.total, self.metric, self.every_s = total, metric, every_s
        self.best: tuple[float, str] | None = None  # the best value reported, and by which trial
        self._shown = time.monotonic()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_shown"}

    def __setstate__(self, state):
        self.__dict__.update(state, _shown=time.monotonic())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if isinstance(value, float) and (self.best is None or value > self.best[0]):
            self.best = (value, trial.trial_id)

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._shown >= self.every_s:
            self._shown = time.monotonic()
            print(progress_line(trials, self.total, self.metric, self.best), flush=True)


def progress_line(trials: list[Trial], total: int, metric: str, best: tuple[float, str] | None) -> str:
    counts = Counter(t.status for t in trials)
    errored = f", {counts[Trial.ERROR]} errored" if counts[Trial.ERROR] else ""
    shown = f"; best {metric} so far {best[0]:.4f} ({best[1]})" if best else ""
    return (f"trials: {counts[Trial.TERMINATED] + counts[Trial.ERROR]} of {total} ended{errored}, "
            f"{counts[Trial.RUNNING]} running, {counts[Trial.PENDING] + counts[Trial.PAUSED]} waiting{shown}")
