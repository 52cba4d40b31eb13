"""The Ray Tune trainable: both REFILLED stages of one trial.

A function trainable in the style of Ray Tune's examples: it restores from
`tune.get_checkpoint()`, runs stage 1 then stage 2 on the tuning splits
(train / validation, never test), and calls `tune.report(metrics,
checkpoint=...)` every epoch. The teacher's weights and its embedding bank are
computed once per experiment by the driver and handed to every trial through
Ray's object store (`tune.with_parameters`), never recomputed in a trial.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune

from refilled.files import checkpoint
from refilled.method.bank import TeacherBank, teacher_embeddings
from refilled.schema.config import Config, from_dict
from refilled.store.cost import Clock, device_units
from refilled.runs.inputs import load_teacher_state, student_data, transfer_teacher
from refilled.runtime import keep_freed_memory, resolve_device
from refilled.store.stage1_cache import Stage1Cache, stage1_key
from refilled.method.train import STAGE2, Diverged, build_student, global_centers, refilled_epochs
from refilled.runs.epoch_log import STAGE_NAMES
from refilled.store.layout import STATE_FILE
from refilled.tune.trial_report import report
from refilled.schema.rungs import CLOCK
from refilled.schema.rungs import clock as rung_clock

# fault injection for tests: each trial crashes once at this step (markers in the folder CRASH_MARKERS_ENV names)
CRASH_ENV = "TUNE_REFILLED_CRASH_ONCE_AT_STEP"
CRASH_MARKERS_ENV = "TUNE_REFILLED_CRASH_MARKERS"


def _report(clock: Clock, metrics: dict[str, Any], snapshot: dict | None = None) -> None:
    report(clock, metrics, None if snapshot is None else lambda folder: checkpoint.save(snapshot, folder / STATE_FILE))


def restored_state(ckpt: tune.Checkpoint | None) -> dict | None:
    """The state a retried or resumed trial continues from. A damaged one is named as it
    is in storage (not as the local copy Ray may have made): the trial's error says it."""
    if ckpt is None:
        return None
    with ckpt.as_directory() as folder:
        return checkpoint.load(Path(folder) / STATE_FILE, "trial checkpoint", shown=f"{ckpt.path}/{STATE_FILE}",
                               remedy="restore it from a backup; this trial cannot resume without it")


def _crash_once_for_tests(step: int) -> None:
    """Raise once per trial at step N when CRASH_ENV=N: how the tests show a retried
    trial resumes from its checkpoint. The marker that makes it once is
    <CRASH_MARKERS_ENV>/<trial id>: a retry may run in another worker process, whose
    trial working directory need not be the first attempt's."""
    at = os.environ.get(CRASH_ENV)
    if not at or int(at) != step:
        return
    marker = Path(os.environ[CRASH_MARKERS_ENV]) / tune.get_context().get_trial_id()
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected crash at step {step} ({CRASH_ENV})")


