"""A real Tune run whose one trial crashes once at step 3 and is retried from its
step-2 checkpoint, with the experiment's storage copy of result.json left at step 1
when the trial restarts (what a copy Tune made a while before leaves there). Prints
the steps result.json ends with: with our callback, every step the trial reported.

    python tests/support/retried_trial_logs.py STORAGE [--without-fix]

`--without-fix` runs the same without our callback (to see what it prevents).
"""

import json
import os
import sys
import tempfile
from pathlib import Path

# Tune saves and uploads its state once at the start, then not again during this short run:
# nothing but this script writes the storage copy of result.json until the end
os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "3600"

from ray import tune  # noqa: E402

from refilled.tune import current  # noqa: E402
from refilled.tune.callbacks import KeepLogsOfRetriedTrials  # noqa: E402

STORAGE = Path(sys.argv[1])
WITH_FIX = "--without-fix" not in sys.argv


def trial(config):
    start = 0
    if tune.get_checkpoint():
        with tune.get_checkpoint().as_directory() as folder:
            start = int(Path(folder, "step").read_text())
    for step in range(start + 1, 5):
        crashed = STORAGE / "crashed_once"
        if step == 3 and not crashed.exists():
            crashed.touch()
            raise RuntimeError("injected crash at step 3")
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "step").write_text(str(step))
            tune.report({"step": step}, checkpoint=tune.Checkpoint.from_directory(folder))


class StaleStorageOnRestart(KeepLogsOfRetriedTrials):
    def on_trial_start(self, iteration, trials, trial, **info):
        staged = Path(trial.local_path, "result.json")
        if staged.exists():  # a restart: leave the storage copy at step 1
            Path(trial.path).mkdir(parents=True, exist_ok=True)
            Path(trial.path, "result.json").write_text(staged.read_text().splitlines()[0] + "\n")
            if WITH_FIX:
                super().on_trial_start(iteration, trials, trial, **info)


current.set_location(str(STORAGE / "retried"))  # as SearchRun.run says where its experiment is
grid = tune.Tuner(trial, run_config=tune.RunConfig(
    name="retried", storage_path=str(STORAGE), callbacks=[StaleStorageOnRestart()],
    failure_config=tune.FailureConfig(max_failures=1))).fit()
print("STEPS", [json.loads(line)["step"] for line in Path(grid[0].path, "result.json").read_text().splitlines()])
