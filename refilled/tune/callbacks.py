"""Driver-side Tune callbacks."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.fs
from ray.tune import Callback

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

