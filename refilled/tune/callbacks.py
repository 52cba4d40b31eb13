"""Driver-side Tune callbacks."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pyarrow.fs
from ray.tune import Callback

from refilled.experiments import STATE_PREFIX, ray_state_trials

log = logging.getLogger(__name__)

# The files Ray's JSON, CSV and TensorBoard loggers append to on the driver.
LOG_FILES = ("result.json", "progress.csv", "events.out.tfevents.*")


class KeepLogsOfRetriedTrials(Callback):
    """Put a restarting trial's complete log files into storage before Ray's
    loggers read them back from there.

    Ray's loggers append to a staging copy on the driver that a background sync
    copies to the experiment's storage now and then. When a crashed trial
    restarts, the loggers start again from the storage copy, which may be behind
    the staging copy or half-written by a sync in flight: the results reported
    just before the crash went missing from result.json (a gap before the
    checkpoint the trial resumes from). Tune runs user callbacks before its
    loggers, so on a restart this waits for the sync and uploads the staging copy
    first. A first start (no staging files) or a resumed experiment (staging
    gone with the old driver) has nothing to upload."""

    def on_trial_start(self, iteration, trials, trial, **info):
        if not getattr(trial.storage, "trial_dir_name", None):
            return
        files = [f for pattern in LOG_FILES for f in Path(trial.local_path).glob(pattern)]
        if not files:
            return
        try:
            trial.storage.syncer.wait()  # the experiment's syncer (trials share it)
        except Exception as error:  # a failed sync is Ray's to report; ours still runs
            log.warning("waiting for the experiment sync failed: %s", error)
        fs = trial.storage.storage_filesystem
        fs.create_dir(trial.storage.trial_fs_path, recursive=True)
        for file in files:
            pyarrow.fs.copy_files(str(file), f"{trial.storage.trial_fs_path}/{file.name}", destination_filesystem=fs)



CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")


def checkpoints_to_delete(names: list[str], keep: int, protected: set[str]) -> list[str]:
    """All checkpoint folders but the newest `keep` and the `protected` ones."""
    ordered = sorted((n for n in names if CHECKPOINT_DIR.match(n)), key=lambda n: int(CHECKPOINT_DIR.match(n)[1]))
    kept = set(ordered[-keep:]) | protected
    return [n for n in ordered if n not in kept]


def resumable_checkpoints(fs: pyarrow.fs.FileSystem, experiment: str) -> dict[str, str]:
    """{trial folder: checkpoint folder} that Ray's last saved experiment state would
    resume each trial from (the newest checkpoint its checkpoint manager knew)."""
    selector = pyarrow.fs.FileSelector(experiment, allow_not_found=True)
    states = sorted(i.path for i in fs.get_file_info(selector) if i.base_name.startswith(STATE_PREFIX))
    if not states:
        return {}
    with fs.open_input_stream(states[-1]) as f:
        trials = ray_state_trials(f.read().decode())
    out = {}
    for trial, metadata in trials:
        # the manager is cloudpickled (hex); the paths it holds are plain bytes inside
        found = re.findall(r"checkpoint_(\d{6})", str(metadata) + bytes.fromhex(_hex_of(metadata)).decode("latin-1"))
        if found and trial.get("relative_logdir"):
            out[trial["relative_logdir"]] = f"checkpoint_{max(found, key=int)}"
    return out


def _hex_of(metadata) -> str:
    metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
    manager = (metadata or {}).get("checkpoint_manager") or {}
    value = manager.get("value", "") if isinstance(manager, dict) else ""
    return value if re.fullmatch(r"[0-9a-f]*", value) and len(value) % 2 == 0 else ""


def prune_checkpoints(fs: pyarrow.fs.FileSystem, experiment: str, trial_dirs: list[str], keep: int) -> None:
    """Delete the trials' checkpoints but the newest `keep` and the one a resume would use."""
    protected = resumable_checkpoints(fs, experiment)
    for trial_dir in trial_dirs:
        selector = pyarrow.fs.FileSelector(f"{experiment}/{trial_dir}", allow_not_found=True)
        names = [i.base_name for i in fs.get_file_info(selector) if i.type == pyarrow.fs.FileType.Directory]
        keep_also = {protected[trial_dir]} if trial_dir in protected else set()
        for name in checkpoints_to_delete(names, keep, keep_also):
            fs.delete_dir(f"{experiment}/{trial_dir}/{name}")


class KeepLastCheckpoints(Callback):
    """Ray's own CheckpointConfig(num_to_keep) deletes a trial's old checkpoint as soon
    as a newer one arrives, while the experiment state it saves a moment later (in
    the background) still names it: a driver killed in between leaves a state that
    `--resume` cannot restore ("checkpoint does not exist"), and the trial errors.
    Here Ray keeps every checkpoint, and this callback deletes the old ones of
    running trials every 30 s, of a trial when it ends, and of all at the end,
    sparing the one Ray's last *saved* state would resume from."""

    def __init__(self, keep: int, every_s: float = 30.0):
        self.keep, self.every_s, self._last = keep, every_s, 0.0

    def __getstate__(self):  # saved with Tune's state; a resumed driver's clock starts anew
        return {**self.__dict__, "_last": 0.0}

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.every_s:  # few listings: storage may be an object store
            self._last = time.monotonic()
            self._prune([t for t in trials if t.status == "RUNNING"])  # ended ones were pruned as they ended

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._prune([trial])

    def on_trial_error(self, iteration, trials, trial, **info):
        self._prune([trial])

    def on_experiment_end(self, trials, **info):
        self._prune(trials)

    def _prune(self, trials) -> None:
        trials = [t for t in trials if getattr(t.storage, "trial_dir_name", None)]
        if not trials:
            return
        storage = trials[0].storage
        try:
            prune_checkpoints(storage.storage_filesystem, storage.experiment_fs_path,
                              [t.storage.trial_dir_name for t in trials], self.keep)
        except (OSError, ValueError) as error:  # disk space is not worth a failed search
            log.warning("pruning old checkpoints failed: %s", error)