def refilled_trial(params: dict[str, Any], *, base: dict[str, Any], teacher: dict[str, Any],
                   bank: np.ndarray | None, centers: np.ndarray | None, cache_dir: str | None,
                   stage1: dict | None = None, stage1_only: bool = False, checkpoint_every: int = 1,
                   teacher_id: str = "", rungs: list[int] = (), reduction_factor: float = 3,
                   max_t: int = 0) -> None:
    """One trial. `params` are the searched values; `base` the experiment's config.
    `stage1`: an end-of-stage-1 snapshot to start stage 2 from (phase 2 of a staged
    search: the trial reports stage-2 epochs only, their steps continue stage 1's).
    `stage1_only`: end after stage 1 (phase 1 of a staged search).
    `rungs`, `reduction_factor`, `max_t`: where ASHA compares trials, in the epochs this
    phase counts; each report carries the clock that puts them there (refilled.schema.rungs)."""
    cfg: Config = from_dict(params, from_dict(base))
    cfg = cfg.replace(flag_tuning=True, device="auto")  # searching never sees the test split
    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    keep_freed_memory()
    device = resolve_device("auto")  # CUDA exactly when Ray gave this trial a GPU
    clock = Clock(device.type, device_units(device.type, resources.get("CPU", 1), resources.get("GPU", 0)))
    data = student_data(cfg, device)
    teacher_net = load_teacher_state(teacher, cfg, data)
    lookup = TeacherBank(bank).to(device) if bank is not None else None
    fn = teacher_embeddings(teacher_net, lookup)
    if cfg.centers == "global":  # computed once by the driver; recomputed only if absent
        centers = (torch.tensor(np.array(centers), device=device) if centers is not None
                   else global_centers(teacher_net, lookup, data))
    else:
        centers = None
    student = build_student(cfg, data)
    total = cfg.n_training_epochs1 if stage1_only else cfg.n_training_epochs1 + cfg.n_training_epochs2

    resume = restored_state(tune.get_checkpoint())

    if resume is None and stage1 is not None:
        resume = stage1
    cache = Stage1Cache(cache_dir) if cache_dir and cfg.n_training_epochs1 > 0 else None
    step = 0

    def at_rung(metrics: dict[str, Any]) -> dict[str, Any]:  # ASHA's clock: phase 2 counts stage-2 epochs
        epoch = metrics["stage_epoch"] if stage1 is not None else metrics["step"]
        return {**metrics, CLOCK: rung_clock(epoch, list(rungs), reduction_factor, max_t)}

    # the number the search ranks trials by, reported so TensorBoard's HParams tab shows it too
    best2 = (resume or {}).get("best_val_accuracy_stage2", 0.0)
    try:
        if cache and resume is None:
            resume = _stage1_from_cache(cfg, data, student, fn, centers, cache, stage1_key(cfg, teacher_id),
                                        checkpoint_every, total, clock, at_rung)
        for epoch in refilled_epochs(cfg, data, student, fn, centers, resume, transfer_teacher(data, teacher_net)):
            _crash_once_for_tests(epoch.step)
            step = epoch.step
            metrics = at_rung(_metrics(epoch, total))
            if epoch.stage == STAGE2:
                best2 = metrics["best_val_accuracy_stage2"] = max(best2, metrics["val_accuracy"])
            save = step == total or step % checkpoint_every == 0
            _report(clock, metrics, {**epoch.snapshot(), "best_val_accuracy_stage2": best2} if save else None)
            if step == total:
                break  # stage1_only: stage 2 is not this trial's
    except Diverged as e:  # end this trial, recorded as diverged; the search goes on
        _report(clock, {"diverged": 1, "diverged_reason": str(e), "val_accuracy": 0.0, "step": step + 1,
                        "total_steps": total})


def _metrics(epoch, total: int) -> dict[str, Any]:
    return {"stage": STAGE_NAMES[epoch.stage], "stage_epoch": epoch.epoch, "step": epoch.step,
            "total_steps": total, "diverged": 0, **epoch.metrics}


def _stage1_from_cache(cfg, data, student, fn, centers, cache, key, checkpoint_every, total, clock, at_rung) -> dict:
    """The end-of-stage-1 snapshot: another trial's, replayed epoch by epoch so ASHA
    sees the same reports it would have, or computed here (under the key's lock) and stored."""
    hit = cache.lookup(key)
    if hit is None:
        with cache.computing(key):
            hit = cache.lookup(key)  # another trial may have stored it while we waited
            if hit is None:
                return _run_stage1_and_store(cfg, data, student, fn, centers, cache, key, checkpoint_every, total,
                                             clock, at_rung)
    for record in hit["history"]:  # costs what the replay takes: the clock overwrites the record's cost
        _report(clock, at_rung({**record, "stage1_cache": "hit"}))
    return hit["snapshot"]


def _run_stage1_and_store(cfg, data, student, fn, centers, cache, key, checkpoint_every, total, clock,
                          at_rung) -> dict:
    """Run stage 1 (reporting every epoch as usual), store it for other trials, return its snapshot."""
    history, snapshot = [], None
    for epoch in refilled_epochs(cfg, data, student, fn, centers):
        _crash_once_for_tests(epoch.step)
        metrics = _metrics(epoch, total)
        history.append(metrics)
        snapshot = epoch.snapshot()
        _report(clock, at_rung({**metrics, "stage1_cache": "miss"}), snapshot if epoch.step % checkpoint_every == 0 else None)
        if epoch.epoch == cfg.n_training_epochs1:
            break  # stage 1 is done; stage 2 resumes from the snapshot
    cache.store(key, snapshot, history)
    return snapshot
