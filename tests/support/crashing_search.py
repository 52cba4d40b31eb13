"""A search whose trials each crash once, at one step: how the tests show that a retried
trial resumes from its checkpoint. Run as a script (the crash is the tests', not the
product's: the trials are REFILLED's, through the TrialKind seam):

    python tests/support/crashing_search.py STEP MARKERS CONFIG STORAGE TEACHER

Each trial raises once when it is about to report step STEP (after computing it); the file
MARKERS/<trial id> makes it once: a retry may run in another worker process. This script
is `__main__`, so Ray pickles the trial function below by value: the workers need not
import it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from refilled.schema.config import load_experiment
from refilled.tune.search import open_search
from refilled.tune.trainable import refilled_trial
from refilled.tune.trial_inputs import MethodTrials

AT_ENV, MARKERS_ENV = "CRASHING_SEARCH_AT_STEP", "CRASHING_SEARCH_MARKERS"  # the workers inherit the driver's


def crashing_trial(params, **bound):
    """refilled_trial, with Tune's report raising once per trial at the step AT_ENV names."""
    from ray import tune

    report, at, markers = tune.report, int(os.environ[AT_ENV]), Path(os.environ[MARKERS_ENV])

    def crash_once(metrics, *args, **kwargs):
        marker = markers / tune.get_context().get_trial_id()
        if metrics.get("step") == at and not marker.exists():
            marker.touch()
            raise RuntimeError(f"injected crash at step {at}")
        return report(metrics, *args, **kwargs)

    tune.report = crash_once
    try:
        refilled_trial(params, **bound)
    finally:
        tune.report = report


class CrashingTrials(MethodTrials):
    trial = staticmethod(crashing_trial)


if __name__ == "__main__":
    step, markers, config, storage, teacher = sys.argv[1:6]
    os.environ.update({AT_ENV: step, MARKERS_ENV: markers})
    cfg, experiment = load_experiment(config)
    search = open_search(storage, Path(config).stem, cfg, dict(experiment.get("search") or {}), CrashingTrials())
    sys.exit(search.run(None, teacher).value)
